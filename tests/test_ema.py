"""Tests of SparseEMA: hand-computed averages, masks, buffers, spectral norm, state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm
from torch.nn.utils.parametrizations import spectral_norm as parametrized_spectral_norm

from sparsegan.ema import SparseEMA


def _linear(values: list[list[float]]) -> nn.Linear:
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(values))
    return layer


def _set(layer: nn.Linear, values: list[list[float]]) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(values))


def test_hand_computed_two_updates() -> None:
    model = _linear([[1.0, 2.0], [3.0, 4.0]])
    ema = SparseEMA(model, decay=0.5)
    assert not ema.module.training and not ema.module.weight.requires_grad
    _set(model, [[3.0, 2.0], [-1.0, 8.0]])
    ema.update(model)  # 0.5*old + 0.5*new
    assert torch.equal(ema.module.weight, torch.tensor([[2.0, 2.0], [1.0, 6.0]]))
    _set(model, [[0.0, 4.0], [1.0, 0.0]])
    ema.update(model)
    assert torch.equal(ema.module.weight, torch.tensor([[1.0, 3.0], [1.0, 3.0]]))
    assert ema.updates == 2
    # decay 0.75: ema = 0.75 * 1 + 0.25 * 5 = 2
    ema2 = SparseEMA(_linear([[1.0, 1.0], [1.0, 1.0]]), decay=0.75)
    ema2.update(_linear([[5.0, 5.0], [5.0, 5.0]]))
    assert torch.equal(ema2.module.weight, torch.full((2, 2), 2.0))


def test_masked_positions_stay_zero_and_set_masks() -> None:
    model = _linear([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[True, False], [True, True]])
    ema = SparseEMA(model, decay=0.5, masks={"weight": mask})
    assert torch.equal(ema.module.weight, torch.tensor([[1.0, 0.0], [3.0, 4.0]]))
    _set(model, [[3.0, 8.0], [5.0, 2.0]])  # the masked entry is nonzero in the module
    ema.update(model)
    assert torch.equal(ema.module.weight, torch.tensor([[2.0, 0.0], [4.0, 3.0]]))
    # Mask change: prune (1, 0), grow (0, 1).
    ema.set_masks({"weight": torch.tensor([[True, True], [False, True]])})
    assert torch.equal(ema.module.weight, torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
    _set(model, [[2.0, 6.0], [7.0, 1.0]])
    ema.update(model)  # the grown entry accumulates from 0: 0.5*0 + 0.5*6 = 3
    assert torch.equal(ema.module.weight, torch.tensor([[2.0, 3.0], [0.0, 2.0]]))
    assert ema.density() == 0.75
    # Non-bool masks are read as mask != 0; masks are copies (mutating the caller's has no effect).
    float_mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    ema.set_masks({"weight": float_mask})
    float_mask.zero_()
    ema.update(model)
    assert torch.equal(ema.module.weight, torch.tensor([[2.0, 0.0], [3.5, 1.5]]))


def test_batchnorm_buffers_copied() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = SparseEMA(model, decay=0.9)
    model(torch.randn(8, 3) * 3 + 2)  # training forward updates the running statistics
    assert not torch.equal(model[1].running_mean, ema.module[1].running_mean)
    ema.update(model)
    for name, buf in model.named_buffers():
        assert torch.equal(dict(ema.module.named_buffers())[name], buf)


class _SNNet(nn.Module):
    def __init__(self, sn=spectral_norm) -> None:  # noqa: ANN001 - a torch function
        super().__init__()
        self.conv = sn(nn.Conv2d(1, 4, 3, padding=1))
        self.fc = sn(nn.Linear(4 * 4 * 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("sn", [spectral_norm, parametrized_spectral_norm], ids=["legacy", "parametrized"])
def test_spectral_norm_after_training_forward(sn) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = _SNNet(sn)
    x = torch.randn(2, 1, 4, 4)
    model(x).sum().backward()  # legacy SN now holds a non-leaf `weight` attribute
    names = [n for n, _ in model.named_parameters()]
    weight_name = "conv.weight_orig" if sn is spectral_norm else "conv.parametrizations.weight.original"
    assert weight_name in names
    mask = torch.zeros(4, 1, 3, 3, dtype=torch.bool)
    mask[:2] = True
    ema = SparseEMA(model, decay=0.0, masks={weight_name: mask})
    if sn is spectral_norm:
        assert not model.conv.weight.is_leaf  # restored after the copy
    with torch.no_grad():
        dict(model.named_parameters())[weight_name].mul_(mask)
    model(x)
    ema.update(model)  # decay 0: the EMA equals the (masked) module
    for name, param in model.named_parameters():
        assert torch.equal(dict(ema.module.named_parameters())[name], param.detach())
    model.eval()
    with torch.no_grad():
        assert torch.allclose(ema.module(x), model(x))


def test_state_dict_round_trip_and_repr() -> None:
    model = _linear([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[True, False], [True, True]])
    ema = SparseEMA(model, decay=0.5, masks={"weight": mask})
    _set(model, [[3.0, 8.0], [5.0, 2.0]])
    ema.update(model)
    state = ema.state_dict()
    assert state["decay"] == 0.5 and state["updates"] == 1
    other = SparseEMA(_linear([[0.0, 0.0], [0.0, 0.0]]), decay=0.9)
    other.load_state_dict(state)
    assert other.decay == 0.5 and other.updates == 1
    assert torch.equal(other.module.weight, ema.module.weight)
    assert torch.equal(other.masks()["weight"], mask)
    other.update(model)
    assert torch.equal(other.module.weight, torch.tensor([[2.5, 0.0], [4.5, 2.5]]))
    assert repr(ema) == "SparseEMA(Linear, decay=0.5, updates=1, masked=1 weights, density=0.7500)"
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"decay": 0.5})
    with pytest.raises(ValueError, match="does not fit"):
        other.load_state_dict({**state, "module": {"weight": torch.zeros(3, 3)}})


def test_validation() -> None:
    model = _linear([[1.0, 2.0], [3.0, 4.0]])
    for decay in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"decay must lie in \[0, 1\)"):
            SparseEMA(model, decay=decay)
    with pytest.raises(ValueError, match="unknown parameters"):
        SparseEMA(model, masks={"fc.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        SparseEMA(model, masks={"weight": torch.ones(3, 2, dtype=torch.bool)})
    ema = SparseEMA(model)
    with pytest.raises(ValueError, match="do not match"):
        ema.update(nn.Linear(2, 2))  # has a bias the EMA copy lacks


# ---------------------------------------------------------------- added for mutation testing (docs/testing.md)


class _Three(nn.Module):
    """Three linear layers (six parameters), for messages that list at most five names."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(1, 1), nn.Linear(1, 1), nn.Linear(1, 1)


class _TwoParams(nn.Module):
    def __init__(self, first: str) -> None:
        super().__init__()
        for name in (first, "y" if first == "x" else "x"):
            self.register_parameter(name, nn.Parameter(torch.ones(2)))


def test_no_masks_density_one_and_mask_log(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    ema = SparseEMA(_linear([[1.0, 2.0], [3.0, 4.0]]), decay=0.5)
    assert ema.density() == 1.0 and ema.masks() == {}
    with caplog.at_level(logging.DEBUG, logger="sparsegan.ema"):
        ema.set_masks({"weight": torch.tensor([[True, False], [True, True]])})
    assert caplog.messages == ["SparseEMA: 1 masks set, density 0.7500"]


def test_masks_are_copies_of_the_callers_tensors() -> None:
    mask = torch.tensor([[True, False], [False, True]])
    ema = SparseEMA(_linear([[1.0, 2.0], [3.0, 4.0]]), decay=0.5, masks={"weight": mask})
    mask[0, 1] = True  # the caller changes its own tensor afterwards
    assert ema.masks()["weight"].tolist() == [[True, False], [False, True]]
    assert ema.module.weight.tolist() == [[1.0, 0.0], [0.0, 4.0]]


def test_mask_and_state_errors_name_the_problem() -> None:
    ema = SparseEMA(_linear([[1.0, 2.0], [3.0, 4.0]]), decay=0.5)
    with pytest.raises(ValueError, match="^masks must be a mapping of parameter name to mask, got list$"):
        ema.set_masks([torch.ones(2, 2, dtype=torch.bool)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^mask for 'weight' has shape list but the parameter has shape \(2, 2\)$"):
        ema.set_masks({"weight": [[True, False]]})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"^mask for 'weight' has shape \(2,\) but the parameter has shape \(2, 2\)$"):
        ema.set_masks({"weight": torch.ones(2, dtype=torch.bool)})
    state = ema.state_dict()
    with pytest.raises(ValueError, match="^not a SparseEMA state: expected a mapping, got list$"):
        ema.check_state_dict([state])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^not a SparseEMA state: updates is 'many'$"):
        ema.check_state_dict({**state, "updates": "many"})
    with pytest.raises(ValueError, match="^the EMA state's module entry is a list, not a state dict$"):
        ema.check_state_dict({**state, "module": []})
    ema.check_state_dict(state)  # a good state passes, and nothing changes
    assert ema.updates == 0


def test_unknown_mask_names_list_three_examples() -> None:
    ema = SparseEMA(_Three(), decay=0.5)
    with pytest.raises(ValueError) as err:
        ema.set_masks({"d.weight": torch.ones(1, 1, dtype=torch.bool)})
    assert str(err.value) == ("masks for unknown parameters ['d.weight']; use names from module.named_parameters() "
                              "(e.g. ['a.weight', 'a.bias', 'b.weight'])")


def test_state_mismatch_messages_list_five_of_each() -> None:
    ema = SparseEMA(_Three(), decay=0.5)
    state = ema.state_dict()
    own = state["module"]
    names = list(own)
    with pytest.raises(ValueError) as err:
        ema.check_state_dict({**state, "module": {}})  # only missing keys
    assert str(err.value) == ("the EMA state does not fit this module (another architecture?): missing keys "
                              f"{names[:5]}, unexpected keys [], shape mismatches []")
    extra = {f"z{i}": torch.zeros(1) for i in range(6)}
    with pytest.raises(ValueError) as err:
        ema.check_state_dict({**state, "module": {**own, **extra}})
    assert str(err.value).endswith(f"unexpected keys {list(extra)[:5]}, shape mismatches []")
    wrong = {k: torch.zeros(2, 2) for k in own}
    with pytest.raises(ValueError) as err:
        ema.check_state_dict({**state, "module": wrong})
    shapes = [f"{k}: (2, 2) vs {tuple(v.shape)}" for k, v in own.items()][:5]
    assert str(err.value).endswith(f"missing keys [], unexpected keys [], shape mismatches {shapes}")
    with pytest.raises(ValueError, match=r"shape mismatches \['a.weight: list vs \(1, 1\)'\]"):
        ema.check_state_dict({**state, "module": {**own, "a.weight": [0.0]}})


def test_load_state_without_masks_keeps_the_masks() -> None:
    ema = SparseEMA(_linear([[1.0, 2.0], [3.0, 4.0]]), decay=0.5, masks={"weight": torch.tensor([[True, False], [True, True]])})
    state = ema.state_dict()
    del state["masks"]
    ema.load_state_dict(state)
    assert ema.masks()["weight"].tolist() == [[True, False], [True, True]]


def test_tied_parameters_accept_masks_by_alias() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(2, 2, bias=False)
            self.dec = nn.Linear(2, 2, bias=False)
            self.dec.weight = self.enc.weight

    ema = SparseEMA(Tied(), decay=0.5)
    ema.set_masks({"dec.weight": torch.tensor([[True, False], [False, True]])})
    assert list(ema.masks()) == ["enc.weight"]  # stored under the canonical name
    assert ema.module.enc.weight[0, 1] == 0


def test_update_mismatch_messages() -> None:
    ema = SparseEMA(_Three(), decay=0.5)
    other = nn.Sequential(_Three())
    with pytest.raises(ValueError) as err:
        ema.update(other)
    got = [n for n, _ in other.named_parameters()]
    assert str(err.value) == (f"the module's parameters do not match the EMA copy's: missing "
                              f"{ema._names[:5]}, unexpected {got[:5]}; pass the module this SparseEMA was built from")
    ema = SparseEMA(_TwoParams("x"), decay=0.5)
    with pytest.raises(ValueError) as err:
        ema.update(_TwoParams("y"))
    assert str(err.value) == ("the module's parameters do not match the EMA copy's: missing [], unexpected [] "
                              "(same names, different order); pass the module this SparseEMA was built from")


def test_update_mismatch_with_only_missing_names_has_no_order_hint() -> None:
    ema = SparseEMA(_Three(), decay=0.5)
    fewer = _Three()
    del fewer.c
    with pytest.raises(ValueError) as err:
        ema.update(fewer)
    assert str(err.value) == ("the module's parameters do not match the EMA copy's: missing ['c.weight', 'c.bias'], "
                              "unexpected []; pass the module this SparseEMA was built from")
