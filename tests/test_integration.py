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


# MACs per sample of the conftest models (latent 16, 16 channels, 8x8 images), counted by hand:
# a conv makes out-channels x output positions x (in-channels x k x k) MACs; a transposed conv
# in-channels x input positions x (out-channels x k x k); a linear in x out.
HAND_MACS = {
    "generator": {
        "fc.weight": 16 * 256,                      # Linear(16, 16 * 4 * 4)
        "conv1.weight": 16 * (4 * 4) * (16 * 3 * 3),  # 3x3, padding 1, on 4x4
        "up.weight": 16 * (4 * 4) * (16 * 4 * 4),     # 4x4 stride 2 transposed: 4x4 -> 8x8
        "out.weight": 1 * (8 * 8) * (16 * 3 * 3),     # 3x3, padding 1, on 8x8
    },
    "discriminator": {
        "conv1.weight_orig": 16 * (8 * 8) * (1 * 3 * 3),
        "conv2.weight_orig": 16 * (4 * 4) * (16 * 4 * 4),  # 4x4 stride 2: 8x8 -> 4x4
        "fc.weight_orig": 256,
    },
}


def test_flops_of_static_training_by_hand() -> None:
    G, D, g_opt, d_opt, sg = _conv_wrapped(Static(0.3, 0.5))
    train(G, D, g_opt, d_opt, 4, latent=LATENT, data_shape=(1, 8, 8), n_critic=2)
    flops = sg.flops()
    for net, steps in (("generator", 4), ("discriminator", 8)):
        macs = HAND_MACS[net]
        masks = sg.masks(net)
        assert set(masks) == set(macs)
        densities = {n: int(m.sum()) / m.numel() for n, m in masks.items()}
        # forward 2 FLOPs per MAC; a training step is 3 forwards' worth (forward, two backward products)
        dense = sum(2 * m for m in macs.values())
        sparse = sum(densities[n] * 2 * m for n, m in macs.items())
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
