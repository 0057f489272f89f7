"""Balance ratio, its probe, the density controller, and DDST on tiny GANs."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsegan import SparseGANWrapper
from sparsegan.balance import BalanceRatio, DensityController, check_bounds
from sparsegan.masks import MaskedWeights
from sparsegan.strategies import DDST, SDST, Dense, Static
from tests.conftest import LATENT, ConvDiscriminator, ConvGenerator, adam, assert_masks_hold, mlp_gan, real_batch, train

# ---------------------------------------------------------------------------- the ratio and its window


def test_ratio_by_hand() -> None:
    # D(x) mean 2, D(G(z)) mean 0, D(G'(z)) mean 0.5 -> (0.5 - 0) / (2 - 0) = 0.25
    assert BalanceRatio.ratio(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0])) == 0.25
    # negative margins are kept: (1 - 2) / (0 - 2) = 0.5
    assert BalanceRatio.ratio(0.0, 2.0, 1.0) == 0.5


def test_window_is_a_mean_of_ratios_not_a_ratio_of_means() -> None:
    br = BalanceRatio(window=2)
    assert br.value is None
    assert br.add(2.0, 0.0, 0.5, step=10) == 0.25
    assert br.add(1.0, 0.0, 0.75, step=20) == 0.75
    assert br.value == pytest.approx(0.5)  # a ratio of means would be (1.25/2) / (3/2) = 0.4167
    br.add(4.0, 0.0, 2.0, step=30)  # 0.5; the window drops 0.25
    assert br.value == pytest.approx(0.625)
    assert [h[0] for h in br.history] == [10, 20, 30]
    assert br.history[-1][2] == pytest.approx(0.625)


def test_bad_samples_are_skipped_and_logged(caplog) -> None:
    br = BalanceRatio(window=4)
    br.add(2.0, 0.0, 1.0)
    with caplog.at_level(logging.WARNING, logger="sparsegan.balance"):
        assert br.add(float("nan"), 0.0, 1.0) is None
        assert br.add(torch.tensor([1.0, float("inf")]), 0.0, 1.0) is None
        assert br.add(1.0, 1.0, 2.0) is None  # D(x) == D(G(z)): zero denominator
    assert br.skipped == 3 and len(br) == 1 and br.value == 0.5
    assert "non-finite" in caplog.text and "zero denominator" in caplog.text


def test_balance_state_dict_round_trip() -> None:
    br = BalanceRatio(window=3)
    for real in (2.0, 3.0, 4.0, 5.0):
        br.add(real, 0.0, 1.0)
    other = BalanceRatio(window=3)
    other.load_state_dict(br.state_dict())
    assert other.value == br.value and other.history == br.history
    with pytest.raises(ValueError, match="window"):
        BalanceRatio(window=5).load_state_dict(br.state_dict())


# ---------------------------------------------------------------------------- the controller


def _path(controller: DensityController, ratios) -> list[tuple[str, float]]:
    return [(d.action, round(d.density, 4)) for d in (controller.decide(r) for r in ratios)]


def test_relax_controller_follows_a_scripted_sequence_to_the_floor() -> None:
    controller = DensityController(0.1, bounds=(0.45, 0.55), step=0.05, min_density=0.05, max_density=1.0)
    assert _path(controller, [0.6, 0.55, 0.5, 0.3, None, 0.45, 0.1, 0.1]) == [
        ("grow", 0.15), ("grow", 0.2), ("hold", 0.2), ("prune", 0.15), ("hold", 0.15),
        ("prune", 0.1), ("prune", 0.05), ("hold", 0.05),  # floor
    ]


def test_relax_controller_stops_at_dense() -> None:
    controller = DensityController(0.9, step=0.05)
    assert _path(controller, [0.9, 0.9, 0.9]) == [("grow", 0.95), ("grow", 1.0), ("hold", 1.0)]


def test_strict_controller_caps_and_rewires_at_the_cap() -> None:
    controller = DensityController(0.3, step=0.15, max_density=0.5, mode="strict")
    assert _path(controller, [0.7, 0.7, 0.7, 0.2]) == [("grow", 0.45), ("grow", 0.5), ("dst", 0.5), ("prune", 0.35)]
    restored = DensityController(0.3, step=0.15, max_density=0.5, mode="strict")
    restored.load_state_dict(controller.state_dict())
    assert restored.density == pytest.approx(0.35) and len(restored.decisions) == 4


@pytest.mark.parametrize("bounds", [(0.55, 0.45), (0.5, 0.5), (-0.1, 0.5), (0.4, 1.5), ("a", "b"), (0.5,)])
def test_bad_bounds(bounds) -> None:
    with pytest.raises(ValueError, match="br_bounds"):
        check_bounds(bounds)
    with pytest.raises(ValueError, match="br_bounds"):
        DDST(0.1, 0.1, br_bounds=bounds)


def test_controller_argument_errors() -> None:
    with pytest.raises(ValueError, match="outside"):
        DDST(0.1, 0.6, mode="strict")  # initial D density above the strict cap 0.5
    with pytest.raises(ValueError, match="mode"):
        DDST(0.1, 0.1, mode="loose")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="br_min_samples"):
        DDST(0.1, 0.1, br_window=5, br_min_samples=6)


# ---------------------------------------------------------------------------- the probe


def _train_static(probe: bool):
    torch.manual_seed(0)
    G, D = ConvGenerator(), ConvDiscriminator()  # BatchNorm in G, legacy spectral norm in D
    g_opt, d_opt = adam(G), adam(D)
    kwargs = {}
    if probe:
        kwargs = dict(latent=lambda n: torch.randn(n, LATENT), real=lambda n: real_batch(n, torch.Generator(), (1, 8, 8)))
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=Static(0.3, 0.3), g_example_inputs=torch.randn(2, LATENT), **kwargs)
    sg.strategy.br_every = 2
    # a loop that also draws from the global RNG (dropout-like), which the probe must not disturb
    train(G, D, g_opt, d_opt, 12, latent=LATENT, data_shape=(1, 8, 8), on_iteration=lambda it: torch.rand(1))
    return G, D, sg


def test_probe_leaves_no_trace() -> None:
    G_on, D_on, sg_on = _train_static(probe=True)
    G_off, D_off, sg_off = _train_static(probe=False)
    assert len(sg_on.balance.history) == 6 and sg_off.balance.value is None
    for a, b in zip(list(G_on.state_dict().values()) + list(D_on.state_dict().values()),
                    list(G_off.state_dict().values()) + list(D_off.state_dict().values())):
        assert torch.equal(a, b)


def test_probe_measures_the_formula() -> None:
    # a G that only shifts by a learnable bias and a linear D: every term is known in closed form
    G = torch.nn.Linear(1, 1)
    D = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        G.weight.fill_(0.0)
        G.bias.fill_(0.0)
        D.weight.fill_(1.0)
    g_opt = torch.optim.SGD(G.parameters(), lr=0.5)
    d_opt = torch.optim.SGD(D.parameters(), lr=0.0)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=Dense(), latent=lambda n: torch.zeros(n, 1),
                          real=lambda n: torch.full((n, 1), 2.0), probe_batch_size=4)
    sg.strategy.br_every = 1
    loss = -D(G(torch.zeros(4, 1))).mean()
    loss.backward()  # d loss / d bias = -1 -> SGD moves the bias to 0.5
    g_opt.step()
    # D(x) = 2, D(G(z)) = 0 before, D(G'(z)) = 0.5 after: BR = 0.5 / 2
    assert sg.balance_ratio == pytest.approx(0.25)


# ---------------------------------------------------------------------------- DDST on tiny GANs


def _check_decisions(sg) -> list[str]:
    """Every controller decision follows its windowed BR; the masks match the controller's density."""
    decisions = [d for _, d in sg.algorithm("D").controller.decisions]
    for d in decisions:
        if d.balance_ratio is not None and d.balance_ratio >= 0.55:
            assert d.action == "grow" or (d.action == "hold" and d.density == 1.0)
        elif d.balance_ratio is not None and d.balance_ratio <= 0.45:
            assert d.action == "prune" or (d.action == "hold" and d.density == 0.05)
        else:
            assert d.action == "hold"
    total = sum(m.numel() for m in sg.masks("D").values())
    assert sum(int(m.sum()) for m in sg.masks("D").values()) == round(sg.algorithm("D").density * total)
    return [d.action for d in decisions]


def test_ddst_raises_density_of_a_too_weak_discriminator() -> None:
    # D is frozen (lr 0) while G takes large steps: each G step moves D's score of the same fakes
    # by a growing share of D's fixed real/fake margin, so the BR climbs past the upper bound.
    torch.manual_seed(0)
    G, _ = mlp_gan(hidden=16)
    D = nn.Sequential(nn.Linear(2, 8), nn.Linear(8, 1))
    with torch.no_grad():
        for layer in D:
            layer.weight.fill_(0.1)
            layer.bias.zero_()
    g_opt = torch.optim.Adam(G.parameters(), lr=3e-2, betas=(0.0, 0.9))
    d_opt = torch.optim.SGD(D.parameters(), lr=0.0)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, latent=lambda n: torch.randn(n, 8),
                          real=lambda n: real_batch(n, torch.Generator()),
                          strategy=DDST(0.3, 0.5, d_update_every=1, br_every=1, br_window=2, update_every=1000))
    train(G, D, g_opt, d_opt, 8, latent=8)
    actions = _check_decisions(sg)
    ratios = [h[1] for h in sg.balance.history][:7]
    assert ratios == sorted(ratios) and ratios[-1] > 0.55  # BR rises while G closes on the real data
    # the decision for iteration 7 (made at iteration 8's D step) sees the window (BR_6 + BR_7) / 2
    # >= 0.55 and grows D; one decision per iteration, not per D step
    assert len(actions) == 7 and actions[6] == "grow"
    decisions = sg.algorithm("D").controller.decisions
    assert [s for s, _ in decisions] == list(range(1, 8))
    assert decisions[6][1].density == pytest.approx(decisions[5][1].density + 0.05)
    # (once G's fakes outscore the real data the denominator turns negative and so does BR)


def test_ddst_lowers_density_of_a_too_strong_discriminator() -> None:
    # G cannot move (lr 0): the numerator of BR is exactly 0, so D is pruned down to the floor
    torch.manual_seed(0)
    G, D = mlp_gan(hidden=16)
    g_opt = torch.optim.Adam(G.parameters(), lr=0.0, betas=(0.0, 0.9))
    d_opt = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.0, 0.9))
    sg = SparseGANWrapper(G, D, g_opt, d_opt, latent=lambda n: torch.randn(n, 8),
                          real=lambda n: real_batch(n, torch.Generator()),
                          strategy=DDST(0.3, 0.3, d_update_every=10, br_every=2, br_window=5, update_every=20))
    losses = train(G, D, g_opt, d_opt, 100, latent=8)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert_masks_hold(sg, G, D)
    actions = _check_decisions(sg)
    assert sg.balance_ratio == 0.0
    # decisions every 10 iterations; the window (5 samples x every 2) is full at iteration 10, so the
    # first decision already acts; iteration 100's would come at a D step the loop never takes
    assert [s for s, _ in sg.algorithm("D").controller.decisions] == list(range(10, 100, 10))
    assert actions == ["prune"] * 5 + ["hold"] * 4
    assert sg.density("D") == pytest.approx(0.05, abs=2e-3)  # 0.3 -> 0.05 in five steps of 0.05


def test_ddst_with_observe_instead_of_the_probe() -> None:
    G, D = mlp_gan()
    g_opt, d_opt = adam(G), adam(D)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=DDST(0.2, 0.2, d_update_every=5, br_window=3))
    rng = torch.Generator().manual_seed(0)
    for _ in range(15):
        real, z = real_batch(8, rng), torch.randn(8, 8, generator=rng)
        d_loss = F.relu(1 - D(real)).mean() + F.relu(1 + D(G(z).detach())).mean()
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        fake_score = D(G(z))
        g_opt.zero_grad()
        (-fake_score.mean()).backward()
        g_opt.step()
        with torch.no_grad():  # the user's own numbers: a D that is too weak (BR = 0.9)
            sg.observe(d_real=1.0, d_fake_before=0.0, d_fake_after=0.9)
    assert sg.balance_ratio == pytest.approx(0.9)
    # decisions for iterations 5 and 10 (the one for 15 would come at a 16th D step); window full from 3
    assert [s for s, _ in sg.algorithm("D").controller.decisions] == [5, 10]
    assert sg.density("D") == pytest.approx(0.3, abs=2e-3)


def test_ddst_without_a_balance_source_is_a_clear_error(caplog) -> None:
    G, D = mlp_gan()
    g_opt, d_opt = adam(G), adam(D)
    with caplog.at_level(logging.WARNING):
        SparseGANWrapper(G, D, g_opt, d_opt, strategy=DDST(0.2, 0.2, d_update_every=3), br_estimator=None)
    assert "observe" in caplog.text
    with pytest.raises(RuntimeError, match="br_estimator='step'.*observe"):
        train(G, D, g_opt, d_opt, 4, latent=8)  # the decision for iteration 3 comes at iteration 4's D step


def test_fresh_estimator_needs_latent_and_real() -> None:
    G, D = mlp_gan()
    with pytest.raises(ValueError, match="latent=.*real="):
        SparseGANWrapper(G, D, adam(G), adam(D), strategy=Static(0.5, 0.5), real=lambda n: torch.randn(n, 2),
                         br_estimator="fresh")
    with pytest.raises(ValueError, match="br_estimator"):
        SparseGANWrapper(G, D, adam(G), adam(D), strategy=Static(0.5, 0.5), br_estimator="later")  # type: ignore[arg-type]  # a bad value on purpose
    # the step estimator needs neither: its latents and real batches are the training step's
    sg = SparseGANWrapper(G, D, adam(G), adam(D), strategy=Static(0.5, 0.5), real=lambda n: torch.randn(n, 2))
    assert "the G step's own latents" in sg.report()


def test_sdst_defaults_follow_the_paper() -> None:
    built = SDST(0.1, 0.2, total_steps=10_000).build()
    g = built["generator"]
    assert g.schedule.every == 500 and g.schedule.stop == 10_000
    assert g.drop_fraction(0) == 0.5 and g.drop_fraction(5000) == pytest.approx(0.25)
    assert (g.prune, g.grow, g.scope) == ("magnitude", "gradient", "global")
    assert built["discriminator"].density == 0.2 and not built["discriminator"].is_due(500)


def _ddst_resume(checkpoint: bool, mode: str):
    def make():
        G, D = ConvGenerator(), ConvDiscriminator()
        g_opt, d_opt = adam(G), adam(D)
        strategy = DDST(0.3, 0.3, mode=mode, d_max_density=0.35, density_step=0.05, d_update_every=6,
                        br_every=2, br_window=3, update_every=8)
        sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=strategy, seed=3,
                              latent=lambda n: torch.randn(n, LATENT),
                              real=lambda n: real_batch(n, torch.Generator(), (1, 8, 8)) * 0.0 + 3.0, g_ema=0.9)
        return G, D, g_opt, d_opt, sg

    torch.manual_seed(0)
    G, D, g_opt, d_opt, sg = make()
    rng = torch.Generator().manual_seed(1)
    train(G, D, g_opt, d_opt, 14, latent=LATENT, data_shape=(1, 8, 8), rng=rng, n_critic=2)
    if checkpoint:
        saved = copy.deepcopy({"G": G.state_dict(), "D": D.state_dict(), "g": g_opt.state_dict(),
                               "d": d_opt.state_dict(), "sg": sg.state_dict(), "rng": rng.get_state()})
        torch.manual_seed(5)
        G, D, g_opt, d_opt, sg = make()
        G.load_state_dict(saved["G"])
        D.load_state_dict(saved["D"])
        g_opt.load_state_dict(saved["g"])
        d_opt.load_state_dict(saved["d"])
        sg.load_state_dict(saved["sg"])
        rng.set_state(saved["rng"])
    train(G, D, g_opt, d_opt, 14, latent=LATENT, data_shape=(1, 8, 8), rng=rng, n_critic=2)
    return G, D, sg


@pytest.mark.parametrize("mode", ["relax", "strict"])
def test_ddst_resume_continues_bit_identically(mode: str) -> None:
    G_a, D_a, sg_a = _ddst_resume(False, mode)
    G_b, D_b, sg_b = _ddst_resume(True, mode)
    decisions = [d.action for _, d in sg_a.algorithm("D").controller.decisions]
    assert len(decisions) >= 4 and set(decisions) - {"hold"}  # the controller acted, before and after
    assert sg_a.balance.history == sg_b.balance.history
    assert sg_a.flops() == sg_b.flops()  # the FLOPs ledger resumes too, across D density changes
    assert sg_a.algorithm("D").controller.state_dict() == sg_b.algorithm("D").controller.state_dict()
    for a, b in zip(list(G_a.state_dict().values()) + list(D_a.state_dict().values()),
                    list(G_b.state_dict().values()) + list(D_b.state_dict().values())):
        assert torch.equal(a, b)
    assert sg_a.ema is not None and sg_b.ema is not None  # the G-EMA resumes too
    for a, b in zip(sg_a.ema.module.state_dict().values(), sg_b.ema.module.state_dict().values()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- the reference's units


def _count_decisions(mode: str, n_critic: int, iterations: int) -> tuple[list[int], list[int], DDST]:
    """Run the paper's DDST schedule on a 2-weight GAN; return the decision iterations and D steps."""
    G, D = nn.Linear(1, 1), nn.Linear(1, 1)
    g_opt = torch.optim.SGD(G.parameters(), lr=1e-3)
    d_opt = torch.optim.SGD(D.parameters(), lr=1e-3)
    strategy = DDST(0.5, mode=mode, d_min_density=0.5, d_max_density=1.0, total_steps=iterations)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=strategy, g_example_inputs=torch.zeros(2, 1))
    controller = sg.algorithm("D").controller
    d_steps_at_decision: list[int] = []
    real, z = torch.ones(4, 1), torch.zeros(4, 1)
    for _ in range(iterations):
        for _ in range(n_critic):
            d_opt.zero_grad()
            (D(G(z).detach()).mean() - D(real).mean()).backward()
            before = len(controller.decisions)
            d_opt.step()
            if len(controller.decisions) > before:
                d_steps_at_decision.append(sg.steps("D"))
        g_opt.zero_grad()
        (-D(G(z)).mean()).backward()
        g_opt.step()
    return [s for s, _ in controller.decisions], d_steps_at_decision, strategy


@pytest.mark.parametrize("n_critic", [2, 5])
def test_paper_schedule_decides_on_the_reference_iterations(n_critic: int) -> None:
    # The reference counts D steps and decides when the count is a multiple of
    # update_frequency_D x n_critic, checked after each G step: after iterations 1000, 2000, ...
    # (relax) and 2000, 4000, ... (strict), whatever n_critic is. Here the decision for iteration k
    # runs at D's first step after that iteration's G step: D step k * n_critic + 1.
    relax, relax_d_steps, relax_strategy = _count_decisions("relax", n_critic, 2001)
    assert relax == [1000, 2000]
    assert relax_d_steps == [1000 * n_critic + 1, 2000 * n_critic + 1]
    # the window (100 samples every 10 iterations) spans exactly relax's interval, and is full at
    # the first decision: the reference waits for a full window
    assert relax_strategy.br_window * relax_strategy.br_every == relax_strategy.d_update_every == 1000
    assert relax_strategy.br_min_samples == 100
    strict, strict_d_steps, strict_strategy = _count_decisions("strict", n_critic, 2001)
    assert strict == [2000] and strict_d_steps == [2000 * n_critic + 1]
    assert strict_strategy.br_window * strict_strategy.br_every == 1000  # relax's interval: half of strict's


def test_no_decision_at_the_end_of_the_run() -> None:
    decided, _, _ = _count_decisions("relax", 1, 1001)
    assert decided == [1000]
    strategy = DDST(0.5, d_min_density=0.5, total_steps=1000)
    assert not strategy.build()["discriminator"].is_due(1, iteration=1000)


def test_ddst_starts_d_at_g_density_in_both_modes() -> None:
    for mode in ("relax", "strict"):
        strategy = DDST(0.1, mode=mode)  # type: ignore[arg-type]  # a loop over the two literals
        assert strategy.d_density == 0.1
        assert strategy.build()["discriminator"].density == 0.1
        assert strategy.build()["discriminator"].controller.density == 0.1
    assert DDST(0.1, 0.3, mode="strict").d_density == 0.3  # unless the user sets it


# ---------------------------------------------------------------------------- which latents


class _Shift(nn.Module):
    """G(z) = w z + b, one weight and one bias."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1)
        with torch.no_grad():
            self.lin.weight.zero_()
            self.lin.bias.zero_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.lin(z)


class _Score(nn.Module):
    """D(x) = x (+ y when a label is given): a frozen, linear discriminator."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.lin.weight.fill_(1.0)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.lin(x) + (0.0 if y is None else y)


def _one_iteration(estimator: str, *, conditional: bool = False) -> SparseGANWrapper:
    G, D = _Shift(), _Score()
    g_opt = torch.optim.SGD(G.parameters(), lr=0.5)
    d_opt = torch.optim.SGD(D.parameters(), lr=0.0)
    # the probe's own sources: fresh latents 0 and real batches of 4.0
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=Dense(), br_estimator=estimator,  # type: ignore[arg-type]
                          latent=lambda n: torch.zeros(n, 1), real=lambda n: torch.full((n, 1), 4.0),
                          probe_batch_size=4)
    sg.strategy.br_every = 1
    y = torch.ones(4, 1) if conditional else None
    # the user's step: real batch 2.0, latents 1.0
    real, z = torch.full((4, 1), 2.0), torch.ones(4, 1)
    d_opt.zero_grad()
    (D(G(z).detach(), y).mean() - D(real, y).mean()).backward()
    d_opt.step()
    g_opt.zero_grad()
    (-D(G(z), y).mean()).backward()  # dL/dw = -mean(z) = -1, dL/db = -1: SGD(0.5) -> w = b = 0.5
    g_opt.step()
    return sg


def test_step_and_fresh_estimators_by_hand() -> None:
    # step: z = 1 from the G step; D(G_t(z)) = 0, D(G_t+1(z)) = 0.5 * 1 + 0.5 = 1, D(x) on the D
    # step's real batch = 2: BR = (1 - 0) / (2 - 0) = 0.5
    assert _one_iteration("step").balance_ratio == pytest.approx(0.5)
    # fresh: z = 0 from latent=, x = 4 from real=: D(G_t+1(0)) = 0.5: BR = 0.5 / 4 = 0.125
    assert _one_iteration("fresh").balance_ratio == pytest.approx(0.125)


def test_step_estimator_replays_a_conditional_discriminator() -> None:
    # D(x, y) = x + y with y = 1: before 0 + 1, after 1 + 1, real 2 + 1: BR = (2 - 1) / (3 - 1)
    assert _one_iteration("step", conditional=True).balance_ratio == pytest.approx(0.5)


def test_step_estimator_falls_back_to_real_when_the_real_batch_is_ambiguous(caplog) -> None:
    # fakes passed to D through .clone(): no D call is on G's own output, so the D step's real
    # batch cannot be told apart and the probe scores a batch of real= (4.0): BR = 1 / 4
    G, D = _Shift(), _Score()
    g_opt, d_opt = torch.optim.SGD(G.parameters(), lr=0.5), torch.optim.SGD(D.parameters(), lr=0.0)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=Dense(), real=lambda n: torch.full((n, 1), 4.0))
    sg.strategy.br_every = 1
    real, z = torch.full((4, 1), 2.0), torch.ones(4, 1)
    with caplog.at_level(logging.INFO):
        d_opt.zero_grad()
        (D(G(z).clone().detach()).mean() - D(real).mean()).backward()
        d_opt.step()
    assert "could not tell D's real batch" in caplog.text
    g_opt.zero_grad()
    (-D(G(z)).mean()).backward()
    g_opt.step()
    assert sg.balance_ratio == pytest.approx(0.25)


@pytest.mark.parametrize("estimator", ["step", "fresh"])
def test_probe_leaves_no_trace_with_either_estimator(estimator: str) -> None:
    def run(probe: bool):
        torch.manual_seed(0)
        G, D = ConvGenerator(), ConvDiscriminator()  # BatchNorm in G, legacy spectral norm in D
        g_opt, d_opt = adam(G), adam(D)
        sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=Static(0.3, 0.3), g_example_inputs=torch.randn(2, LATENT),
                              latent=lambda n: torch.randn(n, LATENT), br_estimator=estimator if probe else None,  # type: ignore[arg-type]
                              real=lambda n: real_batch(n, torch.Generator(), (1, 8, 8)))
        sg.strategy.br_every = 2
        train(G, D, g_opt, d_opt, 8, latent=LATENT, data_shape=(1, 8, 8), n_critic=2, on_iteration=lambda it: torch.rand(1))
        return G, D, sg

    G_on, D_on, sg_on = run(True)
    G_off, D_off, sg_off = run(False)
    assert len(sg_on.balance.history) == 4 and sg_off.balance.value is None
    for a, b in zip(list(G_on.state_dict().values()) + list(D_on.state_dict().values()),
                    list(G_off.state_dict().values()) + list(D_off.state_dict().values())):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- warm-up bounds


def test_warmup_bounds_by_hand() -> None:
    controller = DensityController(0.5, bounds="warmup")
    assert controller.bounds is None and controller.decide(0.9).action == "hold"  # no bounds yet: hold
    assert not controller.calibrate(-0.1) and not controller.calibrate(0.95)  # 0.95 x 1.1 > 1
    assert controller.bounds is None
    assert controller.calibrate(0.2) and controller.bounds == pytest.approx((0.18, 0.22))
    assert controller.decide(0.25).action == "grow" and controller.decide(0.1).action == "prune"
    assert controller.decide(0.2).action == "hold"
    restored = DensityController(0.5, bounds="warmup")
    restored.load_state_dict(controller.state_dict())
    assert restored.bounds == controller.bounds and restored.density == controller.density
    with pytest.raises(ValueError, match="differ"):
        DensityController(0.5, bounds=(0.1, 0.2)).load_state_dict(controller.state_dict())
    with pytest.raises(ValueError, match="warmup"):
        check_bounds("later")  # type: ignore[arg-type]  # a bad value on purpose


def test_ddst_warmup_bounds_from_the_first_iterations() -> None:
    G, D = mlp_gan()
    g_opt, d_opt = adam(G), adam(D)
    strategy = DDST(0.2, br_bounds="warmup", br_warmup=4, d_update_every=2, br_every=1, br_window=2)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=strategy, br_estimator=None)
    rng = torch.Generator().manual_seed(0)
    # warm-up samples 0.1, 0.3, 0.2, 0.2 (mean 0.2 -> bounds 0.18, 0.22), then a too-weak D (0.5)
    for sample in (0.1, 0.3, 0.2, 0.2, 0.5, 0.5, 0.5):
        real, z = real_batch(8, rng), torch.randn(8, 8, generator=rng)
        d_opt.zero_grad()
        (F.relu(1 - D(real)).mean() + F.relu(1 + D(G(z).detach())).mean()).backward()
        d_opt.step()
        g_opt.zero_grad()
        (-D(G(z)).mean()).backward()
        g_opt.step()
        sg.observe(d_real=1.0, d_fake_before=0.0, d_fake_after=sample)
    controller = sg.algorithm("D").controller
    assert controller.bounds == pytest.approx((0.18, 0.22))
    # iteration 2: warm-up not over (hold); 4: bounds fixed, window (0.2 + 0.2) / 2 inside (hold);
    # 6: window 0.5 >= 0.22 (grow)
    assert [(s, d.action) for s, d in controller.decisions] == [(2, "hold"), (4, "hold"), (6, "grow")]
    assert sg.density("D") == pytest.approx(0.25, abs=2e-3)


def test_step_estimator_falls_back_to_fresh_when_the_loop_bypasses_hooks(caplog) -> None:
    # torch-mimicry's trainer calls G.forward() and D.forward() itself, which runs no forward hook:
    # with latent= and real= the probe then measures on fresh latents (z = 0, x = 4: BR = 0.5 / 4)
    G, D = _Shift(), _Score()
    g_opt, d_opt = torch.optim.SGD(G.parameters(), lr=0.5), torch.optim.SGD(D.parameters(), lr=0.0)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=Dense(), latent=lambda n: torch.zeros(n, 1),
                          real=lambda n: torch.full((n, 1), 4.0), probe_batch_size=4)
    sg.strategy.br_every = 1
    z = torch.ones(4, 1)
    with caplog.at_level(logging.WARNING):
        g_opt.zero_grad()
        (-D.forward(G.forward(z)).mean()).backward()
        g_opt.step()
    assert "G.forward() directly" in caplog.text
    assert sg.balance_ratio == pytest.approx(0.125)
    assert "1 samples on fresh latents" in sg.report()


def test_step_estimator_skips_a_conditional_sample_it_cannot_replay(caplog) -> None:
    # the G step scores an augmented copy of G's output with a label: the probe cannot know what to
    # pass D, so the sample is skipped (logged), never a TypeError from inside g_opt.step()
    G, D = _Shift(), _Score()
    g_opt, d_opt = torch.optim.SGD(G.parameters(), lr=0.5), torch.optim.SGD(D.parameters(), lr=0.0)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=Dense(), real=lambda n: torch.full((n, 1), 4.0))
    sg.strategy.br_every = 1
    z, y = torch.ones(4, 1), torch.ones(4, 1)
    with caplog.at_level(logging.WARNING):
        g_opt.zero_grad()
        (-D(G(z) * 1.0, y).mean()).backward()
        g_opt.step()
    assert "takes more than the image" in caplog.text
    assert sg.balance_ratio is None and sg.balance.skipped == 1


def _two_iterations(*, clone: bool, conditional: bool = False) -> SparseGANWrapper:
    """Two iterations of the frozen linear GAN with real batches 2.0 then 3.0 and latents 1.0."""
    G, D = _Shift(), _Score()
    g_opt, d_opt = torch.optim.SGD(G.parameters(), lr=0.5), torch.optim.SGD(D.parameters(), lr=0.0)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=Dense(), real=lambda n: torch.full((n, 1), 4.0))
    sg.strategy.br_every = 1
    z = torch.ones(4, 1)
    labels = (torch.ones(4, 1),) if conditional else ()
    for value in (2.0, 3.0):
        real = torch.full((4, 1), value)
        d_opt.zero_grad()
        fake = G(z).clone().detach() if clone else G(z).detach()  # lucidrains scores cloned fakes first
        (D(fake, *labels).mean() - D(real, *labels).mean()).backward()
        d_opt.step()
        g_opt.zero_grad()
        (-D(G(z), *labels).mean()).backward()  # w and b move by 0.5 per step
        g_opt.step()
    return sg


def test_step_estimator_follows_the_loops_real_batches() -> None:
    # iteration 2: before G_t(1) = 1, after G_t+1(1) = 2, real 3: BR = 1 / 2 (a stale real batch of
    # 2.0, or the probe's own replay taken for the user's call, would give 1 / 1)
    sg = _two_iterations(clone=False)
    assert [round(h[1], 6) for h in sg.balance.history] == [0.5, 0.5]


def test_cloned_fakes_are_never_taken_for_the_real_batch() -> None:
    # no D call of either D step is on G's own output: the real batches come from real= (4.0):
    # iteration 1: (1 - 0) / (4 - 0); iteration 2: (2 - 1) / (4 - 1)
    sg = _two_iterations(clone=True)
    assert [h[1] for h in sg.balance.history] == pytest.approx([0.25, 1 / 3])
    # a conditional D cannot score real='s unlabelled batches: skipped, not a TypeError
    sg = _two_iterations(clone=True, conditional=True)
    assert sg.balance.history == [] and sg.balance.skipped == 2


# ---------------------------------------------------------------------------- D's masks by hand


def _d_weights() -> tuple[MaskedWeights, torch.optim.Optimizer, nn.Parameter]:
    w = nn.Parameter(torch.tensor([3.0, 2.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]))
    weights = MaskedWeights(["w"], [w], [torch.tensor([True, True, True, False, False, False, False, False])])
    # the inactive positions' gradients rank 5 > 7 > 3 > 4 > 6; the magnitudes there are all 0
    w.grad = torch.tensor([0.0, 0.0, 0.0, 0.3, 0.1, 0.9, 0.05, 0.6])
    return weights, torch.optim.SGD([w], lr=0.1), w


def _controlled(density: float, mode: str = "relax", connectivity=None):
    from sparsegan.schedules import UpdateSchedule
    from sparsegan.strategies.ddst import ControlledDensity

    controller = DensityController(density, bounds=(0.4, 0.6), step=0.25, mode=mode,
                                   max_density=0.375 if mode == "strict" else 1.0)
    return ControlledDensity(density, controller=controller, update=UpdateSchedule(every=1),
                             connectivity=connectivity)


def test_growing_d_picks_the_largest_gradients_by_hand() -> None:
    weights, opt, w = _d_weights()
    # density 3/8 -> 5/8: grow 2 of the inactive positions by |grad| (5: 0.9, 7: 0.6), not by magnitude
    assert _controlled(0.375).resize(weights, opt, torch.Generator(), 0.625)
    assert weights.masks[0].tolist() == [True, True, True, False, False, True, False, True]
    # and back to 2/8: prune the smallest |w| among the active (the grown ones are 0, then 0.5)
    assert _controlled(0.625).resize(weights, opt, torch.Generator(), 0.25)
    assert weights.masks[0].tolist() == [True, True, False, False, False, False, False, False]


def test_strict_rewires_d_at_its_cap_at_constant_density() -> None:
    from sparsegan.schedules import ConstantDropFraction, UpdateSchedule
    from sparsegan.strategies import DynamicSparsity

    weights, opt, w = _d_weights()
    rewire = DynamicSparsity(0.375, update=UpdateSchedule(every=1), drop_fraction=ConstantDropFraction(0.34))
    algorithm = _controlled(0.375, "strict", rewire)  # D starts at its cap
    balance = BalanceRatio(window=1)
    balance.add(1.0, 0.0, 0.9)  # BR 0.9 >= the upper bound 0.6: D too weak, but no room to grow
    assert algorithm.update(1, weights, opt, torch.Generator(), balance=balance, iteration=1)
    assert algorithm.controller.decisions[-1][1].action == "dst"
    # drop round(0.34 * 3) = 1, the smallest |w| (w[2] = 0.5); grow the largest |grad| (w[5])
    assert weights.masks[0].tolist() == [True, True, False, False, False, True, False, False]
    assert weights.active_counts() == [3]
