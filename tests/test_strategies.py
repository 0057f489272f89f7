"""Strategies: the registry, hand-computed DST updates, and tiny GANs trained with each strategy."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from sparsegan import SparseGANWrapper, strategies
from sparsegan.masks import MaskedWeights
from sparsegan.schedules import ConstantDropFraction, UpdateSchedule
from sparsegan.strategies import DST, SDST, Dense, DynamicSparsity, Static, StaticSparsity
from tests.conftest import LATENT, ConvDiscriminator, ConvGenerator, adam, assert_masks_hold, mlp_gan, train

# ---------------------------------------------------------------------------- registry


def test_registry_builds_by_name() -> None:
    assert set(strategies.STRATEGIES) >= {"dense", "static", "dst", "sdst", "ddst"}
    built = strategies.create("STATIC", g_density=0.1, d_density=0.2)
    assert isinstance(built, Static) and built.d_density == 0.2
    assert isinstance(strategies.create("dense"), Dense)
    with pytest.raises(ValueError, match="unknown strategy 'rigl'"):
        strategies.create("rigl", g_density=0.1, d_density=0.1)
    with pytest.raises(TypeError, match=r"Static\(g_density"):
        strategies.create("static", g_density=0.1)


@pytest.fixture
def unregister_after() -> Any:
    """Names registered by a test are removed again, so no test sees another test's strategies."""
    before = dict(strategies.STRATEGIES)
    yield
    strategies.STRATEGIES.clear()
    strategies.STRATEGIES.update(before)


def test_register_custom_strategy(unregister_after: Any) -> None:
    @strategies.register_strategy("half-static-test")
    class HalfStatic(strategies.Strategy):
        def build(self):
            return {"generator": StaticSparsity(0.5, "uniform"), "discriminator": None}

    assert isinstance(strategies.create("half-static-test"), HalfStatic)
    G, D = mlp_gan()
    sg = SparseGANWrapper(G, D, adam(G), adam(D), strategy="half-static-test")
    assert sg.density("G") == 0.5 and sg.density("D") == 1.0
    with pytest.raises(ValueError, match="already registered"):
        strategies.register_strategy("static")(HalfStatic)
    assert strategies.STRATEGIES["static"] is Static  # the refused registration changed nothing


def test_dst_builds_static_for_the_other_network() -> None:
    built = DST(0.1, 0.3, networks="generator").build()
    assert isinstance(built["generator"], DynamicSparsity)
    assert type(built["discriminator"]) is StaticSparsity
    assert built["discriminator"].density == 0.3
    with pytest.raises(ValueError, match="networks must name"):
        DST(0.1, 0.1, networks="critic")
    with pytest.raises(ValueError, match="unknown|known"):
        DST(0.1, 0.1, grow="magic")
    with pytest.raises(ValueError, match="total_steps"):
        DST(0.1, 0.1, drop_schedule="cosine")


# ---------------------------------------------------------------------------- hand-computed updates


def _two_layers() -> tuple[MaskedWeights, torch.optim.Optimizer, nn.Parameter, nn.Parameter]:
    a = nn.Parameter(torch.tensor([[0.5, -0.1], [0.3, 0.0]]))
    b = nn.Parameter(torch.tensor([0.05, 0.0, 0.0, 2.0]))
    weights = MaskedWeights(["a", "b"], [a, b], [torch.tensor([[True, True], [True, False]]),
                                                 torch.tensor([True, False, False, True])])
    opt = torch.optim.Adam([a, b], lr=0.1)
    a.grad = torch.tensor([[0.0, 0.0], [0.0, 0.9]])
    b.grad = torch.tensor([0.0, 0.2, 0.7, 0.0])
    opt.step()  # fills exp_avg everywhere
    with torch.no_grad():  # put the weights back to the hand-made values
        a.copy_(torch.tensor([[0.5, -0.1], [0.3, 0.0]]))
        b.copy_(torch.tensor([0.05, 0.0, 0.0, 2.0]))
    a.grad = torch.tensor([[0.0, 0.0], [0.0, 0.9]])
    b.grad = torch.tensor([0.0, 0.2, 0.7, 0.0])
    return weights, opt, a, b


def _dst(scope: str, fraction: float, grow: str = "gradient") -> DynamicSparsity:
    return DynamicSparsity(0.5, update=UpdateSchedule(every=1), drop_fraction=ConstantDropFraction(fraction),
                           prune="magnitude", grow=grow, scope=scope)


def test_global_rigl_update_by_hand() -> None:
    weights, opt, a, b = _two_layers()
    # 5 active; drop round(0.4 * 5) = 2 with the smallest |w| over both layers: b[0] (0.05), a[0,1] (0.1).
    # grow 2 inactive (not just-dropped) with the largest |grad|: a[1,1] (0.9), b[2] (0.7).
    moved = _dst("global", 0.4).prune_and_grow(weights, opt, torch.Generator().manual_seed(0), 0.4)
    assert moved == 2
    assert torch.equal(weights.masks[0], torch.tensor([[True, False], [True, True]]))
    assert torch.equal(weights.masks[1], torch.tensor([False, False, True, True]))
    assert a[0, 1] == 0 and b[0] == 0  # pruned weights zeroed
    assert a[1, 1] == 0 and b[2] == 0  # grown weights start at zero
    # optimizer moments reset where the mask changed, kept elsewhere
    assert opt.state[a]["exp_avg"][0, 1] == 0 and opt.state[a]["exp_avg"][1, 1] == 0
    assert opt.state[b]["exp_avg"][1] != 0


def test_a_just_pruned_weight_is_not_regrown_even_with_the_largest_gradient() -> None:
    w = nn.Parameter(torch.tensor([0.1, 5.0, 4.0, 3.0, 0.0, 0.0]))
    weights = MaskedWeights(["w"], [w], [torch.tensor([True, True, True, True, False, False])])
    w.grad = torch.tensor([100.0, 1.0, 1.0, 1.0, 2.0, 3.0])  # the smallest |w| has the largest |grad|
    opt = torch.optim.SGD([w], lr=0.1)
    # drop round(0.25 * 4) = 1: w[0] (|w| 0.1); grow 1 of the others by |grad|: w[5] (3), not w[0] (100)
    moved = _dst("global", 0.25).prune_and_grow(weights, opt, torch.Generator(), 0.25)
    assert torch.equal(weights.masks[0], torch.tensor([False, True, True, True, False, True]))
    assert moved == 1


def test_per_layer_update_by_hand() -> None:
    weights, opt, a, b = _two_layers()
    # fraction 0.5: layer a drops round(1.5) = 2 (-0.1 and 0.3) and layer b drops round(1.0) = 1 (0.05).
    # a has one eligible inactive position (a[1,1]); the second grown one falls back to a just-dropped
    # position; b grows b[2] (grad 0.7 > 0.2). Per-layer counts are kept.
    moved = _dst("layer", 0.5).prune_and_grow(weights, opt, torch.Generator().manual_seed(0), 0.5)
    assert weights.active_counts() == [3, 2]
    # measured on the masks: a[1,1] and b[2] became active; the regrown just-dropped one is no move
    assert moved == 2
    assert weights.masks[0][0, 0] and weights.masks[0][1, 1]
    assert torch.equal(weights.masks[1], torch.tensor([False, False, True, True]))


def test_random_growth_is_seeded() -> None:
    def run(seed: int) -> list[torch.Tensor]:
        w = MaskedWeights(["w"], [nn.Parameter(torch.randn(50, 50, generator=torch.Generator().manual_seed(3)))],
                          [torch.rand(50, 50, generator=torch.Generator().manual_seed(4)) < 0.2])
        opt = torch.optim.SGD(w.params, lr=0.1)
        _dst("global", 0.3, grow="random").prune_and_grow(w, opt, torch.Generator().manual_seed(seed), 0.3)
        return w.masks

    start = torch.rand(50, 50, generator=torch.Generator().manual_seed(4)) < 0.2
    first = run(0)[0]
    assert torch.equal(first, run(0)[0])
    assert not torch.equal(first, run(1)[0])
    # the update kept the count and moved round(0.3 * active) positions
    assert int(first.sum()) == int(start.sum())
    assert int((first & ~start).sum()) == round(0.3 * int(start.sum()))


def test_update_follows_its_schedule() -> None:
    algo = DynamicSparsity(0.5, update=UpdateSchedule(every=3, start=0, stop=9),
                           drop_fraction=ConstantDropFraction(0.5), grow="random")
    weights, opt, *_ = _two_layers()
    due = [s for s in range(1, 12) if algo.update(s, weights, opt, torch.Generator().manual_seed(s))]
    assert due == [3, 6]


# ---------------------------------------------------------------------------- training


def _initial(sg, network: str) -> dict[str, torch.Tensor]:
    return sg.masks(network)


def test_static_training_keeps_masks_fixed() -> None:
    torch.manual_seed(0)
    G, D = mlp_gan()
    g_opt, d_opt = adam(G), adam(D)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=Static(0.2, 0.3))
    start = {n: _initial(sg, n) for n in ("generator", "discriminator")}
    losses = train(G, D, g_opt, d_opt, 300, latent=8)
    assert all(torch.isfinite(torch.tensor(losses)))
    for net, masks in start.items():
        assert all(torch.equal(masks[k], v) for k, v in sg.masks(net).items())
    assert_masks_hold(sg, G, D)
    assert sg.density("G") == pytest.approx(0.2, abs=1e-3) and sg.density("D") == pytest.approx(0.3, abs=1e-3)


@pytest.mark.parametrize("networks", ["generator", "discriminator", ("generator", "discriminator")])
def test_dst_training_changes_masks_at_constant_density(networks) -> None:
    torch.manual_seed(0)
    G, D = mlp_gan()
    g_opt, d_opt = adam(G), adam(D)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=DST(0.2, 0.3, networks=networks, update_every=25))
    start = {n: _initial(sg, n) for n in ("generator", "discriminator")}
    counts = {n: sum(int(m.sum()) for m in start[n].values()) for n in start}
    losses = train(G, D, g_opt, d_opt, 200, latent=8)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert_masks_hold(sg, G, D)
    dynamic = {networks} if isinstance(networks, str) else set(networks)
    state = sg.state_dict()["networks"]
    for net in ("generator", "discriminator"):
        now = sg.masks(net)
        assert sum(int(m.sum()) for m in now.values()) == counts[net]  # exact counts
        changed = any(not torch.equal(start[net][k], v) for k, v in now.items())
        assert changed == (net in dynamic)
        assert state[net]["mask_updates"] == (8 if net in dynamic else 0)  # steps 25, 50, ..., 200


def test_dst_on_sngan_style_conv_gan() -> None:
    torch.manual_seed(0)
    G, D = ConvGenerator(), ConvDiscriminator()
    g_opt, d_opt = adam(G), adam(D)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=DST(0.2, 0.2, update_every=10, drop_fraction=0.5,
                                                             drop_schedule="cosine", total_steps=60))
    losses = train(G, D, g_opt, d_opt, 60, latent=LATENT, data_shape=(1, 8, 8), n_critic=2)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert_masks_hold(sg, G, D)
    updates = sg.state_dict()["networks"]
    # the cosine drop fraction reaches 0 at total_steps=60 of each network: updates at 10..50 move
    # weights, later ones (D takes 120 steps with n_critic=2) have nothing to move
    assert updates["discriminator"]["mask_updates"] == 5
    assert updates["generator"]["mask_updates"] == 5


def _run(strategy, steps_before: int, steps_after: int, checkpoint: bool):
    torch.manual_seed(0)
    G, D = ConvGenerator(), ConvDiscriminator()
    g_opt, d_opt = adam(G), adam(D)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=strategy, seed=7)
    rng = torch.Generator().manual_seed(1)
    train(G, D, g_opt, d_opt, steps_before, latent=LATENT, data_shape=(1, 8, 8), rng=rng)
    if not checkpoint:
        train(G, D, g_opt, d_opt, steps_after, latent=LATENT, data_shape=(1, 8, 8), rng=rng)
        return G, D, sg
    saved = copy.deepcopy({"G": G.state_dict(), "D": D.state_dict(), "g_opt": g_opt.state_dict(),
                           "d_opt": d_opt.state_dict(), "sg": sg.state_dict(), "rng": rng.get_state()})
    # a fresh process: new models, optimizers and wrapper (different seeds on purpose), then load
    torch.manual_seed(123)
    G2, D2 = ConvGenerator(), ConvDiscriminator()
    g_opt2, d_opt2 = adam(G2), adam(D2)
    sg2 = SparseGANWrapper(G2, D2, g_opt2, d_opt2, strategy=strategy, seed=99)
    G2.load_state_dict(saved["G"])
    D2.load_state_dict(saved["D"])
    g_opt2.load_state_dict(saved["g_opt"])
    d_opt2.load_state_dict(saved["d_opt"])
    sg2.load_state_dict(saved["sg"])
    rng2 = torch.Generator().manual_seed(0)
    rng2.set_state(saved["rng"])
    train(G2, D2, g_opt2, d_opt2, steps_after, latent=LATENT, data_shape=(1, 8, 8), rng=rng2)
    return G2, D2, sg2


@pytest.mark.parametrize("strategy", [
    Dense(),
    Static(0.3, 0.3),
    SDST(0.3, 0.5, update_every=15, total_steps=45),
    DST(0.3, 0.3, update_every=15, grow="random"),
    DST(0.3, 0.3, update_every=15, grow="gradient", scope="layer"),
], ids=["dense", "static", "sdst", "dst-random", "dst-gradient-layer"])
def test_state_dict_round_trip_continues_bit_identically(strategy, request) -> None:
    # 20 iterations, checkpoint, 25 more: mask updates happen before and after the checkpoint
    G_a, D_a, sg_a = _run(strategy, 20, 25, checkpoint=False)
    G_b, D_b, sg_b = _run(strategy, 20, 25, checkpoint=True)
    for a, b in zip(list(G_a.state_dict().values()) + list(D_a.state_dict().values()),
                    list(G_b.state_dict().values()) + list(D_b.state_dict().values())):
        assert torch.equal(a, b)
    for net in ("generator", "discriminator"):
        assert all(torch.equal(sg_a.masks(net)[k], v) for k, v in sg_b.masks(net).items())
        assert sg_a.steps(net) == sg_b.steps(net) == 45
        assert sg_a.mask_updates(net) == sg_b.mask_updates(net)
    # the checkpoint at step 20 falls between mask updates (G's steps 15 and 30, and 45 unless
    # that is the run's end), so the resumed run made updates on both sides of it
    dynamic = request.node.callspec.id not in ("dense", "static")
    assert (sg_b.mask_updates("generator") >= 2) == dynamic


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(st.one_of(st.just("step"), st.tuples(st.just("update"), st.floats(0.0, 0.9))), min_size=1, max_size=12),
    density=st.floats(0.05, 1.0),
    grow=st.sampled_from(["gradient", "random", "momentum"]),
    prune=st.sampled_from(["magnitude", "random"]),
    scope=st.sampled_from(["global", "layer"]),
    seed=st.integers(0, 2**16),
)
def test_invariants_hold_under_any_sequence_of_steps_and_updates(ops, density, grow, prune, scope, seed) -> None:
    torch.manual_seed(seed)
    G, D = mlp_gan(hidden=12)
    g_opt, d_opt = adam(G), adam(D)
    strategy = DST(density, density, update_every=1000, grow=grow, prune=prune, scope=scope)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=strategy, seed=seed)
    counts = {n: sum(int(m.sum()) for m in sg.masks(n).values()) for n in ("generator", "discriminator")}
    for op in ["step", *ops]:  # gradient growth needs one backward first
        if op == "step":
            train(G, D, g_opt, d_opt, 1, latent=8, seed=seed, batch=4)
        else:
            for net in ("generator", "discriminator"):
                n = sg._net(net)
                n.algorithm.prune_and_grow(n.weights, n.optimizer, n.generator, op[1])
        assert_masks_hold(sg, G, D)
        for net in ("generator", "discriminator"):
            masks = sg.masks(net)
            assert all(m.dtype == torch.bool for m in masks.values())
            assert sum(int(m.sum()) for m in masks.values()) == counts[net]


def test_custom_algorithm_without_the_balance_keyword() -> None:
    class EveryStepCounter(StaticSparsity):
        schedule = UpdateSchedule(every=1)

        def __init__(self) -> None:
            super().__init__(0.5, "uniform")
            self.calls = 0

        def update(self, step, weights, optimizer, generator):  # no balance= keyword
            self.calls += 1
            return False

    class Counting(strategies.Strategy):
        def build(self):
            return {"generator": EveryStepCounter(), "discriminator": None}

    G, D = mlp_gan()
    g_opt, d_opt = adam(G), adam(D)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=Counting())
    train(G, D, g_opt, d_opt, 3, latent=8)
    assert sg.algorithm("G").calls == 3


def test_unknown_run_length_is_logged_at_the_first_prune_and_grow_not_at_construction(caplog) -> None:
    import logging

    from sparsegan.strategies import SDST

    with caplog.at_level(logging.INFO, logger="sparsegan"):
        schedule = SDST(0.1, 0.1).build()["generator"].drop_fraction
        assert "total_steps" not in caplog.text  # constructing says nothing
        assert schedule(0) == 0.5 and schedule(500) == 0.5
    assert caplog.text.count("total_steps was not given") == 1  # the first use says it, once
