"""The schedules and strategy names behind ``sparsegan demo`` / ``compare`` (sparsegan.training)."""

from __future__ import annotations

import pytest
import torch

from sparsegan.strategies import DDST, SDST, Static
from sparsegan.training import (
    Schedule,
    SNGANDiscriminator,
    build_strategy,
    compressed_schedule,
    default_d_density,
    paper_schedule,
)


def test_compressed_schedule_by_hand() -> None:
    # 1000 iterations: the reference's 100 relax decisions per run -> every 1000 // 100 = 10
    # iterations; a sample every max(1, 10 // 100) = 1 iteration; the window spans one relax
    # interval: 10 samples; 4 G intervals -> a G update every 250.
    assert compressed_schedule(1000) == Schedule(250, 10, 1, 10, 1000)
    assert compressed_schedule(1000, g_updates=20).g_update_every == 50
    assert compressed_schedule(3000) == Schedule(750, 30, 1, 30, 3000)
    # at the published length the compressed schedule is the published controller schedule
    assert compressed_schedule(100_000) == Schedule(25_000, 1000, 10, 100, 100_000)
    # tiny runs stay valid
    assert compressed_schedule(3) == Schedule(1, 1, 1, 1, 3)


@pytest.mark.parametrize("bad", [0, -1, 2.5, None, True])
def test_compressed_schedule_rejects_bad_g_updates(bad: object) -> None:
    with pytest.raises(ValueError, match="g_updates must be a positive int"):
        compressed_schedule(1000, g_updates=bad)  # type: ignore[arg-type]


def test_paper_schedule_is_the_published_constants() -> None:
    # decisions every 1000 iterations (relax), BR every 10, a window of 100 samples = 1000 iterations
    assert paper_schedule(100_000) == Schedule(500, 1000, 10, 100, 100_000)


@pytest.mark.parametrize("iterations", [1000, 3000, 100_000])
def test_compressed_schedule_keeps_the_reference_proportions(iterations: int) -> None:
    relax = build_strategy("ddst-relax", g_density=0.1, iterations=iterations)
    strict = build_strategy("ddst-strict", g_density=0.1, iterations=iterations)
    assert isinstance(relax, DDST) and isinstance(strict, DDST)
    assert iterations // relax.d_update_every == 100 and strict.d_update_every == 2 * relax.d_update_every
    # the window is relax's interval in both modes, and the first decision waits for it to fill
    for strategy in (relax, strict):
        assert strategy.br_window * strategy.br_every == relax.d_update_every
        assert strategy.br_min_samples == strategy.br_window
    assert strict.d_density == relax.d_density == 0.1  # both start at G's density


def test_build_strategy_applies_the_schedule() -> None:
    sdst = build_strategy("sdst", g_density=0.1, iterations=1000)
    assert isinstance(sdst, SDST) and sdst.update.every == 250 and (sdst.br_every, sdst.br_window) == (1, 10)
    assert build_strategy("sdst", g_density=0.1, iterations=1000, g_updates=10).update.every == 100
    # N intervals make N - 1 updates: none at the end of the run, so g_updates=1 keeps G static
    due = [step for step in range(1, 1001)
           if build_strategy("sdst", g_density=0.1, iterations=1000).update.is_due(step)]
    assert due == [250, 500, 750]
    static_g = build_strategy("sdst", g_density=0.1, iterations=1000, g_updates=1)
    assert not any(static_g.update.is_due(step) for step in range(1, 1001))
    strict = build_strategy("ddst-strict", g_density=0.1, iterations=1000, schedule="paper")
    assert isinstance(strict, DDST) and strict.mode == "strict"
    assert (strict.d_update_every, strict.d_density, strict.br_bounds) == (2000, 0.1, (0.45, 0.55))
    assert (strict.br_every, strict.br_window) == (10, 100)
    relax = build_strategy("ddst", g_density=0.2, iterations=1000, br_bounds=(0.03, 0.07))
    assert relax.mode == "relax" and relax.d_density == 0.2 and relax.br_bounds == (0.03, 0.07)
    assert relax.d_update_every == 10
    static = build_strategy("static", g_density=0.1, d_density=0.3, iterations=10)
    assert isinstance(static, Static) and (static.g_density, static.d_density) == (0.1, 0.3)


def test_default_d_density_and_unknown_names() -> None:
    assert default_d_density("ddst-strict", 0.1) == 0.1  # the reference starts strict at G's density too
    assert default_d_density("ddst-relax", 0.3) == 0.3
    assert default_d_density("SDST", 0.2) == 0.2
    assert default_d_density("dense", 0.1) == 1.0
    with pytest.raises(ValueError, match="unknown strategy 'rigl'"):
        build_strategy("rigl", g_density=0.1, iterations=10)


def test_discriminator_mean_pooling_divides_the_sum_by_the_positions() -> None:
    torch.manual_seed(0)
    summed = SNGANDiscriminator(8, 16, 1, pooling="sum").eval()
    averaged = SNGANDiscriminator(8, 16, 1, pooling="mean").eval()
    averaged.load_state_dict(summed.state_dict())
    x = torch.randn(3, 1, 16, 16)
    bias = summed.fc.bias.detach()
    with torch.no_grad():
        # the final map is 8x8: mean = sum / 64 before the (spectrally normed) linear layer
        torch.testing.assert_close(averaged(x) - bias, (summed(x) - bias) / 64)
    with pytest.raises(ValueError, match="pooling must be one of 'sum', 'mean'"):
        SNGANDiscriminator(8, 16, 1, pooling="max")
