"""MaskedWeights: in-place enforcement, staleness, optimizer-state hygiene, state dicts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsegan.masks import MaskedWeights, MaskStateError


def _weights(policy: str = "reset") -> tuple[MaskedWeights, nn.Parameter, nn.Parameter]:
    a = nn.Parameter(torch.tensor([[1.0, -2.0], [3.0, -4.0]]))
    b = nn.Parameter(torch.tensor([5.0, 6.0, 7.0]))
    masks = [torch.tensor([[True, False], [False, True]]), torch.tensor([False, True, True])]
    return MaskedWeights(["a", "b"], [a, b], masks, optimizer_state=policy), a, b


def test_apply_zeroes_exactly_the_inactive_entries() -> None:
    weights, a, b = _weights()
    weights.apply_()
    assert torch.equal(a.detach(), torch.tensor([[1.0, 0.0], [0.0, -4.0]]))
    assert torch.equal(b.detach(), torch.tensor([0.0, 6.0, 7.0]))
    assert weights.active_counts() == [2, 2]
    assert weights.density() == pytest.approx(4 / 7)
    assert weights.layer_densities() == {"a": 0.5, "b": pytest.approx(2 / 3)}
    assert all(m.dtype == torch.bool and m.element_size() == 1 for m in weights.masks)


def test_staleness_follows_in_place_changes() -> None:
    weights, a, _ = _weights()
    weights.apply_()
    assert not weights.stale()
    with torch.no_grad():
        a.copy_(torch.ones(2, 2))  # e.g. model.load_state_dict
    assert weights.stale()
    assert weights.apply_if_stale_()
    assert torch.equal(a.detach(), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert not weights.apply_if_stale_()


def _adam_with_state(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    opt = torch.optim.Adam(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt


def test_set_masks_resets_optimizer_state_at_changed_positions() -> None:
    weights, a, b = _weights("reset")
    weights.apply_()
    opt = _adam_with_state([a, b])
    # prune a[1,1], grow a[0,1]; b unchanged
    new = [torch.tensor([[True, True], [False, False]]), weights.masks[1].clone()]
    changed = weights.set_masks(new, [opt])
    assert torch.equal(changed[0], torch.tensor([[False, True], [False, True]]))
    assert not changed[1].any()
    exp_avg = opt.state[a]["exp_avg"]
    assert exp_avg[0, 1] == 0 and exp_avg[1, 1] == 0
    assert exp_avg[0, 0] != 0 and exp_avg[1, 0] != 0  # untouched positions keep their moments
    assert opt.state[a]["exp_avg_sq"][1, 1] == 0
    assert (opt.state[b]["exp_avg"] != 0).all()
    assert opt.state[a]["step"].item() == 1  # scalar state is left alone
    assert a[1, 1] == 0  # pruned weight zeroed


def test_keep_policy_leaves_optimizer_state() -> None:
    weights, a, b = _weights("keep")
    opt = _adam_with_state([a, b])
    weights.set_masks([torch.ones(2, 2, dtype=torch.bool), weights.masks[1]], [opt])
    assert (opt.state[a]["exp_avg"] != 0).all()


def test_reset_optimizer_state_defaults_to_inactive_positions() -> None:
    weights, a, b = _weights()
    opt = _adam_with_state([a, b])
    weights.reset_optimizer_state(opt)
    assert torch.equal(opt.state[b]["exp_avg"] != 0, weights.masks[1])


def test_state_dict_round_trip_and_errors() -> None:
    weights, a, b = _weights()
    state = weights.state_dict()
    other, a2, _ = _weights()
    other.masks = [torch.ones_like(m) for m in other.masks]
    other.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(other.masks, weights.masks))
    assert a2[0, 1] == 0  # enforced on load
    with pytest.raises(MaskStateError, match="missing"):
        other.load_state_dict({"a": state["a"]})
    with pytest.raises(MaskStateError, match="shape"):
        other.load_state_dict({"a": torch.ones(3, 3, dtype=torch.bool), "b": state["b"]})
    with pytest.raises(MaskStateError, match="bool"):
        other.load_state_dict({"a": state["a"].float(), "b": state["b"]})


def test_bad_construction() -> None:
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(MaskStateError):
        MaskedWeights(["a", "b"], [p])
    with pytest.raises(ValueError, match="optimizer_state"):
        MaskedWeights(["a"], [p], optimizer_state="zero")  # type: ignore[arg-type]


def test_apply_zeroes_nan_and_inf_at_inactive_positions() -> None:
    w = nn.Parameter(torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), float("nan")]))
    weights = MaskedWeights(["w"], [w], [torch.tensor([True, False, False, False, True])])
    weights.apply_()
    # inactive entries are exactly 0 whatever they held (a multiply would leave nan * 0 = nan)
    assert w.detach()[1:4].tolist() == [0.0, 0.0, 0.0]
    assert w.detach()[0] == 1.0 and torch.isnan(w.detach()[4])  # active entries are left alone


def test_wrapping_zeroes_existing_optimizer_state_at_inactive_positions() -> None:
    from sparsegan import SparseGANWrapper
    from sparsegan.strategies import Static
    from tests.conftest import mlp_gan

    torch.manual_seed(0)
    G, D = mlp_gan()
    g_opt, d_opt = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
    for module, opt in ((G, g_opt), (D, d_opt)):  # a few dense steps before wrapping: moments everywhere
        for _ in range(2):
            opt.zero_grad()
            module(torch.randn(4, module[0].in_features)).sum().backward()
            opt.step()
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=Static(0.3, 0.3))
    for net, module, opt in (("generator", G, g_opt), ("discriminator", D, d_opt)):
        params = dict(module.named_parameters())
        for name, mask in sg.masks(net).items():
            state = opt.state[params[name]]
            assert torch.count_nonzero(state["exp_avg"][~mask]) == 0
            assert torch.count_nonzero(state["exp_avg_sq"][~mask]) == 0
            assert torch.count_nonzero(state["exp_avg"][mask]) > 0  # kept where the weights stay active


# ---------------------------------------------------------------- added for mutation testing (docs/testing.md)


def test_density_of_no_weights_is_one() -> None:
    weights = MaskedWeights([], [])
    assert weights.total == 0
    assert weights.density() == 1.0
    assert weights.layer_densities() == {}


def test_repr_names_weights_banks_density_and_policy() -> None:
    weights, _, _ = _weights("keep")
    assert repr(weights) == "MaskedWeights(2 weights, density=0.5714, optimizer_state='keep')"
    bank = nn.Parameter(torch.zeros(3, 2, 2))
    banked = MaskedWeights(["w"], [bank], shared_dims=[(0,)])
    assert repr(banked) == "MaskedWeights(1 weights, 1 kernel banks, density=1.0000, optimizer_state='reset')"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none present)")
def test_masks_follow_the_parameters_device() -> None:
    weights, a, b = _weights()
    a.data = a.data.cuda()  # the module was moved after wrapping
    weights.apply_()
    assert weights.masks[0].device == a.device and weights.masks[1].device == b.device
    assert a.detach().cpu().tolist() == [[1.0, 0.0], [0.0, -4.0]]
    state = {n: m.cpu() for n, m in weights.state_dict().items()}
    weights.load_state_dict(state)  # CPU masks are installed on the parameters' devices
    assert weights.masks[0].device == a.device


def test_kernel_masks_of_a_bank_of_one() -> None:
    w = nn.Parameter(torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]))  # a bank of N = 1 kernel of shape (2, 2)
    mask = torch.tensor([[[True, False], [False, True]]])
    weights = MaskedWeights(["w"], [w], [mask], shared_dims=[(0,)])
    assert weights.multiplicity == [1]
    (kernel,) = weights.kernel_masks()
    assert kernel.tolist() == [[True, False], [False, True]]
    assert torch.equal(weights.expand([kernel])[0], mask)


def test_check_state_dict_errors_name_the_problem() -> None:
    weights, _, _ = _weights()
    state = weights.state_dict()
    with pytest.raises(MaskStateError, match="by parameter name, got list"):
        weights.check_state_dict([state["a"], state["b"]])  # type: ignore[arg-type]
    with pytest.raises(MaskStateError, match=r"missing \[\], unexpected \['c'\]; was the checkpoint made for a "
                                             r"different model or with different include/exclude\?"):
        weights.check_state_dict({**state, "c": state["b"]})
    with pytest.raises(MaskStateError, match=r"masks for \['b'\] are not tensors"):
        weights.check_state_dict({"a": state["a"], "b": [False, True, True]})  # type: ignore[dict-item]


def test_reset_optimizer_state_skips_parameters_the_optimizer_does_not_hold() -> None:
    weights, a, b = _weights()
    opt = _adam_with_state([b])  # no state for a (listed first), state for b
    weights.reset_optimizer_state(opt)
    assert a not in opt.state
    assert (opt.state[b]["exp_avg"] != 0).tolist() == [False, True, True]


def test_wrong_number_of_masks_is_named() -> None:
    weights, _, _ = _weights()
    with pytest.raises(MaskStateError, match="got 1 masks for 2 weights"):
        weights.set_masks([torch.ones(2, 2, dtype=torch.bool)])


def test_bank_axis_need_not_lead() -> None:
    w = nn.Parameter(torch.ones(2, 3))  # a bank of 3 along axis 1, kernels of shape (2,)
    shared = torch.tensor([[True, True, True], [False, False, False]])
    weights = MaskedWeights(["w"], [w], [shared], shared_dims=[(1,)])
    assert weights.multiplicity == [3]
    assert weights.kernel_masks()[0].tolist() == [True, False]
    assert w.detach().tolist() == [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]  # nothing enforced before apply_
    unshared = torch.tensor([[True, False, True], [False, False, False]])
    with pytest.raises(MaskStateError, match=r"differs along its bank axes \[1\]; a bank has one kernel mask "
                                             r"shared across the bank \(build it with MaskedWeights.expand\)"):
        weights.set_masks([unshared])


def test_construction_errors_are_named() -> None:
    p, q = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(MaskStateError, match="2 names for 1 parameters"):
        MaskedWeights(["a", "b"], [p])
    with pytest.raises(MaskStateError, match=r"shared_dims \[\(\)\] do not fit the 2 parameters' shapes"):
        MaskedWeights(["p", "q"], [p, q], shared_dims=[()])  # one entry for two weights
    with pytest.raises(MaskStateError, match=r"shared_dims \[\(0,\)\] do not fit the 1 parameters' shapes"):
        MaskedWeights(["p"], [p], shared_dims=[(0,)])  # every axis shared: no kernel left


def test_default_masks_are_all_true_bool() -> None:
    p = nn.Parameter(torch.ones(2, 3))
    weights = MaskedWeights(["p"], [p])
    assert weights.masks[0].dtype == torch.bool and bool(weights.masks[0].all())
    assert weights.density() == 1.0


def test_a_new_object_is_stale_whatever_the_parameter_version() -> None:
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    with torch.no_grad():
        p.add_(1.0)  # p._version is now 1
    weights = MaskedWeights(["p"], [p], [torch.tensor([True, False])])
    assert weights.stale()
    assert weights.apply_if_stale_()
    assert p.detach().tolist() == [2.0, 0.0]
