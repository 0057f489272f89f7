"""Dense and static strategies: masks fixed at initialisation."""

from __future__ import annotations

from sparsegan.strategies.base import (
    Distribution,
    SparsityAlgorithm,
    Strategy,
    check_density,
    register_strategy,
)

__all__ = ["StaticSparsity", "Dense", "Static"]


class StaticSparsity(SparsityAlgorithm):
    """Masks drawn once from the distribution and never changed."""


@register_strategy("dense")
class Dense(Strategy):
    """No masks on either network; discovery, reporting and step counting still run.

    Useful as the baseline of a comparison: the same wrapper, the same hooks, no sparsity.
    """

    def build(self) -> dict[str, SparsityAlgorithm | None]:
        """Both networks dense."""
        return {"generator": None, "discriminator": None}


@register_strategy("static")
class Static(Strategy):
    """Fixed random masks at the given densities (the paper's *Static* baseline).

    Args:
        g_density: Generator density in (0, 1].
        d_density: Discriminator density in (0, 1].
        distribution: Layer-wise allocation, ``"erk"`` (default), ``"er"``, ``"uniform"`` or custom.
    """

    def __init__(self, g_density: float, d_density: float, distribution: Distribution = "erk") -> None:
        self.g_density = check_density(g_density, "g_density")
        self.d_density = check_density(d_density, "d_density")
        self.distribution = distribution

    def build(self) -> dict[str, SparsityAlgorithm | None]:
        """Two static algorithms."""
        return {
            "generator": StaticSparsity(self.g_density, self.distribution),
            "discriminator": StaticSparsity(self.d_density, self.distribution),
        }
