"""Discovery: which parameters are conv/linear kernel weights, found by fx, export or a runtime record."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm
from torch.nn.utils.parametrizations import spectral_norm as parametrized_spectral_norm

from sparsegan import DiscoveryError, discover
from tests.conftest import ConvDiscriminator, ConvGenerator

X = torch.randn(2, 1, 8, 8)
Z = torch.randn(2, 16)


class ScaledConv(nn.Module):
    """Equalized-LR style: ``F.conv2d(x, self.weight * scale * gain)`` plus a learned constant input."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 1, 3, 3))
        self.gain = nn.Parameter(torch.ones(4, 1, 1, 1))
        self.const = nn.Parameter(torch.randn(1, 1, 8, 8))
        self.head = nn.Linear(4 * 8 * 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x + self.const, self.weight * 0.5 * self.gain, padding=1)
        return self.head(h.flatten(1))


class DataDependent(nn.Module):
    """Python control flow on tensor values: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.proj = nn.Parameter(torch.randn(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x) if x.sum() > 0 else self.b(x)
        return h @ self.proj


class Modulated(nn.Module):
    """StyleGAN2-style modulated conv: the kernel is scaled per sample and reshaped for a grouped conv."""

    def __init__(self, cin: int = 3, cout: int = 4, style: int = 5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))
        self.to_style = nn.Linear(style, cin)
        self.cout = cout

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape  # shape unpacking is fine for export/runtime
        style = self.to_style(s)[:, None, :, None, None]
        weights = self.weight[None] * (style + 1)
        weights = weights * torch.rsqrt((weights ** 2).sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
        out = F.conv2d(x.reshape(1, -1, h, w), weights.reshape(b * self.cout, c, 3, 3), padding=1, groups=b)
        return out.reshape(b, self.cout, h, w)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.mid = nn.Linear(6, 6)
        self.unembed = nn.Linear(6, 10, bias=False)
        self.unembed.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.unembed(torch.relu(self.mid(self.embed(tokens))))


class OptionalArg(nn.Module):
    """Like timm's hiera: an optional argument whose None default must be bound when tracing."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.extra = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            x = self.extra(x) * mask
        return self.fc(x)


class PythonRandom(nn.Module):
    """fx bakes a Python random number into the graph: the trace disagrees with eager."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * (1.0 + random.random())


class HookedBlock(nn.Module):
    """A custom module with a forward pre-hook: fx must keep it opaque, so its weight is hidden from fx."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(4, 4))
        self.register_forward_pre_hook(lambda m, args: None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.kernel)


class WithHooked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = HookedBlock()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(x))


def _ops(result) -> dict[str, str]:
    return {w.name: w.op for w in result.weights}


def test_generator_weights_ops_and_skip_reasons() -> None:
    result = discover(ConvGenerator(), Z)
    assert result.method == "fx"
    assert _ops(result) == {"fc.weight": "linear", "conv1.weight": "conv2d", "up.weight": "conv_transpose2d",
                            "out.weight": "conv2d"}
    reasons = {s.name: s.reason for s in result.skipped}
    assert reasons["fc.bias"] == "bias of linear"
    assert reasons["up.bias"] == "bias of conv_transpose2d"
    assert reasons["bn0.weight"] == reasons["bn0.bias"] == "normalization affine parameter"
    assert any("verified against eager" in n for n in result.notes)


def test_without_example_input_fx_is_used_unverified() -> None:
    result = discover(ConvGenerator())
    assert result.method == "fx" and len(result) == 4
    assert all(w.macs_per_sample is None for w in result.weights)
    assert any("not verified" in n for n in result.notes)


@pytest.mark.parametrize("method", ["fx", "export", "runtime"])
def test_legacy_spectral_norm_masks_weight_orig(method: str) -> None:
    result = discover(ConvDiscriminator(sn=spectral_norm), X, methods=[method])
    assert result.method == method
    assert _ops(result) == {"conv1.weight_orig": "conv2d", "conv2.weight_orig": "conv2d", "fc.weight_orig": "linear"}
    # the SN power-iteration buffers and the derived `weight` are not parameters, so never listed
    listed = {w.name for w in result.weights} | {s.name for s in result.skipped}
    assert listed == {n for n, _ in ConvDiscriminator(sn=spectral_norm).named_parameters()}


@pytest.mark.parametrize("method", ["fx", "export", "runtime"])
def test_parametrized_spectral_norm_masks_original(method: str) -> None:
    result = discover(ConvDiscriminator(sn=parametrized_spectral_norm), X, methods=[method])
    assert set(result.names) == {"conv1.parametrizations.weight.original", "conv2.parametrizations.weight.original",
                                 "fc.parametrizations.weight.original"}


@pytest.mark.parametrize("method", ["fx", "export", "runtime"])
def test_scaled_functional_weight_is_found_through_the_scaling(method: str) -> None:
    result = discover(ScaledConv(), X, methods=[method])
    assert _ops(result) == {"weight": "conv2d", "head.weight": "linear"}
    assert "mul" in result["weight"].via
    skipped = {s.name for s in result.skipped}
    assert {"gain", "const", "head.bias"} <= skipped


@pytest.mark.parametrize("method", ["export", "runtime"])
def test_modulated_grouped_conv_masks_the_unmodulated_kernel(method: str) -> None:
    result = discover(Modulated(), (torch.randn(2, 3, 6, 6), torch.randn(2, 5)), methods=[method])
    assert _ops(result) == {"weight": "conv2d", "to_style.weight": "linear"}
    # MACs per sample: output 4x6x6 positions x (3 in-channels x 3 x 3) = 3888 (the grouped conv's
    # batch-folded output is divided by the real batch of 2)
    assert result["weight"].macs_per_sample == 4 * 6 * 6 * 3 * 3 * 3


def test_data_dependent_control_flow_falls_back_to_export_or_runtime() -> None:
    result = discover(DataDependent(), torch.randn(2, 4))
    assert result.method in ("export", "runtime")
    assert set(result.names) == {"a.weight", "b.weight", "proj"}
    assert any(n.startswith("fx:") for n in result.notes)
    assert result["proj"].op == "matmul"


def test_untraceable_model_without_example_input_is_a_clear_error() -> None:
    with pytest.raises(DiscoveryError, match="example input"):
        discover(DataDependent())


def test_tied_weights_get_one_record_with_aliases() -> None:
    result = discover(Tied(), torch.tensor([[1, 2, 3]]))
    assert result["embed.weight"].aliases == ("unembed.weight",)
    assert result["unembed.weight"] is result["embed.weight"]
    assert set(result.names) == {"embed.weight", "mid.weight"}


def test_optional_none_argument_is_bound_when_tracing() -> None:
    result = discover(OptionalArg(), torch.randn(2, 4))
    assert result.method == "fx"
    assert result["fc.weight"].method == "fx"
    # not reached with mask=None, but a Linear's weight: masked by module type (the rule below)
    assert result["extra.weight"].method == "fx+module type"
    assert result["extra.weight"].macs_per_sample == 0  # costs nothing in this forward


class FromRGB(nn.Module):
    """A progressive-GAN style D: one from-RGB conv per resolution, only one used per call."""

    def __init__(self) -> None:
        super().__init__()
        self.from_rgb = nn.ModuleDict({"8": nn.Conv2d(1, 4, 1), "16": nn.Conv2d(1, 4, 1)})
        self.fc = nn.Linear(4 * 8 * 8, 1)
        self.resolution = "8"  # the current stage of a progressive schedule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.from_rgb[self.resolution](x).flatten(1))


class Heads(nn.Module):
    """A D with a classifier head used only in another mode (ACGAN-like)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.adv = nn.Linear(8, 1)
        self.aux = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, classify: bool = False) -> torch.Tensor:
        h = torch.relu(self.body(x))
        return self.aux(h) if classify else self.adv(h)


@pytest.mark.parametrize("model, example, expected", [
    (FromRGB, (2, 1, 8, 8), {"from_rgb.8.weight", "from_rgb.16.weight", "fc.weight"}),
    (Heads, (2, 4), {"body.weight", "adv.weight", "aux.weight"}),
    (OptionalArg, (2, 4), {"fc.weight", "extra.weight"}),
])
@pytest.mark.parametrize("method", ["fx", "export", "runtime"])
def test_unreached_conv_linear_weights_are_masked_whichever_method_wins(model, example, expected, method,
                                                                        caplog) -> None:
    with caplog.at_level("WARNING", logger="sparsegan.discovery"):
        result = discover(model(), torch.randn(*example), methods=(method,))
    assert result.method == method
    assert set(result.names) == expected
    unreached = {w.name for w in result.weights if w.method == f"{method}+module type"}
    assert len(unreached) == 1
    assert f"masked by module type (they may run in another mode or at another resolution): {unreached.pop()}" \
        in caplog.text


def test_trace_that_disagrees_with_eager_is_not_trusted() -> None:
    result = discover(PythonRandom(), torch.randn(2, 4))
    assert result.method == "export"
    assert any("differs from the eager" in n for n in result.notes)
    assert result.names == ["fc.weight"]


def test_weights_hidden_in_opaque_modules() -> None:
    # with an example input the cascade moves on to a method that sees inside the module
    found = discover(WithHooked(), torch.randn(2, 4))
    assert set(found.names) == {"block.kernel", "fc.weight"} and found.method == "export"
    # without one, fx is all there is: the hidden weight is reported, not silently dropped
    partial = discover(WithHooked())
    assert partial.names == ["fc.weight"]
    assert "tracing does not look into" in {s.name: s.reason for s in partial.skipped}["block.kernel"]


def test_macs_per_sample_for_linear_and_conv() -> None:
    result = discover(ConvDiscriminator(sn=None), X)
    # conv1: 16 out-channels x 8 x 8 positions x (1 in-channel x 3 x 3)
    assert result["conv1.weight"].macs_per_sample == 16 * 8 * 8 * 1 * 3 * 3
    # conv2 (stride 2): 16 x 4 x 4 positions x (16 x 4 x 4)
    assert result["conv2.weight"].macs_per_sample == 16 * 4 * 4 * 16 * 4 * 4
    assert result["fc.weight"].macs_per_sample == 256


def test_include_and_exclude() -> None:
    model = ConvGenerator()
    assert discover(model, include="conv*").names == ["conv1.weight"]
    assert set(discover(model, exclude=["fc.*", "out.*"]).names) == {"conv1.weight", "up.weight"}
    only_convs = discover(model, include=lambda name, p: p.dim() == 4)
    assert set(only_convs.names) == {"conv1.weight", "up.weight", "out.weight"}
    reasons = {s.name: s.reason for s in only_convs.skipped}
    assert reasons["fc.weight"] == "not matched by include="


def test_discovery_leaves_no_trace() -> None:
    model = ConvDiscriminator(sn=spectral_norm)
    gen = ConvGenerator()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen_before = {k: v.clone() for k, v in gen.state_dict().items()}
    rng = torch.get_rng_state()
    for method in ("fx", "export", "runtime"):
        discover(model, X, methods=[method])
        discover(gen, Z, methods=[method])
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in gen.state_dict().items():
        assert torch.equal(v, gen_before[k]), k
    assert model.training and gen.training
    assert isinstance(model.conv1.weight, torch.Tensor) and not isinstance(model.conv1.weight, torch._subclasses.FakeTensor)


def test_report_lists_everything() -> None:
    text = discover(ConvDiscriminator(sn=spectral_norm), X).report()
    assert "conv1.weight_orig" in text and "spectral_norm" in text and "bias of conv2d" in text


def test_unknown_method_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown discovery method"):
        discover(ConvGenerator(), methods=["magic"])


class StandardizedConv(nn.Conv2d):
    """Weight standardisation as in timm's ``ScaledStdConv2d``: the kernel goes through
    ``F.batch_norm`` and ``reshape_as`` before ``F.conv2d``; ``gain`` is the norm's affine weight."""

    def __init__(self) -> None:
        super().__init__(1, 4, 3, padding=1)
        self.gain = nn.Parameter(torch.ones(4, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(self.weight.reshape(1, 4, -1), None, None, weight=self.gain.view(-1), training=True,
                         momentum=0.0).reshape_as(self.weight)
        return F.conv2d(x, w.type_as(x), self.bias, padding=1)


@pytest.mark.parametrize("method", ["fx", "export", "runtime"])
def test_standardized_weight_is_found_through_batch_norm_and_reshape_as(method: str) -> None:
    result = discover(StandardizedConv(), X, methods=[method])
    assert _ops(result) == {"weight": "conv2d"}
    assert "batch_norm" in result["weight"].via
    assert {s.name: s.reason for s in result.skipped}["gain"] == "normalization affine parameter"


@pytest.mark.parametrize("method", ["fx", "export", "runtime"])
def test_discovery_under_no_grad_finds_the_same_weights(method: str) -> None:
    expected = discover(ScaledConv(), X, methods=[method])
    with torch.no_grad():
        result = discover(ScaledConv(), X, methods=[method])
    assert result.names == expected.names and result.method == method
    assert [w.macs_per_sample for w in result.weights] == [w.macs_per_sample for w in expected.weights]
    # and both are right, not just alike: the kernel (4 x 1 x 3 x 3, padding 1) makes 4 x 8 x 8 outputs
    # of 1 x 3 x 3 MACs each; the head 256 -> 1
    assert {w.name: (w.op, w.macs_per_sample) for w in result.weights} == {
        "weight": ("conv2d", 4 * 8 * 8 * 1 * 3 * 3), "head.weight": ("linear", 256)}


class RecurrentD(nn.Module):
    """A sequence discriminator: LSTM(8, 64) then a linear score of the last step."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 64, batch_first=True)
        self.fc = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x)
        return self.fc(h[:, -1])


@pytest.mark.parametrize("method", ["fx", "export", "runtime"])
def test_lstm_weights_are_matmul_operands_with_their_macs(method) -> None:
    result = discover(RecurrentD(), torch.randn(2, 5, 8), methods=(method,))
    assert result.names == ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "fc.weight"]
    assert result["rnn.weight_ih_l0"].op == "lstm"
    # per sample: each weight entry multiplies once per time step (5 steps)
    assert result["rnn.weight_ih_l0"].macs_per_sample == 4 * 64 * 8 * 5
    assert result["rnn.weight_hh_l0"].macs_per_sample == 4 * 64 * 64 * 5
    assert result["fc.weight"].macs_per_sample == 64
    assert {s.name: s.reason for s in result.skipped}["rnn.bias_hh_l0"] == "bias of lstm"


def test_every_layer_and_direction_of_a_gru_is_found() -> None:
    gru = nn.GRU(4, 6, num_layers=2, bidirectional=True, batch_first=True)
    result = discover(gru, torch.randn(2, 3, 4), methods=("runtime",))  # batch 2, 3 steps
    assert sorted(result.names) == sorted(f"weight_{k}_l{layer}{d}" for k in ("ih", "hh") for layer in (0, 1)
                                          for d in ("", "_reverse"))
    # layer 1 reads both directions of layer 0: weight_ih_l1 is 3*6 x 12; 3 steps
    assert result["weight_ih_l1"].macs_per_sample == 3 * 6 * 12 * 3


class KernelBank(nn.Module):
    """N kernels mixed per sample by softmax weights, then one grouped conv (plain torch or einops)."""

    def __init__(self, use_einops: bool = False, n: int = 4, cin: int = 3, cout: int = 5, k: int = 3) -> None:
        super().__init__()
        self.bank = nn.Parameter(torch.randn(n, cout, cin, k, k) * 0.1)
        self.to_mix = nn.Linear(6, n)
        self.use_einops, self.shape = use_einops, (n, cout, cin, k)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        n, cout, cin, k = self.shape
        mix = F.softmax(self.to_mix(w), -1)
        if self.use_einops:
            import einops

            bank = einops.repeat(self.bank, "n o i h w -> b n o i h w", b=b)
            kernel = einops.reduce(bank * mix[:, :, None, None, None, None], "b n o i h w -> b o i h w", "sum")
            kernel = einops.rearrange(kernel, "b o i h w -> (b o) i h w")
        else:
            bank = self.bank.unsqueeze(0).expand(b, -1, -1, -1, -1, -1)
            kernel = (bank * mix[:, :, None, None, None, None]).sum(1).reshape(b * cout, cin, k, k)
        out = F.conv2d(x.reshape(1, b * cin, *x.shape[2:]), kernel, padding=1, groups=b)
        return out.reshape(b, cout, *x.shape[2:])


@pytest.mark.parametrize("use_einops", [False, True])
@pytest.mark.parametrize("method", ["export", "runtime"])
def test_a_bank_whose_axis_the_shapes_cannot_tell_is_skipped_with_the_reduction_that_stopped_it(
        use_einops, method) -> None:
    # a bank (3, 3, 3, 3, 3): every axis has the bank's size, so which one the sum runs over is not
    # guessed (tests/test_kernel_banks.py has the banks that are followed)
    model = KernelBank(use_einops, n=3, cin=3, cout=3)
    result = discover(model, (torch.randn(2, 3, 8, 8), torch.randn(2, 6)), methods=(method,))
    reason = {s.name: s.reason for s in result.skipped}["bank"]
    # the reduction that stopped it, not a harmless .shape read ("used by get"); einops sums a
    # permuted copy, so the axis torch sees there is the last one
    assert reason == f"sum over dim {5 if use_einops else 1} (a reduction discovery does not follow)"


def test_a_kernel_bank_is_followed_through_the_sum_over_its_axis() -> None:
    result = discover(KernelBank(), (torch.randn(2, 3, 8, 8), torch.randn(2, 6)), methods=("runtime",))
    assert result["bank"].shared_dims == (0,)
    assert result["bank"].op == "conv2d"
    assert "sum over bank dim 0" in result["bank"].via


def test_include_naming_a_weight_discovery_could_not_follow_is_refused() -> None:
    with pytest.raises(DiscoveryError, match=r"include= names 1 parameter\(s\) that discovery did not find as "
                                             r"kernel weights: 'bank' \(sum over dim 1"):
        discover(KernelBank(n=3, cin=3, cout=3), (torch.randn(2, 3, 8, 8), torch.randn(2, 6)), methods=("runtime",),
                 include=["bank", "to_mix.weight"])
    found = discover(KernelBank(n=3, cin=3, cout=3), (torch.randn(2, 3, 8, 8), torch.randn(2, 6)), methods=("runtime",),
                     include="to_mix.*")
    assert found.names == ["to_mix.weight"]
