"""The wrapper's FLOPs ledger and sparse G-EMA, driven by the user's unchanged loop."""

from __future__ import annotations

import pytest
import torch

from sparsegan import SparseGANWrapper
from sparsegan.strategies import DST, Dense, Static
from tests.conftest import LATENT, ConvDiscriminator, ConvGenerator, adam, mlp_gan, train


def _conv_wrapped(strategy, **kwargs):
    torch.manual_seed(0)
    G, D = ConvGenerator(), ConvDiscriminator()
    g_opt, d_opt = adam(G), adam(D)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=strategy, latent=lambda n: torch.randn(n, LATENT), **kwargs)
    return G, D, g_opt, d_opt, sg


def test_flops_of_static_training_by_hand() -> None:
    G, D, g_opt, d_opt, sg = _conv_wrapped(Static(0.3, 0.5))
    train(G, D, g_opt, d_opt, 4, latent=LATENT, data_shape=(1, 8, 8), n_critic=2)
    flops = sg.flops()
    for net, steps in (("generator", 4), ("discriminator", 8)):
        records = sg.discovery(net).weights
        densities = {n: int(m.sum()) / m.numel() for n, m in sg.masks(net).items()}
        dense = sum(2 * r.macs_per_sample for r in records)
        sparse = sum(densities[r.name] * 2 * r.macs_per_sample for r in records)
        assert flops[net]["dense"] == pytest.approx(3 * dense * steps)
        assert flops[net]["sparse"] == pytest.approx(3 * sparse * steps)
        assert flops["inference"][net] == pytest.approx(sparse / dense)
    assert flops["total"]["sparse"] == pytest.approx(flops["generator"]["sparse"] + flops["discriminator"]["sparse"])
    assert 0 < flops["total"]["ratio"] < 1


def test_dense_strategy_flops_ratio_is_one() -> None:
    G, D, g_opt, d_opt, sg = _conv_wrapped(Dense())
    train(G, D, g_opt, d_opt, 2, latent=LATENT, data_shape=(1, 8, 8))
    assert sg.flops()["total"]["ratio"] == pytest.approx(1.0)


def test_flops_need_an_example_input() -> None:
    G, D = mlp_gan()
    sg = SparseGANWrapper(G, D, adam(G), adam(D), strategy=Static(0.5, 0.5))
    with pytest.raises(RuntimeError, match="latent="):
        sg.flops()


def test_sparse_ema_follows_the_generators_masks() -> None:
    G, D, g_opt, d_opt, sg = _conv_wrapped(DST(0.3, 0.5, networks="generator", update_every=3), g_ema=0.9)
    assert sg.ema is not None
    train(G, D, g_opt, d_opt, 10, latent=LATENT, data_shape=(1, 8, 8))
    assert sg.mask_updates("G") == 3
    ema_params = dict(sg.ema.module.named_parameters())
    for name, mask in sg.masks("G").items():
        assert torch.count_nonzero(ema_params[name].detach()[~mask]) == 0
        assert not torch.equal(ema_params[name].detach(), G.get_parameter(name).detach())
    assert not sg.ema.module._forward_pre_hooks  # the copy carries none of the wrapper's hooks
    state = sg.state_dict()
    assert state["ema"] is not None and state["ledger"] is not None
