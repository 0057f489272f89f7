"""sparsegan on timm backbones as discriminators, through ``sparsegan.adapters.timm``.

The sweep covers the 20 models of the test-bed's timm list (testbed.md §5), the models that use
kernel weights functionally (``nfnet_l0``'s weight-standardised ``ScaledStdConv2d``, ``eva02``'s
``F.linear(x, qkv.weight, qkv_bias)``) and the models whose root ``torch.fx`` cannot trace
(``mobilevit_xxs``, ``efficientvit_b0``, ``crossvit_tiny_240``, ``mvitv2_tiny``, ``nest_tiny``),
plus ``hiera_tiny_224``, which fx traces into a wrong graph unless its optional ``mask`` argument is
bound. For each one, discovery must find exactly the kernels that the independent autograd-graph
reference (:func:`test_adapters_common.kernel_record`) records, hide none inside leaf modules, and
report the method that found them.

Cost: default architectures (``pretrained=False``), batch 1, eval mode, ``torch.no_grad``, each at the
smallest image side the model accepts (floored at 8 px: below that every CNN feature map is 1x1 and
the run costs the same), on one thread. Each model is built and analysed once per module.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsegan
from sparsegan import discovery
from tests.adapter_checks import (
    D_DENSITY,
    RealBatches,
    check_after_training,
    check_zeroed_reference,
    digits,
    one_thread,
    wrap,
)
from tests.test_adapters_common import assert_discovery_complete, hidden_in_leaves, kernel_record

timm = pytest.importorskip("timm")
timm_adapter = pytest.importorskip("sparsegan.adapters.timm")

_thread_fixture = pytest.fixture(scope="module", autouse=True)(one_thread)

# (model, smallest accepted image side, floored at 8; the discovery method expected to be used)
TESTBED_20 = [
    ("resnet18", 8, "fx"),
    ("resnet50", 8, "fx"),
    ("convnext_atto", 32, "fx"),
    ("vit_tiny_patch16_224", 16, "fx"),
    ("efficientnet_b0", 8, "fx"),
    ("mobilenetv3_small_100", 8, "fx"),
    ("regnetx_002", 8, "fx"),
    ("densenet121", 29, "fx"),
    ("deit_tiny_patch16_224", 16, "fx"),
    ("swin_tiny_patch4_window7_224", 8, "fx"),
    ("levit_128s", 16, "fx"),
    ("mixer_b16_224", 16, "fx"),
    ("poolformer_s12", 8, "fx"),
    ("edgenext_xx_small", 32, "fx"),
    ("ghostnet_100", 8, "fx"),
    ("inception_v3", 75, "fx"),
    ("nfnet_l0", 8, "fx"),  # also a functional-weight case: 57 ScaledStdConv2d
    ("cait_xxs24_224", 16, "fx"),
    ("coat_lite_tiny", 32, "fx"),
    ("xcit_nano_12_p16_224", 16, "fx"),
]
FUNCTIONAL = [("eva02_tiny_patch14_224", 14, "fx")]
ROOT_UNTRACEABLE = [
    ("mobilevit_xxs", 8, "export"),
    ("efficientvit_b0", 8, "export"),
    ("crossvit_tiny_240", 18, "export"),
    ("mvitv2_tiny", 32, "export"),
    ("nest_tiny", 16, "export"),
]
TRACES_WRONG_UNLESS_BOUND = [("hiera_tiny_224", 32, "fx")]
SWEEP = TESTBED_20 + FUNCTIONAL + ROOT_UNTRACEABLE + TRACES_WRONG_UNLESS_BOUND
SIZES = {name: size for name, size, _ in SWEEP}


@dataclass
class Analysed:
    """One sweep model, its example input, what discovery found and what the reference records."""

    model: nn.Module
    example: torch.Tensor
    result: sparsegan.DiscoveryResult
    record: dict[str, set[str]]


@pytest.fixture(scope="module")
def analysed() -> Iterator[Callable[[str], Analysed]]:
    """``name -> Analysed``, built and analysed once per test module."""
    cache: dict[str, Analysed] = {}

    def get(name: str) -> Analysed:
        if name not in cache:
            size = SIZES[name]
            torch.manual_seed(0)
            model = timm_adapter.discriminator(name, img_size=size).eval()
            example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                result = sparsegan.discover(model, example)
            cache[name] = Analysed(model, example, result, kernel_record(model, example))
        return cache[name]

    yield get
    cache.clear()


# --------------------------------------------------------------------------------------------- sweep


@pytest.mark.parametrize(("name", "img_size", "method"), SWEEP, ids=[n for n, _, _ in SWEEP])
def test_discovery_finds_every_kernel(name: str, img_size: int, method: str, analysed, record_property) -> None:
    a = analysed(name)
    result, record = a.result, a.record
    record_property("discovery_method", result.method)
    assert record, "the reference recorded no kernel"
    assert_discovery_complete(result, record)
    assert not hidden_in_leaves(result)
    # the method is reported, on the result, on every weight and in the report
    assert result.method == method, result.notes
    assert all(w.method == method for w in result.weights), {w.name: w.method for w in result.weights if w.method != method}
    assert f"found by {method}" in result.report().splitlines()[0]
    if method == "fx":
        assert "fx: traced graph verified against eager on the example input" in result.notes
    else:
        fx_note = next(n for n in result.notes if n.startswith("fx: "))
        assert "Error" in fx_note, f"fx did not fail with a reported error: {fx_note}"
    # each weight's op is one the reference saw it used by (conv2d / linear / matmul ...)
    wrong_op = {w.name: (w.op, record[w.name]) for w in result.weights if w.op not in record[w.name]}
    assert not wrong_op, wrong_op
    # every conv/linear module's weight is among them (a module-level sanity check of the sweep)
    module_weights = {f"{n}.weight" for n, m in a.model.named_modules()
                      if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.dim() >= 2}
    assert module_weights <= set(result.names) | _unused(a.model, a.example)


def _unused(model: nn.Module, example: torch.Tensor) -> set[str]:
    """Parameters that get no gradient from one forward (e.g. a branch the input does not take)."""
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        model(example).sum().backward()
    unused = {n for n, p in model.named_parameters() if p.grad is None}
    model.zero_grad(set_to_none=True)
    return unused


# --------------------------------------------------------------------------------------------- the hard cases


def test_nfnet_weight_standardised_convs_are_found_through_batch_norm(analysed) -> None:
    a = analysed("nfnet_l0")
    std_convs = [n for n, m in a.model.named_modules() if isinstance(m, timm.layers.ScaledStdConv2d)]
    assert len(std_convs) == 57
    for n in std_convs:
        record = a.result[f"{n}.weight"]
        assert record.op == "conv2d" and "batch_norm" in record.via, (n, record)
    skipped = {s.name: s.reason for s in a.result.skipped}
    assert all(skipped[f"{n}.gain"] == "normalization affine parameter" for n in std_convs)


def test_eva02_fused_qkv_is_found_through_its_functional_linear(analysed) -> None:
    a = analysed("eva02_tiny_patch14_224")
    attns = [m for m in a.model.modules() if type(m).__name__ == "EvaAttention"]
    assert attns and all(m.q_bias is not None and not m.qkv_bias_separate for m in attns)  # the F.linear branch
    qkv = [n for n in a.result.names if n.endswith("attn.qkv.weight")]
    assert len(qkv) == len(attns) and all(a.result[n].op == "linear" for n in qkv)
    skipped = {s.name for s in a.result.skipped}
    assert {n.replace("qkv.weight", b) for n in qkv for b in ("q_bias", "v_bias")} <= skipped


def test_hiera_optional_mask_is_bound_and_an_unbound_trace_is_not_trusted(analysed, monkeypatch) -> None:
    a = analysed("hiera_tiny_224")
    bare = a.model.model  # the timm model itself: its forward(x, mask=None) is the traced root
    assert inspect.signature(bare.forward).parameters["mask"].default is None
    with torch.no_grad():
        bound = sparsegan.discover(bare, a.example)
    assert bound.method == "fx" and "fx: traced graph verified against eager on the example input" in bound.notes
    expected = {n.removeprefix("model.") for n in a.record}
    assert set(bound.names) == expected
    # without binding the default, fx cannot be used; discovery says why and still finds every kernel
    monkeypatch.setattr(discovery, "_default_concrete_args", lambda *args, **kwargs: None)
    with torch.no_grad():
        unbound = sparsegan.discover(bare, a.example)
    assert unbound.method != "fx" and any(n.startswith("fx: ") and "Error" in n for n in unbound.notes)
    assert set(unbound.names) == expected and not hidden_in_leaves(unbound)


@pytest.mark.parametrize(("name", "methods"), [
    ("nfnet_l0", ("export",)),
    ("nfnet_l0", ("runtime",)),
    ("eva02_tiny_patch14_224", ("runtime",)),
    ("mobilevit_xxs", ("runtime",)),
], ids=["nfnet_l0-export", "nfnet_l0-runtime", "eva02-runtime", "mobilevit_xxs-runtime"])
def test_each_method_alone_agrees_even_under_no_grad(name: str, methods: tuple[str, ...], analysed) -> None:
    a = analysed(name)
    with torch.no_grad():
        result = sparsegan.discover(a.model, a.example, methods=methods)
    assert result.method == methods[0]
    assert all(w.method == methods[0] for w in result.weights)  # found by the graph, not by module type
    assert_discovery_complete(result, a.record)
    assert all(w.macs_per_sample for w in result.weights)


# --------------------------------------------------------------------------------------------- the adapter


def test_discriminator_gives_one_logit_in_training_mode() -> None:
    torch.manual_seed(0)
    d = timm_adapter.discriminator("resnet18", img_size=16, in_chans=1)
    assert d.training and d.img_size == 16 and d.in_chans == 1
    assert all(n.startswith("model.") for n, _ in d.named_parameters())
    assert d(torch.randn(3, 1, 16, 16)).shape == (3, 1)
    assert timm_adapter.default_input_size("resnet18") == (3, 224, 224)
    assert timm_adapter.default_input_size("no_such_model_xyz") is None


def test_distilled_model_averages_its_two_heads_in_training() -> None:
    torch.manual_seed(0)
    d = timm_adapter.discriminator("deit_tiny_distilled_patch16_224", img_size=16)
    x = torch.randn(2, 3, 16, 16)
    train_out = d(x)  # training mode, dropout-free: the same average as in eval
    assert train_out.shape == (2, 1)
    assert torch.allclose(train_out, d.eval()(x))
    # by hand: the class token through `head`, the distillation token through `head_dist`, averaged
    with torch.no_grad():
        tokens = d.model.forward_features(x)
        cls, dist = d.model.head(tokens[:, 0]), d.model.head_dist(tokens[:, 1])
    assert not torch.allclose(cls, dist)  # two different heads: the average is not either one
    torch.testing.assert_close(train_out.detach(), (cls + dist) / 2)


@pytest.mark.parametrize(("name", "img_size", "match"), [
    ("convnext_atto", 16, r"does not run on 16x16 images \(its default input is 224x224\)"),
    ("crossvit_tiny_240", 32, r"does not run on 32x32 images \(its default input is 240x240\)"),
    ("mvitv2_tiny", 16, r"cannot build 'mvitv2_tiny' for 16x16 images \(its default input is 224x224\)"),
    ("no_such_model_xyz", 32, "timm has no model named"),
    ("resnet18", 0, "img_size must be a positive int"),
])
def test_discriminator_refuses_what_cannot_work_with_the_fix(name: str, img_size: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        timm_adapter.discriminator(name, img_size=img_size)


def test_unknown_model_kwargs_are_not_swallowed() -> None:
    with pytest.raises(TypeError, match="bogus"):
        timm_adapter.discriminator("resnet18", img_size=16, bogus=1)


# --------------------------------------------------------------------------------------------- training

NZ, IMG, BATCH, STEPS = 16, 16, 8, 6


class TinyGenerator(nn.Module):
    """z (B, NZ) -> images (B, 1, 16, 16) in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(NZ, 32 * 4 * 4)
        self.conv1 = nn.Conv2d(32, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 1, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(z)).view(-1, 32, 4, 4)
        h = F.relu(self.bn(self.conv1(F.interpolate(h, scale_factor=2))))
        return torch.tanh(self.conv2(F.interpolate(h, scale_factor=2)))


def _hinge_steps(G: nn.Module, D: nn.Module, g_opt, d_opt, real: Callable[[int], torch.Tensor],
                 steps: int) -> list[float]:
    rng = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(steps):
        z = torch.randn(BATCH, NZ, generator=rng)
        d_loss = F.relu(1 - D(real(BATCH))).mean() + F.relu(1 + D(G(z).detach())).mean()
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        g_loss = -D(G(torch.randn(BATCH, NZ, generator=rng))).mean()
        g_opt.zero_grad()
        g_loss.backward()
        g_opt.step()
        losses += [d_loss.item(), g_loss.item()]
    return losses


@pytest.mark.parametrize(("d_name", "strategy"), [
    ("mobilevit_xxs", "static"),  # root untraceable: D's kernels come from torch.export
    ("mobilevit_xxs", "ddst"),
    ("eva02_tiny_patch14_224", "ddst"),  # functional qkv linear
])
def test_timm_discriminator_trains_sparse(d_name: str, strategy: str) -> None:
    torch.manual_seed(0)
    G = TinyGenerator()
    D = timm_adapter.discriminator(d_name, img_size=IMG, in_chans=1)
    g_opt = torch.optim.Adam(G.parameters(), 2e-4, betas=(0.0, 0.9))
    d_opt = torch.optim.Adam(D.parameters(), 2e-4, betas=(0.0, 0.9))
    images = digits(IMG)
    latent_rng = torch.Generator().manual_seed(4)
    sg, _, dense_d = wrap(G, D, g_opt, d_opt, strategy, STEPS,
                          latent=lambda n: torch.randn(n, NZ, generator=latent_rng), real=RealBatches(images, seed=2))
    found = sg.discovery("D")
    assert found.method == ("export" if d_name == "mobilevit_xxs" else "fx")
    assert set(sg.masks("D")) == set(found.names)
    assert abs(sg.density("D") - D_DENSITY) < 1e-3
    check_zeroed_reference(dense_d, D, sg.masks("D"), images[:4])
    losses = _hinge_steps(G, D, g_opt, d_opt, RealBatches(images, seed=5), STEPS)
    assert len(losses) == 2 * STEPS and all(math.isfinite(v) for v in losses), losses
    check_after_training(sg, G, D, strategy, STEPS)
    sg.remove()
