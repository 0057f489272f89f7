"""Base classes of the strategies and their name registry.

Two levels, kept apart so that each stays small:

* a :class:`SparsityAlgorithm` decides how the masks of **one** network are initialised and when
  and how they change (static masks, dynamic sparse training, ...);
* a :class:`Strategy` is what users pick: it builds one algorithm per network (or ``None`` for a
  dense network). ``Static(g_density=0.1, d_density=0.2)`` builds two static algorithms.

Strategies are registered by name so that configs can say ``"static"`` or ``"dst"``.
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import torch

from sparsegan.balance import BalanceRatio
from sparsegan.distributions import allocate, check_density, random_mask
from sparsegan.masks import MaskedWeights, shared_mask
from sparsegan.schedules import UpdateSchedule

__all__ = [
    "NETWORKS",
    "SparsityAlgorithm",
    "Strategy",
    "STRATEGIES",
    "register_strategy",
    "create",
    "check_density",
]

logger = logging.getLogger(__name__)

NETWORKS: tuple[str, str] = ("generator", "discriminator")
"""The two networks of a GAN, in the order strategies and the wrapper use them."""

Distribution = str | Mapping[str, float] | Callable[[str, tuple[int, ...]], float]


class SparsityAlgorithm(abc.ABC):
    """How the masks of one network are initialised and updated.

    Args:
        density: Target fraction of the network's maskable weights that are active, in (0, 1].
        distribution: How the density is spread over layers: ``"erk"`` (default), ``"er"``,
            ``"uniform"``, a ``{name: density}`` map, or a callable ``(name, shape) -> density``.
    """

    def __init__(self, density: float, distribution: Distribution = "erk") -> None:
        self.density = check_density(density)
        self.distribution = distribution

    def initial_masks(self, shapes: Mapping[str, Sequence[int]], *, generator: torch.Generator,
                      shared_dims: Mapping[str, tuple[int, ...]] | None = None) -> list[torch.Tensor]:
        """Random masks with exact per-layer active counts from the distribution.

        Args:
            shapes: Weight name to shape, in the network's order.
            generator: The network's random generator (CPU).
            shared_dims: The kernel banks among the weights: name to the axes their one kernel
                mask is shared along (see :mod:`sparsegan.masks`). The distribution sees a bank
                at its full parameter shape; its count is rounded to whole kernel positions and
                the ordinary layers absorb the rounding.

        Returns:
            One bool mask per weight, on the CPU.
        """
        counts = allocate(shapes, self.density, self.distribution)
        banks = {name: dims for name, dims in (shared_dims or {}).items() if dims and name in shapes}
        if not banks:
            return [random_mask(shape, counts[name], generator=generator) for name, shape in shapes.items()]
        kernel_shapes: dict[str, tuple[int, ...]] = {}
        residual = 0
        for name, axes in banks.items():
            full = tuple(shapes[name])
            kernel_shapes[name] = tuple(n for d, n in enumerate(full) if d not in axes)
            multiplicity = math.prod(full[d] for d in axes)
            positions = min(max(round(counts[name] / multiplicity), 1), math.prod(kernel_shapes[name]))
            residual += counts[name] - positions * multiplicity
            counts[name] = positions
        for name in sorted((n for n in shapes if n not in banks), key=lambda n: -counts[n]):
            room = math.prod(shapes[name]) - counts[name] if residual > 0 else counts[name] - 1
            take = max(min(abs(residual), room), 0)
            counts[name] += take if residual > 0 else -take
            residual -= take if residual > 0 else -take
        return [shared_mask(random_mask(kernel_shapes[name], counts[name], generator=generator), tuple(shape),
                            banks[name]) if name in banks else random_mask(shape, counts[name], generator=generator)
                for name, shape in shapes.items()]

    needs_balance_ratio: ClassVar[bool] = False
    """Whether :meth:`update` reads the balance ratio (the wrapper then checks it has a source)."""

    def update(self, step: int, weights: MaskedWeights, optimizer: torch.optim.Optimizer,
               generator: torch.Generator, *, balance: BalanceRatio | None = None) -> bool:
        """Called after every optimizer step of the network; change masks if due.

        Args:
            step: Optimizer steps of this network so far (1 after the first).
            weights: The network's masked weights (change them with ``weights.set_masks``).
            optimizer: The network's optimizer (grads and state are still in place).
            generator: The network's random generator.
            balance: The wrapper's balance-ratio estimate; passed only to algorithms that set
                :attr:`needs_balance_ratio` (others may omit the keyword from their signature).
                Those algorithms also receive ``iteration=``: the generator's optimizer steps.

        Returns:
            Whether the masks changed.

        Raises:
            NonFiniteScoreError: (:class:`sparsegan.criteria.NonFiniteScoreError`) when scores
                are not finite; raise it before changing the masks. At a due step the wrapper
                then restores this algorithm's :meth:`state_dict` and the generator's state,
                logs a warning and skips the update (it also skips a due update without calling
                this method when a masked weight or its gradient is not finite).
        """
        return False

    schedule: UpdateSchedule | None = None
    """When :meth:`update` considers a change (``None``: never, as for static masks)."""

    def is_due(self, step: int, *, iteration: int | None = None) -> bool:
        """Whether :meth:`update` considers a change at ``step``.

        ``iteration`` (the generator's optimizer steps so far) is passed, like ``balance``, only
        to algorithms that set :attr:`needs_balance_ratio`; their decisions run on that clock.
        """
        return self.schedule is not None and self.schedule.is_due(step)

    def state_dict(self) -> dict[str, Any]:
        """State that changes during training (none for most algorithms)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def _config(self) -> str:
        dist = self.distribution if isinstance(self.distribution, str) else "custom"
        return f"density={self.density}, distribution={dist!r}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._config()})"


class Strategy(abc.ABC):
    """A user-facing sparse training strategy: one algorithm per network.

    Subclasses set :attr:`name` and implement :meth:`build`.
    """

    name: ClassVar[str] = ""
    br_every: int = 10
    """G steps between balance-ratio samples of the wrapper's probe."""
    br_window: int = 100
    """Balance-ratio samples averaged by the wrapper's estimate."""

    @abc.abstractmethod
    def build(self) -> dict[str, SparsityAlgorithm | None]:
        """Fresh per-network algorithms: ``{"generator": ..., "discriminator": ...}`` (None = dense)."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


S = TypeVar("S", bound=type[Strategy])

STRATEGIES: dict[str, type[Strategy]] = {}
"""Registered strategies by lower-case name."""


def register_strategy(name: str) -> Callable[[S], S]:
    """Class decorator registering a :class:`Strategy` under ``name`` (case-insensitive)."""

    def decorator(cls: S) -> S:
        key = name.lower()
        if key in STRATEGIES and STRATEGIES[key] is not cls:
            raise ValueError(f"a strategy named {name!r} is already registered ({STRATEGIES[key].__name__})")
        STRATEGIES[key] = cls
        cls.name = key
        return cls

    return decorator


def create(name: str, **kwargs: Any) -> Strategy:
    """Build a registered strategy by name, e.g. ``create("static", g_density=0.1, d_density=0.2)``.

    Raises:
        ValueError: For an unknown name (the message lists the known ones).
        TypeError: When required arguments are missing (the message shows the signature).
    """
    if not isinstance(name, str):
        raise TypeError(f"strategy name must be a string, got {type(name).__name__}")
    cls = STRATEGIES.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown strategy {name!r}; known strategies: {sorted(STRATEGIES)}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        import inspect

        raise TypeError(f"strategy {name!r} takes {cls.__name__}{inspect.signature(cls)}: {exc}") from None
