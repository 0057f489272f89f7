"""Tests for sparsegan.schedules."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsegan.schedules import (
    DROP_FRACTION_SCHEDULES,
    ConstantDropFraction,
    CosineDropFraction,
    DropFractionSchedule,
    LinearDropFraction,
    UpdateSchedule,
    drop_fraction_schedule,
)

# ----------------------------------------------------------------------------- UpdateSchedule


def _due(schedule: UpdateSchedule, steps: range) -> list[int]:
    return [s for s in steps if schedule.is_due(s)]


def test_is_due_tables() -> None:
    assert _due(UpdateSchedule(every=3, start=0, stop=9), range(20)) == [3, 6]
    assert _due(UpdateSchedule(every=3), range(13)) == [3, 6, 9, 12]
    # start=5: first update at 5 + 2 = 7; stop=12 excludes 13 anyway and 11 is due
    assert _due(UpdateSchedule(every=2, start=5, stop=12), range(20)) == [7, 9, 11]
    assert _due(UpdateSchedule(every=1, start=2, stop=5), range(10)) == [3, 4]
    assert _due(UpdateSchedule(every=100, start=0, stop=100), range(300)) == []
    assert not UpdateSchedule(every=1).is_due(0)


def test_update_schedule_is_frozen_with_repr() -> None:
    schedule = UpdateSchedule(every=4, start=1)
    assert repr(schedule) == "UpdateSchedule(every=4, start=1, stop=None)"
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.every = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"every": 0}, ValueError, r"every must be >= 1, got 0"),
        ({"every": -2}, ValueError, r"every must be >= 1"),
        ({"every": 2, "start": -1}, ValueError, r"start must be >= 0"),
        ({"every": 2, "start": 5, "stop": 5}, ValueError, r"stop must be greater than start=5"),
        ({"every": 2, "stop": 0}, ValueError, r"stop must be greater than start=0"),
        ({"every": 2.5}, TypeError, r"every must be an int, got float"),
        ({"every": True}, TypeError, r"every must be an int, got bool"),
    ],
)
def test_update_schedule_validation(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        UpdateSchedule(**kwargs)


def test_is_due_rejects_negative_step() -> None:
    with pytest.raises(ValueError, match="step must be >= 0"):
        UpdateSchedule(every=1).is_due(-1)


@settings(max_examples=100, deadline=None)
@given(every=st.integers(1, 20), start=st.integers(0, 30), length=st.integers(1, 60))
def test_is_due_matches_definition(every: int, start: int, length: int) -> None:
    stop = start + length
    schedule = UpdateSchedule(every=every, start=start, stop=stop)
    due = _due(schedule, range(stop + 2 * every))
    assert due == list(range(start + every, stop, every))


# ----------------------------------------------------------------------------- drop fractions


def test_constant() -> None:
    schedule = ConstantDropFraction(0.3)
    assert [schedule(s) for s in (0, 1, 10**6)] == [0.3, 0.3, 0.3]
    assert repr(schedule) == "ConstantDropFraction(value=0.3)"


def test_cosine_hand_values() -> None:
    schedule = CosineDropFraction(initial=0.5, total_steps=100)
    assert schedule(0) == 0.5
    assert schedule(50) == pytest.approx(0.25)
    assert schedule(100) == 0.0
    assert schedule(150) == 0.0
    # step 25: 0.5 * 0.5 * (1 + cos(pi/4)) = 0.25 * (1 + sqrt(2)/2)
    assert schedule(25) == pytest.approx(0.25 * (1 + math.sqrt(2) / 2))
    with_final = CosineDropFraction(initial=0.5, total_steps=10, final=0.1)
    assert with_final(5) == pytest.approx(0.3)
    assert with_final(10) == 0.1 and with_final(11) == 0.1
    assert repr(schedule) == "CosineDropFraction(initial=0.5, total_steps=100, final=0.0)"


def test_linear_hand_values() -> None:
    schedule = LinearDropFraction(initial=0.4, total_steps=8, final=0.2)
    assert schedule(0) == pytest.approx(0.4)
    assert schedule(2) == pytest.approx(0.35)
    assert schedule(4) == pytest.approx(0.3)
    assert schedule(8) == 0.2
    assert schedule(100) == 0.2
    assert LinearDropFraction(0.5, 10)(5) == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ConstantDropFraction(1.0), r"value must be in \[0, 1\)"),
        (lambda: ConstantDropFraction(-0.1), r"value must be in \[0, 1\)"),
        (lambda: ConstantDropFraction(math.nan), r"value must be in \[0, 1\)"),
        (lambda: CosineDropFraction(0.5, 0), r"total_steps must be >= 1"),
        (lambda: CosineDropFraction(1.2, 10), r"initial must be in \[0, 1\)"),
        (lambda: LinearDropFraction(0.5, 10, final=1.0), r"final must be in \[0, 1\)"),
        (lambda: LinearDropFraction(0.5, -3), r"total_steps must be >= 1"),
    ],
)
def test_drop_fraction_validation(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_schedules_reject_negative_step() -> None:
    for schedule in (
        ConstantDropFraction(0.1),
        CosineDropFraction(0.1, 5),
        LinearDropFraction(0.1, 5),
    ):
        with pytest.raises(ValueError, match="step must be >= 0"):
            schedule(-1)


# ----------------------------------------------------------------------------- factory


def test_drop_fraction_schedule_factory() -> None:
    assert drop_fraction_schedule(0.3) == ConstantDropFraction(0.3)
    assert drop_fraction_schedule(0) == ConstantDropFraction(0.0)
    existing = CosineDropFraction(0.2, 10)
    assert drop_fraction_schedule(existing) is existing

    def custom(step: int) -> float:
        return 0.1

    assert drop_fraction_schedule(custom) is custom
    assert isinstance(existing, DropFractionSchedule)
    assert drop_fraction_schedule("constant") == ConstantDropFraction(0.5)
    assert drop_fraction_schedule("Cosine", total_steps=50, initial=0.3) == CosineDropFraction(
        0.3, 50
    )
    assert drop_fraction_schedule("linear", total_steps=7) == LinearDropFraction(0.5, 7)



def test_every_registered_name_builds_its_schedule() -> None:
    # by hand, initial 0.5 over 10 steps, at steps 0, 2, 10 and 11: constant stays 0.5; linear
    # 0.5 * (1 - 2/10) = 0.4; cosine 0.5 * 0.5 * (1 + cos(pi * 2/10)) = 0.4523; both reach 0 at 10
    by_hand = {
        "constant": [0.5, 0.5, 0.5, 0.5],
        "linear": [0.5, 0.4, 0.0, 0.0],
        "cosine": [0.5, 0.25 * (1 + math.cos(math.pi / 5)), 0.0, 0.0],
    }
    assert DROP_FRACTION_SCHEDULES  # the loop below runs
    for name, build in DROP_FRACTION_SCHEDULES.items():
        expected = by_hand[name]  # a name added to the registry needs its hand values here
        from_registry = build(0.5) if name == "constant" else build(initial=0.5, total_steps=10)
        assert isinstance(from_registry, DropFractionSchedule)
        for schedule in (from_registry, drop_fraction_schedule(name.upper(), total_steps=10)):
            assert [schedule(s) for s in (0, 2, 10, 11)] == pytest.approx(expected, abs=1e-12), name


def test_drop_fraction_schedule_errors() -> None:
    with pytest.raises(ValueError, match=r"cosine drop fraction needs total_steps=\.\.\."):
        drop_fraction_schedule("cosine")
    with pytest.raises(ValueError, match=r"linear drop fraction needs total_steps"):
        drop_fraction_schedule("linear")
    with pytest.raises(ValueError, match=r"unknown drop fraction schedule 'step'.*'constant'"):
        drop_fraction_schedule("step")
    with pytest.raises(ValueError, match=r"value must be in \[0, 1\)"):
        drop_fraction_schedule(1.5)
    with pytest.raises(TypeError, match="got bool"):
        drop_fraction_schedule(True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got list"):
        drop_fraction_schedule([0.1])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- properties

fraction_st = st.floats(0.0, 0.999)


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from([CosineDropFraction, LinearDropFraction]),
    a=fraction_st,
    c=fraction_st,
    total=st.integers(1, 500),
    steps=st.lists(st.integers(0, 1000), min_size=2, max_size=10),
)
def test_decay_bounds_and_monotone(
    kind: type, a: float, c: float, total: int, steps: list[int]
) -> None:
    initial, final = max(a, c), min(a, c)
    schedule = kind(initial=initial, total_steps=total, final=final)
    values = [schedule(s) for s in sorted(steps)]
    tol = 1e-12
    assert all(final - tol <= v <= initial + tol for v in values)
    assert all(later <= earlier + tol for earlier, later in itertools.pairwise(values))
    assert schedule(0) == pytest.approx(initial)
    assert schedule(total) == final and schedule(total + 1) == final
