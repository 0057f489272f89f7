"""SDST and DDST (ADAPT): dynamic sparse training of G, with D's density steered by the balance ratio.

* :class:`SDST` (single DST): DST on the generator with the paper's defaults (every 500 G steps,
  drop fraction 0.5 cosine-decayed, global magnitude prune, global gradient growth); the
  discriminator keeps static masks.
* :class:`DDST` (double DST / ADAPT): G as in SDST; every ``d_update_every`` iterations (G steps) the
  :class:`~sparsegan.balance.DensityController` reads the windowed balance ratio and raises D's
  density (growing the inactive weights with the largest dense gradient), lowers it (pruning
  the smallest active weights), or - in ``"strict"`` mode at the density cap - replaces part of
  D's connections at constant density.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

import torch

from sparsegan.balance import BalanceRatio, Bounds, DensityController, check_bounds
from sparsegan.criteria import (
    NonFiniteScoreError,
    drop_lowest,
    first_non_finite,
    get_score,
    grow_highest,
    growth_gradients,
)
from sparsegan.masks import MaskedWeights
from sparsegan.schedules import ConstantDropFraction, CosineDropFraction, DropFractionSchedule, UpdateSchedule
from sparsegan.strategies.base import Distribution, SparsityAlgorithm, register_strategy
from sparsegan.strategies.budgets import apply_plan, resize_plan
from sparsegan.strategies.dst import DST, DynamicSparsity, Scope

__all__ = ["ControlledDensity", "SDST", "DDST", "PAPER_BOUNDS", "RELAX_INTERVAL", "STRICT_CAP"]

logger = logging.getLogger(__name__)

PAPER_BOUNDS: tuple[float, float] = (0.45, 0.55)
"""The paper's BR bounds, chosen for its SNGAN on CIFAR-10 and the reference's estimator."""
RELAX_INTERVAL = 1000
"""Iterations between relax decisions in the reference (strict: twice as many)."""
STRICT_CAP = 0.5
"""D's density cap in strict mode in the reference."""


class ControlledDensity(SparsityAlgorithm):
    """The discriminator under DDST: its density follows a :class:`~sparsegan.balance.DensityController`.

    Decisions are scheduled in **iterations** (generator steps), as in the reference, whatever
    ``n_critic`` is. The reference counts D steps and decides when that count is a multiple of
    ``update_frequency_D x n_critic``, checked once per iteration after the G step, so it decides
    after iterations ``every, 2 * every, ...``. Here the decision for iteration ``k * every`` is
    carried out at D's first optimizer step after that iteration's G step (the BR window then
    holds exactly what the reference's holds, since no sample is taken in between), so that
    gradient growth reads D's own loss gradient and not whatever the G step left in D's
    ``.grad``. No decision is made at iteration ``stop`` (the end of the run) or later.

    Args:
        density: Initial density.
        distribution: Initial layer-wise allocation.
        controller: The BR controller (owns the current target density).
        update: When the controller is consulted, in iterations (G steps).
        min_samples: BR samples the window must hold before the controller acts (the reference:
            a full window).
        connectivity: The at-cap prune-and-grow of strict mode (``None`` in relax mode); its drop
            fraction is read at the iteration.
        warmup: With warm-up bounds: iterations whose BR samples are averaged to fix them
            (decisions hold until then).
        grow: Grow score used when the density rises (``"gradient"`` in the paper).
        prune: Prune score used when the density falls (``"magnitude"``).
    """

    needs_balance_ratio = True

    def __init__(self, density: float, distribution: Distribution = "erk", *, controller: DensityController,
                 update: UpdateSchedule, min_samples: int = 1, connectivity: DynamicSparsity | None = None,
                 grow: str = "gradient", prune: str = "magnitude", warmup: int = 0) -> None:
        super().__init__(density, distribution)
        self.warmup = warmup
        self.controller = controller
        self.schedule = update
        self.every = update.every
        self.min_samples = min_samples
        self.connectivity = connectivity
        self.grow, self.prune = grow, prune
        self.grow_score, self.prune_score = get_score(grow, "grow"), get_score(prune, "prune")
        self.decided_at = 0
        """The last iteration a decision was made for (0: none yet)."""

    def is_due(self, step: int, *, iteration: int | None = None) -> bool:
        """Whether the decision for ``iteration`` (G steps so far) is still to be made."""
        return (iteration is not None and iteration != self.decided_at and self.schedule is not None
                and self.schedule.is_due(iteration))

    def update(self, step: int, weights: MaskedWeights, optimizer: torch.optim.Optimizer,
               generator: torch.Generator, *, balance: BalanceRatio | None = None,
               iteration: int | None = None) -> bool:
        """Consult the controller when due and resize (or rewire) D's masks accordingly.

        Args:
            step: D's optimizer steps so far.
            weights: D's masked weights.
            optimizer: D's optimizer.
            generator: D's random generator.
            balance: The windowed balance ratio.
            iteration: G's optimizer steps so far (the controller's clock).
        """
        if not self.is_due(step, iteration=iteration):
            return False
        assert iteration is not None
        self.decided_at = iteration
        value = balance.value if balance is not None and len(balance) >= self.min_samples else None
        if self.controller.bounds is None and balance is not None and iteration >= self.warmup:
            samples = [sample for g_step, sample, _ in balance.history if g_step <= iteration]
            if samples:
                self.controller.calibrate(sum(samples) / len(samples))
        decision = self.controller.decide(value, step=iteration)
        logger.info("DDST controller at iteration %d (D step %d): BR %s -> %s, D density %.4f", iteration, step,
                    "n/a" if value is None else f"{value:.4f}", decision.action, decision.density)
        if decision.action == "dst":
            assert self.connectivity is not None
            return self.connectivity.prune_and_grow(
                weights, optimizer, generator, float(self.connectivity.drop_fraction(iteration))) > 0
        if decision.action == "hold":
            return False
        self.density = decision.density
        return self.resize(weights, optimizer, generator, decision.density)

    def resize(self, weights: MaskedWeights, optimizer: torch.optim.Optimizer, generator: torch.Generator,
               density: float) -> bool:
        """Grow or prune (globally) to exactly ``round(density * total)`` active weights.

        Raises:
            NonFiniteScoreError: If a layer's scores hold NaN or an infinity (a diverged step).
                The masks are then unchanged; the wrapper restores the controller and skips the
                decision (see :class:`~sparsegan.SparseGANWrapper`).
        """
        active = weights.active_counts()
        # never disconnect a layer: each keeps at least one active weight; a kernel bank changes
        # its kernel positions in proportion (strategies.budgets)
        target = max(round(density * weights.total), len(active))
        if target == sum(active):
            return False
        plan = resize_plan(weights, target)
        if not plan:
            return False
        grads = growth_gradients(weights.params, weights.names)
        masks = weights.kernel_masks()
        for sign, score, what in ((-1, self.prune_score, "prune"), (1, self.grow_score, "grow")):
            if not (plan.pooled_count * sign > 0 or any(k * sign > 0 for k in plan.own.values())):
                continue
            with torch.no_grad():
                scores = [score(p, m, grad=g, optimizer_state=optimizer.state.get(p, {}), generator=generator)
                          for p, m, g in zip(weights.params, weights.masks, grads)]
            bad = first_non_finite(scores)
            if bad is not None:
                raise NonFiniteScoreError(f"{what} scores of layer {bad} are not finite", bad)
            if sign > 0:
                masks = apply_plan(grow_highest, masks, weights.kernel_scores(scores), plan)
            else:
                masks = apply_plan(drop_lowest, masks, weights.kernel_scores(scores), plan, sign=-1, min_active=1)
        weights.set_masks(weights.expand(masks), [optimizer])
        return True

    def state_dict(self) -> dict[str, Any]:
        """The controller's density and decision log, and the last iteration decided."""
        return {"controller": self.controller.state_dict(), "decided_at": self.decided_at}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the controller (and so the target density)."""
        self.controller.load_state_dict(state["controller"])
        self.density = self.controller.density
        self.decided_at = int(state.get("decided_at", 0))

    def _config(self) -> str:
        return f"{super()._config()}, controller={self.controller!r}, every={self.every} iterations"


class _ConstantForUnknownLength:
    """A constant drop fraction that says so, once, when it is first used.

    The paper decays the drop fraction over the run, which needs the run's length. Without
    ``total_steps`` it stays constant; that only matters once a prune-and-grow happens (many
    runs end before the first one, and Static-G strategies never use it), so the note is logged
    at the first use instead of at every construction.
    """

    def __init__(self, value: float, what: str) -> None:
        self.inner = ConstantDropFraction(value)
        self.what = what
        self.noted = False

    def __call__(self, step: int) -> float:
        if not self.noted:
            self.noted = True
            logger.info("%s: drop fraction %s at every update (total_steps was not given; pass total_steps= "
                        "(optimizer steps of the run) for the paper's cosine decay)", self.what, self.inner.value)
        return self.inner(step)

    def __repr__(self) -> str:
        return repr(self.inner)


def _paper_drop_schedule(drop_fraction: float | DropFractionSchedule, total_steps: int | None,
                         what: str) -> DropFractionSchedule:
    """Cosine decay from ``drop_fraction`` over ``total_steps``; constant when the run length is unknown."""
    if not isinstance(drop_fraction, (int, float)):
        return drop_fraction
    if total_steps is None:
        return _ConstantForUnknownLength(float(drop_fraction), what)
    return CosineDropFraction(float(drop_fraction), total_steps)


@register_strategy("sdst")
class SDST(DST):
    """Single dynamic sparse training: DST on G with the paper's defaults, D static.

    Args:
        g_density: Generator density in (0, 1].
        d_density: Discriminator density in (0, 1] (the paper finds a relatively larger D density
            usually more stable).
        update_every: G steps between G's mask updates (500).
        drop_fraction: Initial drop fraction (0.5), cosine-decayed over ``total_steps``; or a
            schedule object.
        total_steps: G optimizer steps of the run (for the cosine decay; constant without it).
        distribution: Initial layer-wise allocation (``"erk"``).
        prune: Prune score (``"magnitude"``).
        grow: Grow score (``"gradient"``).
        scope: ``"global"`` (default) or ``"layer"``.
    """

    def __init__(self, g_density: float, d_density: float, *, update_every: int = 500,
                 drop_fraction: float | DropFractionSchedule = 0.5, total_steps: int | None = None,
                 distribution: Distribution = "erk", prune: str = "magnitude", grow: str = "gradient",
                 scope: Scope = "global") -> None:
        super().__init__(g_density, d_density, networks="generator", distribution=distribution,
                         update_every=update_every, stop=total_steps,
                         drop_fraction=_paper_drop_schedule(drop_fraction, total_steps, type(self).__name__),
                         prune=prune, grow=grow, scope=scope)
        self.total_steps = total_steps


@register_strategy("ddst")
class DDST(SDST):
    """Double dynamic sparse training (ADAPT): G as SDST, D's density steered by the balance ratio.

    The balance ratio is measured by the wrapper's probe (by default on the latents of the
    user's own G step, as the reference does; see :class:`~sparsegan.balance.BalanceProbe`) or
    fed by the user with ``sg.observe(...)``.

    Units follow the reference (Wang et al., 2023, and its published scripts): the controller
    decides every ``d_update_every`` **iterations** (generator steps; 1000 in relax, 2000 in
    strict), independent of ``n_critic``, and its BR window spans relax's interval (1000
    iterations = 100 samples at ``br_every`` 10), so each relax decision sees only what happened
    since the previous one; the first decision waits until the window is full.

    Args:
        g_density: Generator density in (0, 1].
        d_density: Initial discriminator density (default: ``g_density``, in both modes, as in
            the reference; an earlier version of our method notes said 0.3 for strict, a
            misreading).
        mode: ``"relax"`` (D may become dense) or ``"strict"`` (D capped at ``d_max_density``; at
            the cap, a connectivity update instead of growth).
        br_bounds: ``(lower, upper)``: BR >= upper raises D's density, BR <= lower lowers it. The
            paper's (0.45, 0.55) were chosen for its SNGAN and its estimator; ``"warmup"`` (our
            extension) fixes them at 0.9x-1.1x of the mean BR of the first ``br_warmup``
            iterations, for a model whose BR scale is unknown (see
            :class:`~sparsegan.balance.DensityController`).
        br_warmup: Warm-up length in iterations for ``br_bounds="warmup"`` (default: 10 relax
            intervals, i.e. 10 % of a run in the reference's proportions; it passes the first
            iterations' transient, where BR is far from its later level).
        density_step: Density change per controller decision (0.05).
        d_update_every: Iterations (G steps) between controller decisions (1000 relax, 2000 strict).
        d_max_density: Density cap (1.0 relax, 0.5 strict by default).
        d_min_density: Density floor (0.05).
        br_every: G steps between BR samples (10).
        br_window: BR samples averaged (default: relax's interval in samples, i.e.
            ``d_update_every // br_every`` in relax and half that in strict: 100 at the defaults).
        br_min_samples: Samples needed before the controller acts (default: a full window).
        d_drop_fraction: Initial drop fraction of strict mode's at-cap update (0.5), cosine-decayed
            over ``total_steps`` iterations.
        update_every: G's DST interval in G steps (500).
        drop_fraction: G's initial drop fraction (0.5, cosine-decayed over ``total_steps``).
        total_steps: Iterations (G optimizer steps) of the run: the cosine decays' length, and
            the end of the run, at which no update is made.
        distribution: Initial layer-wise allocation of both networks.
        prune: G's prune score. D always prunes by magnitude.
        grow: G's grow score. D always grows by gradient (the paper's and its reference code's
            choice: D's added capacity goes where D's own loss gradient is largest).
        scope: G's selection scope.
    """

    def __init__(self, g_density: float, d_density: float | None = None, *,
                 mode: Literal["relax", "strict"] = "relax", br_bounds: Bounds = PAPER_BOUNDS,
                 density_step: float = 0.05, d_update_every: int | None = None, d_max_density: float | None = None,
                 d_min_density: float = 0.05, br_every: int = 10, br_window: int | None = None,
                 br_min_samples: int | None = None, br_warmup: int | None = None, d_drop_fraction: float = 0.5,
                 update_every: int = 500,
                 drop_fraction: float | DropFractionSchedule = 0.5, total_steps: int | None = None,
                 distribution: Distribution = "erk", prune: str = "magnitude", grow: str = "gradient",
                 scope: Scope = "global") -> None:
        super().__init__(g_density, g_density if d_density is None else d_density, update_every=update_every,
                         drop_fraction=drop_fraction, total_steps=total_steps, distribution=distribution,
                         prune=prune, grow=grow, scope=scope)
        if mode not in ("relax", "strict"):
            raise ValueError(f"mode must be 'relax' or 'strict', got {mode!r}")
        self.mode = mode
        self.br_bounds = check_bounds(br_bounds)
        self.density_step = density_step
        self.d_update_every = d_update_every if d_update_every is not None else RELAX_INTERVAL * (
            1 if mode == "relax" else 2)
        self.d_max_density = d_max_density if d_max_density is not None else (1.0 if mode == "relax" else STRICT_CAP)
        self.d_min_density = d_min_density
        for name, value in (("br_every", br_every), ("d_update_every", self.d_update_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if br_window is None:
            relax_interval = self.d_update_every if mode == "relax" else self.d_update_every // 2
            br_window = max(1, relax_interval // br_every)
        if isinstance(br_window, bool) or not isinstance(br_window, int) or br_window < 1:
            raise ValueError(f"br_window must be a positive int, got {br_window!r}")
        self.br_every, self.br_window = br_every, br_window
        self.br_min_samples = br_window if br_min_samples is None else br_min_samples
        if not 1 <= self.br_min_samples <= br_window:
            raise ValueError(f"br_min_samples must be in [1, br_window={br_window}], got {br_min_samples!r}")
        relax_interval = self.d_update_every if mode == "relax" else self.d_update_every // 2
        self.br_warmup = 10 * max(1, relax_interval) if br_warmup is None else br_warmup
        if isinstance(self.br_warmup, bool) or not isinstance(self.br_warmup, int) or self.br_warmup < 0:
            raise ValueError(f"br_warmup must be an int >= 0 (iterations), got {br_warmup!r}")
        self.d_drop_fraction = d_drop_fraction
        # fail now, not at the first controller update
        self._controller()

    def _controller(self) -> DensityController:
        return DensityController(self.d_density, bounds=self.br_bounds, step=self.density_step,
                                 min_density=self.d_min_density, max_density=self.d_max_density, mode=self.mode)

    def build(self) -> dict[str, SparsityAlgorithm | None]:
        """DST on G; a BR-controlled density on D."""
        built = super().build()
        decisions = UpdateSchedule(self.d_update_every, stop=self.total_steps)
        connectivity = None
        if self.mode == "strict":
            connectivity = DynamicSparsity(
                self.d_density, self.distribution, update=decisions,
                drop_fraction=_paper_drop_schedule(self.d_drop_fraction, self.total_steps, "DDST strict at-cap DST"),
                prune="magnitude", grow="gradient", scope="global",
            )
        built["discriminator"] = ControlledDensity(
            self.d_density, self.distribution, controller=self._controller(), update=decisions,
            min_samples=self.br_min_samples, connectivity=connectivity,
            warmup=self.br_warmup if self.br_bounds == "warmup" else 0,
        )
        return built
