"""``stylegan2-torch`` (rosinality-style StyleGAN2) with :class:`~sparsegan.SparseGANWrapper`.

`stylegan2-torch <https://github.com/peterzsyuen/stylegan2-torch>`_ 1.3.0 is the hard case for
any sparsity tool:

* no ``nn.Conv2d``/``nn.Linear`` at all: every layer is an equalized-LR module doing
  ``conv2d(x, self.weight * scale)`` / ``F.linear(x, self.weight * scale)``;
* the modulated convolutions hold **5-D** kernels ``(1, C_out, C_in, k, k)`` that are modulated,
  demodulated and reshaped into grouped ``conv2d`` / ``conv_transpose2d`` weights per call;
* ``upfirdn2d`` is a custom ``autograd.Function`` around a CUDA extension;
* every module sets ``__call__ = lambda self, *a: super(self.__class__, self).__call__(*a)``, so
  anything that swaps a module's class (``torch.nn.utils.parametrize``, dynamic subclasses)
  recurses forever;
* it is grayscale only: G makes 1-channel images, D takes 1 channel.

The wrapper handles it as it is: discovery reaches the kernels through ``torch.export`` (fx
cannot trace ``torch_conv_gradfix``'s ``x.device.type`` branch), and masks are enforced in place
on the parameters, so no class is swapped and nothing recurses. :func:`class_swap_unsafe` lists
the modules a class-swapping tool would break, for tools that need to know.

**Import shim.** The package JIT-compiles two CUDA extensions at import time, which fails on a
machine without a CUDA toolkit. :func:`import_stylegan2_torch` then replaces
``torch.utils.cpp_extension.load`` *during the import only* with a stand-in that returns
pure-PyTorch versions of both ops (:func:`upfirdn2d_native`, :func:`fused_bias_act_native`); on a
machine with CUDA and a toolkit nothing is patched. ``fused_bias_act`` is only reached on CUDA
tensors (the package takes a plain PyTorch path on the CPU); ``upfirdn2d`` is used everywhere.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsegan._utils import module_device

__all__ = [
    "import_stylegan2_torch",
    "upfirdn2d_native",
    "fused_bias_act_native",
    "native_ops_needed",
    "build",
    "latent",
    "class_swap_unsafe",
    "small_channels",
]

logger = logging.getLogger(__name__)


def upfirdn2d_native(x: torch.Tensor, kernel: torch.Tensor, up_x: int, up_y: int, down_x: int, down_y: int,
                     pad_x0: int, pad_x1: int, pad_y0: int, pad_y1: int) -> torch.Tensor:
    """Upsample, pad, FIR-filter and downsample, like the package's CUDA ``upfirdn2d`` op.

    Each channel is upsampled by inserting ``up - 1`` zeros after every sample, padded (negative
    padding crops), convolved with ``kernel`` (a true convolution: the kernel is flipped, as in
    the CUDA op) and subsampled by ``down``.

    Args:
        x: ``(N, C, H, W)`` (the package passes ``(N*C, 1, H, W)``).
        kernel: ``(kh, kw)`` FIR filter.
        up_x: Upsampling factor along x.
        up_y: Upsampling factor along y.
        down_x: Downsampling factor along x.
        down_y: Downsampling factor along y.
        pad_x0: Padding before, along x (may be negative: a crop).
        pad_x1: Padding after, along x.
        pad_y0: Padding before, along y.
        pad_y1: Padding after, along y.

    Returns:
        ``(N, C, out_h, out_w)`` with ``out = (in * up + pad0 + pad1 - k + down) // down``,
        contiguous.
    """
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    out = x.reshape(n * c, 1, h, 1, w, 1)
    out = F.pad(out, [0, up_x - 1, 0, 0, 0, up_y - 1])
    out = out.reshape(n * c, 1, h * up_y, w * up_x)
    out = F.pad(out, [max(pad_x0, 0), max(pad_x1, 0), max(pad_y0, 0), max(pad_y1, 0)])
    out = out[:, :, max(-pad_y0, 0): out.shape[2] - max(-pad_y1, 0),
              max(-pad_x0, 0): out.shape[3] - max(-pad_x1, 0)]
    weight = torch.flip(kernel, [0, 1]).reshape(1, 1, kh, kw).to(out.dtype)
    out = F.conv2d(out, weight)
    out = out[:, :, ::down_y, ::down_x]
    return out.reshape(n, c, out.shape[2], out.shape[3]).contiguous()


def fused_bias_act_native(x: torch.Tensor, bias: torch.Tensor, refer: torch.Tensor, act: int, grad: int,
                          alpha: float, scale: float) -> torch.Tensor:
    """Pure-PyTorch version of the package's CUDA ``fused_bias_act`` (leaky ReLU, ``act=3``).

    ``grad=0``: ``leaky_relu(x + bias) * scale``. ``grad=1``: the gradient of that, given the
    forward output ``refer``: ``(x + bias) * (1 if refer > 0 else alpha) * scale``.

    Raises:
        NotImplementedError: For another activation or derivative order.
    """
    if act != 3 or grad not in (0, 1):
        raise NotImplementedError(f"fused_bias_act act={act} grad={grad}: only the leaky ReLU the package uses "
                                  "(act=3, grad 0 or 1) has a pure-PyTorch version")
    if bias.numel():
        x = x + bias.reshape(1, -1, *([1] * (x.dim() - 2)))
    gate = x if grad == 0 else refer
    return torch.where(gate > 0, x, x * alpha) * scale


def native_ops_needed() -> bool:
    """Whether the CUDA extensions cannot be built here (no CUDA device or no CUDA toolkit)."""
    if not torch.cuda.is_available():
        return True
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME is None


def _fake_load(name: str, *args: Any, **kwargs: Any) -> types.SimpleNamespace:
    """Stand-in for ``torch.utils.cpp_extension.load`` returning the pure-PyTorch ops."""
    logger.info("stylegan2_torch: using the pure-PyTorch version of native op %r", name)
    return types.SimpleNamespace(upfirdn2d=upfirdn2d_native, fused_bias_act=fused_bias_act_native)


def _ensure_distutils() -> None:
    """stylegan2-torch imports ``distutils.util.strtobool``; Python 3.12 dropped distutils."""
    try:
        importlib.import_module("distutils.util")
    except ImportError:
        util = types.ModuleType("distutils.util")

        def strtobool(value: str) -> int:
            value = value.lower()
            if value in ("y", "yes", "t", "true", "on", "1"):
                return 1
            if value in ("n", "no", "f", "false", "off", "0"):
                return 0
            raise ValueError(f"invalid truth value {value!r}")

        util.strtobool = strtobool  # type: ignore[attr-defined]
        package = sys.modules.get("distutils") or types.ModuleType("distutils")
        package.util = util  # type: ignore[attr-defined]
        sys.modules.setdefault("distutils", package)
        sys.modules["distutils.util"] = util


def import_stylegan2_torch(force_native: bool | None = None) -> types.ModuleType:
    """Import ``stylegan2_torch``, with pure-PyTorch native ops where CUDA ones cannot be built.

    Idempotent: returns the already imported package when there is one.

    Args:
        force_native: ``True`` to use the pure-PyTorch ops even where CUDA is available (no JIT
            build); ``False`` never to; ``None`` (default) decides by :func:`native_ops_needed`.

    Returns:
        The ``stylegan2_torch`` package.

    Raises:
        ImportError: If the package (or ``torch-conv-gradfix``) is not installed (the message
            names the install command), or, with ``force_native=False``, if its CUDA extensions
            cannot be built.
    """
    module = sys.modules.get("stylegan2_torch")
    if module is not None:
        return module
    from torch.utils import cpp_extension

    native = native_ops_needed() if force_native is None else force_native
    _ensure_distutils()
    original = cpp_extension.load
    if native:
        cpp_extension.load = _fake_load  # type: ignore[assignment]
    try:
        module = importlib.import_module("stylegan2_torch")
    except ImportError as exc:
        raise ImportError(
            f"could not import stylegan2_torch ({exc}). Install it with: "
            "pip install --no-deps stylegan2-torch==1.3.0 torch-conv-gradfix==0.1.0"
        ) from exc
    except Exception as exc:  # e.g. IndexError from cpp_extension when no CUDA arch can be found
        if native:
            raise
        raise ImportError(
            f"stylegan2_torch could not build its CUDA extensions ({type(exc).__name__}: {exc}); "
            "import it with import_stylegan2_torch(force_native=True) to use the pure-PyTorch ops"
        ) from exc
    finally:
        cpp_extension.load = original  # type: ignore[assignment]
    return module


def small_channels(width: int = 64) -> dict[int, int]:
    """A channel map for small, fast models: ``width`` up to 8x8, then halving per resolution."""
    return {4: width, 8: width, 16: max(width // 2, 1), 32: max(width // 4, 1), 64: max(width // 8, 1),
            128: max(width // 16, 1), 256: max(width // 32, 1), 512: max(width // 64, 1),
            1024: max(width // 128, 1)}


def build(resolution: int = 32, latent_dim: int = 64, *, n_mlp: int = 2,
          channels: Mapping[int, int] | None = None, **kwargs: Any) -> tuple[nn.Module, nn.Module]:
    """Build a stylegan2-torch ``Generator`` and ``Discriminator`` (grayscale) on the CPU.

    Args:
        resolution: Image side (a power of 2, at least 8).
        latent_dim: Size of ``z`` and ``w``.
        n_mlp: Layers of the mapping network.
        channels: Channels per resolution (default :func:`small_channels`; the package's own
            default is ``default_channels``, 512 wide).
        **kwargs: Passed to the generator (``lr_mlp_mult``, ``blur_kernel``).

    Returns:
        ``(G, D)``. ``G([z])`` takes a *list* of latents; ``D(x)`` takes ``(N, 1, H, W)``.
    """
    package = import_stylegan2_torch()
    channel_map = dict(channels) if channels is not None else small_channels()
    G = package.Generator(resolution, latent_dim=latent_dim, n_mlp=n_mlp, channels=channel_map, **kwargs)
    D = package.Discriminator(resolution, channels=channel_map)
    return G, D


def latent(G: nn.Module, *, device: torch.device | str | None = None,
           generator: torch.Generator | None = None) -> Callable[[int], tuple[list[torch.Tensor]]]:
    """A sampler of G's input for the wrapper's ``latent=``: ``n -> ([z],)``.

    stylegan2-torch's ``G.forward(input)`` takes a *sequence* of latents (two for style mixing),
    so the sample is a one-tuple holding a one-element list (a bare list would be read as
    several positional arguments).

    Args:
        G: A stylegan2-torch ``Generator`` (its ``latent_dim`` is read).
        device: Where to put ``z`` (default: G's device at call time).
        generator: Optional ``torch.Generator`` (default: the global RNG).

    Raises:
        TypeError: If ``G`` has no integer ``latent_dim``.
    """
    latent_dim = getattr(G, "latent_dim", None)
    if not isinstance(latent_dim, int):
        raise TypeError(f"{type(G).__name__} has no integer 'latent_dim'; pass a stylegan2_torch Generator")

    def sample(n: int) -> tuple[list[torch.Tensor]]:
        where = module_device(G, device)
        return ([torch.randn(n, latent_dim, generator=generator).to(where)],)

    return sample


def _class_bound_call(cls: type) -> bool:
    """Whether ``cls`` (or a base) defines ``__call__`` through ``super(self.__class__, self)``."""
    for klass in cls.__mro__:
        if klass is nn.Module:
            return False
        call = klass.__dict__.get("__call__")
        code = getattr(call, "__code__", None)
        if code is not None and "__class__" in code.co_names and "super" in code.co_names:
            return True
    return False


def class_swap_unsafe(model: nn.Module) -> list[str]:
    """Names of submodules whose ``__call__`` recurses forever once their class is swapped.

    ``torch.nn.utils.parametrize`` (and anything else that replaces ``module.__class__`` with a
    generated subclass) makes ``super(self.__class__, self).__call__`` resolve to the subclass's
    own ``__call__`` again. sparsegan never swaps classes (masks are enforced in place), but
    other tools combined with it might; check before applying them.

    Args:
        model: Any module.

    Returns:
        Qualified names (``""`` for the root) of the affected modules.
    """
    return [name for name, sub in model.named_modules() if _class_bound_call(type(sub))]
