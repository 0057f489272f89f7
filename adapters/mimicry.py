"""torch-mimicry (SNGAN, SAGAN, cGAN-PD, ...) with :class:`~sparsegan.SparseGANWrapper`.

`torch-mimicry <https://github.com/kwotsin/mimicry>`_ 0.1.16 builds ResNet GANs whose
discriminators use spectral normalisation (legacy ``torch.nn.utils.spectral_norm`` hooks, so the
trained parameter is ``weight_orig``, and mimicry's own ``SNLinear``/``SNEmbedding``). The wrapper
handles all of them unchanged; this module only makes the package importable and builds models::

    from sparsegan.adapters import mimicry
    G, D = mimicry.sngan32(ngf=64, ndf=64)
    optG = torch.optim.Adam(G.parameters(), 2e-4, betas=(0.0, 0.9))
    optD = torch.optim.Adam(D.parameters(), 2e-4, betas=(0.0, 0.9))
    sg = sparsegan.SparseGANWrapper(G, D, optG, optD, strategy=..., latent=mimicry.latent(G))
    mmc.training.Trainer(netD=D, netG=G, optD=optD, optG=optG, ...).train()   # unchanged

**Import shim.** On a torch-2 machine without TensorFlow, ``import torch_mimicry`` fails twice:
``torch._six`` no longer exists, and its metrics subpackage imports TensorFlow (and, when
TensorFlow *is* installed before torch, segfaults on some machines). :func:`import_mimicry`
installs a minimal ``torch._six`` stub and an empty ``torch_mimicry.metrics`` placeholder, each
only when it is missing, then imports the package. The placeholder is marked, so
:func:`import_mimicry` never replaces a real module, and the shim is never applied twice.
Mimicry's Inception metrics (TensorFlow) are therefore unavailable; use
:mod:`sparsegan.metrics` with your own feature extractor instead.

**How mimicry's trainer maps onto the wrapper.** Nothing has to change in mimicry's code:

============================================  =============================================
mimicry                                       what the wrapper does there
============================================  =============================================
``Trainer(netD, netG, optD, optG, ...)``      wrap *before* constructing or calling
                                              ``train()``; the trainer keeps the same module
                                              and optimizer objects
``netD.train_step(...)`` -> ``optD.step()``   D's step post-hook: enforce D's masks, count the
                                              D step, run a due D update (DDST controller)
``netG.train_step(...)`` -> ``optG.step()``   G's step pre-hook (BR probe "before"), post-hook:
                                              enforce masks, BR "after", due G update (DST)
``n_dis`` D steps per G step                  steps are counted per network, so intervals
                                              are in that network's own steps, except DDST's
                                              D decisions: in iterations (G steps)
``amp=True`` (``scaler.step(opt)``)           ``GradScaler.step`` calls ``opt.step()`` when
                                              the gradients are finite, so the hooks run; a
                                              skipped step is not counted
``restore_checkpoint`` / ``load_state_dict``  call ``sg.apply_masks()`` afterwards (or
                                              ``sg.load_state_dict(...)``): mimicry's
                                              ``train_step`` calls ``self.forward`` directly,
                                              which skips the wrapper's forward pre-hook, so
                                              the masks would only come back at the first
                                              ``optimizer.step()``. Save ``sg.state_dict()``
                                              next to the checkpoints to resume the masks
``LRScheduler`` (``lr_decay``)                unaffected (it only changes ``lr``)
============================================  =============================================

**The balance ratio under mimicry's trainer.** ``train_step`` calls ``self.forward(...)`` (and
``generate_images``, which calls ``forward``) instead of the modules, so the forward hooks with
which the default probe (``br_estimator="step"``) records the loop's own G step see no call.
With ``latent=`` and ``real=`` given, that probe falls back to fresh latents (logged, and counted
in ``sg.report()``); without them it skips every sample. For ``DDST`` under mimicry's trainer,
pass ``latent=latent(G)``, ``real=`` (the data loader) and ``br_estimator="fresh"`` explicitly, as
``examples/sngan_mimicry.py`` does.

Conditional models (cGAN-PD, SAGAN) take ``D(x, y)``. The wrapper's discovery gets that from
``d_example_inputs=`` (:func:`d_example` builds one). The fresh probe passes only images to D,
and under mimicry's trainer the default probe has no call to replay, so with a conditional D and
a strategy that needs the balance ratio (``DDST``), write the loop yourself, calling ``G(z, y)``
and ``D(x, y)`` as modules (the default probe then replays them, labels included), or feed the
balance ratio with ``sg.observe(...)``; do not pass ``real=``.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sparsegan._utils import module_device

__all__ = [
    "import_mimicry",
    "sngan32",
    "sagan32",
    "cgan_pd32",
    "build",
    "MODELS",
    "is_conditional",
    "latent",
    "d_example",
]

logger = logging.getLogger(__name__)

_SHIM_MARK = "__sparsegan_shim__"

MODELS: dict[str, tuple[str, str, str, bool]] = {
    # name: (module path, generator class, discriminator class, conditional)
    "sngan32": ("torch_mimicry.nets.sngan", "SNGANGenerator32", "SNGANDiscriminator32", False),
    "sngan48": ("torch_mimicry.nets.sngan", "SNGANGenerator48", "SNGANDiscriminator48", False),
    "sagan32": ("torch_mimicry.nets.sagan", "SAGANGenerator32", "SAGANDiscriminator32", True),
    "cgan_pd32": ("torch_mimicry.nets.cgan_pd", "CGANPDGenerator32", "CGANPDDiscriminator32", True),
    "wgan_gp32": ("torch_mimicry.nets.wgan_gp", "WGANGPGenerator32", "WGANGPDiscriminator32", False),
    "dcgan32": ("torch_mimicry.nets.dcgan", "DCGANGenerator32", "DCGANDiscriminator32", False),
    "ssgan32": ("torch_mimicry.nets.ssgan", "SSGANGenerator32", "SSGANDiscriminator32", False),
}
"""Models :func:`build` knows: ``name -> (module, generator class, discriminator class, conditional)``."""


def _install_shims() -> list[str]:
    """Put the stand-ins mimicry needs into ``sys.modules`` (only those missing); return their names."""
    installed = []
    try:
        importlib.import_module("torch._six")
    except ImportError:
        six = types.ModuleType("torch._six")
        six.PY3 = True  # type: ignore[attr-defined]
        six.string_classes = (str, bytes)  # type: ignore[attr-defined]
        six.inf = float("inf")  # type: ignore[attr-defined]
        six.int_classes = int  # type: ignore[attr-defined]
        setattr(six, _SHIM_MARK, True)
        sys.modules["torch._six"] = six
        torch._six = six  # type: ignore[attr-defined]  # mimicry also reads torch._six.string_classes
        installed.append("torch._six")
    if "torch_mimicry.metrics" not in sys.modules and not _tensorflow_importable():
        metrics = types.ModuleType("torch_mimicry.metrics")
        metrics.__doc__ = ("Placeholder installed by sparsegan.adapters.mimicry: mimicry's metrics need "
                           "TensorFlow, which is not installed. Use sparsegan.metrics instead.")
        setattr(metrics, _SHIM_MARK, True)
        metrics.__path__ = []  # type: ignore[attr-defined]  # a package with no submodules
        sys.modules["torch_mimicry.metrics"] = metrics
        installed.append("torch_mimicry.metrics")
    return installed


def _tensorflow_importable() -> bool:
    """Whether TensorFlow is installed (without importing it: importing it first can crash torch)."""
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


def import_mimicry() -> types.ModuleType:
    """Import ``torch_mimicry``, applying the CPU / torch-2 shims first where needed.

    Safe to call any number of times. Stand-ins are only installed for modules that are missing
    (``torch._six`` on torch 2; ``torch_mimicry.metrics`` when TensorFlow is not installed), and
    a real module is never replaced.

    Returns:
        The ``torch_mimicry`` package.

    Raises:
        ImportError: If torch-mimicry is not installed (the message says how to install it
            without its TensorFlow dependency).
    """
    module = sys.modules.get("torch_mimicry")
    if module is not None:
        return module
    installed = _install_shims()
    try:
        module = importlib.import_module("torch_mimicry")
    except ImportError as exc:
        for name in installed:  # leave no stand-in behind for a package that is not there
            if getattr(sys.modules.get(name), _SHIM_MARK, False):
                del sys.modules[name]
        if getattr(torch, "_six", None) is not None and getattr(torch._six, _SHIM_MARK, False):
            del torch._six  # type: ignore[attr-defined]
        raise ImportError(
            f"could not import torch_mimicry ({exc}). Install it without its TensorFlow dependency: "
            "pip install --no-deps torch-mimicry==0.1.16 tensorboard scikit-image scikit-learn"
        ) from exc
    if installed:
        logger.info("torch_mimicry imported with stand-ins for %s", ", ".join(installed))
    return module


def _classes(name: str) -> tuple[type[nn.Module], type[nn.Module], bool]:
    if name not in MODELS:
        raise ValueError(f"unknown mimicry model {name!r}; choose from {sorted(MODELS)}")
    import_mimicry()
    path, g_cls, d_cls, conditional = MODELS[name]
    module = importlib.import_module(path)
    return getattr(module, g_cls), getattr(module, d_cls), conditional


def build(name: str, *, ngf: int | None = None, ndf: int | None = None, nz: int = 128,
          num_classes: int = 10, **kwargs: Any) -> tuple[nn.Module, nn.Module]:
    """Build a mimicry generator and discriminator pair by name (see :data:`MODELS`).

    Args:
        name: ``"sngan32"``, ``"sagan32"``, ``"cgan_pd32"``, ``"wgan_gp32"``, ...
        ngf: Generator width (mimicry's default when ``None``).
        ndf: Discriminator width (mimicry's default when ``None``).
        nz: Latent size.
        num_classes: Classes of a conditional model (ignored otherwise).
        **kwargs: Passed to both constructors (e.g. ``loss_type="hinge"``).

    Returns:
        ``(G, D)`` on the CPU; move them with ``.to(device)`` as usual.

    Raises:
        ValueError: For an unknown name.
        ImportError: If torch-mimicry is not installed.
    """
    g_cls, d_cls, conditional = _classes(name)
    g_kwargs: dict[str, Any] = dict(kwargs, nz=nz)
    d_kwargs: dict[str, Any] = dict(kwargs)
    if ngf is not None:
        g_kwargs["ngf"] = ngf
    if ndf is not None:
        d_kwargs["ndf"] = ndf
    if conditional:
        g_kwargs["num_classes"] = d_kwargs["num_classes"] = num_classes
    return g_cls(**g_kwargs), d_cls(**d_kwargs)


def sngan32(ngf: int = 64, ndf: int = 64, *, nz: int = 128, **kwargs: Any) -> tuple[nn.Module, nn.Module]:
    """SNGAN for 32x32 images: ResNet G (BatchNorm) and spectrally normalised ResNet D.

    Args:
        ngf: Generator width (mimicry's default is 256; 64 trains fast on a CPU).
        ndf: Discriminator width (mimicry's default is 128).
        nz: Latent size.
        **kwargs: Passed to both constructors (e.g. ``loss_type="ns"``).

    Returns:
        ``(G, D)``.
    """
    return build("sngan32", ngf=ngf, ndf=ndf, nz=nz, **kwargs)


def sagan32(ngf: int = 64, ndf: int = 64, *, nz: int = 128, num_classes: int = 10,
            **kwargs: Any) -> tuple[nn.Module, nn.Module]:
    """SAGAN for 32x32 images: conditional, self-attention and spectral norm in both networks.

    Args:
        ngf: Generator width.
        ndf: Discriminator width.
        nz: Latent size.
        num_classes: Number of classes.
        **kwargs: Passed to both constructors.

    Returns:
        ``(G, D)``; ``G(z, y)`` and ``D(x, y)`` take class labels ``y``.
    """
    return build("sagan32", ngf=ngf, ndf=ndf, nz=nz, num_classes=num_classes, **kwargs)


def cgan_pd32(ngf: int = 64, ndf: int = 64, *, nz: int = 128, num_classes: int = 10,
              **kwargs: Any) -> tuple[nn.Module, nn.Module]:
    """cGAN with projection discriminator for 32x32 images (conditional BatchNorm in G).

    Args:
        ngf: Generator width.
        ndf: Discriminator width.
        nz: Latent size.
        num_classes: Number of classes.
        **kwargs: Passed to both constructors.

    Returns:
        ``(G, D)``; ``G(z, y)`` and ``D(x, y)`` take class labels ``y``. D projects the label
        with mimicry's ``SNEmbedding`` (an embedding table, which is not masked).
    """
    return build("cgan_pd32", ngf=ngf, ndf=ndf, nz=nz, num_classes=num_classes, **kwargs)


def is_conditional(model: nn.Module) -> bool:
    """Whether a mimicry generator or discriminator takes class labels (``num_classes > 0``)."""
    return int(getattr(model, "num_classes", 0) or 0) > 0


def latent(generator: nn.Module, *, device: torch.device | str | None = None,
           generator_rng: torch.Generator | None = None) -> Callable[[int], Any]:
    """A latent sampler for the wrapper's ``latent=`` argument.

    Draws what mimicry's own ``generate_images`` draws: ``z ~ N(0, 1)`` of size ``G.nz``, plus
    uniform class labels for a conditional generator.

    Args:
        generator: A mimicry generator (its ``nz`` and ``num_classes`` are read).
        device: Where to put the samples (default: the generator's device at call time).
        generator_rng: Optional ``torch.Generator``; the global RNG is used otherwise (the
            wrapper's probe seeds it for each sample and restores it afterwards).

    Returns:
        ``n -> z`` for an unconditional generator, ``n -> (z, y)`` for a conditional one.

    Raises:
        TypeError: If ``generator`` has no ``nz`` attribute (not a mimicry generator).
    """
    nz = getattr(generator, "nz", None)
    if not isinstance(nz, int):
        raise TypeError(f"{type(generator).__name__} has no integer 'nz'; pass a torch_mimicry generator, "
                        "or write latent=lambda n: torch.randn(n, <latent size>) yourself")
    num_classes = int(getattr(generator, "num_classes", 0) or 0)

    def sample(n: int) -> Any:
        where = module_device(generator, device)
        z = torch.randn(n, nz, generator=generator_rng).to(where)
        if num_classes > 0:
            y = torch.randint(num_classes, (n,), generator=generator_rng).to(where)
            return z, y
        return z

    return sample


def d_example(generator: nn.Module, n: int = 2) -> tuple[torch.Tensor, ...] | torch.Tensor:
    """An example discriminator input for ``d_example_inputs=``: ``G(z)``, or ``(G(z, y), y)``.

    Only conditional models need it (the wrapper's default D example is G's output alone). The
    generator's buffers (BatchNorm statistics) and the global RNG are left as they were.

    Args:
        generator: A mimicry generator.
        n: Batch size of the example.

    Returns:
        The images for an unconditional model; ``(images, labels)`` for a conditional one.
    """
    from sparsegan._utils import preserved_state

    with preserved_state(generator), torch.no_grad():
        torch.manual_seed(0)
        sample = latent(generator)(n)
        if isinstance(sample, tuple):
            return generator(*sample), sample[1]
        return generator(sample)
