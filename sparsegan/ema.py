"""Exponential moving average (EMA) of a sparse generator.

:class:`SparseEMA` keeps an evaluation copy of a module whose parameters follow
``ema = decay * ema + (1 - decay) * param`` after every :meth:`SparseEMA.update`, and whose
pruned positions follow the module's masks: on a mask change (:meth:`SparseEMA.set_masks`) the EMA
weights at pruned positions are zeroed, then the usual EMA continues, so a regrown weight's
average starts from 0.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from sparsegan._utils import unwrap_model

__all__ = ["SparseEMA"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _leaf_tensor_attributes(module: nn.Module) -> Iterator[None]:
    """Temporarily replace non-leaf tensor attributes of every submodule by detached tensors.

    Legacy :func:`torch.nn.utils.spectral_norm` stores the normalised ``weight`` as a plain
    attribute computed in the forward pass; such a non-leaf tensor makes :func:`copy.deepcopy`
    fail. The original attributes are restored on exit.
    """
    saved: list[tuple[nn.Module, str, torch.Tensor]] = []
    try:
        for sub in module.modules():
            for key, value in list(vars(sub).items()):
                if isinstance(value, torch.Tensor) and not value.is_leaf:
                    saved.append((sub, key, value))
                    vars(sub)[key] = value.detach()
        yield
    finally:
        for sub, key, value in saved:
            vars(sub)[key] = value


def _copy_module(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` in eval mode with gradients off."""
    with _leaf_tensor_attributes(module):
        ema = copy.deepcopy(module)
    ema.eval()
    for param in ema.parameters():
        param.requires_grad_(False)
        param.grad = None
    return ema


class SparseEMA:
    """EMA copy of a module whose pruned positions follow the module's masks.

    The copy (:attr:`module`) is made with :func:`copy.deepcopy` (hooks included, so legacy and
    parametrized spectral norms keep working), put in eval mode, with ``requires_grad=False``.
    On each :meth:`update`, every floating-point parameter moves towards the module's
    (``ema = decay * ema + (1 - decay) * param``), every buffer (BatchNorm running statistics,
    spectral-norm vectors) is copied, and the EMA entries at inactive mask positions are set to 0.

    Parameter names are those of ``module.named_parameters()`` (``"fc.weight"``,
    ``"conv.weight_orig"``, ``"conv.parametrizations.weight.original"``); DDP and
    ``torch.compile`` wrappers are looked through.

    Args:
        module: The module to average (typically the generator).
        decay: The EMA decay, in [0, 1).
        masks: Bool masks keyed by parameter name (``True`` = active); parameters without a mask
            are dense. They may live on any device.

    Attributes:
        module: The EMA copy, for evaluation (e.g. ``ema.module(z)``).
        decay: The EMA decay.
        updates: The number of :meth:`update` calls so far.

    Raises:
        ValueError: If ``decay`` is outside [0, 1) or a mask does not fit a parameter.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999, *, masks: Mapping[str, torch.Tensor] | None = None) -> None:
        self.decay: float = self._checked_decay(decay)
        source = unwrap_model(module)
        self.module: nn.Module = _copy_module(source)
        self.updates: int = 0
        self._names: list[str] = [n for n, _ in self.module.named_parameters()]
        self._params: dict[str, nn.Parameter] = dict(self.module.named_parameters())
        self._canonical: dict[str, str] = self._canonical_names(self.module)
        self._masks: dict[str, torch.Tensor] = {}
        if masks is not None:
            self.set_masks(masks)

    # ------------------------------------------------------------------ updates

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Move the EMA towards ``module``'s current parameters, copy its buffers, apply masks.

        Args:
            module: The averaged module (the same architecture as the one given at construction).

        Raises:
            ValueError: If ``module``'s parameter or buffer names differ from the EMA copy's.
        """
        source = unwrap_model(module)
        src_params = dict(source.named_parameters())
        if list(src_params) != self._names:
            self._mismatch("parameters", list(src_params), self._names)
        ema_float: list[torch.Tensor] = []
        src_float: list[torch.Tensor] = []
        for name in self._names:
            ema, src = self._params[name], src_params[name].detach()
            if src.device != ema.device or src.dtype != ema.dtype:
                src = src.to(device=ema.device, dtype=ema.dtype)
            if ema.is_floating_point():
                ema_float.append(ema)
                src_float.append(src)
            else:
                ema.copy_(src)
        if ema_float:
            torch._foreach_lerp_(ema_float, src_float, 1.0 - self.decay)
        src_buffers = dict(source.named_buffers())
        ema_buffers = dict(self.module.named_buffers())
        if list(src_buffers) != list(ema_buffers):
            self._mismatch("buffers", list(src_buffers), list(ema_buffers))
        for name, buf in ema_buffers.items():
            buf.copy_(src_buffers[name])
        self._apply_masks()
        self.updates += 1

    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Replace the masks and zero the EMA entries at inactive positions.

        Call it whenever the module's masks change. Positions that became inactive are zeroed at
        once; positions that became active start from 0 (they were inactive before) and then
        accumulate through the usual EMA. Parameters absent from ``masks`` become unmasked.

        Args:
            masks: Bool masks keyed by parameter name (or an alias of a tied parameter); any
                device, moved once to the parameter's device. Non-bool masks are read as
                ``mask != 0``.

        Raises:
            ValueError: If a name is not a parameter of the module or a shape differs.
        """
        checked = self._checked_masks(masks)
        self._masks = checked
        with torch.no_grad():
            self._apply_masks()
        logger.debug("SparseEMA: %d masks set, density %.4f", len(checked), self.density())

    def _checked_masks(self, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The masks by canonical name, as bool copies on the parameters' devices (nothing changes)."""
        if not isinstance(masks, Mapping):
            raise ValueError(f"masks must be a mapping of parameter name to mask, got {type(masks).__name__}")
        unknown = [n for n in masks if n not in self._canonical]
        if unknown:
            raise ValueError(
                f"masks for unknown parameters {unknown}; use names from module.named_parameters() "
                f"(e.g. {self._names[:3]})"
            )
        checked: dict[str, torch.Tensor] = {}
        for name, mask in masks.items():
            canonical = self._canonical[name]
            param = self._params[canonical]
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(param.shape):
                shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(
                    f"mask for {name!r} has shape {shape} but the parameter has shape {tuple(param.shape)}"
                )
            mask = mask.detach()
            if mask.dtype != torch.bool:
                mask = mask != 0
            checked[canonical] = mask.to(device=param.device, copy=True)
        return checked

    def masks(self) -> dict[str, torch.Tensor]:
        """The masks in force, by canonical parameter name (copies)."""
        return {n: m.clone() for n, m in self._masks.items()}

    def density(self) -> float:
        """Fraction of active entries over the masked parameters (1.0 when none is masked)."""
        total = sum(m.numel() for m in self._masks.values())
        return sum(int(m.sum()) for m in self._masks.values()) / total if total else 1.0

    def _apply_masks(self) -> None:
        if not self._masks:
            return
        params = [self._params[n] for n in self._masks]
        masks = list(self._masks.values())
        if any(m.device != p.device for m, p in zip(masks, params)):
            # The EMA copy was moved since the masks were set: move them once.
            self._masks = {n: m.to(p.device) for (n, m), p in zip(self._masks.items(), params)}
            masks = list(self._masks.values())
        with torch.no_grad():  # where, not multiply: a NaN at a pruned position is still zeroed
            for param, mask in zip(params, masks):
                torch.where(mask, param, torch.zeros((), dtype=param.dtype, device=param.device), out=param)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """``{"decay", "module" (the EMA copy's state dict), "updates", "masks" (bool, CPU)}``."""
        return {
            "decay": self.decay,
            "module": self.module.state_dict(),
            "updates": self.updates,
            "masks": {n: m.detach().cpu().clone() for n, m in self._masks.items()},
        }

    def check_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check a state saved by :meth:`state_dict` without changing anything.

        Raises:
            ValueError: If keys are missing, the decay or the update count is invalid, the module
                state does not fit the EMA copy (names or shapes), or a mask does not fit.
        """
        self._checked_state(state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` (``"masks"`` is optional; nothing changes on an error).

        Raises:
            ValueError: If keys are missing, the decay or the update count is invalid, the module
                state does not fit the EMA copy (names or shapes), or a mask does not fit.
        """
        decay, updates, masks = self._checked_state(state)
        self.module.load_state_dict(state["module"])
        self.decay = decay
        self.updates = updates
        if masks is not None:
            self._masks = masks
        with torch.no_grad():
            self._apply_masks()

    def _checked_state(self, state: Mapping[str, Any]) -> tuple[float, int, dict[str, torch.Tensor] | None]:
        if not isinstance(state, Mapping):
            raise ValueError(f"not a SparseEMA state: expected a mapping, got {type(state).__name__}")
        missing = [k for k in ("decay", "module", "updates") if k not in state]
        if missing:
            raise ValueError(f"not a SparseEMA state: missing {missing}")
        decay = self._checked_decay(state["decay"])
        try:
            updates = int(state["updates"])
        except (TypeError, ValueError):
            raise ValueError(f"not a SparseEMA state: updates is {state['updates']!r}") from None
        saved = state["module"]
        if not isinstance(saved, Mapping):
            raise ValueError(f"the EMA state's module entry is a {type(saved).__name__}, not a state dict")
        own = self.module.state_dict()
        missing_keys = [k for k in own if k not in saved]
        unexpected = [k for k in saved if k not in own]
        shapes = [f"{k}: {_shape(saved[k])} vs {_shape(v)}" for k, v in own.items()
                  if k in saved and isinstance(v, torch.Tensor) and _shape(saved[k]) != _shape(v)]
        if missing_keys or unexpected or shapes:
            raise ValueError(
                "the EMA state does not fit this module (another architecture?): missing keys "
                f"{missing_keys[:5]}, unexpected keys {unexpected[:5]}, shape mismatches {shapes[:5]}"
            )
        masks = self._checked_masks(state["masks"]) if "masks" in state else None
        return decay, updates, masks

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _checked_decay(decay: float) -> float:
        decay = float(decay)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1) (e.g. 0.999), got {decay}")
        return decay

    @staticmethod
    def _canonical_names(module: nn.Module) -> dict[str, str]:
        """Every parameter name (aliases of tied parameters included) -> its canonical name."""
        canonical_by_id: dict[int, str] = {}
        names: dict[str, str] = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            canonical = canonical_by_id.setdefault(id(param), name)
            names[name] = canonical
        return names

    @staticmethod
    def _mismatch(kind: str, got: list[str], expected: list[str]) -> None:
        missing = [n for n in expected if n not in set(got)]
        extra = [n for n in got if n not in set(expected)]
        raise ValueError(
            f"the module's {kind} do not match the EMA copy's: missing {missing[:5]}, unexpected "
            f"{extra[:5]}{' (same names, different order)' if not missing and not extra else ''}; "
            "pass the module this SparseEMA was built from"
        )

    def __repr__(self) -> str:
        return (f"SparseEMA({type(self.module).__name__}, decay={self.decay}, updates={self.updates}, "
                f"masked={len(self._masks)} weights, density={self.density():.4f})")


def _shape(value: Any) -> tuple[int, ...] | str:
    """A tensor's shape, or the type name of anything else (for state checks)."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
