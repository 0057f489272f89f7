"""Tests of the FLOPs ledger: hand-computed totals and agreement with FlopCounterMode."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import sparsegan
from sparsegan.discovery import WeightRecord
from sparsegan.flops import FlopsLedger, LayerFlops, dense_forward_flops, layer_flops

TOY = {"generator": [LayerFlops("a", 100), LayerFlops("b", 300)]}


def _counter_flops_per_sample(module: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(x)
    return counter.get_total_flops() // x.shape[0]


# ---------------------------------------------------------------- hand-computed ledger


def test_toy_ledger_hand_computed() -> None:
    ledger = FlopsLedger(TOY)
    ledger.set_densities("generator", {"a": 0.5, "b": 0.1})
    # sparse forward = 0.5*100 + 0.1*300 = 80; dense = 400.
    assert ledger.inference_flops("generator") == pytest.approx({"sparse": 80.0, "dense": 400.0, "ratio": 0.2})
    ledger.record_step("generator")
    s = ledger.summary()["generator"]
    assert s["sparse"] == pytest.approx(240.0) and s["dense"] == 1200.0 and s["steps"] == 1
    ledger.record_step("generator", dense_gradient=True)  # 2*80 + 400 = 560
    s = ledger.summary()["generator"]
    assert s["sparse"] == pytest.approx(800.0) and s["dense"] == 2400.0 and s["steps"] == 2
    assert s["ratio"] == pytest.approx(800 / 2400)


def test_samples_and_density_changes_and_total() -> None:
    ledger = FlopsLedger({**TOY, "discriminator": [LayerFlops("c", 1000)]})
    # Before set_densities the network is dense: 3 * 400 per sample.
    ledger.record_step("generator", samples=2)
    assert ledger.summary()["generator"]["sparse"] == pytest.approx(2400.0)
    ledger.set_densities("generator", {"a": 1.0, "b": 0.0})  # sparse forward 100
    ledger.record_step("generator", samples=4)  # 4 * 300 = 1200
    ledger.set_densities("discriminator", {"c": 0.25})  # 250
    ledger.record_step("discriminator", samples=2)  # 2 * 750 = 1500 (dense 6000)
    summary = ledger.summary()
    assert summary["generator"]["sparse"] == pytest.approx(3600.0)
    assert summary["generator"]["dense"] == 2 * 1200 + 4 * 1200
    assert summary["discriminator"] == pytest.approx({"sparse": 1500.0, "dense": 6000.0, "ratio": 0.25, "steps": 1})
    assert summary["total"] == pytest.approx({"sparse": 5100.0, "dense": 13200.0, "ratio": 5100 / 13200, "steps": 3})


def test_report_and_repr() -> None:
    ledger = FlopsLedger(TOY)
    assert "ratio -" in repr(ledger)
    ledger.set_densities("generator", {"a": 0.5, "b": 0.1})
    ledger.record_step("generator")
    text = ledger.report()
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["network", "steps", "training"]
    assert lines[1].split() == ["generator", "1", "240", "1200", "0.2000"]
    assert lines[2].split()[0] == "total"
    assert "generator: 2 layers, 1 steps, ratio 0.2000" in repr(ledger)


def test_state_dict_round_trip() -> None:
    ledger = FlopsLedger(TOY)
    ledger.set_densities("generator", {"a": 0.5, "b": 0.1})
    ledger.record_step("generator")
    ledger.record_step("generator", dense_gradient=True)
    state = ledger.state_dict()
    other = FlopsLedger(TOY)
    other.load_state_dict(state)
    assert other.summary() == ledger.summary()
    assert other.densities("generator") == {"a": 0.5, "b": 0.1}
    other.record_step("generator")  # the loaded densities are in force
    assert other.summary()["generator"]["sparse"] == pytest.approx(1040.0)
    with pytest.raises(ValueError, match="networks"):
        FlopsLedger({"discriminator": TOY["generator"]}).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        FlopsLedger({"generator": [LayerFlops("a", 1)]}).load_state_dict(state)
    with pytest.raises(ValueError, match="format"):
        other.load_state_dict({"networks": {}})


def test_errors() -> None:
    ledger = FlopsLedger(TOY)
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        ledger.set_densities("generator", {"a": 0.5})
    with pytest.raises(ValueError, match=r"unknown \['z'\]"):
        ledger.set_densities("generator", {"a": 0.5, "b": 0.5, "z": 1.0})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ledger.set_densities("generator", {"a": 1.5, "b": 0.5})
    with pytest.raises(ValueError, match="unknown network 'critic'"):
        ledger.record_step("critic")
    with pytest.raises(ValueError, match="samples"):
        ledger.record_step("generator", samples=0)
    with pytest.raises(ValueError, match="more than once"):
        FlopsLedger({"generator": [LayerFlops("a", 1), LayerFlops("a", 2)]})
    with pytest.raises(ValueError, match="reserved"):
        FlopsLedger({"total": []})
    assert math.isnan(FlopsLedger(TOY).summary()["total"]["ratio"])
    record = WeightRecord("fc.weight", (4, 3), "linear", "fx")
    with pytest.raises(ValueError, match=r"fc\.weight.*example input.*latent="):
        layer_flops([record])


# ---------------------------------------------------------------- against FlopCounterMode


def test_mlp_layer_flops_match_flop_counter() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32, bias=False), nn.ReLU(), nn.Linear(32, 16, bias=False), nn.ReLU(),
                          nn.Linear(16, 2, bias=False))
    x = torch.randn(4, 8)
    layers = layer_flops(sparsegan.discover(model, x).weights)
    # Hand count: 2 * (8*32 + 32*16 + 16*2) = 1600 per sample.
    assert [layer.forward_flops for layer in layers] == [512, 1024, 64]
    assert sum(layer.forward_flops for layer in layers) == _counter_flops_per_sample(model, x) == 1600
    assert dense_forward_flops(model, x) == 1600


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.up = nn.ConvTranspose2d(4, 2, 4, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(2 * 8 * 8, 5, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.up(h).flatten(1))


def test_conv_layer_flops_match_flop_counter_and_sparse_scaling() -> None:
    torch.manual_seed(0)
    model = _ConvNet()
    x = torch.randn(2, 3, 4, 4)
    layers = {layer.name: layer.forward_flops for layer in layer_flops(sparsegan.discover(model, x).weights)}
    # conv: 4x4 outputs * 4 channels * 3*3*3 MACs = 1728; up: 4*4*4 inputs * 2 * 16 = 2048;
    # fc: 5 * 128 = 640 MACs.
    assert layers == {"conv.weight": 2 * 1728, "up.weight": 2 * 2048, "fc.weight": 2 * 640}
    assert sum(layers.values()) == _counter_flops_per_sample(model, x)
    running_mean = model.bn.running_mean.clone()
    assert dense_forward_flops(model, x) == sum(layers.values())
    assert torch.equal(model.bn.running_mean, running_mean) and model.training  # no state change

    ledger = FlopsLedger({"generator": [LayerFlops(n, f) for n, f in layers.items()]})
    densities = {"conv.weight": 0.3, "up.weight": 0.2, "fc.weight": 0.7}
    ledger.set_densities("generator", densities)
    expected = sum(densities[n] * f for n, f in layers.items())
    assert ledger.inference_flops("generator")["sparse"] == pytest.approx(expected, rel=1e-12)
    ledger.record_step("generator")
    assert ledger.summary()["generator"]["sparse"] == pytest.approx(3 * expected, rel=1e-12)
