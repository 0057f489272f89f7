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
    # each name scores a hand-made weight by what it says, looked up in any case
    w = torch.tensor([-3.0, 1.0, -0.5])
    mask = torch.tensor([True, True, False])
    grad = torch.tensor([0.2, -4.0, 1.5])
    state = {"exp_avg": torch.tensor([-7.0, 0.0, 2.0])}
    expected = {("magnitude", "prune"): [3.0, 1.0, 0.5], ("gradient", "grow"): [0.2, 4.0, 1.5],
                ("momentum", "grow"): [7.0, 0.0, 2.0]}
    for (name, kind), values in expected.items():
        score = get_score(name.upper(), kind)
        got = score(w, mask, grad=grad, optimizer_state=state, generator=torch.Generator().manual_seed(0))
        assert got.tolist() == pytest.approx(values), name
    for kind in ("prune", "grow"):
        drawn = get_score("Random", kind)(w, mask, generator=torch.Generator().manual_seed(0))
        again = get_score("random", kind)(w, mask, generator=torch.Generator().manual_seed(0))
        assert torch.equal(drawn, again) and len(set(drawn.tolist())) == 3 and bool(((drawn >= 0) & (drawn < 1)).all())
    assert sorted(PRUNE_SCORES) == ["magnitude", "random"]
    assert sorted(GROW_SCORES) == ["gradient", "momentum", "random"]
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


# ---------------------------------------------------------------- added for mutation testing (docs/testing.md)


def test_non_finite_score_error_keeps_its_layer_through_pickle() -> None:
    import pickle

    from sparsegan.criteria import NonFiniteScoreError

    with pytest.raises(NonFiniteScoreError) as err:
        drop_lowest([torch.ones(2, dtype=torch.bool)] * 2, [torch.ones(2), torch.tensor([1.0, math.nan])], 1)
    assert err.value.layer == 1
    copy = pickle.loads(pickle.dumps(err.value))
    assert type(copy) is NonFiniteScoreError and copy.layer == 1 and str(copy) == str(err.value)


def test_first_non_finite_by_hand() -> None:
    from sparsegan.criteria import first_non_finite

    assert first_non_finite([]) is None
    assert first_non_finite([None, torch.zeros(0), torch.tensor([1, 2]), torch.tensor([1.0, -2.0])]) is None
    assert first_non_finite([torch.ones(2), torch.tensor([0.0, math.inf])]) == 1
    assert first_non_finite([torch.tensor([-math.inf, 0.0]), torch.tensor([math.nan])]) == 0
    assert first_non_finite([torch.ones(3), None, torch.tensor([[1.0], [math.nan]])]) == 2


def test_growth_gradients_zero_fills_only_some_missing(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from sparsegan.criteria import growth_gradients

    params = [torch.nn.Parameter(torch.ones(2)) for _ in range(7)]
    names = [f"w{i}" for i in range(7)]
    assert growth_gradients(params, names) == [None] * 7  # none reached: kept as None (gradient_score explains)
    for i in (0, 6):
        params[i].grad = torch.full((2,), float(i + 1))
    with caplog.at_level(logging.INFO, logger="sparsegan.criteria"):
        grads = growth_gradients(params, names)
    assert grads[0] is params[0].grad and grads[6] is params[6].grad
    assert all(g is not None and g.tolist() == [0.0, 0.0] for g in grads[1:6])
    assert caplog.messages == ["no gradient for 5 masked weight(s) the last backward did not reach "
                               "(w1, w2, w3, w4, w5); scored as zero gradient"]
    params[6].grad = None
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sparsegan.criteria"):
        growth_gradients(params, names)
    assert caplog.messages == ["no gradient for 6 masked weight(s) the last backward did not reach "
                               "(w1, w2, w3, w4, w5, ...); scored as zero gradient"]
    for p in params:
        p.grad = torch.ones(2)
    grads = growth_gradients(params, names)
    assert all(g is p.grad for g, p in zip(grads, params))


def test_random_score_is_float32_on_the_params_device_whatever_the_default_dtype() -> None:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        scores = random_score(torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.bool),
                              generator=torch.Generator().manual_seed(0))
    finally:
        torch.set_default_dtype(old)
    assert scores.dtype == torch.float32
    assert torch.equal(scores, torch.rand(3, generator=torch.Generator().manual_seed(0), dtype=torch.float32))
    on_meta = random_score(torch.empty(2, 2, device="meta"), torch.ones(2, 2, dtype=torch.bool))
    assert on_meta.device.type == "meta" and on_meta.shape == (2, 2)


def test_gradient_score_message_names_the_cause_and_the_way_out() -> None:
    with pytest.raises(ValueError) as err:
        gradient_score(torch.ones(2), torch.ones(2, dtype=torch.bool), grad=None)
    assert str(err.value) == (
        "gradient growth needs `.grad` of every sparse weight at update time; the update "
        "runs right after optimizer.step(), so do not set gradients to None between "
        "backward() and step() (e.g. call optimizer.zero_grad() before backward(), not "
        "between backward() and step()), or use grow='random'/'momentum'"
    )


def test_get_score_rejects_a_non_string_name_with_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown prune score 3"):
        get_score(3, "prune")  # type: ignore[arg-type]


def test_min_active_ranks_large_integer_scores_exactly() -> None:
    # 2**24 and 2**24 + 1 are equal in float32: the protected (highest) position must be found exactly
    scores = torch.tensor([2**24, 2**24 + 1], dtype=torch.int64)
    (out,) = drop_lowest([torch.ones(2, dtype=torch.bool)], [scores], 1, min_active=1)
    assert out.tolist() == [False, True]


def test_topk_indices_small_cases_by_hand() -> None:
    from sparsegan.criteria import _topk_indices

    values = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])
    none = _topk_indices(values, 0, largest=True)
    assert none.dtype == torch.long and none.shape == (0,)
    assert _topk_indices(values, 5, largest=False).tolist() == [0, 1, 2, 3, 4]
    assert sorted(_topk_indices(values, 4, largest=True).tolist()) == [0, 2, 3, 4]  # via the complement
    assert sorted(_topk_indices(values, 3, largest=False).tolist()) == [1, 3, 4]
    assert sorted(_topk_indices(values, 2, largest=True).tolist()) == [0, 2]
    meta = torch.empty(4, device="meta")  # the trivial answers are made on the scores' device
    assert _topk_indices(meta, 0, largest=True).device.type == "meta"
    assert _topk_indices(meta, 4, largest=True).device.type == "meta"


def test_topk_indices_prefilter_is_exact_and_taken(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from sparsegan.criteria import _PREFILTER_MIN, _topk_indices

    n, k = _PREFILTER_MIN, 1000
    values = torch.randperm(n, generator=torch.Generator().manual_seed(0)).float()  # distinct scores
    with caplog.at_level(logging.DEBUG, logger="sparsegan.criteria"):
        top = _topk_indices(values, k, largest=True)
        low = _topk_indices(values, k, largest=False)
    assert sorted(values[top].tolist()) == [float(v) for v in range(n - k, n)]
    assert sorted(values[low].tolist()) == [float(v) for v in range(k)]
    assert caplog.messages == []  # the pre-filter kept enough candidates: no fall-back to the full topk
    with caplog.at_level(logging.DEBUG, logger="sparsegan.criteria"):
        tied = _topk_indices(torch.zeros(n), 3, largest=True)  # all tied: the pre-filter keeps everything
    assert tied.numel() == 3 and len(set(tied.tolist())) == 3
    assert caplog.messages == [f"top-k pre-filter kept {n} of {n} entries; using full topk"]


def test_momentum_score_message_names_the_way_out() -> None:
    with pytest.raises(ValueError) as err:
        momentum_score(torch.ones(2), torch.ones(2, dtype=torch.bool), optimizer_state={"step": 1})
    assert str(err.value) == (
        "momentum growth needs a first-moment buffer in the optimizer state (looked for keys "
        "['exp_avg', 'momentum_buffer'], found ['step']); use Adam/AdamW or SGD with momentum>0 "
        "and take at least one optimizer step first, or use grow='gradient'"
    )


def test_count_and_layer_errors_name_the_problem() -> None:
    m, s = torch.tensor([True, False]), torch.tensor([1.0, 2.0])
    with pytest.raises(TypeError, match="^count must be an int or a sequence of ints, got bool$"):
        drop_lowest([m], [s], True)
    with pytest.raises(ValueError, match=r"^counts must be non-negative, got \[-1\]$"):
        drop_lowest([m], [s], [-1])
    with pytest.raises(TypeError, match="^count must be an int \\(global\\) or a sequence of ints \\(per layer\\), got float$"):
        drop_lowest([m], [s], 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^cannot select 1 active positions to drop: there are no layers$"):
        drop_lowest([], [], 1)
    with pytest.raises(ValueError, match="^cannot select 2 inactive positions to grow: only 1 available in total$"):
        grow_highest([m], [s], 2)
    with pytest.raises(TypeError, match="^exclude 0 must have dtype torch.bool, got torch.float32$"):
        grow_highest([m], [s], 1, exclude=[s])
    with pytest.raises(ValueError, match=r"^exclude 0 has shape \(3,\) but mask has shape \(2,\)$"):
        grow_highest([m], [s], 1, exclude=[torch.zeros(3, dtype=torch.bool)])


def test_returned_masks_own_their_memory() -> None:
    masks = [torch.tensor([True, False, False]), torch.tensor([[False, True], [False, False]])]
    scores = [torch.tensor([0.0, 1.0, 2.0]), torch.tensor([[5.0, 0.0], [3.0, 4.0]])]
    for out in (grow_highest(masks, scores, 2), drop_lowest(masks, scores, 1)):
        for new, old in zip(out, masks):
            assert new.shape == old.shape
            assert new.untyped_storage().nbytes() == new.numel()  # not a view of one shared buffer
    assert [m.tolist() for m in grow_highest(masks, scores, 2)] == [[True, False, False], [[True, True], [False, True]]]


def test_min_active_keeps_the_first_of_tied_highest_scores() -> None:
    scores = torch.tensor([0.0, 3.0, 3.0, 1.0, 3.0])
    (out,) = drop_lowest([torch.ones(5, dtype=torch.bool)], [scores], 4, min_active=1)
    assert out.tolist() == [False, True, False, False, False]  # deterministic: the lowest index among the ties
