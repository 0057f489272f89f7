"""Discriminators built from `timm <https://github.com/huggingface/pytorch-image-models>`_ backbones.

Any timm classifier becomes a GAN discriminator with one logit per image::

    from sparsegan.adapters import timm as timm_adapter
    D = timm_adapter.discriminator("resnet18", img_size=32)
    sg = sparsegan.SparseGANWrapper(G, D, g_opt, d_opt, strategy=..., latent=...)

The wrapper's discovery handles timm's quirks itself (functional weights in ``nfnet``'s
``ScaledStdConv2d`` and ``eva02``'s fused qkv, models whose root fx cannot trace, ``hiera``'s
optional ``mask`` argument); this module only builds the model:

* ``num_classes=1`` gives the single logit; weights are never downloaded unless you pass
  ``pretrained=True`` yourself;
* ``img_size`` is passed to models that take it (vision transformers, MLP-Mixers, ... whose
  position embeddings depend on it) and left out for those that do not (CNNs, which adapt);
* the result is checked with one forward pass at ``(2, in_chans, img_size, img_size)``, so a
  model that cannot be built for, or run at, that size fails here with a ``ValueError`` that
  gives its default size, rather than in the middle of training;
* distilled models (two heads) average their heads in training as in evaluation.

Some models have a floor on ``img_size``. Measured with timm 1.0.31: 32 for ``convnext_atto``,
``coat_lite_tiny``, ``edgenext_xx_small``, ``hiera_tiny_224`` and ``mvitv2_tiny``; 29 for
``densenet121``; 75 for ``inception_v3``; 18 for ``crossvit_tiny_240``; one patch (14 or 16) for
the ViT-style models; most other CNNs run on any size.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from sparsegan._utils import module_device

__all__ = ["TimmDiscriminator", "discriminator", "default_input_size"]

logger = logging.getLogger(__name__)


def _timm() -> Any:
    try:
        import timm
    except ImportError as exc:
        raise ImportError("timm is not installed: pip install timm (or pip install 'sparsegan[adapters]')") from exc
    return timm


def default_input_size(name: str) -> tuple[int, int, int] | None:
    """The input size of a timm model's default pretrained configuration.

    Args:
        name: A timm model name, optionally with a pretrained tag (``"vit_tiny_patch16_224.augreg_in21k"``).

    Returns:
        ``(C, H, W)``, or ``None`` when timm has no configuration for ``name``.
    """
    timm = _timm()
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # an unknown name is reported by create_model, not here
        return None
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    return tuple(size) if size else None  # type: ignore[return-value]


class TimmDiscriminator(nn.Module):
    """A timm model with a single-logit head: ``x (B, C, H, W) -> logits (B, 1)``.

    Args:
        model: A timm model created with ``num_classes=1``.
        img_size: The image side it was checked at.
        in_chans: Its number of input channels.

    Attributes:
        model: The timm model (its parameters are named ``model.<timm name>``).
        img_size: The image side it was checked at.
        in_chans: Its number of input channels.
    """

    def __init__(self, model: nn.Module, img_size: int, in_chans: int) -> None:
        super().__init__()
        self.model = model
        self.img_size = img_size
        self.in_chans = in_chans

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One logit per image.

        Args:
            x: Images ``(B, in_chans, H, W)``.

        Returns:
            Logits ``(B, 1)``.
        """
        out = self.model(x)
        if isinstance(out, (tuple, list)):  # a distilled model still in two-head training mode
            out = sum(out) / len(out)
        return out.reshape(x.shape[0], -1)


def discriminator(name: str, img_size: int = 32, in_chans: int = 3, *, pretrained: bool = False,
                  **kwargs: Any) -> TimmDiscriminator:
    """Build a discriminator from a timm model name.

    Args:
        name: A timm model name (``timm.list_models()``), e.g. ``"resnet18"``, ``"vit_tiny_patch16_224"``.
        img_size: Image side the discriminator will see.
        in_chans: Image channels (1 for grayscale).
        pretrained: Load timm's pretrained weights (downloads them; off by default).
        **kwargs: Passed to ``timm.create_model``: ``drop_path_rate=``, ``patch_size=``, or
            architecture overrides such as ``depth=`` (ViTs) and ``layers=`` (ResNets).

    Returns:
        A :class:`TimmDiscriminator` in training mode.

    Raises:
        ValueError: If timm does not know ``name``, or the model cannot be built for or run at
            ``img_size`` (the message gives its default input size), or its output is not one
            logit per image.
        TypeError: If the model does not accept one of ``kwargs``.
        ImportError: If timm is not installed.
    """
    timm = _timm()
    if not timm.is_model(name):
        raise ValueError(f"timm has no model named {name!r}; see timm.list_models('*pattern*')")
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"img_size must be a positive int, got {img_size!r}")
    base = dict(kwargs, pretrained=pretrained, num_classes=1, in_chans=in_chans)
    try:
        model = timm.create_model(name, img_size=img_size, **base)
        sized = True
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
        model = timm.create_model(name, **base)  # a CNN: its size follows the input
        sized = False
    except (RuntimeError, ValueError, AssertionError, ZeroDivisionError) as exc:
        # e.g. mvitv2 sizes its relative-position tables from img_size and fails below 32
        raise ValueError(f"timm cannot build {name!r} for {img_size}x{img_size} images{_size_hint(name)}: "
                         f"{_first_line(exc)}. Pass a larger img_size=.") from exc
    if hasattr(model, "set_distilled_training"):
        model.set_distilled_training(False)
    d = TimmDiscriminator(model, img_size, in_chans)
    _check_runs(d, name, img_size, in_chans)
    logger.info("timm discriminator %s at %dpx (%s img_size), %.2fM parameters", name, img_size,
                "with" if sized else "without", sum(p.numel() for p in d.parameters()) / 1e6)
    return d


def _size_hint(name: str) -> str:
    default = default_input_size(name)
    return f" (its default input is {default[1]}x{default[2]})" if default else ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _check_runs(d: TimmDiscriminator, name: str, img_size: int, in_chans: int) -> None:
    """Run one eval-mode forward at ``(2, in_chans, img_size, img_size)``; raise a ValueError with the fix."""
    was_training = d.training
    d.eval()
    try:
        with torch.no_grad():
            x = torch.zeros(2, in_chans, img_size, img_size, device=module_device(d))
            out = d(x)
    except Exception as exc:  # re-raised with the fix
        raise ValueError(
            f"timm model {name!r} does not run on {img_size}x{img_size} images{_size_hint(name)}: "
            f"{_first_line(exc)}. Pass a larger img_size= (or a model that adapts to the input size)."
        ) from exc
    finally:
        d.train(was_training)
    if out.shape != (2, 1):
        raise ValueError(f"timm model {name!r} gives {tuple(out.shape[1:])} outputs per image with num_classes=1, "
                         "expected one logit")
