"""User-facing strategies and their name registry.

=============  ===========================================================
name           what it does
=============  ===========================================================
``dense``      :class:`Dense`: no masks (baseline; still measures)
``static``     :class:`Static`: fixed masks at ``g_density`` / ``d_density``
``dst``        :class:`DST`: prune-and-grow on G, D or both at fixed density
``sdst``       :class:`SDST`: DST on G (paper defaults), D static
``ddst``       :class:`DDST`: SDST plus D's density steered by the balance ratio
=============  ===========================================================

Build one by class (``strategies.Static(0.1, 0.2)``) or by name
(``strategies.create("static", g_density=0.1, d_density=0.2)``).
"""

from sparsegan.strategies.base import (
    NETWORKS,
    STRATEGIES,
    SparsityAlgorithm,
    Strategy,
    check_density,
    create,
    register_strategy,
)
from sparsegan.strategies.ddst import DDST, SDST, ControlledDensity
from sparsegan.strategies.dst import DST, DynamicSparsity
from sparsegan.strategies.static import Dense, Static, StaticSparsity

__all__ = [
    "NETWORKS",
    "STRATEGIES",
    "SparsityAlgorithm",
    "Strategy",
    "StaticSparsity",
    "DynamicSparsity",
    "Dense",
    "Static",
    "DST",
    "SDST",
    "DDST",
    "ControlledDensity",
    "check_density",
    "create",
    "register_strategy",
]
