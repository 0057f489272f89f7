"""The logic inside the benchmark scripts that is not a measurement (the measurements themselves run
outside the test suite: ``make bench``)."""

from __future__ import annotations

import math

import pytest

from benchmarks.br_calibration import recommended_bounds


def _run(label: str, br: float | None, fd: float, strategy: str = "static") -> dict[str, object]:
    return {"label": label, "br_late_mean": br, "fd": fd, "strategy": strategy}


def test_recommended_bounds_span_the_good_sparse_runs() -> None:
    records = [
        _run("D 0.05", 0.19, 13.0),   # too weak a D: high BR, worse FD
        _run("D 0.1", 0.06, 6.2),     # within 1.25 x 5.0 = 6.25
        _run("D 0.3", 0.04, 5.0),     # the best sparse run
        _run("D 0.3", 0.03, 6.3),     # just outside the tolerance
        _run("D 0.5", 0.0, 154.0),    # G collapsed: BR ~0
        _run("dense", 0.17, 2.5, strategy="dense"),  # never part of the band
        _run("D 1", None, 4.0),       # no BR samples: ignored
    ]
    assert recommended_bounds(records, tolerance=1.25) == (0.04, 0.06)
    assert recommended_bounds(records, tolerance=1.3) == (0.03, 0.06)


def test_recommended_bounds_need_two_good_runs() -> None:
    assert recommended_bounds([_run("a", 0.05, 5.0), _run("b", 0.1, 50.0)]) is None
    assert recommended_bounds([_run("dense", 0.1, 1.0, strategy="dense")]) is None
    assert recommended_bounds([_run("a", 0.05, math.nan), _run("b", 0.06, math.nan)]) is None


def test_recommended_bounds_tolerance_one_keeps_ties_only() -> None:
    band = recommended_bounds([_run("a", 0.05, 5.0), _run("b", 0.07, 5.0), _run("c", 0.2, 5.1)], tolerance=1.0)
    assert band == pytest.approx((0.05, 0.07))
