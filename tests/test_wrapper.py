"""SparseGANWrapper: the public contract, hooks on the user's unchanged loop, and bad input."""

from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm
from torch.nn.utils.parametrizations import spectral_norm as parametrized_spectral_norm

from sparsegan import DiscoveryError, SparseGANWrapper, WrapperStateError
from sparsegan.strategies import Dense, Static
from tests.conftest import LATENT, ConvDiscriminator, ConvGenerator, adam, assert_masks_hold, mlp_gan, train


def _wrap(G, D, strategy=None, **kwargs):
    g_opt, d_opt = adam(G), adam(D)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=strategy or Static(0.2, 0.3), **kwargs)
    return sg, g_opt, d_opt


def test_public_contract(conv_gan) -> None:
    G, D = conv_gan
    sg, g_opt, d_opt = _wrap(G, D, latent=lambda n: torch.randn(n, LATENT))
    total_g = sum(p.numel() for p in (G.fc.weight, G.conv1.weight, G.up.weight, G.out.weight))
    assert sg.density("generator") == round(0.2 * total_g) / total_g
    # D's kernels: conv1 16*1*3*3 = 144, conv2 16*16*4*4 = 4096, fc 256 -> 4496; round(0.3 * 4496) = 1349
    assert sg.density("discriminator") == 1349 / 4496
    # the short names (any case) reach their own network, not the other one
    assert sg.density("G") == sg.density("g") == round(0.2 * total_g) / total_g
    assert sg.density("D") == sg.density("d") == 1349 / 4496
    assert set(sg.masks("G")) == {"fc.weight", "conv1.weight", "up.weight", "out.weight"}
    assert all(torch.equal(sg.masks("d")[k], m) for k, m in sg.masks("discriminator").items())
    masks = sg.masks("discriminator")
    assert set(masks) == {"conv1.weight_orig", "conv2.weight_orig", "fc.weight_orig"}
    assert all(m.dtype == torch.bool for m in masks.values())
    report = sg.report()
    assert "conv1.weight_orig" in report and "conv_transpose2d" in report and "bias of conv2d" in report
    state = sg.state_dict()
    assert set(state["networks"]) == {"generator", "discriminator"}
    assert "Static" in repr(sg)
    sg.remove()
    with pytest.raises(ValueError, match="network must be"):
        sg.density("critic")


def test_wrapping_leaves_the_global_rng_alone(conv_gan) -> None:
    G, D = conv_gan
    torch.manual_seed(1)
    expected = torch.rand(4)
    torch.manual_seed(1)
    sg, *_ = _wrap(G, D, latent=lambda n: torch.randn(n, LATENT))  # latent(2) runs for discovery
    assert torch.equal(torch.rand(4), expected)
    assert "probe" not in sg.report() and "one sample per observe() call" in sg.report()


def test_masks_hold_at_wrap_time_and_after_every_step(conv_gan) -> None:
    G, D = conv_gan
    sg, g_opt, d_opt = _wrap(G, D)
    assert_masks_hold(sg, G, D)
    train(G, D, g_opt, d_opt, 5, latent=LATENT, data_shape=(1, 8, 8))
    assert_masks_hold(sg, G, D)
    assert sg.steps("generator") == 5 and sg.steps("discriminator") == 5


def test_weights_changed_outside_the_optimizer_are_masked_before_the_next_forward() -> None:
    G, D = mlp_gan()
    dense = copy.deepcopy(G.state_dict())
    sg, g_opt, d_opt = _wrap(G, D)
    G.load_state_dict(dense)  # the user loads dense weights after wrapping
    z = torch.randn(4, 8)
    masked_copy = copy.deepcopy(G)
    with torch.no_grad():
        for name, mask in sg.masks("G").items():
            masked_copy.get_parameter(name).mul_(mask)
    out = G(z)  # the forward pre-hook re-enforces the masks first
    assert torch.equal(out, masked_copy(z))
    assert_masks_hold(sg, G, D)


@pytest.mark.parametrize("sn", [spectral_norm, parametrized_spectral_norm], ids=["legacy", "parametrize"])
def test_spectral_norm_discriminator_trains_through_its_masks(sn) -> None:
    torch.manual_seed(0)
    G, D = ConvGenerator(), ConvDiscriminator(sn=sn)
    sg, g_opt, d_opt = _wrap(G, D, Static(0.5, 0.25))
    weight_name = "conv2.weight_orig" if sn is spectral_norm else "conv2.parametrizations.weight.original"
    u_name = "conv2.weight_u" if sn is spectral_norm else "conv2.parametrizations.weight.0._u"
    param = D.get_parameter(weight_name)
    mask = sg.masks("D")[weight_name]
    u_before = D.get_buffer(u_name).clone()
    before = param.detach().clone()
    train(G, D, g_opt, d_opt, 3, latent=LATENT, data_shape=(1, 8, 8))
    assert param.grad is not None and param.grad[mask].abs().sum() > 0  # the SN parameter is trained
    assert not torch.equal(param.detach()[mask], before[mask])
    assert torch.count_nonzero(param.detach()[~mask]) == 0
    assert not torch.equal(D.get_buffer(u_name), u_before)  # power iteration still runs
    # the wrapped D computes exactly what an unwrapped D with zeroed weights computes
    reference = ConvDiscriminator(sn=sn)
    reference.load_state_dict(D.state_dict())
    reference.eval()
    D.eval()
    x = torch.randn(4, 1, 8, 8)
    assert torch.allclose(D(x), reference(x))


def test_tied_weights_share_one_mask() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(2, 6)
            self.a = nn.Linear(6, 6, bias=False)
            self.b = nn.Linear(6, 6, bias=False)
            self.b.weight = self.a.weight
            self.head = nn.Linear(6, 1)

        def forward(self, x):
            return self.head(self.b(torch.relu(self.a(self.inp(x)))))

    G, _ = mlp_gan(hidden=6)
    D = Tied()
    sg, g_opt, d_opt = _wrap(G, D, Static(0.5, 0.5))
    assert set(sg.masks("D")) == {"inp.weight", "a.weight", "head.weight"}
    assert "a.weight (= b.weight)" in sg.report()
    train(G, D, g_opt, d_opt, 3, latent=8)
    assert torch.count_nonzero(D.b.weight.detach()[~sg.masks("D")["a.weight"]]) == 0


def test_conditional_generator_and_multi_output_discriminator() -> None:
    class CondG(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(3, 8)
            self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))

        def forward(self, z, y):
            return self.net(torch.cat([z, self.embed(y)], 1))

    class TwoHeadD(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(2, 32)
            self.adv = nn.Linear(32, 1)
            self.cls = nn.Linear(32, 3)

        def forward(self, x):
            h = F.leaky_relu(self.body(x), 0.2)
            return self.adv(h), self.cls(h)

    G, D = CondG(), TwoHeadD()
    sg, g_opt, d_opt = _wrap(G, D, Static(0.5, 0.5), latent=lambda n: (torch.randn(n, 8), torch.randint(3, (n,))))
    assert set(sg.masks("G")) == {"net.0.weight", "net.2.weight"}
    assert {s.name: s.reason for s in sg.discovery("G").skipped}["embed.weight"] == "embedding table"
    assert set(sg.masks("D")) == {"body.weight", "adv.weight", "cls.weight"}
    for _ in range(3):
        z, y = torch.randn(8, 8), torch.randint(3, (8,))
        adv, logits = D(G(z, y).detach())
        d_loss = F.softplus(adv).mean() + F.cross_entropy(logits, y)
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        adv, _ = D(G(z, y))
        g_opt.zero_grad()
        F.softplus(-adv).mean().backward()
        g_opt.step()
    assert_masks_hold(sg, G, D)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_wrapped_modules_are_looked_through() -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        G, D = mlp_gan()
        ddp_g, ddp_d = nn.parallel.DistributedDataParallel(G), nn.parallel.DistributedDataParallel(D)
        g_opt, d_opt = adam(ddp_g), adam(ddp_d)
        sg = SparseGANWrapper(ddp_g, ddp_d, g_opt, d_opt, strategy=Static(0.3, 0.3))
        assert set(sg.masks("G")) == {"0.weight", "2.weight", "4.weight"}  # the user's names, no "module."
        train(ddp_g, ddp_d, g_opt, d_opt, 3, latent=8)
        assert_masks_hold(sg, G, D)
    finally:
        dist.destroy_process_group()


def test_remove_detaches_every_hook() -> None:
    G, D = mlp_gan()
    sg, g_opt, d_opt = _wrap(G, D)
    sg.remove()
    train(G, D, g_opt, d_opt, 2, latent=8)
    assert sg.steps("G") == 0  # no hook counted the steps
    assert torch.count_nonzero(G[2].weight.detach()[~sg.masks("G")["2.weight"]]) > 0  # Adam moved them
    assert G._forward_pre_hooks == {} and not g_opt._optimizer_step_post_hooks
    SparseGANWrapper(G, D, g_opt, d_opt, strategy=Dense())  # may be wrapped again


def test_dense_strategy_measures_without_masks() -> None:
    G, D = mlp_gan()
    before = [p.detach().clone() for p in G.parameters()]
    sg, g_opt, d_opt = _wrap(G, D, Dense())
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, G.parameters()))
    assert sg.density("G") == 1.0 and sg.masks("G") == {}
    assert len(sg.discovery("G")) == 3
    train(G, D, g_opt, d_opt, 2, latent=8)
    assert sg.steps("D") == 2


def test_strategy_by_name() -> None:
    G, D = mlp_gan()
    sg, *_ = _wrap(G, D, "dense")
    assert isinstance(sg.strategy, Dense)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_outside_range(density) -> None:
    with pytest.raises(ValueError, match=r"must be in \(0, 1\].*for 90% sparsity use 0.1"):
        Static(density, 0.5)
    with pytest.raises(ValueError, match=r"d_density must be in \(0, 1\]"):
        Static(0.5, density)


def test_density_of_the_wrong_type() -> None:
    with pytest.raises(TypeError, match="g_density must be a float"):
        Static("half", 0.5)  # type: ignore[arg-type]


def test_unknown_strategy_name() -> None:
    G, D = mlp_gan()
    with pytest.raises(ValueError, match="unknown strategy 'rigl'.*known strategies"):
        _wrap(G, D, "rigl")


def test_strategy_name_needing_arguments() -> None:
    G, D = mlp_gan()
    with pytest.raises(TypeError, match="g_density"):
        _wrap(G, D, "static")


def test_model_without_maskable_weights() -> None:
    class NoWeights(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return (x * self.scale).sum(1, keepdim=True)

    G, _ = mlp_gan()
    with pytest.raises(ValueError, match="no maskable weights.*scale"):
        _wrap(G, NoWeights())


def test_optimizer_not_holding_the_models_parameters() -> None:
    G, D = mlp_gan()
    with pytest.raises(ValueError, match="g_optimizer does not hold.*swap"):
        SparseGANWrapper(G, D, adam(D), adam(G), strategy=Static(0.5, 0.5))
    with pytest.raises(ValueError, match="same object"):
        opt = torch.optim.Adam(list(G.parameters()) + list(D.parameters()))
        SparseGANWrapper(G, D, opt, opt, strategy=Static(0.5, 0.5))
    with pytest.raises(TypeError, match="d_optimizer must be a torch.optim.Optimizer"):
        SparseGANWrapper(G, D, adam(G), None, strategy=Static(0.5, 0.5))  # type: ignore[arg-type]


def test_untraceable_model_without_example_input() -> None:
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 1)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    G, _ = mlp_gan()
    with pytest.raises(DiscoveryError, match="discriminator.*d_example_inputs=.*latent="):
        _wrap(G, Untraceable())
    # the fix the message names works
    sg, *_ = _wrap(G, Untraceable(), latent=lambda n: torch.randn(n, 8))
    assert sg.discovery("D").method in ("export", "runtime")


def test_wrapping_the_same_model_twice() -> None:
    G, D = mlp_gan()
    _wrap(G, D)
    with pytest.raises(ValueError, match="already wrapped.*remove"):
        _wrap(G, D)


def test_state_dict_from_another_strategy_or_model() -> None:
    G, D = mlp_gan()
    sg, *_ = _wrap(G, D, Static(0.5, 0.5))
    G2, D2 = mlp_gan()
    dense, *_ = _wrap(G2, D2, Dense())
    with pytest.raises(WrapperStateError, match="strategy Dense"):
        sg.load_state_dict(dense.state_dict())
    G3, D3 = mlp_gan(hidden=16)
    other, *_ = _wrap(G3, D3, Static(0.5, 0.5))
    with pytest.raises(WrapperStateError, match="shape"):
        sg.load_state_dict(other.state_dict())
    with pytest.raises(WrapperStateError, match="not a SparseGANWrapper state dict"):
        sg.load_state_dict({"masks": {}})


def test_include_exclude_per_network() -> None:
    G, D = mlp_gan()
    sg, *_ = _wrap(G, D, include={"generator": "2.*"}, exclude={"discriminator": ["4.*"]})
    assert set(sg.masks("G")) == {"2.weight"}
    assert set(sg.masks("D")) == {"0.weight", "2.weight"}
    # the weights left out are not pruned at all, and count as fully active in the density.
    # G: round(0.2 * 1024) = 205 of 2.weight, plus 0.weight's 256 and 4.weight's 64, of 1344
    assert int(torch.count_nonzero(G[2].weight)) == 205
    assert int(torch.count_nonzero(G[0].weight)) == 256 and int(torch.count_nonzero(G[4].weight)) == 64
    assert sg.density("G") == (205 + 256 + 64) / 1344
    # D: round(0.3 * (64 + 1024)) = 326 active in the two masked kernels, plus 4.weight's 32, of 1120
    assert int(torch.count_nonzero(D[4].weight)) == 32
    assert sum(int(m.sum()) for m in sg.masks("D").values()) == 326
    assert sg.density("D") == (326 + 32) / 1120
