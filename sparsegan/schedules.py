"""Schedules for dynamic sparse training, as small immutable objects.

* `UpdateSchedule` says at which optimizer steps the sparse topology is
  updated.
* Drop-fraction schedules (`ConstantDropFraction`, `CosineDropFraction`,
  `LinearDropFraction`) say which fraction of the active weights is dropped
  (and regrown) at a given step.  Any callable ``step -> float`` satisfies the
  `DropFractionSchedule` protocol; `drop_fraction_schedule` builds one from a
  float, a name or an existing schedule.

Steps count optimizer steps taken so far: the step is 1 right after the first
``optimizer.step()``.

Example:
    >>> schedule = CosineDropFraction(initial=0.5, total_steps=100)
    >>> schedule(50)
    0.25
    >>> UpdateSchedule(every=3, stop=9).is_due(6)
    True
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "DROP_FRACTION_SCHEDULES",
    "ConstantDropFraction",
    "CosineDropFraction",
    "DropFractionSchedule",
    "LinearDropFraction",
    "UpdateSchedule",
    "drop_fraction_schedule",
]


def _check_int(value: object, name: str, *, minimum: int) -> int:
    """Validates that ``value`` is an int (not bool) of at least ``minimum``.

    Raises:
        TypeError: If ``value`` is not an int.
        ValueError: If ``value < minimum``.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        number = operator.index(value)  # type: ignore[arg-type]  # any object: index() itself raises the TypeError we report
    except TypeError as exc:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from exc
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number


def _check_fraction(value: object, name: str) -> float:
    """Validates that ``value`` is a real number in ``[0, 1)``.

    Raises:
        TypeError: If ``value`` is not a real number.
        ValueError: If ``value`` is outside ``[0, 1)`` (or NaN).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(value).__name__}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(
            f"{name} must be in [0, 1) (a fraction of the active weights), got {value!r}"
        )
    return float(value)


def _check_step(step: int) -> int:
    """Validates an optimizer step count (an int >= 0)."""
    return _check_int(step, "step", minimum=0)


@dataclass(frozen=True)
class UpdateSchedule:
    """When to update the sparse topology.

    An update is due at step ``step`` (optimizer steps taken so far) when
    ``start < step``, ``(step - start) % every == 0`` and, if ``stop`` is set,
    ``step < stop``.  For example ``UpdateSchedule(every=3, start=0, stop=9)``
    is due at steps 3 and 6 only.

    Attributes:
        every: Number of optimizer steps between updates (> 0).
        start: Steps before the first possible update (>= 0); the first update
            is at ``start + every``.
        stop: Exclusive step at which updates stop (> start), or None to
            update forever.
    """

    every: int
    start: int = 0
    stop: int | None = None

    def __post_init__(self) -> None:
        """Validates the fields.

        Raises:
            TypeError: If a field is not an int.
            ValueError: If ``every <= 0``, ``start < 0`` or ``stop <= start``.
        """
        _check_int(self.every, "UpdateSchedule.every", minimum=1)
        _check_int(self.start, "UpdateSchedule.start", minimum=0)
        if self.stop is not None:
            stop = _check_int(self.stop, "UpdateSchedule.stop", minimum=0)
            if stop <= self.start:
                raise ValueError(
                    f"UpdateSchedule.stop must be greater than start={self.start} (it is the "
                    f"exclusive last step), got stop={stop}; use stop=None to update forever"
                )

    def is_due(self, step: int) -> bool:
        """Returns whether a topology update is due at ``step``.

        Args:
            step: Number of optimizer steps taken so far (>= 0).

        Returns:
            True if the topology should be updated now.

        Raises:
            ValueError: If ``step`` is negative.
        """
        step = _check_step(step)
        if step <= self.start or (self.stop is not None and step >= self.stop):
            return False
        return (step - self.start) % self.every == 0


@runtime_checkable
class DropFractionSchedule(Protocol):
    """Anything callable as ``schedule(step) -> fraction``.

    The fraction, in ``[0, 1)``, is the share of a layer's active weights that
    is dropped (and regrown) at an update after ``step`` optimizer steps.
    """

    def __call__(self, step: int) -> float:
        """Returns the drop fraction at ``step``."""
        ...


@dataclass(frozen=True)
class ConstantDropFraction:
    """The same drop fraction at every step.

    Attributes:
        value: The drop fraction, in ``[0, 1)``.
    """

    value: float

    def __post_init__(self) -> None:
        """Validates ``value``.

        Raises:
            TypeError: If ``value`` is not a number.
            ValueError: If ``value`` is outside ``[0, 1)``.
        """
        _check_fraction(self.value, "ConstantDropFraction.value")

    def __call__(self, step: int) -> float:
        """Returns ``value``.

        Args:
            step: Optimizer steps taken so far (>= 0).

        Returns:
            The drop fraction.
        """
        _check_step(step)
        return float(self.value)


@dataclass(frozen=True)
class _DecayingDropFraction:
    """Shared fields, validation and end handling of the decaying schedules.

    Attributes:
        initial: Drop fraction at step 0, in ``[0, 1)``.
        total_steps: Number of steps of the decay (> 0), usually the number of
            optimizer steps of the run.
        final: Drop fraction from ``total_steps`` on, in ``[0, 1)``.
    """

    initial: float
    total_steps: int
    final: float = 0.0

    def __post_init__(self) -> None:
        """Validates the fields.

        Raises:
            TypeError: If a field has the wrong type.
            ValueError: If a fraction is outside ``[0, 1)`` or
                ``total_steps <= 0``.
        """
        name = type(self).__name__
        _check_fraction(self.initial, f"{name}.initial")
        _check_fraction(self.final, f"{name}.final")
        _check_int(self.total_steps, f"{name}.total_steps", minimum=1)

    def _remaining(self, progress: float) -> float:
        """Share of ``initial - final`` left at ``progress`` in ``[0, 1)``."""
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        """Returns the drop fraction at ``step``.

        Args:
            step: Optimizer steps taken so far (>= 0).

        Returns:
            The drop fraction.
        """
        t = min(_check_step(step), self.total_steps)
        if t == self.total_steps:  # exact end value, free of rounding
            return float(self.final)
        return float(self.final + (self.initial - self.final) * self._remaining(t / self.total_steps))


@dataclass(frozen=True)
class CosineDropFraction(_DecayingDropFraction):
    """Cosine decay from ``initial`` at step 0 to ``final`` at ``total_steps``.

    ``fraction(step) = final + (initial - final) * 0.5 * (1 + cos(pi * t / T))``
    with ``t = min(step, T)`` and ``T = total_steps``; constant after ``T``.
    """

    def _remaining(self, progress: float) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LinearDropFraction(_DecayingDropFraction):
    """Linear decay from ``initial`` at step 0 to ``final`` at ``total_steps``.

    ``fraction(step) = initial + (final - initial) * min(step, T) / T`` with
    ``T = total_steps``; constant after ``T``.
    """

    def _remaining(self, progress: float) -> float:
        return 1.0 - progress


DROP_FRACTION_SCHEDULES: dict[str, Callable[..., DropFractionSchedule]] = {
    "constant": ConstantDropFraction,
    "cosine": CosineDropFraction,
    "linear": LinearDropFraction,
}
"""Registry of drop-fraction schedule classes by name."""


def drop_fraction_schedule(
    spec: float | DropFractionSchedule | str,
    *,
    total_steps: int | None = None,
    initial: float = 0.5,
) -> DropFractionSchedule:
    """Builds a drop-fraction schedule from a flexible specification.

    Args:
        spec: A float (a `ConstantDropFraction`), a schedule object or any
            callable ``step -> float`` (returned unchanged), or a name from
            `DROP_FRACTION_SCHEDULES` (``"constant"``, ``"cosine"``,
            ``"linear"``; case-insensitive) built with ``initial`` and, for
            cosine/linear, ``total_steps`` (decaying to 0).
        total_steps: Length of the decay in optimizer steps; required by
            ``"cosine"`` and ``"linear"``, ignored otherwise.
        initial: Initial (or constant) drop fraction for named schedules.

    Returns:
        The schedule.

    Raises:
        TypeError: If ``spec`` has an unsupported type.
        ValueError: If the name is unknown, ``total_steps`` is missing for a
            decaying schedule, or a value is out of range.
    """
    if isinstance(spec, bool):
        raise TypeError("drop fraction must be a float, a schedule or a name, got bool")
    if isinstance(spec, (int, float)):
        return ConstantDropFraction(float(spec))
    if isinstance(spec, str):
        name = spec.lower()
        if name not in DROP_FRACTION_SCHEDULES:
            raise ValueError(
                f"unknown drop fraction schedule {spec!r}; known names are "
                f"{sorted(DROP_FRACTION_SCHEDULES)}, or pass a float or a callable step -> float"
            )
        if name == "constant":
            return ConstantDropFraction(initial)
        if total_steps is None:
            raise ValueError(
                f"{name} drop fraction needs total_steps=... (the number of optimizer steps of "
                "the run)"
            )
        return DROP_FRACTION_SCHEDULES[name](initial=initial, total_steps=total_steps)
    if callable(spec):
        return spec
    raise TypeError(
        "drop fraction must be a float, a schedule object (callable step -> float) or one of "
        f"{sorted(DROP_FRACTION_SCHEDULES)}; got {type(spec).__name__}"
    )
