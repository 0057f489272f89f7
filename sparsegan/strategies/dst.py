"""Dynamic sparse training (DST): periodic prune-and-grow at constant density.

One update (every ``update_every`` optimizer steps of the network, from ``start`` to ``stop``):

1. take the drop fraction ``p`` from its schedule;
2. prune ``p`` x (active weights) active weights with the lowest prune score (``"magnitude"``:
   smallest ``|w|``; ``"random"``), across all layers (``scope="global"``) or per layer;
3. grow as many inactive positions with the highest grow score (``"gradient"``: largest dense
   ``|dL/dw|`` as in RigL; ``"random"`` as in SET; ``"momentum"``), not re-growing just-pruned
   positions unless nothing else is left; grown weights start at 0;
4. the active count is unchanged; optimizer state follows the wrapper's policy.

``prune="magnitude", grow="random"`` is SET; ``prune="magnitude", grow="gradient"`` is RigL.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

from sparsegan.balance import BalanceRatio
from sparsegan.criteria import (
    NonFiniteScoreError,
    drop_lowest,
    first_non_finite,
    get_score,
    grow_highest,
    growth_gradients,
)
from sparsegan.masks import MaskedWeights
from sparsegan.schedules import DropFractionSchedule, UpdateSchedule, drop_fraction_schedule
from sparsegan.strategies.base import (
    NETWORKS,
    Distribution,
    SparsityAlgorithm,
    Strategy,
    check_density,
    register_strategy,
)
from sparsegan.strategies.budgets import apply_plan, replacement_plan

__all__ = ["DynamicSparsity", "DST"]

logger = logging.getLogger(__name__)

Scope = Literal["global", "layer"]


class DynamicSparsity(SparsityAlgorithm):
    """Prune-and-grow updates of one network at constant density.

    Args:
        density: Target density in (0, 1].
        distribution: Initial layer-wise allocation (``"erk"``, ``"er"``, ``"uniform"``, custom).
        update: When to update (an :class:`~sparsegan.schedules.UpdateSchedule`).
        drop_fraction: Fraction of active weights replaced per update, as a function of the step.
        prune: Prune score name (``"magnitude"`` or ``"random"``).
        grow: Grow score name (``"gradient"``, ``"random"`` or ``"momentum"``).
        scope: ``"global"`` (one ranking across layers) or ``"layer"`` (per-layer counts kept).
    """

    def __init__(
        self,
        density: float,
        distribution: Distribution = "erk",
        *,
        update: UpdateSchedule,
        drop_fraction: DropFractionSchedule,
        prune: str = "magnitude",
        grow: str = "gradient",
        scope: Scope = "global",
    ) -> None:
        super().__init__(density, distribution)
        if scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
        self.prune_score = get_score(prune, "prune")
        self.grow_score = get_score(grow, "grow")
        self.prune, self.grow, self.scope = prune, grow, scope
        self.schedule = update
        self.drop_fraction = drop_fraction

    def update(self, step: int, weights: MaskedWeights, optimizer: torch.optim.Optimizer,
               generator: torch.Generator, *, balance: BalanceRatio | None = None) -> bool:
        """Prune and grow when the schedule says so (see the module docs)."""
        if not self.is_due(step):
            return False
        fraction = float(self.drop_fraction(step))
        moved = self.prune_and_grow(weights, optimizer, generator, fraction)
        logger.info("DST update at step %d: replaced %d of %d active weights (drop fraction %.4f)",
                    step, moved, sum(weights.active_counts()), fraction)
        return moved > 0

    def prune_and_grow(self, weights: MaskedWeights, optimizer: torch.optim.Optimizer,
                       generator: torch.Generator, fraction: float) -> int:
        """Replace ``fraction`` of the active weights; return how many positions became active.

        The count is measured on the masks, so an update that changes nothing returns 0 (and
        the wrapper does not count it as a mask update).

        Raises:
            NonFiniteScoreError: If the prune or grow scores are not finite (the masks are then
                unchanged).
        """
        # every layer keeps at least one active weight, so no update can disconnect the network;
        # a kernel bank is ranked in kernel shape and replaces its own share (strategies.budgets)
        plan = replacement_plan(weights, fraction, self.scope)
        if not plan:
            return 0
        masks = weights.kernel_masks()
        prune_scores = weights.kernel_scores(self._scores(self.prune_score, weights, optimizer, generator))
        after_drop = apply_plan(drop_lowest, masks, prune_scores, plan, min_active=1)
        grow_scores = weights.kernel_scores(self._scores(self.grow_score, weights, optimizer, generator))
        dropped = [old & ~new for old, new in zip(masks, after_drop)]
        grown = weights.expand(apply_plan(grow_highest, after_drop, grow_scores, plan, per_layer={"exclude": dropped}))
        regrown = sum(int(torch.count_nonzero(new & ~old)) for old, new in zip(weights.masks, grown))
        weights.set_masks(grown, [optimizer])
        return regrown

    @staticmethod
    def _scores(score, weights: MaskedWeights, optimizer: torch.optim.Optimizer,
                generator: torch.Generator) -> list[torch.Tensor]:
        """One score tensor per weight.

        Raises:
            NonFiniteScoreError: If a layer's scores hold NaN or an infinity (a diverged step):
                nothing has changed yet, and the wrapper skips the update.
        """
        grads = growth_gradients(weights.params, weights.names)
        with torch.no_grad():
            scores = [
                score(p, m, grad=g, optimizer_state=optimizer.state.get(p, {}), generator=generator)
                for p, m, g in zip(weights.params, weights.masks, grads)
            ]
        bad = first_non_finite(scores)
        if bad is not None:
            raise NonFiniteScoreError(
                f"{getattr(score, '__name__', 'score')} of layer {bad} ({weights.names[bad]!r}) is not finite "
                "(NaN or inf)", bad)
        return scores

    def _config(self) -> str:
        return (f"{super()._config()}, update={self.schedule}, drop_fraction={self.drop_fraction}, "
                f"prune={self.prune!r}, grow={self.grow!r}, scope={self.scope!r}")


@register_strategy("dst")
class DST(Strategy):
    """Dynamic sparse training on the generator, the discriminator, or both.

    The building block of SDST (DST on G only) and DDST. A network not listed in ``networks``
    keeps static masks at its density.

    Args:
        g_density: Generator density in (0, 1].
        d_density: Discriminator density in (0, 1].
        networks: Which networks get DST: ``"generator"``, ``"discriminator"`` or both (default).
        distribution: Initial layer-wise allocation.
        update_every: Optimizer steps of the network between updates.
        start: First step after which updates may happen.
        stop: No updates at or after this step (exclusive); ``None`` for no end.
        drop_fraction: Initial fraction of active weights replaced per update.
        drop_schedule: ``"constant"``, ``"cosine"`` or ``"linear"`` decay of the drop fraction
            toward 0 over ``total_steps``; or pass a schedule object as ``drop_fraction``.
        total_steps: Length of the run in optimizer steps of each network (for decaying schedules).
        prune: Prune score (``"magnitude"`` or ``"random"``).
        grow: Grow score (``"gradient"``, ``"random"`` or ``"momentum"``).
        scope: ``"global"`` or ``"layer"`` selection.
    """

    def __init__(
        self,
        g_density: float,
        d_density: float,
        *,
        networks: str | tuple[str, ...] = NETWORKS,
        distribution: Distribution = "erk",
        update_every: int = 100,
        start: int = 0,
        stop: int | None = None,
        drop_fraction: float | DropFractionSchedule = 0.3,
        drop_schedule: str = "constant",
        total_steps: int | None = None,
        prune: str = "magnitude",
        grow: str = "gradient",
        scope: Scope = "global",
    ) -> None:
        self.g_density = check_density(g_density, "g_density")
        self.d_density = check_density(d_density, "d_density")
        names = (networks,) if isinstance(networks, str) else tuple(networks)
        unknown = [n for n in names if n not in NETWORKS]
        if unknown or not names:
            raise ValueError(f"networks must name 'generator' and/or 'discriminator', got {networks!r}")
        self.networks = names
        self.distribution = distribution
        self.update = UpdateSchedule(update_every, start, stop)
        spec = drop_schedule if isinstance(drop_fraction, (int, float)) and drop_schedule != "constant" else drop_fraction
        self.drop_fraction = drop_fraction_schedule(
            spec, total_steps=total_steps,
            initial=float(drop_fraction) if isinstance(drop_fraction, (int, float)) else 0.5,
        )
        self.prune, self.grow, self.scope = prune, grow, scope
        get_score(prune, "prune")
        get_score(grow, "grow")

    def build(self) -> dict[str, SparsityAlgorithm | None]:
        """DST on the listed networks, static masks on the other."""
        from sparsegan.strategies.static import StaticSparsity

        densities = {"generator": self.g_density, "discriminator": self.d_density}
        built: dict[str, SparsityAlgorithm | None] = {}
        for net in NETWORKS:
            if net in self.networks:
                built[net] = DynamicSparsity(
                    densities[net], self.distribution, update=self.update,
                    drop_fraction=self.drop_fraction, prune=self.prune, grow=self.grow, scope=self.scope,
                )
            else:
                built[net] = StaticSparsity(densities[net], self.distribution)
        return built
