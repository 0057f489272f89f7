"""The hard edge case: stylegan2-torch (rosinality-style StyleGAN2), via ``sparsegan.adapters.stylegan2_torch``.

No ``nn.Conv2d``/``nn.Linear`` anywhere (equalized-LR everywhere), 5-D modulated kernels,
a custom ``autograd.Function`` (``upfirdn2d``, here with the adapter's pure-PyTorch op), and a
``__call__`` that recurses forever once a module's class is swapped. It works: discovery goes
through ``torch.export`` and masks are enforced in place, so no class is swapped. Everything
that could hang runs under a time limit. 16x16 grayscale digits, 16 channels.
"""

from __future__ import annotations

import itertools
import sys

import pytest
import torch
from torch.nn.utils import parametrize

import sparsegan
from tests.adapter_checks import (
    STRATEGY_NAMES,
    RealBatches,
    check_after_training,
    check_discovery,
    check_zeroed_reference,
    digits,
    one_thread,
    time_limit,
    wrap,
)

sg2t = pytest.importorskip("sparsegan.adapters.stylegan2_torch")
try:
    package = sg2t.import_stylegan2_torch()
except ImportError as exc:  # pragma: no cover - the test-bed has it installed
    pytest.skip(f"stylegan2-torch is not installed: {exc}", allow_module_level=True)
from stylegan2_torch import loss as sg2t_loss  # noqa: E402  (needs the import shim above)
from stylegan2_torch.op.upfirdn2d import upfirdn2d as package_upfirdn2d  # noqa: E402

SIZE, LATENT, WIDTH, BATCH = 16, 32, 16, 4
LIMIT = 120  # seconds; a class-swap recursion or a hang fails instead of stalling the suite

_thread_fixture = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return digits(SIZE, channels=1)  # the package is grayscale only


def models(seed: int = 0):
    torch.manual_seed(seed)
    return sg2t.build(SIZE, LATENT, n_mlp=2, channels=sg2t.small_channels(WIDTH))


def adam(module: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(module.parameters(), lr=2e-3, betas=(0.0, 0.99))  # the package's defaults


# --------------------------------------------------------------------------------------------- native op


def upfirdn2d_by_definition(x: torch.Tensor, kernel: torch.Tensor, up: tuple[int, int], down: tuple[int, int],
                            pad: tuple[int, int, int, int]) -> torch.Tensor:
    """Zero-insertion upsampling, padding (negative crops), true convolution, subsampling; by loops."""
    (up_x, up_y), (down_x, down_y), (px0, px1, py0, py1) = up, down, pad
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    big = torch.zeros(n, c, h * up_y, w * up_x, dtype=x.dtype)
    big[:, :, ::up_y, ::up_x] = x
    H, W = h * up_y + py0 + py1, w * up_x + px0 + px1
    padded = torch.zeros(n, c, H, W, dtype=x.dtype)
    for yy, xx in itertools.product(range(H), range(W)):
        sy, sx = yy - py0, xx - px0
        if 0 <= sy < big.shape[2] and 0 <= sx < big.shape[3]:
            padded[:, :, yy, xx] = big[:, :, sy, sx]
    out_h, out_w = (H - kh) // down_y + 1, (W - kw) // down_x + 1
    out = torch.zeros(n, c, out_h, out_w, dtype=x.dtype)
    for oy, ox in itertools.product(range(out_h), range(out_w)):
        window = padded[:, :, oy * down_y: oy * down_y + kh, ox * down_x: ox * down_x + kw]
        out[:, :, oy, ox] = (window * kernel.flip(0, 1)).sum(dim=(2, 3))
    return out


CASES = [((1, 1), (1, 1), (1, 1, 1, 1)), ((2, 2), (1, 1), (2, 1, 2, 1)), ((1, 1), (2, 2), (1, 1, 1, 1)),
         ((2, 1), (1, 2), (0, -1, 2, 0)), ((1, 1), (1, 1), (-1, 2, 0, -1))]


@pytest.mark.parametrize("up,down,pad", CASES)
def test_native_upfirdn2d_matches_its_definition(up, down, pad) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64)
    kernel = torch.randn(4, 3, generator=gen, dtype=torch.float64)  # asymmetric: flips matter
    got = sg2t.upfirdn2d_native(x, kernel, *up, *down, *pad)
    torch.testing.assert_close(got, upfirdn2d_by_definition(x, kernel, up, down, pad))
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: sg2t.upfirdn2d_native(t, kernel, *up, *down, *pad), (x,))


def test_package_autograd_function_runs_on_the_native_op() -> None:
    """The package's custom Function (forward and its hand-written backward) against autograd."""
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(4, 4, dtype=torch.float64)
    for up, down, pad in [(2, 1, (2, 1)), (1, 2, (1, 1))]:
        out = package_upfirdn2d(x, kernel, up=up, down=down, pad=pad)
        ref = sg2t.upfirdn2d_native(x, kernel, up, up, down, down, pad[0], pad[1], pad[0], pad[1])
        torch.testing.assert_close(out, ref)
        g = torch.randn_like(out)
        torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_fused_bias_act_native() -> None:
    x, bias = torch.randn(2, 3, 4), torch.randn(3)
    out = sg2t.fused_bias_act_native(x, bias, torch.empty(0), 3, 0, 0.2, 2 ** 0.5)
    torch.testing.assert_close(out, torch.nn.functional.leaky_relu(x + bias[:, None], 0.2) * 2 ** 0.5)
    with pytest.raises(NotImplementedError):
        sg2t.fused_bias_act_native(x, bias, x, 1, 0, 0.2, 1.0)


def test_import_restores_cpp_extension_load() -> None:
    from torch.utils import cpp_extension

    assert sg2t.import_stylegan2_torch() is package
    assert cpp_extension.load is not sg2t._fake_load


# --------------------------------------------------------------------------------------------- discovery


@pytest.mark.parametrize("batch", [2, 8])
def test_discovery_finds_every_kernel_including_5d_and_to_rgb(batch: int) -> None:
    G, D = models()
    with time_limit(LIMIT):
        g_result = check_discovery(G, sg2t.latent(G)(batch), method="export")
        check_discovery(D, torch.randn(batch, 1, SIZE, SIZE), method="export")
    five_d = [n for n, p in G.named_parameters() if p.dim() == 5]  # modulated kernels, to-RGB 1x1 ones too
    assert any(n.startswith("to_rgbs.") for n in five_d) and set(five_d) <= set(g_result.names)
    assert {g_result[n].op for n in five_d} >= {"conv2d", "conv_transpose2d"}
    assert not any(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in G.modules())


# --------------------------------------------------------------------------------------------- class swap


def test_class_swap_recursion_is_detected_and_avoided() -> None:
    G, D = models()
    unsafe = sg2t.class_swap_unsafe(G)
    assert {"", "convs.0", "convs.0.affine", "mapping.1"} <= set(unsafe)
    assert sg2t.class_swap_unsafe(torch.nn.Linear(2, 2)) == []

    class Keep(torch.nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w

    victim = G.convs[0].affine
    parametrize.register_parametrization(victim, "weight", Keep())
    with time_limit(LIMIT), pytest.raises(RecursionError):  # the trap sparsegan must not fall into
        victim(torch.randn(2, LATENT))
    parametrize.remove_parametrizations(victim, "weight")

    G, D = models()
    classes = {n: type(m) for n, m in itertools.chain(G.named_modules(prefix="G"), D.named_modules(prefix="D"))}
    with time_limit(LIMIT):
        sg = sparsegan.SparseGANWrapper(G, D, adam(G), adam(D), strategy=sparsegan.strategies.Static(0.3, 0.5),
                                        latent=sg2t.latent(G))
        D(G(*sg2t.latent(G)(2))).mean().backward()
    assert classes == {n: type(m) for n, m in itertools.chain(G.named_modules(prefix="G"), D.named_modules(prefix="D"))}
    assert sg.density("G") == pytest.approx(0.3, abs=1e-3)


# --------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_trains_with_the_package_losses(strategy: str, images: torch.Tensor) -> None:
    steps = 6
    G, D = models()
    g_opt, d_opt = adam(G), adam(D)
    sample = sg2t.latent(G)
    batches = RealBatches(images, seed=1)
    with time_limit(LIMIT):
        sg, dense_g, dense_d = wrap(G, D, g_opt, d_opt, strategy, steps, latent=sample,
                                    real=RealBatches(images, seed=2))
        check_zeroed_reference(dense_g, G, sg.masks("G"), sample(3))
        check_zeroed_reference(dense_d, D, sg.masks("D"), images[:3])
        for step in range(steps):  # the package's d_loss / R1 (lazy, at step 0) / g_loss
            real = batches(BATCH).requires_grad_(step == 0)
            real_pred = D(real)
            d_loss = sg2t_loss.d_loss(real_pred, D(G(*sample(BATCH)).detach()))
            if step == 0:
                d_loss = d_loss + 10 / 2 * sg2t_loss.d_reg_loss(real_pred, real)
            d_opt.zero_grad()
            d_loss.backward()
            d_opt.step()
            g_opt.zero_grad()
            sg2t_loss.g_loss(D(G(*sample(BATCH)))).backward()
            g_opt.step()
    check_after_training(sg, G, D, strategy, steps)
    five_d = [n for n in sg.masks("G") if G.get_parameter(n).dim() == 5]
    assert five_d and all(sg.masks("G")[n].shape == G.get_parameter(n).shape for n in five_d)
    sg.remove()


@pytest.mark.skipif(not sg2t.native_ops_needed(), reason="the CUDA extensions can be built on this machine")
def test_a_failed_cuda_build_is_an_import_error_with_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in sys.modules if n == "stylegan2_torch" or n.startswith("stylegan2_torch.")]:
        monkeypatch.delitem(sys.modules, name)  # restored after the test
    with time_limit(LIMIT), pytest.raises(ImportError, match="force_native=True"):
        sg2t.import_stylegan2_torch(force_native=False)
