"""What ``latent=`` and ``real=`` return reaches each network on its device and in its dtype.

Without a GPU, the dtype shows the move: the models here are float64 and every callable returns
float32 CPU tensors, so a consumer that received them unmoved would see float32 (and fail with a
dtype mismatch). The CUDA tests run the same loop with CUDA models and CPU latents; they are
skipped only where CUDA is absent.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsegan import SparseGANWrapper
from sparsegan._utils import to_module
from sparsegan.strategies import DDST, Static
from tests.conftest import LATENT, ConvDiscriminator, ConvGenerator

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none present)")


def _recorders(G: nn.Module, D: nn.Module) -> dict[str, list[tuple[torch.device, torch.dtype]]]:
    seen: dict[str, list[tuple[torch.device, torch.dtype]]] = {"generator": [], "discriminator": []}

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            seen[name].append((args[0].device, args[0].dtype))
        return record

    G.register_forward_pre_hook(hook("generator"))
    D.register_forward_pre_hook(hook("discriminator"))
    return seen


def _train(G: nn.Module, D: nn.Module, g_opt: torch.optim.Optimizer, d_opt: torch.optim.Optimizer, steps: int,
           device: torch.device) -> None:
    dtype = next(G.parameters()).dtype
    for _ in range(steps):
        real = torch.rand(8, 1, 8, 8, device=device, dtype=dtype) * 2 - 1
        z = torch.randn(8, LATENT, device=device, dtype=dtype)
        d_loss = F.relu(1 - D(real)).mean() + F.relu(1 + D(G(z).detach())).mean()
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        g_loss = -D(G(torch.randn(8, LATENT, device=device, dtype=dtype))).mean()
        g_opt.zero_grad()
        g_loss.backward()
        g_opt.step()


def _wrap(G: nn.Module, D: nn.Module, estimator: str,
          strategy: Any = None) -> tuple[SparseGANWrapper, torch.optim.Optimizer, torch.optim.Optimizer]:
    g_opt, d_opt = torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3)
    return SparseGANWrapper(
        G, D, g_opt, d_opt,
        strategy=strategy or DDST(0.3, 0.3, br_every=1, br_window=2, d_update_every=2, update_every=1000),
        latent=lambda n: torch.randn(n, LATENT),                  # float32, CPU
        real=lambda n: torch.rand(n, 1, 8, 8) * 2 - 1,            # float32, CPU
        br_estimator=estimator, probe_batch_size=4,
    ), g_opt, d_opt


def test_to_module_moves_floating_tensors_and_keeps_labels() -> None:
    module = nn.Linear(2, 2).double()
    z, labels = torch.randn(3, 2), torch.tensor([1, 0, 1])
    moved = to_module({"z": z, "labels": labels, "tag": "x"}, module)
    assert moved["z"].dtype == torch.float64 and torch.equal(moved["z"], z.double())
    assert moved["labels"].dtype == torch.int64 and moved["labels"] is labels
    assert moved["tag"] == "x"
    ready = torch.randn(3, 2, dtype=torch.float64)
    assert to_module(ready, module) is ready  # nothing to do: no copy


@pytest.mark.parametrize("estimator", ["fresh", "step"])
def test_discovery_and_probe_receive_the_models_dtype(estimator: str) -> None:
    torch.manual_seed(0)
    G, D = ConvGenerator().double(), ConvDiscriminator().double()
    seen = _recorders(G, D)
    sg, g_opt, d_opt = _wrap(G, D, estimator)
    assert seen["generator"] and seen["discriminator"]  # discovery ran both on the moved examples
    seen["generator"].clear()
    seen["discriminator"].clear()
    _train(G, D, g_opt, d_opt, 4, torch.device("cpu"))
    assert len(sg.balance) >= 2  # the probe measured
    expected = (torch.device("cpu"), torch.float64)
    assert set(seen["generator"]) == {expected}
    assert set(seen["discriminator"]) == {expected}
    assert sg.flops()["total"]["ratio"] < 1.0  # the ledger's example pass ran too


@CUDA
@pytest.mark.parametrize("estimator", ["fresh", "step"])
def test_cuda_models_with_cpu_latents_and_real_batches(estimator: str) -> None:
    torch.manual_seed(0)
    device = torch.device("cuda")
    G, D = ConvGenerator().to(device), ConvDiscriminator().to(device)
    seen = _recorders(G, D)
    sg, g_opt, d_opt = _wrap(G, D, estimator)
    _train(G, D, g_opt, d_opt, 4, device)
    assert all(d.type == "cuda" for d, _ in seen["generator"] + seen["discriminator"])
    assert len(sg.balance) >= 2
    for net in ("generator", "discriminator"):
        for name, mask in sg.masks(net).items():
            weight = dict((G if net == "generator" else D).named_parameters())[name]
            assert weight.device.type == "cuda"
            assert int(torch.count_nonzero(weight.detach()[~mask.to(device)])) == 0


@CUDA
def test_cuda_amp_static_keeps_its_masks() -> None:
    torch.manual_seed(0)
    device = torch.device("cuda")
    G, D = ConvGenerator().to(device), ConvDiscriminator().to(device)
    sg, g_opt, d_opt = _wrap(G, D, "step", Static(0.2, 0.2))
    scaler = torch.amp.GradScaler("cuda")
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.float16):
            d_loss = F.relu(1 + D(G(torch.randn(8, LATENT, device=device)).detach())).mean()
        d_opt.zero_grad()
        scaler.scale(d_loss).backward()
        scaler.step(d_opt)
        with torch.autocast("cuda", dtype=torch.float16):
            g_loss = -D(G(torch.randn(8, LATENT, device=device))).mean()
        g_opt.zero_grad()
        scaler.scale(g_loss).backward()
        scaler.step(g_opt)
        scaler.update()
    assert sg.density("generator") == pytest.approx(0.2, abs=0.01)
    for name, mask in sg.masks("generator").items():
        assert int(torch.count_nonzero(dict(G.named_parameters())[name].detach()[~mask.to(device)])) == 0
