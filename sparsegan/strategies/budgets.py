"""How a strategy's count of weights to prune, grow or add is split over layers when some layers
are kernel banks.

A kernel bank (``(N, *kernel)``, mixed per sample before one conv) has one kernel mask shared
across its N kernels (:mod:`sparsegan.masks`), so one of its kernel positions stands for N
parameter entries. Strategies select in kernel shape (:meth:`MaskedWeights.kernel_masks`) with
scores summed over the bank (:meth:`MaskedWeights.kernel_scores`). Counts stay in parameter
entries, so that densities mean the same for every layer, by this rule (ours; the paper has no
banks):

* ordinary layers share one global ranking, as without banks;
* each bank moves on its own: a prune-and-grow replaces the same fraction of its kernel positions
  as of the others' weights, and a density change scales its kernel positions in proportion;
* the ordinary layers absorb the rounding, so the network's active count is exact whenever an
  ordinary layer has room (otherwise it is off by less than one bank position).

Without banks every function here reduces to the plain global or per-layer call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sparsegan.masks import MaskedWeights

__all__ = ["Plan", "replacement_plan", "resize_plan", "apply_plan"]

Selector = Callable[..., list[torch.Tensor]]


@dataclass(frozen=True)
class Plan:
    """Counts of kernel positions per group: one global count over ``pooled`` layers, one per other layer.

    Attributes:
        pooled: Layers ranked together (ordinary layers under a global scope).
        pooled_count: Positions selected among the pooled layers.
        own: Per-layer counts of the layers selected on their own (banks, or every layer under
            a per-layer scope).
    """

    pooled: list[int]
    pooled_count: int
    own: dict[int, int]

    def __bool__(self) -> bool:
        return self.pooled_count != 0 or any(self.own.values())


def _active(masks: Sequence[torch.Tensor]) -> list[int]:
    return [int(torch.count_nonzero(m)) for m in masks]


def replacement_plan(weights: MaskedWeights, fraction: float, scope: str) -> Plan:
    """How many kernel positions a prune-and-grow replaces (each layer keeps one active).

    Args:
        weights: The network's masked weights.
        fraction: Fraction of the active weights to replace.
        scope: ``"global"`` (ordinary layers ranked together) or ``"layer"``.
    """
    active = _active(weights.kernel_masks())
    mult = weights.multiplicity
    if scope == "layer":
        return Plan([], 0, {i: min(round(fraction * a), a - 1) for i, a in enumerate(active)})
    pooled = [i for i, m in enumerate(mult) if m == 1]
    pooled_active = sum(active[i] for i in pooled)
    pooled_count = min(round(fraction * pooled_active), pooled_active - len(pooled)) if pooled else 0
    own = {i: min(round(fraction * active[i]), active[i] - 1) for i, m in enumerate(mult) if m > 1}
    return Plan(pooled, pooled_count, own)


def resize_plan(weights: MaskedWeights, target: int) -> Plan:
    """Signed changes of kernel positions that bring the active count to ``target`` parameter entries.

    Banks scale their kernel positions by ``target / current`` (each keeps one active); the
    ordinary layers take the rest in one global ranking, within what they can hold.
    """
    kernel = weights.kernel_masks()
    active, mult = _active(kernel), weights.multiplicity
    current = sum(a * m for a, m in zip(active, mult))
    pooled = [i for i, m in enumerate(mult) if m == 1]
    own: dict[int, int] = {}
    for i, m in enumerate(mult):
        if m > 1:
            size = kernel[i].numel()
            scaled = round(active[i] * target / current) if current else 1
            own[i] = min(max(scaled, 1), size) - active[i]
    rest = target - current - sum(mult[i] * k for i, k in own.items())
    if pooled:
        low = len(pooled) - sum(active[i] for i in pooled)
        high = sum(kernel[i].numel() - active[i] for i in pooled)
        rest = min(max(rest, low), high)
    else:
        rest = 0
    return Plan(pooled, rest, own)


def apply_plan(
    select: Selector,
    masks: Sequence[torch.Tensor],
    scores: Sequence[torch.Tensor],
    plan: Plan,
    *,
    sign: int = 1,
    per_layer: dict[str, Sequence[torch.Tensor] | None] | None = None,
    **kwargs: Any,
) -> list[torch.Tensor]:
    """Run ``select`` (``drop_lowest`` or ``grow_highest``) group by group and merge the masks.

    Args:
        select: The selector, called as ``select(masks, scores, count, **kwargs)``.
        masks: Kernel-shape masks of every layer.
        scores: Kernel-shape scores of every layer.
        plan: The counts; only entries whose sign matches ``sign`` are applied (their size).
        sign: ``1`` for the plan's positive entries, ``-1`` for its negative ones.
        per_layer: Keyword arguments holding one tensor per layer (``exclude=``), sliced per group.
        **kwargs: Other keyword arguments for ``select`` (``min_active=``).

    Returns:
        New kernel-shape masks (layers outside the applied groups unchanged).
    """
    out = list(masks)
    groups: list[tuple[list[int], int | list[int]]] = []
    if plan.pooled and plan.pooled_count * sign > 0:
        groups.append((plan.pooled, abs(plan.pooled_count)))
    own = [i for i, k in plan.own.items() if k * sign > 0]
    if own:
        groups.append((own, [abs(plan.own[i]) for i in own]))
    for ids, count in groups:
        extra = {key: [value[i] for i in ids] for key, value in (per_layer or {}).items() if value is not None}
        chosen = select([masks[i] for i in ids], [scores[i] for i in ids], count, **extra, **kwargs)
        for i, mask in zip(ids, chosen):
            out[i] = mask
    return out
