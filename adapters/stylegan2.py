"""lucidrains ``stylegan2-pytorch`` with :class:`~sparsegan.SparseGANWrapper`.

`stylegan2-pytorch <https://github.com/lucidrains/stylegan2-pytorch>`_ 1.9.0 has a modulated
convolution (``Conv2DMod``: ``F.conv2d(x, demod(weight * (style + 1)), groups=batch)``), an
equalized-LR mapping network (``EqualLinear``: ``F.linear(x, weight * lr_mul)``) and a plain
conv discriminator that returns ``(logits, quantize_loss)``. Neither network can be traced by
``torch.fx`` (iteration over a Proxy, starred shape unpacking), so the wrapper's discovery falls
back to ``torch.export``; it finds the modulated kernels and masks the parameters themselves::

    from sparsegan.adapters import stylegan2
    G, D, S = stylegan2.build(image_size=32, latent_dim=64, network_capacity=4)
    G_opt = Adam(list(G.parameters()) + list(S.parameters()), lr=2e-4, betas=(0.5, 0.9))
    D_opt = Adam(D.parameters(), lr=4e-4, betas=(0.5, 0.9))
    sg = sparsegan.SparseGANWrapper(G, D, G_opt, D_opt, strategy=...,
                                    latent=stylegan2.latent(G, S))

**Import shim.** ``stylegan2_pytorch`` asserts ``torch.cuda.is_available()`` at module level and
does ``import aim`` (only its ``Trainer`` logs to aim). :func:`import_stylegan2` makes
``torch.cuda.is_available`` report ``True`` *only for the duration of the import* (restored in a
``finally``), and puts a placeholder ``aim`` module in place only when aim is not installed; the
placeholder is taken out of ``sys.modules`` again after the import, so a later real ``import
aim`` is unaffected. Nothing is patched on a machine with CUDA and aim.

**Never use its ``StyleGAN2`` / ``Trainer`` classes on a CPU**: ``StyleGAN2.__init__`` calls
``self.cuda()`` and the trainer's noise helpers call ``.cuda()``. Build ``Generator``,
``Discriminator`` and ``StyleVectorizer`` directly (:func:`build` does, with the weight
initialisation ``StyleGAN2`` would apply) and write the few lines of the loop yourself (see
``examples/stylegan2_lucidrains.py``).

What the wrapper sees:

* ``G(styles, noise)``: ``styles`` is ``(B, num_layers, latent_dim)`` (the mapped ``w``, one per
  layer), ``noise`` is ``(B, image_size, image_size, 1)``. :func:`latent` draws both, mapping
  ``z`` through the ``StyleVectorizer`` when one is given.
* ``D(x) -> (logits, quantize_loss)``: the balance-ratio probe scores with the first tensor,
  the logits.
* The mapping network ``S`` is a separate module that lucidrains trains with G's optimizer; it
  stays dense when you wrap ``G``. To make it sparse as well, wrap ``MappedGenerator(S, G)``
  (same parameters, one module), whose forward takes ``(z, noise)``.
* lucidrains' hinge loss has D score *real* images low and fakes high; the balance ratio is a
  ratio of score differences, so it is unaffected by that sign convention.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from sparsegan._utils import module_device

__all__ = [
    "import_stylegan2",
    "build",
    "init_weights",
    "latent",
    "MappedGenerator",
    "image_noise",
]

logger = logging.getLogger(__name__)

_SHIM_MARK = "__sparsegan_shim__"
_MODULE = "stylegan2_pytorch.stylegan2_pytorch"


def _aim_placeholder() -> types.ModuleType:
    aim = types.ModuleType("aim")
    aim.__doc__ = "Placeholder installed by sparsegan.adapters.stylegan2 while importing stylegan2_pytorch."

    class Session:  # noqa: D401 - mimics aim.Session's constructor only to fail clearly
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ImportError("aim is not installed; stylegan2_pytorch's Trainer(log=True) needs it "
                              "(pip install aim), or train without log=True")

    aim.Session = Session  # type: ignore[attr-defined]
    setattr(aim, _SHIM_MARK, True)
    return aim


def import_stylegan2() -> types.ModuleType:
    """Import ``stylegan2_pytorch.stylegan2_pytorch`` on any machine (CPU included).

    Idempotent: returns the already imported module when there is one. The CUDA check and the
    ``aim`` placeholder are only in effect during the import (see the module docs).

    Returns:
        The module holding ``Generator``, ``Discriminator``, ``StyleVectorizer``, ...

    Raises:
        ImportError: If stylegan2-pytorch (or one of the packages it needs) is not installed;
            the message names the install command.
    """
    module = sys.modules.get(_MODULE)
    if module is not None:
        return module
    placeholder = None
    if "aim" not in sys.modules and importlib.util.find_spec("aim") is None:
        placeholder = sys.modules["aim"] = _aim_placeholder()
    original = torch.cuda.is_available
    patched = not original()
    if patched:
        torch.cuda.is_available = lambda: True  # type: ignore[assignment]
    try:
        module = importlib.import_module(_MODULE)
    except ImportError as exc:
        raise ImportError(
            f"could not import stylegan2_pytorch ({exc}). Install it without aim and its other heavy "
            "dependencies: pip install --no-deps stylegan2-pytorch==1.9.0 vector-quantize-pytorch==0.1.0 "
            "&& pip install einops kornia fire retry tqdm"
        ) from exc
    finally:
        if patched:
            torch.cuda.is_available = original  # type: ignore[assignment]
        if placeholder is not None and sys.modules.get("aim") is placeholder:
            del sys.modules["aim"]  # the imported module keeps its reference; a later real import is clean
    logger.info("stylegan2_pytorch imported (CUDA check bypassed: %s, aim placeholder: %s)",
                patched, placeholder is not None)
    return module


def init_weights(*modules: nn.Module) -> None:
    """The weight initialisation lucidrains' ``StyleGAN2`` applies (without its ``.cuda()``).

    Kaiming-normal for every plain ``nn.Conv2d``/``nn.Linear``, zeros for the generator blocks'
    noise projections.

    Args:
        *modules: Any of G, D and S.
    """
    for module in modules:
        for m in module.modules():
            if type(m) in {nn.Conv2d, nn.Linear}:
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in", nonlinearity="leaky_relu")
        for block in getattr(module, "blocks", []):
            for name in ("to_noise1", "to_noise2"):
                layer = getattr(block, name, None)
                if isinstance(layer, nn.Linear):
                    nn.init.zeros_(layer.weight)
                    nn.init.zeros_(layer.bias)


def build(image_size: int = 32, latent_dim: int = 64, network_capacity: int = 4, *, style_depth: int = 2,
          lr_mlp: float = 0.1, fmap_max: int = 512, attn_layers: Sequence[int] = (),
          fq_layers: Sequence[int] = (), fq_dict_size: int = 256, transparent: bool = False,
          no_const: bool = False) -> tuple[nn.Module, nn.Module, nn.Module]:
    """Build lucidrains' ``Generator``, ``Discriminator`` and ``StyleVectorizer`` on the CPU.

    The defaults are a small 32x32 configuration (lucidrains' own defaults are
    ``network_capacity=16, latent_dim=512, style_depth=8``).

    Args:
        image_size: Image side (a power of 2).
        latent_dim: Size of ``z`` and ``w``.
        network_capacity: Width multiplier of both networks.
        style_depth: Layers of the mapping network.
        lr_mlp: Learning-rate multiplier of the mapping network (``EqualLinear``).
        fmap_max: Channel cap.
        attn_layers: Layers with linear self-attention (e.g. ``[1]``).
        fq_layers: Discriminator layers with vector quantisation.
        fq_dict_size: Codebook size of those layers.
        transparent: RGBA instead of RGB.
        no_const: Start G from a transposed conv of the mean style instead of a learned constant.

    Returns:
        ``(G, D, S)``, initialised like ``StyleGAN2`` does.

    Raises:
        ValueError: If ``image_size`` is not a power of 2 of at least 8.
    """
    if image_size < 8 or image_size & (image_size - 1):
        raise ValueError(f"image_size must be a power of 2 (>= 8), got {image_size}")
    LS = import_stylegan2()
    S = LS.StyleVectorizer(latent_dim, style_depth, lr_mul=lr_mlp)
    G = LS.Generator(image_size, latent_dim, network_capacity, transparent=transparent,
                     attn_layers=list(attn_layers), no_const=no_const, fmap_max=fmap_max)
    D = LS.Discriminator(image_size, network_capacity, fq_layers=list(fq_layers), fq_dict_size=fq_dict_size,
                         attn_layers=list(attn_layers), transparent=transparent, fmap_max=fmap_max)
    init_weights(S, G, D)
    return G, D, S


def image_noise(n: int, image_size: int, *, device: torch.device | str = "cpu",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """lucidrains' ``image_noise`` without its ``.cuda()``: uniform ``(n, size, size, 1)``."""
    return torch.rand(n, image_size, image_size, 1, generator=generator).to(device)


def latent(G: nn.Module, S: nn.Module | None = None, *, mixed_prob: float = 0.0,
           device: torch.device | str | None = None,
           generator: torch.Generator | None = None) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """A sampler of G's inputs for the wrapper's ``latent=``: ``n -> (styles, noise)``.

    ``z ~ N(0, 1)`` is mapped through ``S`` (when given; without it the raw ``z`` is used as
    ``w``) and repeated over G's layers, as lucidrains' ``noise_list`` / ``latent_to_w`` /
    ``styles_def_to_tensor`` do; with probability ``mixed_prob`` two styles are mixed at a random
    layer (``mixed_list``). The mapping runs under ``torch.no_grad()``: the wrapper only uses the
    sampler for example inputs and the balance-ratio probe, never to train.

    Args:
        G: A lucidrains ``Generator`` (its ``latent_dim``, ``num_layers`` and ``image_size`` are read).
        S: Its ``StyleVectorizer``, or ``None`` for raw styles.
        mixed_prob: Style-mixing probability (lucidrains' default is 0.9; 0 keeps samples simple).
        device: Where to put the samples (default: G's device at call time).
        generator: Optional ``torch.Generator``; otherwise the global RNG (the wrapper's probe
            seeds it per sample and restores it).

    Returns:
        ``n -> (styles, noise)``.

    Raises:
        TypeError: If ``G`` is not a lucidrains ``Generator``.
    """
    for attr in ("latent_dim", "num_layers", "image_size"):
        if not isinstance(getattr(G, attr, None), int):
            raise TypeError(f"{type(G).__name__} has no integer {attr!r}; pass a stylegan2_pytorch Generator")
    latent_dim, num_layers, image_size = G.latent_dim, G.num_layers, G.image_size

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        where = module_device(G, device)
        mix = mixed_prob > 0 and float(torch.rand((), generator=generator)) < mixed_prob
        split = int(torch.randint(1, num_layers, (), generator=generator)) if mix and num_layers > 1 else num_layers
        parts = []
        for layers in (split, num_layers - split):
            if layers == 0:
                continue
            z = torch.randn(n, latent_dim, generator=generator).to(where)
            with torch.no_grad():
                w = S(z) if S is not None else z
            parts.append(w[:, None, :].expand(-1, layers, -1))
        styles = torch.cat(parts, dim=1)
        return styles, image_noise(n, image_size, device=where, generator=generator)

    return sample


class MappedGenerator(nn.Module):
    """The mapping network and the synthesis network as one module: ``(z, noise) -> image``.

    Wrap this instead of ``G`` to make the ``StyleVectorizer``'s ``EqualLinear`` weights sparse
    as well. Parameter names get the prefixes ``S.`` and ``G.``; the parameters are the same
    objects, so an optimizer built from ``G.parameters()`` and ``S.parameters()`` still holds
    them.

    Args:
        S: A lucidrains ``StyleVectorizer``.
        G: A lucidrains ``Generator``.
    """

    def __init__(self, S: nn.Module, G: nn.Module) -> None:
        super().__init__()
        self.S = S
        self.G = G

    def forward(self, z: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Map ``z`` (B, latent_dim) to one style per layer and synthesise images."""
        w = self.S(z)
        styles = w[:, None, :].expand(-1, self.G.num_layers, -1)
        return self.G(styles, noise)

    def latent(self, *, device: torch.device | str | None = None,
               generator: torch.Generator | None = None) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
        """A sampler of this module's inputs: ``n -> (z, noise)``."""

        def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            where = module_device(self, device)
            z = torch.randn(n, self.G.latent_dim, generator=generator).to(where)
            return z, image_noise(n, self.G.image_size, device=where, generator=generator)

        return sample
