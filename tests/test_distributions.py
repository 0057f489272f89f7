"""Tests for sparsegan.distributions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsegan.distributions import (
    DISTRIBUTIONS,
    active_counts,
    allocate,
    layer_densities,
    random_mask,
)

# numel: a = 8, b = 32, c = 16 -> total 56
MLP = {"a": (4, 2), "b": (8, 4), "c": (2, 8)}


# ----------------------------------------------------------------------------- ERK by hand


def test_erk_hand_computed_mlp() -> None:
    # raw ERK factors: a = 6/8 = 0.75, b = 12/32 = 0.375, c = 10/16 = 0.625.
    # target = 0.5 * 56 = 28; sum(raw * n) = 6 + 12 + 10 = 28 -> eps = 1.
    dens = layer_densities(MLP, 0.5, "erk")
    assert list(dens) == ["a", "b", "c"]
    assert dens == pytest.approx({"a": 0.75, "b": 0.375, "c": 0.625})
    assert allocate(MLP, 0.5, "erk") == {"a": 6, "b": 12, "c": 10}


def test_erk_dense_layers_are_resolved_by_hand() -> None:
    # target = 0.8 * 56 = 44.8.
    # Round 1: eps = 44.8 / 28 = 1.6 -> a: 1.2 > 1 (dense), c: 1.0 (not > 1), b: 0.6.
    # Round 2: eps = (44.8 - 8) / (12 + 10) = 36.8 / 22 = 1.6727 -> c: 1.045 > 1 (dense).
    # Round 3: eps = (44.8 - 8 - 16) / 12 = 20.8 / 12 -> b: 0.375 * 20.8 / 12 = 0.65.
    dens = layer_densities(MLP, 0.8, "erk")
    assert dens == pytest.approx({"a": 1.0, "b": 0.65, "c": 1.0})
    # b: 0.65 * 32 = 20.8 -> floor 20, remainder 0.8 gets the extra unit; total round(44.8) = 45.
    assert allocate(MLP, 0.8, "erk") == {"a": 8, "b": 21, "c": 16}


def test_erk_conv_shapes_by_hand() -> None:
    shapes = {"conv": (4, 2, 3, 3), "fc": (10, 4)}
    # conv: numel 72, raw (4+2+3+3)/72 = 1/6; fc: numel 40, raw 14/40 = 0.35.
    # target = 0.25 * 112 = 28; sum(raw * n) = 12 + 14 = 26 -> eps = 28/26 = 14/13.
    dens = layer_densities(shapes, 0.25, "erk")
    assert dens["conv"] == pytest.approx(14 / 13 / 6)
    assert dens["fc"] == pytest.approx(14 / 13 * 0.35)
    # ER uses only (4, 2): raw conv = 6/8 = 0.75, fc = 0.35;
    # sum(raw * n) = 54 + 14 = 68 -> eps = 28/68 = 7/17.
    er = layer_densities(shapes, 0.25, "er")
    assert er["conv"] == pytest.approx(7 / 17 * 0.75)
    assert er["fc"] == pytest.approx(7 / 17 * 0.35)
    assert er != pytest.approx(dens)


def test_erk_power() -> None:
    # power 0 makes every raw factor 1 -> uniform.
    assert layer_densities(MLP, 0.3, "erk", power=0.0) == pytest.approx(
        {"a": 0.3, "b": 0.3, "c": 0.3}
    )
    # power 2: raw = 0.5625, 0.140625, 0.390625; sum(raw * n) = 4.5 + 4.5 + 6.25 = 15.25.
    eps = 0.25 * 56 / 15.25
    assert layer_densities(MLP, 0.25, "erk", power=2.0) == pytest.approx(
        {"a": eps * 0.5625, "b": eps * 0.140625, "c": eps * 0.390625}
    )


def test_er_and_erk_agree_on_2d_shapes() -> None:
    # on 2-D shapes ER's (n_in + n_out) / (n_in * n_out) is ERK's factor: the hand values of
    # test_erk_hand_computed_mlp, not just whatever ERK returns
    assert layer_densities(MLP, 0.5, "er") == pytest.approx({"a": 0.75, "b": 0.375, "c": 0.625})
    for density in (0.1, 0.5, 0.9):
        assert layer_densities(MLP, density, "er") == pytest.approx(
            layer_densities(MLP, density, "ERK")
        )


def test_uniform_and_full_density() -> None:
    assert layer_densities(MLP, 0.25, "uniform") == {"a": 0.25, "b": 0.25, "c": 0.25}
    # 0.25 * (8, 32, 16) = (2, 8, 4) exactly.
    assert allocate(MLP, 0.25, "Uniform") == {"a": 2, "b": 8, "c": 4}
    for name in DISTRIBUTIONS:
        assert layer_densities(MLP, 1.0, name) == {"a": 1.0, "b": 1.0, "c": 1.0}
        assert allocate(MLP, 1.0, name) == {"a": 8, "b": 32, "c": 16}


def test_registry_signature() -> None:
    shapes = {name: tuple(s) for name, s in MLP.items()}
    assert DISTRIBUTIONS["erk"](shapes, 0.5, 1.0) == pytest.approx(
        {"a": 0.75, "b": 0.375, "c": 0.625}
    )
    # the third argument is the power: 0 makes ERK uniform
    assert DISTRIBUTIONS["erk"](shapes, 0.3, 0.0) == pytest.approx({"a": 0.3, "b": 0.3, "c": 0.3})
    # every registered entry, called as fn(shapes, density, power) and by its name (any case), gives
    # its own hand-computed densities (the conv/fc values of test_erk_conv_shapes_by_hand)
    conv_fc = {"conv": (4, 2, 3, 3), "fc": (10, 4)}
    by_hand = {
        "uniform": {"conv": 0.25, "fc": 0.25},
        "er": {"conv": 7 / 17 * 0.75, "fc": 7 / 17 * 0.35},
        "erk": {"conv": 14 / 13 / 6, "fc": 14 / 13 * 0.35},
    }
    assert DISTRIBUTIONS  # the loop below runs
    for name, fn in DISTRIBUTIONS.items():
        expected = by_hand[name]  # a name added to the registry needs its hand values here
        assert fn(conv_fc, 0.25, 1.0) == pytest.approx(expected), name
        assert layer_densities(conv_fc, 0.25, name.upper()) == pytest.approx(expected), name


# ----------------------------------------------------------------------------- custom densities


def test_custom_mapping_and_callable() -> None:
    custom = {"a": 0.5, "b": 0.1, "c": 1.0}
    assert layer_densities(MLP, 0.3, custom) == custom
    # 0.5*8 = 4, 0.1*32 = 3.2 -> 3, 16; total round(23.2) = 23.
    assert allocate(MLP, 0.3, custom) == {"a": 4, "b": 3, "c": 16}

    def by_rows(name: str, shape: tuple[int, ...]) -> float:
        return 1.0 / shape[0]

    assert layer_densities(MLP, 0.3, by_rows) == {"a": 0.25, "b": 0.125, "c": 0.5}
    assert allocate(MLP, 0.3, by_rows) == {"a": 2, "b": 4, "c": 8}


def test_custom_errors() -> None:
    with pytest.raises(ValueError, match=r"missing: \['c'\], unknown: \['z'\]"):
        layer_densities(MLP, 0.5, {"a": 0.5, "b": 0.5, "z": 0.5})
    with pytest.raises(ValueError, match="density of layer 'b' must be in"):
        layer_densities(MLP, 0.5, {"a": 0.5, "b": 0.0, "c": 0.5})
    with pytest.raises(ValueError, match="density of layer 'a'"):
        layer_densities(MLP, 0.5, lambda name, shape: 1.5)
    with pytest.raises(TypeError, match="distribution must be"):
        layer_densities(MLP, 0.5, 3)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, math.nan])
def test_bad_density(density: float) -> None:
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        layer_densities(MLP, density)


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="no maskable weights"):
        layer_densities({}, 0.5)
    with pytest.raises(ValueError, match="only weights with at least 2 dimensions"):
        layer_densities({"w": (4, 4), "bias": (4,)}, 0.5)
    with pytest.raises(ValueError, match="non-positive dimension"):
        layer_densities({"w": (4, 0)}, 0.5)


def test_unknown_distribution_lists_names() -> None:
    with pytest.raises(
        ValueError, match=r"unknown distribution 'snip'.*\['er', 'erk', 'uniform'\]"
    ):
        layer_densities(MLP, 0.5, "snip")


# ----------------------------------------------------------------------------- active_counts


def test_largest_remainder_by_hand() -> None:
    shapes = {"x": (2, 5), "y": (2, 5), "z": (2, 5)}
    # exact: 3.4, 3.3, 3.3 -> floors 3, 3, 3 (sum 9), target round(10.0) = 10;
    # the largest remainder (x: 0.4) gets the extra unit.
    assert active_counts(shapes, {"x": 0.34, "y": 0.33, "z": 0.33}) == {"x": 4, "y": 3, "z": 3}
    # equal remainders: ties go to the earlier layer.
    assert active_counts(shapes, {"x": 0.35, "y": 0.35, "z": 0.35}, total=11) == {
        "x": 4,
        "y": 4,
        "z": 3,
    }


def test_at_least_one_weight_per_layer() -> None:
    shapes = {"big": (10, 10), "tiny": (2, 2)}
    # tiny: 0.01 * 4 = 0.04 -> floor 0, clamped to 1; big: 0.6 * 100 = 60 -> 61 in all,
    # so with total=60 big gives one back.
    assert active_counts(shapes, {"big": 0.6, "tiny": 0.01}, total=61) == {"big": 60, "tiny": 1}
    assert active_counts(shapes, {"big": 0.6, "tiny": 0.01}, total=60) == {"big": 59, "tiny": 1}
    # when the clamp cannot be paid for, the total is exceeded.
    assert active_counts(shapes, {"big": 0.01, "tiny": 0.01}, total=1) == {"big": 1, "tiny": 1}


def test_total_far_from_densities_is_spread() -> None:
    shapes = {"x": (2, 5), "y": (4, 5)}
    counts = active_counts(shapes, {"x": 0.1, "y": 0.1}, total=25)
    assert counts == {"x": 10, "y": 15}  # x saturates at 10, the rest goes to y
    with pytest.raises(ValueError, match=r"total must be in \[0, 30\]"):
        active_counts(shapes, {"x": 0.1, "y": 0.1}, total=31)
    with pytest.raises(ValueError, match="missing"):
        active_counts(shapes, {"x": 0.1})


# ----------------------------------------------------------------------------- random_mask


def test_random_mask_basic() -> None:
    mask = random_mask((3, 4), 5, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (3, 4)
    assert int(mask.sum()) == 5
    assert not random_mask((3, 4), 0).any()
    assert random_mask((3, 4), 12).all()
    with pytest.raises(ValueError, match=r"active must be in \[0, 12\]"):
        random_mask((3, 4), 13)
    with pytest.raises(ValueError, match="active must be in"):
        random_mask((3, 4), -1)


def test_random_mask_is_roughly_uniform() -> None:
    gen = torch.Generator().manual_seed(1)
    hits = torch.stack([random_mask((10,), 3, generator=gen) for _ in range(2000)]).sum(0)
    # each position is active with probability 0.3 -> 600 expected, sd ~ 20.5
    assert bool(((hits > 500) & (hits < 700)).all())


# ----------------------------------------------------------------------------- properties

shape_st = st.lists(st.integers(1, 12), min_size=2, max_size=4).map(tuple)
shapes_st = st.lists(shape_st, min_size=1, max_size=6).map(
    lambda shapes: {f"l{i}": s for i, s in enumerate(shapes)}
)
density_st = st.floats(0.01, 1.0)


@settings(max_examples=150, deadline=None)
@given(shapes=shapes_st, density=density_st, name=st.sampled_from(sorted(DISTRIBUTIONS)))
def test_allocation_properties(
    shapes: dict[str, tuple[int, ...]], density: float, name: str
) -> None:
    dens = layer_densities(shapes, density, name)
    assert list(dens) == list(shapes)
    assert all(0.0 < d <= 1.0 for d in dens.values())
    numel = {k: math.prod(s) for k, s in shapes.items()}
    total = sum(numel.values())
    # the densities reproduce the target number of active weights
    assert math.fsum(dens[k] * numel[k] for k in shapes) == pytest.approx(density * total)

    counts = allocate(shapes, density, name)
    assert all(isinstance(c, int) and 1 <= c <= numel[k] for k, c in counts.items())
    target = round(density * total)
    clamp_needed = any(dens[k] * numel[k] < 1 for k in shapes)
    if not clamp_needed:
        assert sum(counts.values()) == target
    else:
        assert sum(counts.values()) >= target
    # rounding never moves a layer by more than one unit unless the clamp kicks in
    if not clamp_needed:
        assert all(abs(counts[k] - dens[k] * numel[k]) < 1 + 1e-9 for k in shapes)


@settings(max_examples=100, deadline=None)
@given(shapes=shapes_st, data=st.data())
def test_active_counts_hit_any_total(
    shapes: dict[str, tuple[int, ...]], data: st.DataObject
) -> None:
    dens = {k: data.draw(density_st) for k in shapes}
    total_numel = sum(math.prod(s) for s in shapes.values())
    total = data.draw(st.integers(len(shapes), total_numel))
    counts = active_counts(shapes, dens, total=total)
    assert sum(counts.values()) == total
    assert all(1 <= counts[k] <= math.prod(shapes[k]) for k in shapes)
    assert counts == active_counts(shapes, dens, total=total)  # deterministic


@settings(max_examples=100, deadline=None)
@given(shape=shape_st, data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_random_mask_properties(shape: tuple[int, ...], data: st.DataObject, seed: int) -> None:
    k = data.draw(st.integers(0, math.prod(shape)))
    first = random_mask(shape, k, generator=torch.Generator().manual_seed(seed))
    second = random_mask(shape, k, generator=torch.Generator().manual_seed(seed))
    assert first.shape == shape and first.dtype == torch.bool
    assert int(first.sum()) == k
    assert torch.equal(first, second)
