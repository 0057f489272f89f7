"""Shared helpers of the adapter tests, and tests of those helpers.

:func:`kernel_record` is an *independent* reference for discovery: it runs one eager forward
under a ``TorchFunctionMode`` and, at every conv / linear / matmul call, walks the **autograd
graph** of the weight operand back to the parameters it was computed from. It shares no code with
``sparsegan.discovery`` (which follows tensor identities through a list of pass-through ops).

Rules (kept deliberately simple, so a disagreement points at discovery):

* conv / transposed conv / linear / bilinear: the ``weight`` operand is a weight. Among the
  parameters it is computed from, the kernel is the largest one (by element count) whose count
  divides the operand's and, for convolutions, whose last two (spatial) dims match the operand's;
  modulation styles, gains and spectral-norm vectors are smaller or shaped differently.
* matmul-like ops: an operand is a weight when it does not depend on the model's input while
  another operand does (``x @ W``); so an attention product ``q @ k^T`` (both depend on the input)
  or a spectral-norm estimate ``W @ v`` (neither does) is not a weight use.
* A parameter read through a table lookup (indexing, ``embedding``, ``gather``) is an embedding,
  not a kernel, whatever the looked-up rows are multiplied with.
* Only parameters with 2 or more dimensions count (discovery skips 1-D ones by design).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from sparsegan._utils import as_args

_CONV = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
_LINEAR = {"linear", "bilinear"}
_MATMUL = {"matmul", "mm", "bmm", "einsum", "addmm", "baddbmm", "addbmm", "tensordot", "rmatmul"}
# Table lookups: a parameter read through these is an embedding (e.g. a relative-position table),
# not a kernel, whatever it is multiplied with afterwards.
_LOOKUPS = {"IndexBackward0", "EmbeddingBackward0", "EmbeddingBagBackward0", "IndexSelectBackward0",
            "GatherBackward0"}


def _name(func: Any) -> str:
    return (getattr(func, "__name__", None) or str(func)).strip("_")


class _Recorder(TorchFunctionMode):
    def __init__(self, params: Mapping[int, str], tensors: Mapping[int, torch.Tensor], inputs: set[int]) -> None:
        super().__init__()
        self.params = params
        self.tensors = tensors
        self.inputs = inputs
        self.memo: dict[Any, tuple[frozenset[int], bool]] = {}
        self.found: dict[str, set[str]] = {}

    def _leaf(self, tensor: torch.Tensor) -> tuple[frozenset[int], bool]:
        if id(tensor) in self.params:
            return frozenset({id(tensor)}), False
        return frozenset(), id(tensor) in self.inputs

    def _ancestry(self, value: Any) -> tuple[frozenset[int], bool]:
        """(ids of the parameters a tensor is computed from, whether it depends on the input)."""
        if not isinstance(value, torch.Tensor):
            return frozenset(), False
        if value.grad_fn is None:
            return self._leaf(value)
        stack = [(value.grad_fn, False)]
        while stack:  # iterative post-order walk, memoised per autograd node
            node, expanded = stack.pop()
            if node in self.memo:
                continue
            children = [fn for fn, _ in node.next_functions if fn is not None]
            if not expanded:
                stack.append((node, True))
                stack += [(c, False) for c in children if c not in self.memo]
                continue
            params: set[int] = set()
            data = False
            variable = getattr(node, "variable", None)
            if variable is not None:
                p, d = self._leaf(variable)
                params |= p
                data |= d
            for child in children:
                p, d = self.memo[child]
                if type(node).__name__ not in _LOOKUPS:
                    params |= p
                data |= d
            self.memo[node] = (frozenset(params), data)
        return self.memo[value.grad_fn]

    def _kernel(self, operand: torch.Tensor, family: str) -> int | None:
        ancestors, _ = self._ancestry(operand)
        candidates = []
        for pid in ancestors:
            p = self.tensors[pid]
            if p.dim() < 2 or operand.numel() % p.numel():
                continue
            if family == "conv" and (p.dim() < operand.dim() or p.shape[-2:] != operand.shape[-2:]):
                continue
            candidates.append((p.numel(), pid))
        return max(candidates)[1] if candidates else None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        name = _name(func)
        if name in _CONV or name in _LINEAR:
            slot = 2 if name == "bilinear" else 1
            weight = kwargs.get("weight", args[slot] if len(args) > slot else None)
            if isinstance(weight, torch.Tensor):
                pid = self._kernel(weight, "conv" if name in _CONV else "linear")
                if pid is not None:
                    self.found.setdefault(self.params[pid], set()).add(name)
        elif name in _MATMUL:
            operands = [v for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor)]
            if name in ("addmm", "baddbmm", "addbmm"):
                operands = operands[1:3]
            info = [self._ancestry(v) for v in operands]
            for i, (operand, (ancestors, data)) in enumerate(zip(operands, info)):
                others_data = any(d for j, (_, d) in enumerate(info) if j != i)
                if ancestors and not data and others_data:
                    pid = self._kernel(operand, "matmul")
                    if pid is not None:
                        self.found.setdefault(self.params[pid], set()).add(name)
        return func(*args, **kwargs)


def kernel_record(model: nn.Module, example: Any, kwargs: Mapping[str, Any] | None = None) -> dict[str, set[str]]:
    """Canonical names of the model's kernel weights (>= 2-D) -> the ops that use them.

    Runs one forward in eval mode with gradients enabled on a deep copy of ``model`` (the model
    itself and the global RNG are left untouched); float example inputs are made leaves that
    require grad so that "depends on the input" can be told from the autograd graph.
    """
    rng = torch.get_rng_state()
    twin = copy.deepcopy(model).eval()
    names = {}
    for name, p in twin.named_parameters():  # canonical (first) name per parameter object
        names.setdefault(id(p), name)
    tensors = {id(p): p for p in twin.parameters()}
    inputs: set[int] = set()

    def prepare(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            x = x.detach().clone().requires_grad_(True)
            inputs.add(id(x))
        return x

    args = pytree.tree_map(prepare, as_args(example))
    kw = pytree.tree_map(prepare, dict(kwargs or {}))
    recorder = _Recorder(names, tensors, inputs)
    try:
        with torch.enable_grad(), recorder:
            twin(*args, **kw)
    finally:
        torch.set_rng_state(rng)
    return recorder.found


def hidden_in_leaves(result: Any) -> list[str]:
    """Parameters discovery reports as inside modules its tracer did not enter."""
    return [s.name for s in result.skipped if "that tracing does not look into" in s.reason]


def assert_discovery_complete(result: Any, record: Mapping[str, Iterable[str]]) -> None:
    """Discovery found exactly the kernel weights of the reference record, none hidden in leaves."""
    found = set(result.names)
    expected = set(record)
    assert not hidden_in_leaves(result), f"weights hidden inside leaf modules: {hidden_in_leaves(result)}"
    assert found == expected, (
        f"discovery ({result.method}) missed {sorted(expected - found)}; "
        f"found extra {sorted(found - expected)}; skipped reasons: "
        f"{ {s.name: s.reason for s in result.skipped if s.name in expected} }"
    )


def zeroed_reference(module: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """A deep copy of ``module`` with the masked-out entries set to 0 (hooks of the copy are inert)."""
    twin = copy.deepcopy(module)
    with torch.no_grad():
        for name, mask in masks.items():
            twin.get_parameter(name).mul_(mask.to(torch.float32))
    return twin


def first_tensor(output: Any) -> torch.Tensor:
    """The first tensor of a (possibly nested) output."""
    if isinstance(output, torch.Tensor):
        return output
    return next(x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor))


# ---------------------------------------------------------------------------------------------
# Tests of the reference itself (so that it can be trusted as a yardstick)
# ---------------------------------------------------------------------------------------------


class _Toy(nn.Module):
    """Direct, scaled, modulated, spectrally normalised, attention-style and matmul weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.scaled = nn.Parameter(torch.randn(4, 4, 3, 3))
        self.gain = nn.Parameter(torch.ones(4, 1, 1, 1))
        self.mod = nn.Parameter(torch.randn(4, 4, 1, 1))
        self.to_style = nn.Linear(5, 4)
        self.sn = nn.utils.spectral_norm(nn.Linear(16, 8))
        self.q = nn.Linear(8, 8)
        self.proj = nn.Parameter(torch.randn(8, 2))
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = self.conv(x)
        h = F.conv2d(h, self.scaled * 0.5 * self.gain, padding=1)
        style = self.to_style(s)[:, None, :, None, None]
        w = (self.mod[None] * (style + 1)).reshape(b * 4, 4, 1, 1)
        h = F.conv2d(h.reshape(1, b * 4, 4, 4), w, groups=b).reshape(b, 16, 4).mean(-1)
        t = self.norm(self.sn(h))[:, None, :]
        q = self.q(t)
        attn = (q @ q.transpose(1, 2)).softmax(-1) @ t
        return attn[:, 0] @ self.proj


def test_kernel_record_on_a_toy_model() -> None:
    torch.manual_seed(0)
    model = _Toy()
    record = kernel_record(model, (torch.randn(2, 3, 4, 4), torch.randn(2, 5)))
    assert set(record) == {"conv.weight", "scaled", "mod", "to_style.weight", "sn.weight_orig", "q.weight", "proj"}
    assert record["proj"] == {"matmul"} and record["mod"] == {"conv2d"}


def test_kernel_record_leaves_model_and_rng_alone() -> None:
    torch.manual_seed(0)
    model = _Toy()
    example = (torch.randn(2, 3, 4, 4), torch.randn(2, 5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    kernel_record(model, example)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training


@pytest.mark.parametrize("batch", [2, 5])
def test_kernel_record_does_not_depend_on_the_batch(batch: int) -> None:
    torch.manual_seed(0)
    model = _Toy()
    assert "mod" in kernel_record(model, (torch.randn(batch, 3, 4, 4), torch.randn(batch, 5)))
