"""What the wrapper guarantees or refuses at the edges: shared optimizers, diverged updates,
atomic loading, and what it says once its hooks are gone (issue 13, items 1, 4, 5 and 6)."""

from __future__ import annotations

import copy
import logging
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsegan import SparseGANWrapper, WrapperStateError
from sparsegan.criteria import NonFiniteScoreError, drop_lowest, first_non_finite
from sparsegan.strategies import DDST, DST, Dense, Static
from tests.conftest import adam, assert_masks_hold, mlp_gan, real_batch, train

LATENT = 8


class GeneratorHoldingCritic(nn.Module):
    """A generator that keeps the discriminator as a submodule (and never calls it)."""

    def __init__(self, critic: nn.Module) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(LATENT, 32), nn.ReLU(), nn.Linear(32, 2))
        self.critic = critic

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def _step(G, D, g_opt, d_opt, rng, *, poison: float | None = None) -> None:
    """One hinge-loss iteration; ``poison`` multiplies both losses (NaN / inf: a diverged step)."""
    real = real_batch(16, rng)
    z = torch.randn(16, LATENT, generator=rng)
    d_loss = F.relu(1 - D(real)).mean() + F.relu(1 + D(G(z).detach())).mean()
    if poison is not None:
        d_loss = d_loss * poison
    d_opt.zero_grad()
    d_loss.backward()
    d_opt.step()
    g_loss = -D(G(z)).mean()
    if poison is not None:
        g_loss = g_loss * poison
    g_opt.zero_grad()
    g_loss.backward()
    g_opt.step()


# ---------------------------------------------------------------------------- 1. shared optimizers


def test_an_optimizer_holding_the_other_networks_masked_weights_is_refused() -> None:
    torch.manual_seed(0)
    _, D = mlp_gan()
    G = GeneratorHoldingCritic(D)
    g_opt, d_opt = adam(G), adam(D)  # Adam(G.parameters()) also holds D's three kernels
    with pytest.raises(ValueError, match=r"g_optimizer also holds 3 of the discriminator's 3 masked weights: "
                                         r"'0\.weight' \(the generator's 'critic\.0\.weight'\)") as err:
        SparseGANWrapper(G, D, g_opt, d_opt, strategy=Static(0.2, 0.3))
    assert "n.startswith('critic.')" in str(err.value)  # the fix, spelled out
    # nothing was wrapped, and the fix the message names works: D's masks hold through G's steps
    g_opt = torch.optim.Adam([p for n, p in G.named_parameters() if not n.startswith("critic.")], lr=2e-4)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=Static(0.2, 0.3))
    train(G, D, g_opt, d_opt, 5, latent=LATENT)
    assert_masks_hold(sg, G, D)
    assert sg.steps("G") == 5 and sg.steps("D") == 5


def test_two_optimizers_over_both_networks_are_refused_both_ways() -> None:
    G, D = mlp_gan()
    g_opt = torch.optim.Adam([*G.parameters(), *D.parameters()])
    d_opt = torch.optim.Adam([*D.parameters(), *G.parameters()])
    with pytest.raises(ValueError, match=r"d_optimizer also holds 3 of the generator's 3 masked weights.*"
                                         r"g_optimizer also holds 3 of the discriminator's 3 masked weights.*"
                                         r"from discriminator\.parameters\(\) alone") as err:
        SparseGANWrapper(G, D, g_opt, d_opt, strategy=Static(0.5, 0.5))
    assert "'0.weight'" in str(err.value)


def test_a_dense_network_may_share_its_optimizer() -> None:
    # with no masks on either network nothing can be violated, so nothing is refused
    _, D = mlp_gan()
    G = GeneratorHoldingCritic(D)
    sg = SparseGANWrapper(G, D, adam(G), adam(D), strategy=Dense())
    assert sg.density("D") == 1.0


def test_weights_added_to_the_other_optimizer_after_wrapping_are_refused_at_its_next_step() -> None:
    torch.manual_seed(0)
    G, D = mlp_gan()
    g_opt, d_opt = adam(G), adam(D)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=Static(0.2, 0.3))
    train(G, D, g_opt, d_opt, 2, latent=LATENT)
    g_opt.add_param_group({"params": list(D.parameters())})
    with pytest.raises(ValueError, match="g_optimizer also holds 3 of the discriminator's"):
        train(G, D, g_opt, d_opt, 1, latent=LATENT)
    # G's step wrote into D's pruned weights; they were zeroed again before the error
    assert_masks_hold(sg, G, D)
    assert sg.steps("G") == 2  # the refused step is not counted


# ---------------------------------------------------------------------------- 4. non-finite updates


@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_a_due_dst_update_on_a_diverged_network_is_skipped_and_retried(poison, caplog) -> None:
    torch.manual_seed(0)
    G, D = mlp_gan()
    g_opt, d_opt = adam(G), adam(D)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=DST(0.2, 0.2, update_every=5))
    rng = torch.Generator().manual_seed(0)
    for _ in range(2):
        _step(G, D, g_opt, d_opt, rng)
    checkpoint = copy.deepcopy({"G": G.state_dict(), "D": D.state_dict(),
                                "g_opt": g_opt.state_dict(), "d_opt": d_opt.state_dict()})
    masks = {net: sg.masks(net) for net in ("G", "D")}
    _step(G, D, g_opt, d_opt, rng, poison=poison)  # step 3: every weight becomes NaN
    with caplog.at_level(logging.WARNING, logger="sparsegan.wrapper"):
        for _ in range(2):  # steps 4 and 5; the update due at step 5 cannot rank NaN weights
            _step(G, D, g_opt, d_opt, rng)
    skipped = [r.getMessage() for r in caplog.records if "is skipped" in r.getMessage()]
    assert len(skipped) == 2
    assert skipped[0].startswith("discriminator: the mask update due at step 5 is skipped: the weight '0.weight'")
    assert skipped[1].startswith("generator: the mask update due at step 5 is skipped: the weight '0.weight'")
    for net in ("G", "D"):
        assert all(torch.equal(masks[net][n], m) for n, m in sg.masks(net).items())
        assert sg.mask_updates(net) == 0 and sg.steps(net) == 5
    assert "1 due mask updates skipped" in sg.report()
    assert_masks_hold(sg, G, D)
    # the user reloads the last good checkpoint; the next due update (step 10) runs as usual
    G.load_state_dict(checkpoint["G"])
    D.load_state_dict(checkpoint["D"])
    g_opt.load_state_dict(checkpoint["g_opt"])
    d_opt.load_state_dict(checkpoint["d_opt"])
    for _ in range(5):
        _step(G, D, g_opt, d_opt, rng)
    for net in ("G", "D"):
        assert sg.mask_updates(net) == 1
        assert any(not torch.equal(masks[net][n], m) for n, m in sg.masks(net).items())
        assert sg.density(net) == masks_density(masks[net])
    assert sg.state_dict()["networks"]["generator"]["skipped_updates"] == 1


def masks_density(masks: dict[str, torch.Tensor]) -> float:
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def test_non_finite_scores_from_the_optimizer_state_skip_the_update(caplog) -> None:
    # weights and gradients finite, but momentum growth reads a NaN first moment at a pruned
    # position: the algorithm's own score check refuses it, and nothing changes
    torch.manual_seed(0)
    G, D = mlp_gan()
    g_opt, d_opt = torch.optim.Adam(G.parameters(), lr=1e-3), torch.optim.Adam(D.parameters(), lr=1e-3)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=DST(0.2, 0.2, update_every=3, grow="momentum",
                                                             networks="discriminator"))
    rng = torch.Generator().manual_seed(0)
    for _ in range(2):
        _step(G, D, g_opt, d_opt, rng)
    mask = sg.masks("D")["2.weight"]
    pruned = (~mask).nonzero()[0].tolist()
    d_opt.state[D[2].weight]["exp_avg"][tuple(pruned)] = math.nan
    rng_state = sg.state_dict()["networks"]["discriminator"]["rng"]
    masks = sg.masks("D")
    with caplog.at_level(logging.WARNING, logger="sparsegan.wrapper"):
        _step(G, D, g_opt, d_opt, rng)  # step 3: due
    (message,) = [r.getMessage() for r in caplog.records if "is skipped" in r.getMessage()]
    assert message.startswith("discriminator: the mask update due at step 3 is skipped: the scores of '2.weight'")
    assert all(torch.equal(masks[n], m) for n, m in sg.masks("D").items())
    assert torch.equal(sg.state_dict()["networks"]["discriminator"]["rng"], rng_state)
    assert sg.mask_updates("D") == 0
    assert_masks_hold(sg, G, D)


def test_a_due_ddst_decision_on_a_diverged_discriminator_is_skipped_and_retried(caplog) -> None:
    torch.manual_seed(0)
    G, D = mlp_gan()
    g_opt, d_opt = adam(G), adam(D)
    strategy = DDST(0.2, 0.2, d_update_every=4, br_every=1, br_window=1, update_every=1000)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=strategy, br_estimator=None)
    controller = sg.algorithm("D").controller
    rng = torch.Generator().manual_seed(0)

    def iteration(poison: float | None = None) -> None:
        _step(G, D, g_opt, d_opt, rng, poison=poison)
        sg.observe(1.0, 0.0, 1.0)  # BR 1.0 > 0.55: every decision raises D's density

    for _ in range(2):
        iteration()
    checkpoint = copy.deepcopy({"G": G.state_dict(), "D": D.state_dict(),
                                "g_opt": g_opt.state_dict(), "d_opt": d_opt.state_dict()})
    iteration(math.nan)  # iteration 3
    with caplog.at_level(logging.WARNING, logger="sparsegan.wrapper"):
        iteration()  # iteration 4
        iteration()  # D's step 5 sees iteration 4: the decision is due, D's weights are NaN
    (message,) = [r.getMessage() for r in caplog.records if "is skipped" in r.getMessage()]
    assert message.startswith("discriminator: the mask update due at step 5 (iteration 4) is skipped: the weight")
    assert controller.decisions == [] and controller.density == 0.2 and sg.algorithm("D").decided_at == 0
    assert sg.density("D") == round(0.2 * 1120) / 1120  # 2x32 + 32x32 + 32x1 = 1120 weights
    G.load_state_dict(checkpoint["G"])
    D.load_state_dict(checkpoint["D"])
    g_opt.load_state_dict(checkpoint["g_opt"])
    d_opt.load_state_dict(checkpoint["d_opt"])
    for _ in range(4):  # iterations 6..9: D's step 9 decides for iteration 8
        iteration()
    assert [action for _, action, *_ in controller.state_dict()["decisions"]] == ["grow"]
    assert sg.density("D") == round(0.25 * 1120) / 1120


def test_first_non_finite_by_hand() -> None:
    assert first_non_finite([torch.ones(3), None, torch.zeros(0), torch.tensor([1, 2])]) is None
    assert first_non_finite([torch.ones(2), torch.tensor([0.0, -math.inf])]) == 1
    assert first_non_finite([torch.tensor([math.nan, math.inf])]) == 0
    with pytest.raises(NonFiniteScoreError, match="layer 1 contain NaN") as err:
        drop_lowest([torch.ones(2, dtype=torch.bool)] * 2, [torch.ones(2), torch.tensor([1.0, math.nan])], 1)
    assert err.value.layer == 1 and isinstance(err.value, ValueError)


# ---------------------------------------------------------------------------- 5. atomic loading


def _snapshot(sg: SparseGANWrapper) -> dict:
    state = sg.state_dict()
    return {"masks": {n: sg.masks(n) for n in ("G", "D")}, "steps": [sg.steps("G"), sg.steps("D")],
            "rng": [state["networks"][n]["rng"] for n in ("generator", "discriminator")],
            "balance": state["balance"], "ledger": state["ledger"]}


def _same(a: dict, b: dict) -> bool:
    return (all(torch.equal(a["masks"][n][k], b["masks"][n][k]) for n in a["masks"] for k in a["masks"][n])
            and a["steps"] == b["steps"] and all(torch.equal(x, y) for x, y in zip(a["rng"], b["rng"]))
            and a["balance"] == b["balance"] and a["ledger"] == b["ledger"])


def test_a_state_whose_discriminator_does_not_fit_changes_nothing() -> None:
    torch.manual_seed(0)
    G1, D1 = mlp_gan()
    sg1 = SparseGANWrapper(G1, D1, o1 := adam(G1), p1 := adam(D1), strategy=Static(0.2, 0.3), seed=1,
                           latent=lambda n: torch.randn(n, LATENT))
    train(G1, D1, o1, p1, 3, latent=LATENT)
    G2, _ = mlp_gan()
    D2 = mlp_gan(hidden=16)[1]  # same layer names, other shapes
    sg2 = SparseGANWrapper(G2, D2, adam(G2), adam(D2), strategy=Static(0.2, 0.3), seed=2,
                           latent=lambda n: torch.randn(n, LATENT))
    before = _snapshot(sg2)
    with pytest.raises(WrapperStateError, match="discriminator: mask for '0.weight' has shape"):
        sg2.load_state_dict(sg1.state_dict())
    assert _same(before, _snapshot(sg2))  # G's masks and step count were not replaced


def test_a_renamed_layer_of_the_same_shape_is_a_wrapper_state_error() -> None:
    G1, D1 = mlp_gan()
    sg1 = SparseGANWrapper(G1, D1, adam(G1), adam(D1), strategy=Static(0.5, 0.5),
                           latent=lambda n: torch.randn(n, LATENT))
    G2, _ = mlp_gan()
    D2 = nn.Sequential(OrderedDict(
        inp=nn.Linear(2, 32), a0=nn.LeakyReLU(0.2), mid=nn.Linear(32, 32), a1=nn.LeakyReLU(0.2), out=nn.Linear(32, 1)))
    sg2 = SparseGANWrapper(G2, D2, adam(G2), adam(D2), strategy=Static(0.5, 0.5),
                           latent=lambda n: torch.randn(n, LATENT))
    before = _snapshot(sg2)
    with pytest.raises(WrapperStateError, match=r"discriminator: mask names do not match.*'inp\.weight'"):
        sg2.load_state_dict(sg1.state_dict())
    assert _same(before, _snapshot(sg2))


_CORRUPTIONS = {
    "no-rng": (lambda s: s["networks"]["discriminator"].pop("rng"), "discriminator: missing entry 'rng'"),
    "negative-steps": (lambda s: s["networks"]["discriminator"].update(steps=-1),
                       "discriminator: steps must be a non-negative int"),
    "float-mask": (lambda s: s["networks"]["discriminator"]["masks"].update({"0.weight": torch.ones(32, 2)}),
                   "discriminator: mask for '0.weight' has dtype"),
    "br-window": (lambda s: s["balance"].update(window=7), "balance ratio: saved BR window is 7"),
    "ledger-network": (lambda s: s["ledger"]["networks"].pop("discriminator"), "FLOPs ledger: the state holds networks"),
    "ema-module": (lambda s: s["ema"]["module"].pop("0.weight"),
                   r"G-EMA: the EMA state does not fit.*missing keys \['0.weight'\]"),
    "ema-decay": (lambda s: s["ema"].update(decay=2.0), "G-EMA: decay must lie in"),
    "no-network": (lambda s: s["networks"].pop("discriminator"), "no entry for the discriminator"),
}


@pytest.mark.parametrize("corrupt, match", list(_CORRUPTIONS.values()), ids=list(_CORRUPTIONS))
def test_every_malformed_part_is_a_wrapper_state_error_and_changes_nothing(corrupt, match) -> None:
    torch.manual_seed(0)
    G1, D1 = mlp_gan()
    sg1 = SparseGANWrapper(G1, D1, o1 := adam(G1), p1 := adam(D1), strategy=Static(0.2, 0.3), g_ema=0.9,
                           latent=lambda n: torch.randn(n, LATENT))
    train(G1, D1, o1, p1, 2, latent=LATENT)
    state = copy.deepcopy(sg1.state_dict())
    corrupt(state)
    G2, D2 = mlp_gan()
    sg2 = SparseGANWrapper(G2, D2, adam(G2), adam(D2), strategy=Static(0.2, 0.3), g_ema=0.9, seed=5,
                           latent=lambda n: torch.randn(n, LATENT))
    assert sg2.ema is not None
    before, ema_before = _snapshot(sg2), copy.deepcopy(sg2.ema.state_dict())
    with pytest.raises(WrapperStateError, match=match):
        sg2.load_state_dict(state)
    assert _same(before, _snapshot(sg2))
    ema_after = sg2.ema.state_dict()
    assert ema_after["decay"] == ema_before["decay"] and ema_after["updates"] == ema_before["updates"]
    assert all(torch.equal(v, ema_after["module"][k]) for k, v in ema_before["module"].items())
    sg2.load_state_dict(sg1.state_dict())  # the intact state still loads
    assert sg2.steps("G") == 2


# ---------------------------------------------------------------------------- 6. after remove / finalize


@pytest.mark.parametrize("how", ["remove", "finalize"])
def test_density_and_report_after_the_hooks_are_gone(how, caplog) -> None:
    torch.manual_seed(0)
    G, D = mlp_gan()
    g_opt, d_opt = adam(G), adam(D)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=Static(0.1, 0.1))
    train(G, D, g_opt, d_opt, 2, latent=LATENT)
    density = sg.density("D")
    assert sg.enforcing
    masks = sg.masks("D")
    getattr(sg, how)()
    assert not sg.enforcing
    assert f"no longer enforced since {how}()" in repr(sg)
    # the weights still follow the masks: their density is still true, and a warning says the rest
    with caplog.at_level(logging.WARNING, logger="sparsegan.wrapper"):
        assert sg.density("D") == density
        sg.density("G")
    (warning,) = [r.getMessage() for r in caplog.records if "no longer enforced" in r.getMessage()]
    assert warning.startswith(f"the masks are no longer enforced ({how}() removed the wrapper's hooks)")
    report = sg.report()
    assert (f"MASKS NO LONGER ENFORCED: {how}() removed every hook (after steps: generator 2, discriminator 2); "
            "the densities below are the masks' at that point, and the weights still follow them.") in report
    assert f"density when removed {density:.4f}" in report
    with pytest.raises(ValueError, match="network must be"):  # a bad name is still a ValueError
        sg.density("critic")
    # training on without hooks makes pruned weights nonzero: the masks' density is no longer true
    train(G, D, g_opt, d_opt, 1, latent=LATENT)
    broken = int(torch.count_nonzero(D[0].weight.detach()[~masks["0.weight"]]))
    broken += int(torch.count_nonzero(D[2].weight.detach()[~masks["2.weight"]]))
    broken += int(torch.count_nonzero(D[4].weight.detach()[~masks["4.weight"]]))
    assert broken > 0
    with pytest.raises(RuntimeError, match=rf"discriminator's masks are no longer enforced: {how}\(\) removed the "
                                           rf"wrapper's hooks after 2 discriminator steps, and since then {broken} "
                                           rf"pruned weights became nonzero, so the masks' density {density:.4f}"):
        sg.density("D")
    assert "the weights no longer follow them (generator: " in sg.report()
    assert f"discriminator: {broken} pruned weights nonzero" in sg.report()
    assert all(torch.equal(masks[n], m) for n, m in sg.masks("D").items())  # e.g. for save_sparse


def test_a_dense_network_still_reports_density_one_after_remove() -> None:
    G, D = mlp_gan()
    sg = SparseGANWrapper(G, D, adam(G), adam(D), strategy=Dense())
    sg.remove()
    assert sg.density("G") == 1.0


def test_ddst_resize_refuses_infinite_scores_and_leaves_the_masks() -> None:
    from sparsegan.balance import DensityController
    from sparsegan.criteria import NonFiniteScoreError
    from sparsegan.masks import MaskedWeights
    from sparsegan.schedules import UpdateSchedule
    from sparsegan.strategies.ddst import ControlledDensity

    layer = torch.nn.Linear(4, 4)
    weights = MaskedWeights(["weight"], [layer.weight], [torch.tensor([[True, False, False, False]] * 4)])
    layer.weight.grad = torch.ones(4, 4)
    layer.weight.grad[0, 1] = float("inf")  # an infinite gradient would win every grow slot
    before = weights.masks[0].clone()
    algorithm = ControlledDensity(0.25, controller=DensityController(0.25), update=UpdateSchedule(every=10))
    with pytest.raises(NonFiniteScoreError, match="grow scores of layer 0 are not finite"):
        algorithm.resize(weights, torch.optim.SGD(layer.parameters(), lr=0.1), torch.Generator(), 0.5)
    assert torch.equal(weights.masks[0], before)


def test_layers_the_forward_never_runs_get_zero_gradient_scores_and_zero_flops(caplog) -> None:
    from tests.test_discovery import FromRGB

    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(4, 64), nn.Unflatten(1, (1, 8, 8)))
    D = FromRGB()  # from_rgb.16 is never called at 8x8
    g_opt, d_opt = torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=DST(0.5, 0.5, update_every=2),
                          latent=lambda n: torch.randn(n, 4), br_estimator=None)
    unused = D.from_rgb["16"].weight
    assert "from_rgb.16.weight" in sg.masks("discriminator")
    with caplog.at_level(logging.INFO, logger="sparsegan"):
        for _ in range(4):
            loss = F.softplus(-D(torch.randn(4, 1, 8, 8))).mean() + F.softplus(D(G(torch.randn(4, 4)).detach())).mean()
            d_opt.zero_grad()
            loss.backward()
            assert unused.grad is None
            d_opt.step()  # a gradient-growth update is due at steps 2 and 4
    assert sg.mask_updates("discriminator") == 2
    assert "did not reach (from_rgb.16.weight); scored as zero gradient" in caplog.text
    mask = sg.masks("discriminator")["from_rgb.16.weight"]
    assert int(torch.count_nonzero(unused.detach()[~mask])) == 0  # still masked
    flops = sg.flops()  # the ledger stays on: the unused layer costs 0 in this forward
    assert 0 < flops["discriminator"]["ratio"] < 1


class _KeywordG(nn.Module):
    """A generator whose forward takes a required keyword-only argument."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.emb = nn.Embedding(3, 4)

    def forward(self, z: torch.Tensor, *, labels: torch.Tensor) -> torch.Tensor:
        return self.fc(z + self.emb(labels))


def _keyword_gan() -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, torch.optim.Optimizer]:
    torch.manual_seed(0)
    G, D = _KeywordG(), nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
    return G, D, torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3)


def test_a_required_keyword_argument_without_example_kwargs_names_the_fix() -> None:
    G, D, g_opt, d_opt = _keyword_gan()
    with pytest.raises(TypeError, match=r"calling the generator on its example \(latent\(2\)\) failed: .*labels.*"
                                        r"g_example_kwargs=\{\.\.\.\}"):
        SparseGANWrapper(G, D, g_opt, d_opt, strategy=Static(0.5, 0.5), latent=lambda n: torch.randn(n, 4))


def test_example_kwargs_reach_discovery_and_the_step_probe_replays_the_loops_keywords() -> None:
    G, D, g_opt, d_opt = _keyword_gan()
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=Static(0.5, 0.5), latent=lambda n: torch.randn(n, 4),
                          g_example_kwargs={"labels": torch.tensor([0, 2])}, real=lambda n: torch.randn(n, 2))
    assert set(sg.masks("generator")) == {"fc.weight"}  # emb.weight is an embedding table, not a kernel
    assert set(sg.masks("discriminator")) == {"0.weight", "2.weight"}
    assert sg.strategy.br_every == 10
    for _ in range(20):
        labels = torch.randint(3, (8,))
        d_loss = F.softplus(-D(torch.randn(8, 2))).mean() + F.softplus(D(G(torch.randn(8, 4), labels=labels).detach())).mean()
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        g_loss = F.softplus(-D(G(torch.randn(8, 4), labels=labels))).mean()
        g_opt.zero_grad()
        g_loss.backward()
        g_opt.step()
    assert len(sg.balance) == 2  # G steps 10 and 20 measured, G replayed with the loop's labels=
    assert 0 < sg.flops()["generator"]["ratio"] < 1.0  # layer costs came from the keyword example


def test_a_discriminator_kept_inside_the_generator_is_masked_once_as_the_discriminators() -> None:
    torch.manual_seed(0)
    _, D = mlp_gan()
    G = GeneratorHoldingCritic(D)  # never calls it: without the ownership rule, G would mask it by type
    g_opt = torch.optim.Adam([p for n, p in G.named_parameters() if not n.startswith("critic.")], 1e-3)
    sg = SparseGANWrapper(G, D, g_opt, adam(D), strategy=Static(0.5, 0.5), latent=lambda n: torch.randn(n, LATENT))
    assert set(sg.masks("generator")) == {"net.0.weight", "net.2.weight"}
    assert set(sg.masks("discriminator")) == {"0.weight", "2.weight", "4.weight"}
    assert "critic.0.weight" in sg.report() and "a parameter of the discriminator" in sg.report()


def test_an_lstm_discriminator_is_as_sparse_as_reported() -> None:
    from tests.test_discovery import RecurrentD

    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(4, 40), nn.Unflatten(1, (5, 8)))
    D = RecurrentD()
    g_opt, d_opt = adam(G), adam(D)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=Static(0.1, 0.1), latent=lambda n: torch.randn(n, 4))
    for _ in range(3):
        loss = F.softplus(-D(torch.randn(4, 5, 8))).mean() + F.softplus(D(G(torch.randn(4, 4)).detach())).mean()
        d_opt.zero_grad()
        loss.backward()
        d_opt.step()
    kernels = [p for n, p in D.named_parameters() if p.dim() == 2]
    nonzero = sum(int(torch.count_nonzero(p.detach())) for p in kernels) / sum(p.numel() for p in kernels)
    assert sg.density("discriminator") == pytest.approx(0.1, abs=0.005)
    assert nonzero == pytest.approx(sg.density("discriminator"), abs=1e-9)  # was 0.997 with the LSTM left dense


def test_weights_left_dense_are_named_at_wrap_time_and_counted_in_the_weight_density(caplog) -> None:
    class Opaque(nn.Module):
        """A D whose middle weight goes through an op discovery does not know (a custom product)."""

        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(2, 8)
            self.mix = nn.Parameter(torch.randn(8, 8) / 8)  # 64 entries, used by torch.kron below
            self.out = nn.Linear(8 * 64, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.inp(x))
            return self.out(torch.kron(h, self.mix.flatten()[None]).flatten(1))

    torch.manual_seed(0)
    G, _ = mlp_gan()
    D = Opaque()
    with caplog.at_level(logging.WARNING, logger="sparsegan.wrapper"):
        sg = SparseGANWrapper(G, D, adam(G), adam(D), strategy=Static(0.5, 0.5), latent=lambda n: torch.randn(n, 8))
    assert "discriminator: 1 weight tensor(s) stay dense" in caplog.text and "mix (used by kron)" in caplog.text
    masks = sg.masks("discriminator")
    active = sum(int(m.sum()) for m in masks.values())
    # hand count: inp 16 + out 512 masked at 0.5 (ERK), mix's 64 entries all active
    assert sum(m.numel() for m in masks.values()) == 16 + 512
    assert sg.weight_density("discriminator") == pytest.approx((active + 64) / (16 + 512 + 64))
    assert sg.density("discriminator") == pytest.approx(active / (16 + 512))
    assert "all weight tensors" in sg.report()


class _TwoInputD(nn.Module):
    """A D called as ``D(images, rgbs)``, where ``rgbs`` is derived from the images (a multi-scale input)."""

    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Linear(2, 8)
        self.side = nn.Linear(2, 8)
        self.out = nn.Linear(8, 1)

    @staticmethod
    def images_to_rgbs(x: torch.Tensor) -> torch.Tensor:
        return x.flip(1)

    def forward(self, images: torch.Tensor, rgbs: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.main(images) + self.side(rgbs)))


@pytest.mark.parametrize("estimator", ["fresh", "step"])
def test_a_probe_that_cannot_call_a_two_input_discriminator_is_refused_at_wrap_time(estimator: str) -> None:
    torch.manual_seed(0)
    G, _ = mlp_gan(latent=LATENT)
    D = _TwoInputD()
    x = torch.randn(2, 2)
    with pytest.raises(TypeError, match=r"the balance-ratio probe calls the discriminator on an image batch alone.*"
                                        r"d_inputs=lambda x: \(x, \.\.\.\)"):
        SparseGANWrapper(G, D, adam(G), adam(D), strategy=DDST(0.5, 0.5), latent=lambda n: torch.randn(n, LATENT),
                         d_example_inputs=(x, D.images_to_rgbs(x)), real=lambda n: torch.randn(n, 2),
                         br_estimator=estimator)


@pytest.mark.parametrize("estimator", ["fresh", "step"])
def test_d_inputs_feed_discovery_and_every_probe_call(estimator: str) -> None:
    torch.manual_seed(0)
    G, _ = mlp_gan(latent=LATENT)
    D = _TwoInputD()
    seen: list[int] = []
    D.register_forward_pre_hook(lambda m, args: seen.append(len(args)))
    g_opt, d_opt = adam(G), adam(D)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=DDST(0.5, 0.5, br_every=1, br_window=5),
                          latent=lambda n: torch.randn(n, LATENT), real=lambda n: torch.randn(n, 2) + 1,
                          d_inputs=lambda x: (x, D.images_to_rgbs(x)), br_estimator=estimator)
    assert set(sg.masks("discriminator")) == {"main.weight", "side.weight", "out.weight"}  # side was reached
    for _ in range(3):
        real = torch.randn(8, 2) + 1
        fake = G(torch.randn(8, LATENT))
        d_loss = (F.softplus(-D(real, D.images_to_rgbs(real))).mean()
                  + F.softplus(D(fake.detach(), D.images_to_rgbs(fake.detach()))).mean())
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        g_loss = F.softplus(-D(fake, D.images_to_rgbs(fake))).mean()
        g_opt.zero_grad()
        g_loss.backward()
        g_opt.step()
    assert len(sg.balance) == 3 and math.isfinite(sg.balance_ratio)
    assert set(seen) == {2}  # every D call, the probe's included, had both inputs


def test_a_load_says_what_it_cannot_carry_over(caplog) -> None:
    torch.manual_seed(0)
    G, D = mlp_gan(latent=LATENT)
    sg = SparseGANWrapper(G, D, adam(G), adam(D), strategy=Static(0.5, 0.5), g_ema=0.9)
    state = sg.state_dict()
    sg.remove()
    with caplog.at_level(logging.WARNING, logger="sparsegan.wrapper"):
        plain = SparseGANWrapper(G, D, adam(G), adam(D), strategy=Static(0.5, 0.5),
                                 real=[torch.randn(4, 2) for _ in range(3)])
        plain.load_state_dict(state)
    assert "holds a G-EMA copy, but this wrapper has no g_ema" in caplog.text
    assert "real= iterable starts again from its first batch" in caplog.text


def test_a_state_saved_under_another_strategy_configuration_is_refused() -> None:
    torch.manual_seed(0)
    G, D = mlp_gan(latent=LATENT)
    state = SparseGANWrapper(G, D, adam(G), adam(D), strategy=Static(0.1, 0.1)).state_dict()
    G2, D2 = mlp_gan(latent=LATENT)
    other = SparseGANWrapper(G2, D2, adam(G2), adam(D2), strategy=Static(0.5, 0.1))
    before = other.masks("generator")
    with pytest.raises(WrapperStateError, match=r"saved with Static\(g_density=0.1, .*this wrapper uses "
                                                r"Static\(g_density=0.5"):
        other.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in other.masks("generator").items())


def test_kernels_kept_dense_by_exclude_count_as_dense_flops() -> None:
    torch.manual_seed(0)
    G, D = mlp_gan(latent=LATENT, hidden=16)
    g_opt, d_opt = adam(G), adam(D)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=Static(0.25, 0.25), latent=lambda n: torch.randn(n, LATENT),
                          exclude={"generator": "2.weight"}, br_estimator=None)
    assert set(sg.masks("generator")) == {"0.weight", "4.weight"}
    # G's forward MACs per sample: 8x16 + 16x16 + 16x2 = 128 + 256 + 32; 2.weight (256) stays dense
    assert LATENT == 8
    inference = sg.flops()["inference"]["generator"]
    masks = sg.masks("generator")
    sparse = int(masks["0.weight"].sum()) + 256 + int(masks["4.weight"].sum())
    assert inference == pytest.approx(sparse / (128 + 256 + 32))
    # without the dense layer in the ledger the ratio would over-claim sparsity
    assert inference > (int(masks["0.weight"].sum()) + int(masks["4.weight"].sum())) / (128 + 32)


def test_ddst_grows_a_discriminator_whose_forward_never_runs_a_layer(caplog) -> None:
    from tests.test_discovery import FromRGB

    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(4, 64), nn.Unflatten(1, (1, 8, 8)))
    D = FromRGB()  # from_rgb.16 is never called at 8x8
    g_opt, d_opt = torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3)
    strategy = DDST(0.3, 0.3, update_every=100, total_steps=100, d_update_every=1, br_window=1, br_min_samples=1,
                    density_step=0.1, br_bounds=(0.4, 0.6))
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=strategy, latent=lambda n: torch.randn(n, 4),
                          br_estimator=None)
    unused = D.from_rgb["16"].weight
    densities = [sg.density("discriminator")]
    with caplog.at_level(logging.INFO, logger="sparsegan"):
        for _ in range(4):
            z = torch.randn(4, 4)
            d_loss = F.softplus(-D(torch.randn(4, 1, 8, 8))).mean() + F.softplus(D(G(z).detach())).mean()
            d_opt.zero_grad()
            d_loss.backward()
            assert unused.grad is None
            d_opt.step()  # carries out the decision of the previous iteration (by gradient growth)
            g_loss = F.softplus(-D(G(z))).mean()
            g_opt.zero_grad()
            g_loss.backward()
            g_opt.step()
            sg.observe(d_real=1.0, d_fake_before=0.0, d_fake_after=0.9)  # BR 0.9 > 0.6: grow D
            densities.append(sg.density("discriminator"))
    # three decisions carried out at the D steps of iterations 2-4, each +0.1: D has 4 + 4 + 256
    # weights, so 0.6 is round(0.6 * 264) = 158 active
    assert densities[-1] == 158 / 264
    assert sg.mask_updates("discriminator") == 3
    assert "did not reach (from_rgb.16.weight); scored as zero gradient" in caplog.text
    mask = sg.masks("discriminator")["from_rgb.16.weight"]
    assert int(torch.count_nonzero(unused.detach()[~mask])) == 0
    assert 0 < sg.flops()["discriminator"]["ratio"] < 1
