"""Export, AMP, torch.compile, copying and pickling: behaviour at the edges."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

from sparsegan import SparseGANWrapper, load_sparse, save_sparse
from sparsegan.export import pack_bits, unpack_bits
from sparsegan.strategies import DDST, DST, Static
from tests.conftest import LATENT, ConvDiscriminator, ConvGenerator, adam, assert_masks_hold, mlp_gan, real_batch, train


def _conv(strategy=None, **kwargs):
    torch.manual_seed(0)
    G, D = ConvGenerator(channels=32), ConvDiscriminator(channels=32)
    g_opt, d_opt = adam(G), adam(D)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=strategy or Static(0.1, 0.2), **kwargs)
    return G, D, g_opt, d_opt, sg


# ---------------------------------------------------------------------------- finalize and export


def test_finalize_bakes_masks_and_returns_plain_modules() -> None:
    G, D, g_opt, d_opt, sg = _conv()
    train(G, D, g_opt, d_opt, 3, latent=LATENT, data_shape=(1, 8, 8))
    masks = sg.masks("G")
    G_out, D_out = sg.finalize()
    assert G_out is G and D_out is D
    assert not G._forward_pre_hooks and not g_opt._optimizer_step_post_hooks and not g_opt._optimizer_step_pre_hooks
    for name, mask in masks.items():
        assert torch.count_nonzero(G.get_parameter(name).detach()[~mask]) == 0
    fresh_g, fresh_d = ConvGenerator(channels=32), ConvDiscriminator(channels=32)
    fresh_g.load_state_dict(G.state_dict())  # strict: same keys as the unwrapped architecture
    fresh_d.load_state_dict(D.state_dict())
    SparseGANWrapper(G, D, adam(G), adam(D), strategy=Static(0.5, 0.5))  # no longer "already wrapped"


def test_bits_pack_and_unpack_by_hand() -> None:
    mask = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    packed = pack_bits(mask)
    # row-major bits 101 000 11|1 -> 0b10100011, then 0b1 padded with zeros -> 0b10000000
    assert packed.tolist() == [0b10100011, 0b10000000]
    assert torch.equal(unpack_bits(packed, (3, 3)), mask)


def test_save_sparse_round_trips_exactly_at_a_fraction_of_the_size(tmp_path) -> None:
    G, D, g_opt, d_opt, sg = _conv(Static(0.1, 0.1))
    train(G, D, g_opt, d_opt, 2, latent=LATENT, data_shape=(1, 8, 8))
    sg.apply_masks()
    sizes = save_sparse(D, tmp_path / "d.pt", masks=sg.masks("D"))
    torch.save(D.state_dict(), tmp_path / "dense.pt")
    # masked weights: 10% of the float32 values + 1 bit per weight
    assert sizes["sparse_bytes"] / sizes["dense_bytes"] == pytest.approx(0.1 + 1 / 32, abs=0.005)
    assert (tmp_path / "d.pt").stat().st_size < 0.25 * (tmp_path / "dense.pt").stat().st_size
    fresh = ConvDiscriminator(channels=32)
    state = load_sparse(tmp_path / "d.pt", fresh)
    for key, value in D.state_dict().items():
        assert torch.equal(state[key], value) and torch.equal(fresh.state_dict()[key], value), key
    # without masks: tensors that are mostly zero are found by their zeros
    save_sparse(G, tmp_path / "g.pt")
    assert all(torch.equal(load_sparse(tmp_path / "g.pt")[k], v) for k, v in G.state_dict().items())


def test_save_sparse_refuses_a_mask_the_weights_do_not_follow(tmp_path) -> None:
    G, D = mlp_gan()
    mask = {"0.weight": torch.zeros_like(G[0].weight, dtype=torch.bool)}
    with pytest.raises(ValueError, match="not zero where its mask is False"):
        save_sparse(G, tmp_path / "g.pt", masks=mask)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a sparsegan sparse checkpoint"):
        load_sparse(tmp_path / "other.pt")


# ---------------------------------------------------------------------------- AMP


def test_grad_scaler_skipped_steps_advance_nothing() -> None:
    torch.manual_seed(0)
    G, D = mlp_gan()
    g_opt, d_opt = adam(G), adam(D)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=DDST(0.3, 0.3, update_every=1, d_update_every=1,
                                                            br_every=1, br_window=1),
                          latent=lambda n: torch.randn(n, 8), real=lambda n: real_batch(n, torch.Generator()))
    scaler = torch.amp.GradScaler("cpu")
    before = sg.state_dict()
    z = torch.randn(8, 8)
    for opt, loss in ((d_opt, D(G(z).detach()).mean() * float("inf")), (g_opt, -D(G(z)).mean() * float("nan"))):
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)  # inf/NaN gradients: the step is skipped
        scaler.update()
    assert sg.steps("G") == sg.steps("D") == 0
    assert sg.mask_updates("G") == sg.mask_updates("D") == 0 and sg.balance.history == []
    assert all(torch.equal(before["networks"]["generator"]["masks"][k], v) for k, v in sg.masks("G").items())


def test_bf16_autocast_on_cpu() -> None:
    torch.manual_seed(0)
    G, D = mlp_gan()
    g_opt, d_opt = adam(G), adam(D)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=DST(0.3, 0.3, update_every=2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = train(G, D, g_opt, d_opt, 6, latent=8)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sg.mask_updates("G") == 3
    assert_masks_hold(sg, G, D)


# ---------------------------------------------------------------------------- torch.compile


def test_compiled_modules_match_eager_and_keep_their_masks() -> None:
    torch.manual_seed(0)
    G, D = mlp_gan()
    eager_g = copy.deepcopy(G)
    g_opt, d_opt = adam(G), adam(D)
    cg, cd = torch.compile(G, backend="aot_eager"), torch.compile(D, backend="aot_eager")
    sg = SparseGANWrapper(cg, cd, g_opt, d_opt, strategy=DST(0.3, 0.3, update_every=2),
                          latent=lambda n: torch.randn(n, 8))
    assert set(sg.masks("G")) == {"0.weight", "2.weight", "4.weight"}
    train(cg, cd, g_opt, d_opt, 4, latent=8)
    assert_masks_hold(sg, G, D)
    eager_g.load_state_dict(G.state_dict())
    z = torch.randn(5, 8)
    assert torch.allclose(cg(z), eager_g(z), atol=1e-6)
    # weights changed outside the optimizer are masked before the compiled forward too
    with torch.no_grad():
        G[2].weight.fill_(1.0)
    cg(z)
    assert_masks_hold(sg, G, D)


# ---------------------------------------------------------------------------- copies and pickles


def test_copies_of_a_wrapped_model_are_plain_modules() -> None:
    G, D = mlp_gan()
    sg = SparseGANWrapper(G, D, adam(G), adam(D), strategy=Static(0.3, 0.3))
    clone = copy.deepcopy(G)
    with torch.no_grad():
        clone[2].weight.fill_(1.0)
    clone(torch.randn(2, 8))  # the copied hook is inert: it neither masks the copy...
    assert torch.all(clone[2].weight == 1.0)
    assert_masks_hold(sg, G, D)  # ...nor touches the original
    buffer = io.BytesIO()
    torch.save(G, buffer)  # whole-module pickle works
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(torch.ones(1, 8)), G(torch.ones(1, 8)))


def test_the_wrapper_itself_refuses_pickle_and_deepcopy() -> None:
    G, D = mlp_gan()
    sg = SparseGANWrapper(G, D, adam(G), adam(D), strategy=Static(0.3, 0.3))
    with pytest.raises(TypeError, match="state_dict"):
        pickle.dumps(sg)
    with pytest.raises(TypeError, match="state_dict"):
        copy.deepcopy(sg)
    # the state dict itself pickles
    assert pickle.loads(pickle.dumps(sg.state_dict()))["format"] == 1


def test_nan_losses_do_not_corrupt_masks() -> None:
    torch.manual_seed(0)
    G, D = mlp_gan()
    g_opt, d_opt = adam(G), adam(D)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=Static(0.3, 0.3))
    z = torch.randn(4, 8)
    loss = F.relu(1 + D(G(z).detach())).mean() * float("nan")
    d_opt.zero_grad()
    loss.backward()
    d_opt.step()  # plain Adam applies the NaN update ...
    masks = sg.masks("D")
    for name, mask in masks.items():  # ... but inactive weights are still exactly zero
        assert torch.count_nonzero(D.get_parameter(name).detach()[~mask].nan_to_num(1.0)) == 0
