"""Masks of one network: bool masks over its kernel weights, enforced in place.

Enforcement sets the inactive entries of every masked parameter to exactly zero in place
(``torch.where(mask, param, 0, out=param)``, which also clears NaN/inf, unlike a multiply).
Parameters are masked in place, so the forward pass computes with
zeros and ``param.grad`` is the dense gradient (what gradient-based regrowth needs). Masks are
``torch.bool`` (one byte per weight).

Optimizer state policy (``optimizer_state=``):

* ``"reset"`` (default): whenever a position is pruned or regrown, every optimizer state tensor
  shaped like the parameter (Adam's ``exp_avg``/``exp_avg_sq``, SGD's ``momentum_buffer``, ...)
  is zeroed there, so a regrown weight starts from zero with fresh statistics.
* ``"keep"``: optimizer state is never touched (regrown weights inherit the moments the dense
  gradient accumulated while they were inactive).

Kernel banks: a parameter ``(N, *kernel)`` whose N kernels are mixed per sample before one conv
(:attr:`sparsegan.discovery.WeightRecord.shared_dims`) has **one kernel mask shared across the
bank axis**. Its mask is stored in the parameter's shape, constant along the shared axes (so
enforcement, optimizer state and checkpoints work as for any weight); :meth:`MaskedWeights.kernel_masks`
and :meth:`MaskedWeights.expand` convert to and from the kernel's shape, in which strategies rank
and select positions. Every mask given to a bank is checked to be shared.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn

__all__ = ["MaskedWeights", "OptimizerStatePolicy", "MaskStateError", "shared_mask"]

logger = logging.getLogger(__name__)

OptimizerStatePolicy = Literal["reset", "keep"]
"""What happens to optimizer state at pruned and regrown positions."""


def shared_mask(kernel_mask: torch.Tensor, shape: tuple[int, ...], dims: tuple[int, ...]) -> torch.Tensor:
    """A kernel-shape mask repeated along a bank's ``dims`` to the parameter's ``shape``.

    Returns ``kernel_mask`` itself when ``dims`` is empty (an ordinary weight).
    """
    if not dims:
        return kernel_mask
    for d in sorted(dims):
        kernel_mask = kernel_mask.unsqueeze(d)
    return kernel_mask.expand(shape).clone()


class MaskStateError(ValueError):
    """A mask state (from ``load_state_dict`` or a strategy) does not fit the network's weights."""


class MaskedWeights:
    """The masked kernel weights of one network.

    Args:
        names: Canonical parameter names, one per weight.
        params: The parameters, in the same order.
        masks: Initial bool masks (same shapes); all-True when omitted.
        optimizer_state: The optimizer state policy (see the module docs).
        shared_dims: Per weight, the axes its mask is shared along (a kernel bank's axis, see the
            module docs); ``()`` for an ordinary weight. Default: none shared.

    Raises:
        MaskStateError: If the numbers or shapes do not match, or a kernel bank's mask is not
            shared along its bank axes.
    """

    def __init__(
        self,
        names: Sequence[str],
        params: Sequence[nn.Parameter],
        masks: Sequence[torch.Tensor] | None = None,
        *,
        optimizer_state: OptimizerStatePolicy = "reset",
        shared_dims: Sequence[tuple[int, ...]] | None = None,
    ) -> None:
        if len(names) != len(params):
            raise MaskStateError(f"{len(names)} names for {len(params)} parameters")
        shared = [tuple(sorted({d % p.dim() for d in dims})) for dims, p in
                  zip(shared_dims if shared_dims is not None else [()] * len(params), params)]
        if len(shared) != len(params) or any(len(dims) >= p.dim() for dims, p in zip(shared, params)):
            raise MaskStateError(f"shared_dims {shared_dims} do not fit the {len(params)} parameters' shapes")
        self.shared_dims: list[tuple[int, ...]] = shared
        if optimizer_state not in ("reset", "keep"):
            raise ValueError(f"optimizer_state must be 'reset' or 'keep', got {optimizer_state!r}")
        self.names: list[str] = list(names)
        self.params: list[nn.Parameter] = list(params)
        self.optimizer_state: OptimizerStatePolicy = optimizer_state
        self.masks: list[torch.Tensor] = (
            [torch.ones_like(p, dtype=torch.bool) for p in self.params] if masks is None
            else self._checked(masks)
        )
        self._versions: list[int] = [-1] * len(self.params)
        self._zeros: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    # ------------------------------------------------------------------ enforcement

    def apply_(self) -> None:
        """Set every inactive weight to exactly 0 in place and remember the parameter versions.

        ``torch.where`` (not a multiply) so that a NaN or inf reaching an inactive position (a
        diverged step) is still zeroed: ``nan * 0`` would leave the mask silently violated.
        """
        with torch.no_grad():
            for i, (param, mask) in enumerate(zip(self.params, self.masks)):
                if mask.device != param.device:  # the module was moved after wrapping
                    mask = self.masks[i] = mask.to(param.device)
                torch.where(mask, param, self._zero(param), out=param)
        self._versions = [p._version for p in self.params]

    def _zero(self, param: torch.Tensor) -> torch.Tensor:
        key = (param.device, param.dtype)
        zero = self._zeros.get(key)
        if zero is None:
            zero = self._zeros[key] = torch.zeros((), device=param.device, dtype=param.dtype)
        return zero

    def stale(self) -> bool:
        """Whether a masked parameter changed since the last :meth:`apply_` (e.g. a weight load)."""
        return any(p._version != v for p, v in zip(self.params, self._versions))

    def apply_if_stale_(self) -> bool:
        """Apply the masks when a parameter changed since the last enforcement; return whether it did."""
        if self.stale():
            self.apply_()
            return True
        return False

    # ------------------------------------------------------------------ counts

    def active_counts(self) -> list[int]:
        """Active (True) entries per weight."""
        return [int(torch.count_nonzero(m)) for m in self.masks]

    @property
    def total(self) -> int:
        """Number of maskable entries over all weights."""
        return sum(m.numel() for m in self.masks)

    def density(self) -> float:
        """Active fraction over all weights (1.0 when there are none)."""
        total = self.total
        return sum(self.active_counts()) / total if total else 1.0

    def layer_densities(self) -> dict[str, float]:
        """Active fraction per weight name."""
        return {n: c / m.numel() for n, c, m in zip(self.names, self.active_counts(), self.masks)}

    # ------------------------------------------------------------------ kernel banks

    @property
    def multiplicity(self) -> list[int]:
        """Per weight, how many parameter entries one kernel position stands for (N for a bank of N)."""
        return [math.prod(p.shape[d] for d in dims) for p, dims in zip(self.params, self.shared_dims)]

    def kernel_masks(self) -> list[torch.Tensor]:
        """The masks in kernel shape: a bank's shared axes removed (ordinary masks as they are)."""
        out = []
        for mask, dims in zip(self.masks, self.shared_dims):
            for d in reversed(dims):
                mask = mask.select(d, 0)
            out.append(mask)
        return out

    def kernel_scores(self, scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-entry scores (parameter shape) in kernel shape: summed over a bank's shared axes.

        A bank position's score is the sum of its N entries' scores (for magnitude: the L1 norm
        of the position across the bank), so the bank's kernels are ranked together.
        """
        return [score.sum(dim=dims) if dims else score for score, dims in zip(scores, self.shared_dims)]

    def expand(self, kernel_masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Masks in kernel shape (see :meth:`kernel_masks`) back in each parameter's shape."""
        return [shared_mask(mask, tuple(param.shape), dims)
                for mask, param, dims in zip(kernel_masks, self.params, self.shared_dims)]

    # ------------------------------------------------------------------ changes

    def set_masks(self, masks: Sequence[torch.Tensor], optimizers: Sequence[torch.optim.Optimizer] = ()) -> list[torch.Tensor]:
        """Replace the masks, zero newly inactive weights, and apply the optimizer state policy.

        Newly active (regrown) positions keep their current value, which is 0 because inactive
        weights are kept at 0.

        Args:
            masks: New bool masks, one per weight.
            optimizers: Optimizers whose state to clean at changed positions.

        Returns:
            The changed positions per weight (``old != new``).
        """
        new = self._checked(masks)
        changed = [old ^ m for old, m in zip(self.masks, new)]
        self.masks = new
        self.apply_()
        if self.optimizer_state == "reset":
            for optimizer in optimizers:
                self.reset_optimizer_state(optimizer, changed)
        return changed

    def reset_optimizer_state(self, optimizer: torch.optim.Optimizer, positions: Sequence[torch.Tensor] | None = None) -> None:
        """Zero the optimizer state tensors shaped like each parameter at ``positions``.

        Args:
            optimizer: The optimizer holding (some of) these parameters.
            positions: Bool tensors per weight; the inactive positions when omitted.
        """
        if positions is None:
            positions = [~m for m in self.masks]
        with torch.no_grad():
            for param, where in zip(self.params, positions):
                state = optimizer.state.get(param)
                if not state:
                    continue
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape:
                        value.masked_fill_(where.to(value.device), 0)

    def _checked(self, masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(masks) != len(self.params):
            raise MaskStateError(f"got {len(masks)} masks for {len(self.params)} weights")
        out = []
        for name, mask, param in zip(self.names, masks, self.params):
            if tuple(mask.shape) != tuple(param.shape):
                raise MaskStateError(
                    f"mask for {name!r} has shape {tuple(mask.shape)}, but the parameter has shape "
                    f"{tuple(param.shape)}; was the checkpoint made for a different model?"
                )
            if mask.dtype != torch.bool:
                raise MaskStateError(f"mask for {name!r} has dtype {mask.dtype}; masks must be torch.bool")
            out.append(mask.to(param.device))
        for name, mask, dims in zip(self.names, out, self.shared_dims):
            if dims and not bool((mask == mask.amax(dim=dims, keepdim=True)).all()):
                raise MaskStateError(
                    f"mask for the kernel bank {name!r} differs along its bank axes {list(dims)}; a bank has one "
                    "kernel mask shared across the bank (build it with MaskedWeights.expand)")
        return out

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The masks by parameter name (bool tensors on the CPU)."""
        return {n: m.detach().cpu().clone() for n, m in zip(self.names, self.masks)}

    def check_state_dict(self, state: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Check masks saved by :meth:`state_dict` without changing anything.

        Args:
            state: Bool masks by parameter name.

        Returns:
            The masks in this object's order, on the parameters' devices (what
            :meth:`load_state_dict` would install).

        Raises:
            MaskStateError: If ``state`` is not a mapping, names are missing or extra, or shapes
                or dtypes differ.
        """
        if not isinstance(state, Mapping):
            raise MaskStateError(f"expected masks by parameter name, got {type(state).__name__}")
        missing = [n for n in self.names if n not in state]
        extra = [n for n in state if n not in self.names]
        if missing or extra:
            raise MaskStateError(
                f"mask names do not match this network: missing {missing}, unexpected {extra}; "
                "was the checkpoint made for a different model or with different include/exclude?"
            )
        masks = [state[n] for n in self.names]
        not_tensors = [n for n, m in zip(self.names, masks) if not isinstance(m, torch.Tensor)]
        if not_tensors:
            raise MaskStateError(f"masks for {not_tensors} are not tensors")
        return self._checked(masks)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load masks saved by :meth:`state_dict` and enforce them (nothing changes on an error).

        Raises:
            MaskStateError: If names are missing or extra, or shapes or dtypes differ.
        """
        self.masks = self.check_state_dict(state)
        self.apply_()

    def __len__(self) -> int:
        return len(self.params)

    def __repr__(self) -> str:
        banks = sum(1 for dims in self.shared_dims if dims)
        extra = f", {banks} kernel banks" if banks else ""
        return (f"MaskedWeights({len(self)} weights{extra}, density={self.density():.4f}, "
                f"optimizer_state={self.optimizer_state!r})")
