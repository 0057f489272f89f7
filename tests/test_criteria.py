"""Tests for sparsegan.criteria."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsegan.criteria import (
    GROW_SCORES,
    PRUNE_SCORES,
    drop_lowest,
    get_score,
    gradient_score,
    grow_highest,
    magnitude_score,
    momentum_score,
    random_score,
)

T, F = True, False


def b(values: list) -> torch.Tensor:
    """Builds a bool tensor."""
    return torch.tensor(values, dtype=torch.bool)


def f(values: list) -> torch.Tensor:
    """Builds a float tensor."""
    return torch.tensor(values, dtype=torch.float32)


# ----------------------------------------------------------------------------- scores


def test_magnitude_drop_by_hand() -> None:
    w = f([[0.5, -0.1], [0.3, 0.0]])
    mask = b([[T, T], [T, F]])
    scores = magnitude_score(w, mask)
    assert torch.equal(scores, f([[0.5, 0.1], [0.3, 0.0]]))
    # active |w| are 0.5, 0.1, 0.3 -> the -0.1 entry goes; the inactive 0.0 is never chosen.
    (new,) = drop_lowest([mask], [scores], 1)
    assert torch.equal(new, b([[T, F], [T, F]]))
    (new,) = drop_lowest([mask], [scores], 2)
    assert torch.equal(new, b([[T, F], [F, F]]))
    assert torch.equal(mask, b([[T, T], [T, F]]))  # input untouched


def test_random_score_reproducible() -> None:
    p = torch.zeros(3, 4, dtype=torch.float64)
    m = torch.ones(3, 4, dtype=torch.bool)
    a = random_score(p, m, generator=torch.Generator().manual_seed(7))
    c = random_score(p, m, generator=torch.Generator().manual_seed(7))
    d = random_score(p, m, generator=torch.Generator().manual_seed(8))
    assert a.dtype == torch.float32 and a.shape == (3, 4) and a.device == p.device
    assert torch.equal(a, c) and not torch.equal(a, d)
    assert bool(((a >= 0) & (a < 1)).all())


def test_gradient_score() -> None:
    p = torch.zeros(2, 2)
    m = torch.ones(2, 2, dtype=torch.bool)
    assert torch.equal(gradient_score(p, m, grad=f([[-2, 1], [0, -3]])), f([[2, 1], [0, 3]]))
    with pytest.raises(ValueError, match=r"needs `\.grad`.*optimizer\.step\(\)"):
        gradient_score(p, m)
    with pytest.raises(ValueError, match="grad has shape"):
        gradient_score(p, m, grad=torch.zeros(4))


def test_momentum_score_from_real_optimizers() -> None:
    for make in (
        lambda ps: torch.optim.Adam(ps, lr=0.1),
        lambda ps: torch.optim.AdamW(ps, lr=0.1),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    ):
        p = torch.nn.Parameter(torch.zeros(2, 2))
        opt = make([p])
        p.grad = f([[1, -2], [0, 4]])
        opt.step()
        state = opt.state[p]
        key = "exp_avg" if "exp_avg" in state else "momentum_buffer"
        score = momentum_score(p, torch.ones(2, 2, dtype=torch.bool), optimizer_state=state)
        assert torch.equal(score, state[key].abs())
        # zero gradient entry has zero momentum, the largest gradient the largest momentum
        assert score[1, 0] == 0 and score.argmax() == 3


def test_momentum_score_errors() -> None:
    p = torch.zeros(2, 2)
    m = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"'exp_avg', 'momentum_buffer'.*grow='gradient'"):
        momentum_score(p, m, optimizer_state={"step": 1})
    with pytest.raises(ValueError, match="looked for keys"):
        momentum_score(p, m)
    with pytest.raises(ValueError, match="looked for keys"):  # SGD without momentum stores None
        momentum_score(p, m, optimizer_state={"momentum_buffer": None})
    with pytest.raises(ValueError, match="has shape"):
        momentum_score(p, m, optimizer_state={"exp_avg": torch.zeros(3)})


def test_registries_and_get_score() -> None:
    assert PRUNE_SCORES == {"magnitude": magnitude_score, "random": random_score}
    assert GROW_SCORES == {
        "gradient": gradient_score,
        "random": random_score,
        "momentum": momentum_score,
    }
    assert get_score("Magnitude", "prune") is magnitude_score
    assert get_score("momentum", "grow") is momentum_score
    with pytest.raises(
        ValueError, match=r"unknown prune score 'gradient'.*\['magnitude', 'random'\]"
    ):
        get_score("gradient", "prune")
    with pytest.raises(ValueError, match="kind must be"):
        get_score("random", "regrow")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- selection by hand


def test_global_vs_per_layer_drop() -> None:
    masks = [b([T, T, T, T]), b([T, T, T, T])]
    scores = [f([0.1, 0.2, 0.3, 0.4]), f([0.5, 0.6, 0.7, 0.8])]
    # global: the two lowest scores overall (0.1, 0.2) are both in layer 0
    g = drop_lowest(masks, scores, 2)
    assert torch.equal(g[0], b([F, F, T, T])) and torch.equal(g[1], b([T, T, T, T]))
    # per layer: the lowest of each layer
    p = drop_lowest(masks, scores, [1, 1])
    assert torch.equal(p[0], b([F, T, T, T])) and torch.equal(p[1], b([F, T, T, T]))


def test_global_vs_per_layer_grow() -> None:
    masks = [b([T, F, F]), b([F, F, T])]
    scores = [f([9.0, 1.0, 2.0]), f([3.0, 4.0, 99.0])]
    # inactive scores: layer 0 -> 1, 2; layer 1 -> 3, 4 (the 9 and 99 are active, ignored)
    g = grow_highest(masks, scores, 2)
    assert torch.equal(g[0], b([T, F, F])) and torch.equal(g[1], b([T, T, T]))
    p = grow_highest(masks, scores, [1, 1])
    assert torch.equal(p[0], b([T, F, T])) and torch.equal(p[1], b([F, T, T]))


def test_drop_ignores_low_inactive_scores() -> None:
    (new,) = drop_lowest([b([T, F, T])], [f([5.0, -100.0, 7.0])], 1)
    assert torch.equal(new, b([F, F, T]))


def test_grow_with_exclude_and_fallback() -> None:
    mask = b([T, F, F, F])
    scores = f([9.0, 1.0, 5.0, 3.0])
    assert torch.equal(grow_highest([mask], [scores], 1)[0], b([T, F, T, F]))
    # position 2 (score 5) was just dropped -> the next best eligible is position 3
    assert torch.equal(
        grow_highest([mask], [scores], 1, exclude=[b([F, F, T, F])])[0], b([T, F, F, T])
    )
    # only position 3 is eligible; the second pick falls back to the best excluded one (2)
    assert torch.equal(
        grow_highest([mask], [scores], 2, exclude=[b([F, T, T, F])])[0], b([T, F, T, T])
    )
    # everything inactive: all three grown
    assert grow_highest([mask], [scores], 3, exclude=[b([F, F, T, F])])[0].all()


def test_global_fallback_across_layers() -> None:
    masks = [b([F, F]), b([F, T])]
    scores = [f([1.0, 2.0]), f([3.0, 0.0])]
    exclude = [b([F, T]), b([T, F])]
    # eligible: (0, 0) only; fallback (excluded, inactive): (0, 1) score 2 and (1, 0) score 3
    new = grow_highest(masks, scores, 2, exclude=exclude)
    assert torch.equal(new[0], b([T, F])) and torch.equal(new[1], b([T, T]))


def test_ties_with_fill_value_stay_exact() -> None:
    # eligible scores equal the internal -inf fill, so the exact fallback path is taken
    mask = b([F, F, T, T])
    scores = f([-math.inf, -math.inf, 1.0, 2.0])
    (new,) = grow_highest([mask], [scores], 1)
    assert int(new.sum()) == 3 and bool(new[2:].all())
    (new,) = drop_lowest([b([T, F, T])], [f([math.inf, 0.0, math.inf])], 1)
    assert int(new.sum()) == 1 and not bool(new[1])


def test_count_zero_and_mixed_dtypes() -> None:
    masks = [b([T, F])]
    out = drop_lowest(masks, [f([1.0, 2.0])], 0)
    assert torch.equal(out[0], masks[0]) and out[0] is not masks[0]
    out = grow_highest(masks, [torch.tensor([3, 1])], [0])
    assert torch.equal(out[0], masks[0]) and out[0] is not masks[0]
    # integer scores are accepted
    out = grow_highest([b([F, F, T])], [torch.tensor([1, 5, 0])], 1)
    assert torch.equal(out[0], b([F, T, T]))


def test_scores_not_modified() -> None:
    masks = [b([T, F, T, F])]
    scores = [f([1.0, 2.0, 3.0, 4.0])]
    before = scores[0].clone()
    drop_lowest(masks, scores, 1)
    grow_highest(masks, scores, 1, exclude=[b([F, T, F, F])])
    assert torch.equal(scores[0], before)


def test_selection_errors() -> None:
    masks = [b([T, F]), b([F, F])]
    scores = [f([1.0, 2.0]), f([1.0, 2.0])]
    with pytest.raises(ValueError, match="cannot select 2 active positions to drop: only 1"):
        drop_lowest(masks, scores, 2)
    with pytest.raises(ValueError, match="only 0 available in layer 1"):
        drop_lowest(masks, scores, [0, 1])
    with pytest.raises(ValueError, match="cannot select 4 inactive positions to grow: only 3"):
        grow_highest(masks, scores, 4)
    with pytest.raises(ValueError, match="got 1 per-layer counts for 2 layers"):
        drop_lowest(masks, scores, [1])
    with pytest.raises(ValueError, match="non-negative"):
        drop_lowest(masks, scores, -1)
    with pytest.raises(TypeError, match=r"dtype torch\.bool"):
        drop_lowest([torch.ones(2)], [f([1.0, 2.0])], 1)
    with pytest.raises(ValueError, match="shape"):
        drop_lowest([b([T, T])], [f([1.0, 2.0, 3.0])], 1)
    with pytest.raises(ValueError, match="NaN"):
        drop_lowest([b([T, T])], [f([1.0, math.nan])], 1)
    with pytest.raises(ValueError, match="masks but 1 score"):
        drop_lowest(masks, scores[:1], 1)
    with pytest.raises(ValueError, match="exclude"):
        grow_highest(masks, scores, 1, exclude=[b([T])])


def test_large_global_selection_is_exact() -> None:
    # > 2**20 candidates exercises the threshold pre-filter; scores have many ties
    gen = torch.Generator().manual_seed(0)
    shapes = [(600, 1000), (300, 2000)]
    masks = [torch.rand(s, generator=gen) < 0.5 for s in shapes]
    scores = [torch.randint(0, 1000, s, generator=gen).float() for s in shapes]
    flat_s = torch.cat([s.reshape(-1) for s in scores])
    flat_m = torch.cat([m.reshape(-1) for m in masks])
    for k in (1, 1234, 100_000, int(flat_m.sum()) - 5):
        flat_new = torch.cat([m.reshape(-1) for m in drop_lowest(masks, scores, k)])
        dropped = flat_m & ~flat_new
        assert int(dropped.sum()) == k and not bool((flat_new & ~flat_m).any())
        assert flat_s[dropped].max() <= flat_s[flat_new].min()
    for k in (1, 54_321, int((~flat_m).sum()) - 3):
        flat_new = torch.cat([m.reshape(-1) for m in grow_highest(masks, scores, k)])
        grown = flat_new & ~flat_m
        assert int(grown.sum()) == k and not bool((flat_m & ~flat_new).any())
        assert flat_s[grown].min() >= flat_s[~flat_new].max()


# ----------------------------------------------------------------------------- properties


@st.composite
def layers(draw: st.DrawFn) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Draws (masks, scores, exclude) for 1-4 small layers; scores have ties."""
    n_layers = draw(st.integers(1, 4))
    masks, scores, exclude = [], [], []
    for _ in range(n_layers):
        n = draw(st.integers(1, 12))
        masks.append(b(draw(st.lists(st.booleans(), min_size=n, max_size=n))))
        scores.append(f(draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n))))
        exclude.append(b(draw(st.lists(st.booleans(), min_size=n, max_size=n))))
    return masks, scores, exclude


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _groups(n_layers: int, per_layer: bool) -> list[list[int]]:
    """Layer groups that are selected together: each layer, or all layers."""
    return [[i] for i in range(n_layers)] if per_layer else [list(range(n_layers))]


@settings(max_examples=200, deadline=None)
@given(data=layers(), per_layer=st.booleans(), frac=st.floats(0, 1))
def test_drop_properties(data: tuple, per_layer: bool, frac: float) -> None:
    masks, scores, _ = data
    groups = _groups(len(masks), per_layer)
    counts = [math.floor(frac * int(_flat([masks[i] for i in g]).sum())) for g in groups]
    new = drop_lowest(masks, scores, counts if per_layer else counts[0])
    for group, count in zip(groups, counts, strict=True):
        old_f = _flat([masks[i] for i in group])
        new_f = _flat([new[i] for i in group])
        s_f = _flat([scores[i] for i in group])
        assert not bool((new_f & ~old_f).any())  # only removes previously active
        dropped = old_f & ~new_f
        assert int(dropped.sum()) == count  # exact change
        if dropped.any() and new_f.any():  # dropped scores <= every kept active score
            assert s_f[dropped].max() <= s_f[new_f].min()


@settings(max_examples=200, deadline=None)
@given(data=layers(), per_layer=st.booleans(), frac=st.floats(0, 1), use_exclude=st.booleans())
def test_grow_properties(data: tuple, per_layer: bool, frac: float, use_exclude: bool) -> None:
    masks, scores, exclude = data
    if not use_exclude:
        exclude = [torch.zeros_like(m) for m in masks]
    groups = _groups(len(masks), per_layer)
    counts = [math.floor(frac * int((~_flat([masks[i] for i in g])).sum())) for g in groups]
    new = grow_highest(
        masks, scores, counts if per_layer else counts[0], exclude=exclude if use_exclude else None
    )
    for group, count in zip(groups, counts, strict=True):
        old_f = _flat([masks[i] for i in group])
        new_f = _flat([new[i] for i in group])
        s_f = _flat([scores[i] for i in group])
        ex_f = _flat([exclude[i] for i in group])
        assert not bool((old_f & ~new_f).any())  # only adds previously inactive
        grown = new_f & ~old_f
        assert int(grown.sum()) == count  # exact change
        eligible_left = ~new_f & ~ex_f
        if bool((grown & ex_f).any()):  # excluded positions only as a fallback
            assert not eligible_left.any()
        grown_ok = grown & ~ex_f
        if grown_ok.any() and eligible_left.any():
            assert s_f[grown_ok].min() >= s_f[eligible_left].max()
        fallback_left = ~new_f & ex_f
        grown_ex = grown & ex_f
        if grown_ex.any() and fallback_left.any():
            assert s_f[grown_ex].min() >= s_f[fallback_left].max()


def test_drop_lowest_min_active_keeps_each_layers_best() -> None:
    # layer a's weights are all tiny; a global drop of 3 would empty it without min_active
    masks = [torch.tensor([True, True]), torch.tensor([True, True, True])]
    scores = [torch.tensor([0.01, 0.02]), torch.tensor([0.5, 0.6, 0.7])]
    assert drop_lowest(masks, scores, 3)[0].sum() == 0
    kept = drop_lowest(masks, scores, 3, min_active=1)
    assert torch.equal(kept[0], torch.tensor([False, True]))  # its largest survives
    assert torch.equal(kept[1], torch.tensor([False, False, True]))
    with pytest.raises(ValueError):
        drop_lowest(masks, scores, 4, min_active=1)  # only 3 droppable positions remain


def test_drop_lowest_min_active_above_one_and_integer_scores() -> None:
    masks = [torch.tensor([True, True, True, False]), torch.tensor([True, True, True, True])]
    scores = [torch.tensor([1, 2, 3, 0]), torch.tensor([10, 20, 30, 40])]  # integer scores
    kept = drop_lowest(masks, scores, 3, min_active=2)
    # layer 0 keeps its two best (2, 3); the rest of the drop comes from layer 1's lowest (10, 20)
    assert torch.equal(kept[0], torch.tensor([False, True, True, False]))
    assert torch.equal(kept[1], torch.tensor([False, False, True, True]))
    with pytest.raises(ValueError, match="only 3 available"):
        drop_lowest(masks, scores, 4, min_active=2)


def test_nan_is_found_next_to_infinities() -> None:
    mask = [torch.tensor([True, True, True])]
    with pytest.raises(ValueError, match="NaN"):
        grow_highest([~mask[0]], [torch.tensor([math.inf, math.nan, -math.inf])], 1)
    assert drop_lowest(mask, [torch.tensor([math.inf, 1.0, -math.inf])], 1)[0].tolist() == [True, True, False]


def test_large_global_selection_is_exact_and_leaves_its_inputs_alone() -> None:
    # above the top-k pre-filter size, where the selection masks its own scratch copy in place
    gen = torch.Generator().manual_seed(0)
    shapes = [(700, 1000), (400, 1000)]  # 1.1M entries
    masks = [torch.rand(s, generator=gen) < 0.3 for s in shapes]
    scores = [torch.rand(s, generator=gen) for s in shapes]
    before = [s.clone() for s in scores]
    flat_mask, flat_scores = torch.cat([m.flatten() for m in masks]), torch.cat([s.flatten() for s in scores])
    k = 50_000
    dropped = drop_lowest(masks, scores, k)
    active = flat_mask.nonzero().squeeze(1)
    expected = torch.zeros_like(flat_mask)
    expected[active[flat_scores[active].argsort()[:k]]] = True  # the k lowest active, by sorting
    got = flat_mask & ~torch.cat([d.flatten() for d in dropped])
    assert torch.equal(got, expected)
    grown = grow_highest(masks, scores, k)
    inactive = (~flat_mask).nonzero().squeeze(1)
    expected = torch.zeros_like(flat_mask)
    expected[inactive[flat_scores[inactive].argsort(descending=True)[:k]]] = True
    assert torch.equal(torch.cat([g.flatten() for g in grown]) & ~flat_mask, expected)
    per_layer = grow_highest(masks, scores, [1000, 2000], exclude=[~m for m in masks])  # all fall back
    assert [int((g & ~m).sum()) for g, m in zip(per_layer, masks)] == [1000, 2000]
    drop_lowest(masks, scores, [1000, 2000], min_active=1)
    assert all(torch.equal(s, b) for s, b in zip(scores, before))
