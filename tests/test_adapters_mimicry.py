"""sparsegan on the real torch-mimicry models (SNGAN, SAGAN, cGAN-PD), through ``sparsegan.adapters.mimicry``.

Small widths (16) at mimicry's 32x32 resolution; real batches are sklearn's digits (offline).
Training uses mimicry's own ``train_step`` methods, i.e. its hinge-loss D/G step structure.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

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
    outputs,
    wrap,
)

mimicry = pytest.importorskip("sparsegan.adapters.mimicry")
try:
    mmc = mimicry.import_mimicry()
except ImportError as exc:  # pragma: no cover - the test-bed has it installed
    pytest.skip(f"torch-mimicry is not installed: {exc}", allow_module_level=True)
from torch_mimicry.training import metric_log  # noqa: E402  (needs the shims above)

WIDTH, NZ, BATCH = 16, 32, 8

_thread_fixture = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return digits(32, channels=3)


def models(name: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    return mimicry.build(name, ngf=WIDTH, ndf=WIDTH, nz=NZ)


def adam(module: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(module.parameters(), 2e-4, betas=(0.0, 0.9))  # mimicry's SNGAN recipe


def mimicry_steps(G, D, g_opt, d_opt, images: torch.Tensor, steps: int, n_dis: int = 1) -> None:
    """mimicry's ``Trainer.train`` inner loop: n_dis ``D.train_step`` then one ``G.train_step``."""
    batches = RealBatches(images, seed=1)
    log_data = metric_log.MetricLog()
    for step in range(steps):
        for i in range(n_dis):
            real = (batches(BATCH), torch.zeros(BATCH, dtype=torch.long))
            log_data = D.train_step(real, G, d_opt, log_data, device=torch.device("cpu"), global_step=step)
            if i == n_dis - 1:
                log_data = G.train_step(real, D, g_opt, log_data, device=torch.device("cpu"), global_step=step)


# --------------------------------------------------------------------------------------------- shims


def test_import_is_idempotent_and_shims_only_what_is_missing() -> None:
    assert mimicry.import_mimicry() is mmc is sys.modules["torch_mimicry"]
    six = sys.modules["torch._six"]
    assert six.string_classes == (str, bytes) and six.inf == float("inf")
    with pytest.raises(ValueError, match="unknown mimicry model"):
        mimicry.build("biggan")


def test_latent_samplers_match_the_generators() -> None:
    G, _ = models("sngan32")
    z = mimicry.latent(G)(5)
    assert z.shape == (5, NZ) and not mimicry.is_conditional(G)
    Gc, Dc = models("cgan_pd32")
    z, y = mimicry.latent(Gc, generator_rng=torch.Generator().manual_seed(0))(7)
    assert z.shape == (7, NZ) and y.shape == (7,) and int(y.min()) >= 0 and int(y.max()) < 10
    assert mimicry.is_conditional(Gc) and mimicry.is_conditional(Dc)
    x, labels = mimicry.d_example(Gc, 3)
    assert x.shape == (3, 3, 32, 32) and labels.shape == (3,)
    with pytest.raises(TypeError, match="nz"):
        mimicry.latent(Dc)


# --------------------------------------------------------------------------------------------- discovery


@pytest.mark.parametrize("name", ["sngan32", "sagan32", "cgan_pd32"])
def test_discovery_finds_every_kernel(name: str) -> None:
    G, D = models(name)
    g_result = check_discovery(G, mimicry.latent(G)(2), method="fx")
    d_result = check_discovery(D, mimicry.d_example(G), method="fx")
    sn_convs = [n for n, m in D.named_modules()
                if hasattr(m, "weight_orig") and isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert sn_convs and all(f"{n}.weight_orig" in d_result.names for n in sn_convs)
    assert all(d_result[f"{n}.weight_orig"].via == ("spectral_norm",) for n in sn_convs)
    if name == "sagan32":  # SN in G as well, attention, and an SN embedding table in D
        assert any(n.endswith("weight_orig") for n in g_result.names)
        assert "embedding table" in {s.name: s.reason for s in d_result.skipped}["l_y.weight_orig"]
    if name == "cgan_pd32":
        # mimicry's own SNLinear divides by sigma in forward; SNEmbedding is a table, not a kernel
        assert d_result["l5.weight"].op == "linear"
        assert "embedding table" in {s.name: s.reason for s in d_result.skipped}["l_y.weight"]


# --------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_sngan_trains_with_mimicry_train_steps(strategy: str, images: torch.Tensor) -> None:
    steps = 6
    G, D = models("sngan32")
    g_opt, d_opt = adam(G), adam(D)
    sg, dense_g, dense_d = wrap(G, D, g_opt, d_opt, strategy, steps,
                                latent=mimicry.latent(G), real=RealBatches(images, seed=2))
    check_zeroed_reference(dense_g, G, sg.masks("G"), mimicry.latent(G)(4))
    check_zeroed_reference(dense_d, D, sg.masks("D"), images[:4])
    mimicry_steps(G, D, g_opt, d_opt, images, steps)
    check_after_training(sg, G, D, strategy, steps)
    sg.remove()


def test_n_dis_counts_steps_per_network(images: torch.Tensor) -> None:
    G, D = models("sngan32")
    g_opt, d_opt = adam(G), adam(D)
    sg, _, _ = wrap(G, D, g_opt, d_opt, "static", 3, latent=mimicry.latent(G))
    mimicry_steps(G, D, g_opt, d_opt, images, 3, n_dis=2)
    check_after_training(sg, G, D, "static", 3, d_steps=6)


def test_spectral_norm_weight_orig_gets_gradient_and_masks_hold(images: torch.Tensor) -> None:
    G, D = models("sngan32")
    g_opt, d_opt = adam(G), adam(D)
    sg = sparsegan.SparseGANWrapper(G, D, g_opt, d_opt, strategy=sparsegan.strategies.Static(0.3, 0.3),
                                    latent=mimicry.latent(G))
    masks = sg.masks("D")
    assert masks and all(n.endswith("weight_orig") for n in masks)
    modules = {n: m for n, m in D.named_modules() if hasattr(m, "weight_orig")}
    u_before = {n: m.weight_u.clone() for n, m in modules.items()}
    d_opt.zero_grad()
    loss = torch.relu(1 - D(images[:BATCH])).mean() + torch.relu(1 + D(G(mimicry.latent(G)(BATCH)).detach())).mean()
    loss.backward()
    params = dict(D.named_parameters())
    for name, mask in masks.items():
        grad = params[name].grad
        assert grad is not None, f"{name} got no gradient through the spectral-norm hook"
        assert torch.count_nonzero(grad[mask]) > 0, f"{name}: active entries got no gradient"
    stalled = [n for n, m in modules.items() if m.weight_u.numel() > 1 and torch.equal(u_before[n], m.weight_u)]
    assert not stalled, f"spectral-norm power iteration did not run on {stalled}"
    d_opt.step()
    assert_masks_hold(sg, "D", D)
    # the SN hook recomputes `weight` from the masked `weight_orig`: zeros stay zeros
    D(images[:2])
    for name, mask in masks.items():
        module = modules[name.rsplit(".", 1)[0]]
        assert torch.count_nonzero(module.weight.detach()[~mask]) == 0


@pytest.mark.parametrize("name", ["sagan32", "cgan_pd32"])
def test_conditional_models_match_the_zeroed_reference(name: str) -> None:
    G, D = models(name)
    g_opt, d_opt = adam(G), adam(D)
    d_example = mimicry.d_example(G)
    sg, dense_g, dense_d = wrap(G, D, g_opt, d_opt, "static", 1, latent=mimicry.latent(G), d_example=d_example)
    # the class embedding is read as a table: the wrapper leaves it dense, and it still takes part
    embedding = next(n for n, _ in D.named_parameters() if n.startswith("l_y."))
    assert embedding not in sg.masks("D") and torch.count_nonzero(D.get_parameter(embedding)) > 0
    assert {s.name: s.reason for s in sg.discovery("D").skipped}[embedding].startswith("embedding table")
    z, y = mimicry.latent(G, generator_rng=torch.Generator().manual_seed(3))(4)
    check_zeroed_reference(dense_g, G, sg.masks("G"), (z, y))
    check_zeroed_reference(dense_d, D, sg.masks("D"), (outputs(dense_g, (z, y)), y))


def test_cgan_pd_ddst_fed_by_observe(images: torch.Tensor) -> None:
    """A conditional D cannot be probed with images alone; the loop feeds BR with sg.observe()."""
    steps = 4
    G, D = models("cgan_pd32")
    g_opt, d_opt = adam(G), adam(D)
    sg, _, _ = wrap(G, D, g_opt, d_opt, "ddst", steps, latent=mimicry.latent(G), d_example=mimicry.d_example(G))
    sample = mimicry.latent(G)
    batches = RealBatches(images, seed=4)
    for _ in range(steps):
        real, labels = batches(BATCH), torch.randint(10, (BATCH,))
        z, y = sample(BATCH)
        d_opt.zero_grad()
        d_real = D(real, labels)
        d_loss = torch.relu(1 - d_real).mean() + torch.relu(1 + D(G(z, y).detach(), y)).mean()
        d_loss.backward()
        d_opt.step()
        g_opt.zero_grad()
        d_fake = D(G(z, y), y)
        (-d_fake.mean()).backward()
        g_opt.step()
        with torch.no_grad():
            sg.observe(d_real, d_fake, D(G(z, y), y))
    check_after_training(sg, G, D, "ddst", steps)


def test_masks_come_back_after_loading_a_dense_checkpoint() -> None:
    """load_state_dict writes dense weights; the next call through the module re-applies the masks.

    (mimicry's ``train_step`` calls ``self.forward`` directly, which skips module hooks: there,
    call ``sg.apply_masks()`` after ``restore_checkpoint``; the next optimizer step also does it.)
    """
    G, D = models("sngan32")
    g_opt, d_opt = adam(G), adam(D)
    dense_state = copy.deepcopy(D.state_dict())
    sg, _, dense_d = wrap(G, D, g_opt, d_opt, "static", 1, latent=mimicry.latent(G))
    D.load_state_dict(dense_state)
    assert any(torch.count_nonzero(D.get_parameter(n).detach()[~m]) for n, m in sg.masks("D").items())
    x = torch.randn(2, 3, 32, 32)
    check_zeroed_reference(dense_d, D, sg.masks("D"), x)
    assert_masks_hold(sg, "D", D)
    D.load_state_dict(dense_state)
    sg.apply_masks()
    assert_masks_hold(sg, "D", D)
