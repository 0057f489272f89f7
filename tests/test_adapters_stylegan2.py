"""sparsegan on lucidrains' stylegan2-pytorch (the "untraceable StyleGAN2"), via ``sparsegan.adapters.stylegan2``.

Neither network traces with ``torch.fx``, so discovery goes through ``torch.export``; the
modulated ``Conv2DMod`` kernels are reshaped into grouped ``F.conv2d`` weights per call. 16x16
RGB images, ``network_capacity=2``, ``latent_dim=32``; real batches are sklearn's digits.
Training follows lucidrains' ``Trainer.train``: its hinge-loss sign convention (D scores real
images low), its gradient penalty every 4 steps, and G + style network on one optimizer.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import sparsegan
from tests.adapter_checks import (
    STRATEGY_NAMES,
    RealBatches,
    assert_masks_hold,
    check_after_training,
    check_discovery,
    check_zeroed_reference,
    digits,
    one_thread,
    wrap,
)

stylegan2 = pytest.importorskip("sparsegan.adapters.stylegan2")
try:
    LS = stylegan2.import_stylegan2()
except ImportError as exc:  # pragma: no cover - the test-bed has it installed
    pytest.skip(f"stylegan2-pytorch is not installed: {exc}", allow_module_level=True)

SIZE, LATENT, CAPACITY, BATCH = 16, 32, 2, 4

_thread_fixture = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return digits(SIZE, channels=3, low=0.0)  # lucidrains trains on images in [0, 1]


def models(seed: int = 0):
    torch.manual_seed(seed)
    return stylegan2.build(image_size=SIZE, latent_dim=LATENT, network_capacity=CAPACITY)


def optimizers(G, D, S, lr: float = 2e-4):
    """lucidrains: G and S share one Adam; D's learning rate times ``ttur_mult`` (1 here)."""
    g_opt = torch.optim.Adam(list(G.parameters()) + list(S.parameters()), lr=lr, betas=(0.5, 0.9))
    d_opt = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.5, 0.9))
    return g_opt, d_opt


def style_list(n: int, layers: int, mixed_prob: float = 0.9):
    """lucidrains' ``noise_list`` / ``mixed_list`` without their ``.cuda()``."""
    if float(torch.rand(())) < mixed_prob:
        tt = int(torch.rand(()) * layers)
        return [(torch.randn(n, LATENT), tt), (torch.randn(n, LATENT), layers - tt)]
    return [(torch.randn(n, LATENT), layers)]


def lucidrains_steps(G, D, S, g_opt, d_opt, images: torch.Tensor, steps: int) -> None:
    """The D and G halves of lucidrains' ``Trainer.train`` (no EMA, no path-length penalty)."""
    batches = RealBatches(images, seed=1)
    for step in range(steps):
        d_opt.zero_grad()
        w_styles = LS.styles_def_to_tensor(LS.latent_to_w(S, style_list(BATCH, G.num_layers)))
        noise = stylegan2.image_noise(BATCH, SIZE)
        fake_output, fake_q_loss = D(G(w_styles, noise).clone().detach())
        image_batch = batches(BATCH).requires_grad_()
        real_output, real_q_loss = D(image_batch)
        disc_loss = (F.relu(1 + real_output) + F.relu(1 - fake_output)).mean()
        if step % 4 == 0:
            disc_loss = disc_loss + LS.gradient_penalty(image_batch, real_output)
        disc_loss.backward()
        d_opt.step()

        g_opt.zero_grad()
        w_styles = LS.styles_def_to_tensor(LS.latent_to_w(S, style_list(BATCH, G.num_layers)))
        fake_output, _ = D(G(w_styles, stylegan2.image_noise(BATCH, SIZE)))
        fake_output.mean().backward()
        g_opt.step()


# --------------------------------------------------------------------------------------------- shims


def test_import_leaves_no_patch_behind() -> None:
    assert stylegan2.import_stylegan2() is LS is sys.modules["stylegan2_pytorch.stylegan2_pytorch"]
    assert torch.cuda.is_available() == (torch.cuda.device_count() > 0), "the CUDA check is still patched"
    aim = sys.modules.get("aim")
    assert aim is None or not getattr(aim, "__sparsegan_shim__", False), "the aim placeholder stayed in sys.modules"
    with pytest.raises(ValueError, match="power of 2"):
        stylegan2.build(image_size=24)


def test_build_initialises_like_lucidrains_and_samplers_fit() -> None:
    G, D, S = models()
    assert all(torch.count_nonzero(b.to_noise1.weight) == 0 for b in G.blocks)
    styles, noise = stylegan2.latent(G, S, mixed_prob=1.0, generator=torch.Generator().manual_seed(0))(3)
    assert styles.shape == (3, G.num_layers, LATENT) and noise.shape == (3, SIZE, SIZE, 1)
    assert G(styles, noise).shape == (3, 3, SIZE, SIZE)
    with pytest.raises(TypeError, match="latent_dim"):
        stylegan2.latent(D)


# --------------------------------------------------------------------------------------------- discovery


@pytest.mark.parametrize("batch", [2, 8])
def test_discovery_finds_every_kernel(batch: int) -> None:
    """Through torch.export; the batch size must not matter (the 1x1 to-RGB kernels are smaller
    than the per-sample styles that modulate them once the batch exceeds 3)."""
    G, D, S = models()
    example = stylegan2.latent(G, S)(batch)
    g_result = check_discovery(G, example, method="export")
    d_result = check_discovery(D, torch.rand(batch, 3, SIZE, SIZE), method="export")
    check_discovery(S, torch.randn(batch, LATENT), method="fx")
    modulated = [f"blocks.{i}.{c}.weight" for i in range(len(G.blocks)) for c in ("conv1", "conv2", "to_rgb.conv")]
    assert all(g_result[n].op == "conv2d" for n in modulated)
    assert "initial_block" in {s.name for s in g_result.skipped}  # the learned constant input
    assert len(d_result) == sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in D.modules())


def test_mapped_generator_makes_the_style_network_sparse_too() -> None:
    G, D, S = models()
    MG = stylegan2.MappedGenerator(S, G)
    example = MG.latent()(2)
    result = check_discovery(MG, example, method="export")
    assert {"S.net.0.weight", "S.net.2.weight"} <= set(result.names)
    g_opt, d_opt = optimizers(G, D, S)
    sg, dense_mg, dense_d = wrap(MG, D, g_opt, d_opt, "static", 1, latent=MG.latent())
    check_zeroed_reference(dense_mg, MG, sg.masks("G"), example)
    assert sg.masks("G")["S.net.0.weight"].float().mean() < 1


# --------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_trains_with_lucidrains_losses(strategy: str, images: torch.Tensor) -> None:
    steps = 6
    G, D, S = models()
    g_opt, d_opt = optimizers(G, D, S)
    sg, dense_g, dense_d = wrap(G, D, g_opt, d_opt, strategy, steps,
                                latent=stylegan2.latent(G, S), real=RealBatches(images, seed=2))
    assert sg.discovery("G").method == "export" and sg.discovery("D").method == "export"
    example = stylegan2.latent(G, S, generator=torch.Generator().manual_seed(5))(3)
    check_zeroed_reference(dense_g, G, sg.masks("G"), example)
    check_zeroed_reference(dense_d, D, sg.masks("D"), images[:3])
    s_before = [p.detach().clone() for p in S.parameters()]
    lucidrains_steps(G, D, S, g_opt, d_opt, images, steps)
    check_after_training(sg, G, D, strategy, steps)
    assert all(not torch.equal(a, b) for a, b in zip(s_before, S.parameters())), "S was not trained"
    assert all(torch.count_nonzero(p) == p.numel() for p in S.parameters() if p.dim() > 1), "S is not dense"
    sg.remove()


def test_modulated_kernels_get_gradient_and_masks_hold() -> None:
    G, D, S = models()
    g_opt, d_opt = optimizers(G, D, S)
    sg = sparsegan.SparseGANWrapper(G, D, g_opt, d_opt, strategy=sparsegan.strategies.Static(0.2, 0.5),
                                    latent=stylegan2.latent(G, S))
    styles, noise = stylegan2.latent(G, S)(BATCH)
    g_opt.zero_grad()
    D(G(styles, noise))[0].mean().backward()
    masks = sg.masks("G")
    for name, mask in masks.items():
        grad = G.get_parameter(name).grad
        if "to_noise" in name:  # zero-initialised noise projections: no path to the loss yet
            continue
        assert grad is not None and torch.count_nonzero(grad[mask]) > 0, name
    g_opt.step()
    assert_masks_hold(sg, "G", G)
