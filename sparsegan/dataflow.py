"""Dataflow vocabulary shared by the discovery methods: which ops are kernels, which pass a weight
through, and how one op moves the tracking state.

Every method (fx graph, export graph, runtime record) reduces its ops to a normalised name
(:func:`op_name`) and a list of argument *slots*; :func:`propagate` then decides whether a tracked
parameter reaches a kernel's weight operand, passes through to the op's output, or is consumed
(with a reason for the report).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils import _pytree as pytree

__all__ = [
    "op_name", "flat_slots", "propagate", "kernel_macs", "Flow", "Use", "BankSum", "bank_dims", "BANK_REDUCTIONS",
    "MODULE_KERNELS", "MODULE_REASONS", "RNN_OPS", "base_type", "rnn_op", "rnn_weights", "kernel_weight_of",
    "is_norm_module", "module_kernels",
]
# --------------------------------------------------------------------------------------------
# Op vocabulary (shared by the three methods)
# --------------------------------------------------------------------------------------------

_CONV_LIKE = {
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "convolution", "conv_tbc",
}
_LINEAR_LIKE = {"linear", "bilinear"}
MATMUL_LIKE = {"matmul", "mm", "bmm", "einsum", "addmm", "baddbmm", "addbmm", "tensordot"}
# Recurrent ops (torch.lstm & co.): every 2-D tensor among their weights is a matmul operand
# (``weight_ih`` / ``weight_hh`` of each layer and direction), every 1-D one a bias.
RNN_OPS = {"lstm", "gru", "rnn_tanh", "rnn_relu"}
# Ops whose slot 0 is an additive input (bias), not a product operand.
_ADD_FIRST = {"addmm", "baddbmm", "addbmm"}
_WEIGHT_SLOT = {"conv_tbc": 1, "bilinear": 2}
_CONSUMERS = {
    "embedding": "embedding table",
    "embedding_bag": "embedding table",
    "batch_norm": "normalization affine parameter",
    "layer_norm": "normalization affine parameter",
    "group_norm": "normalization affine parameter",
    "instance_norm": "normalization affine parameter",
    "rms_norm": "normalization affine parameter",
    "native_batch_norm": "normalization affine parameter",
    "native_layer_norm": "normalization affine parameter",
    "native_group_norm": "normalization affine parameter",
    "prelu": "activation parameter",
}
_NORM_INPUT_PASSES = {
    "batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm",
    "native_batch_norm", "native_layer_norm", "native_group_norm", "normalize",
}
_UNARY_PASS = {
    "reshape", "view", "view_as", "reshape_as", "type_as", "unsafe_view", "permute", "transpose", "t",
    "flatten", "unflatten", "unsqueeze", "squeeze", "expand", "expand_as", "repeat", "contiguous", "clone",
    "to", "to_copy", "type", "float", "half", "bfloat16", "double", "getitem", "select", "narrow",
    "slice", "chunk", "split", "split_with_sizes", "unbind", "flip", "neg", "alias",
    "lift_fresh_copy", "movedim", "swapaxes", "mT", "conj", "resolve_conj", "resolve_neg",
}
SIZE_PRESERVING = {
    "reshape", "view", "view_as", "reshape_as", "type_as", "permute", "transpose", "t", "flatten", "unflatten",
    "contiguous", "clone", "to", "type", "float", "half", "bfloat16", "double", "neg", "movedim",
}
BINARY_PASS = {"mul", "div", "truediv", "add", "sub", "addcmul"}
# Reads of a tensor's metadata (``x.shape``, ``x.size(1)``, einops' shape parsing): they use no
# values, so they are no reason why a weight was not followed.
METADATA_READS = {"get", "size", "dim", "numel", "stride", "len", "is_contiguous", "element_size", "data_ptr",
                  "is_floating_point", "is_complex", "ndimension", "nelement"}
REDUCTIONS = {"sum", "mean", "amax", "amin", "prod", "max", "min", "logsumexp", "std", "var", "norm", "nansum",
              "nanmean", "median", "cumsum"}
# Reductions a kernel bank's mixing may use: they keep a position that is zero in every kernel of
# the bank zero in the mixed kernel, so one mask shared across the bank axis stays exact there.
BANK_REDUCTIONS = {"sum", "mean", "nansum", "nanmean"}
_REVERSED = {"rmul": "mul", "rtruediv": "truediv", "rdiv": "div", "radd": "add", "rsub": "sub",
             "rmatmul": "matmul"}


def op_name(target: Any) -> str:
    """Normalise an fx / aten / torch-function target to a short op name (``"conv2d"``, ``"mul"``)."""
    if isinstance(target, str):
        name = target
    elif isinstance(target, torch._ops.OpOverload):
        name = target.overloadpacket.__name__
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = target.__name__
    else:
        name = getattr(target, "__name__", None) or str(target)
    name = name.strip("_")
    return _REVERSED.get(name, name)


def _kernel_family(op: str) -> str | None:
    if op in _CONV_LIKE:
        return "conv"
    if op in _LINEAR_LIKE:
        return "linear"
    if op in MATMUL_LIKE:
        return "matmul"
    return None


def _is_weight_slot(op: str, slot: int | str) -> bool:
    family = _kernel_family(op)
    if family == "matmul":
        return not (op in _ADD_FIRST and slot in (0, "input", "self"))
    if slot == "weight":
        return True
    return slot == _WEIGHT_SLOT.get(op, 1)


def _kernel_op_label(op: str, weight_ndim: int | None, transposed: bool = False) -> str:
    if op in ("convolution", "conv_tbc"):
        nd = (weight_ndim or 4) - 2
        return f"conv_transpose{nd}d" if transposed else f"conv{nd}d"
    return op


# --------------------------------------------------------------------------------------------
# Dataflow propagation shared by fx and export
# --------------------------------------------------------------------------------------------


class BankSum(str):
    """A ``via`` entry: a reduction over a kernel bank's axis ``dim`` of the parameter.

    It reads as its text in reports (``"sum over bank dim 0"``) and carries the axis, so that
    discovery can give the bank one mask shared across that axis.
    """

    dim: int

    def __new__(cls, op: str, dim: int) -> BankSum:
        self = super().__new__(cls, f"{op} over bank dim {dim}")
        self.dim = dim
        return self


def bank_dims(via: Sequence[str]) -> tuple[int, ...]:
    """The parameter axes that the reductions in ``via`` sum a kernel bank over, in order."""
    return tuple(sorted({entry.dim for entry in via if isinstance(entry, BankSum)}))


@dataclass
class Use:
    op: str
    via: tuple[str, ...]
    macs: int | None = None


class Flow:
    """Collects, per parameter id, kernel uses and the non-kernel consumers (the first one is the reason)."""

    def __init__(self) -> None:
        self.uses: dict[int, list[Use]] = {}
        self.reasons: dict[int, list[str]] = {}  # in order; the first one is reported

    def use(self, pid: int, op: str, via: tuple[str, ...], macs: int | None = None) -> None:
        self.uses.setdefault(pid, []).append(Use(op, via, macs))

    def consumed(self, pid: int, reason: str) -> None:
        reasons = self.reasons.setdefault(pid, [])
        if reason not in reasons:
            reasons.append(reason)


def flat_slots(args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[tuple[int | str, Any]]:
    slots: list[tuple[int | str, Any]] = []
    for i, arg in enumerate(args):
        for leaf in pytree.tree_leaves(arg):
            slots.append((i, leaf))
    for key, arg in kwargs.items():
        for leaf in pytree.tree_leaves(arg):
            slots.append((key, leaf))
    return slots


def propagate(
    flow: Flow,
    op: str,
    slots: list[tuple[int | str, Any]],
    tracked: Callable[[Any], list[tuple[int, tuple[str, ...]]]],
    numel: Callable[[Any], int | None],
    weight_ndim: Callable[[Any], int | None],
    transposed: bool = False,
    shape: Callable[[Any], tuple[int, ...] | None] | None = None,
    param_shape: Callable[[int], tuple[int, ...] | None] | None = None,
) -> list[tuple[int, tuple[str, ...]]]:
    """Apply one op to the tracking state; return the (param id, via) pairs its output carries.

    ``shape`` (optional; the export and runtime methods have shapes, fx does not) lets a product
    tell a kernel modulated per sample (see :func:`_per_sample_modulation`) from a learned scale.
    With ``param_shape`` (a parameter's shape by id) as well, a sum over a kernel bank's axis is
    followed (see :func:`_bank_axis`).
    """
    if op in RNN_OPS:
        for slot, value in slots:
            for pid, via in tracked(value):
                if slot == 0:
                    flow.consumed(pid, f"input of {op}, not its weight")
                elif weight_ndim(value) == 2:
                    flow.use(pid, op, via)
                else:
                    flow.consumed(pid, f"bias of {op}")
        return []
    family = _kernel_family(op)
    if family is not None:
        for slot, value in slots:
            for pid, via in tracked(value):
                if _is_weight_slot(op, slot):
                    flow.use(pid, _kernel_op_label(op, weight_ndim(value), transposed), via)
                elif slot in (2, "bias") and family != "matmul":
                    flow.consumed(pid, f"bias of {_kernel_op_label(op, None, transposed)}")
                else:
                    flow.consumed(pid, f"input of {_kernel_op_label(op, None, transposed)}, not its weight")
        return []
    if op in _CONSUMERS or op in _NORM_INPUT_PASSES:
        out: list[tuple[int, tuple[str, ...]]] = []
        for slot, value in slots:
            for pid, via in tracked(value):
                if slot in (0, "input") and op in _NORM_INPUT_PASSES:
                    out.append((pid, via + (op,)))
                else:
                    flow.consumed(pid, _CONSUMERS.get(op, f"used by {op}"))
        return out
    if op in _UNARY_PASS:
        first = next((v for s, v in slots if s in (0, "input", "self")), None)
        return [(pid, via + (op,)) for pid, via in tracked(first)] if first is not None else []
    if op in BINARY_PASS:
        sizes = [numel(v) for _, v in slots]
        known = [s for s in sizes if s is not None]
        largest = max(known) if known else None
        out = []
        for (_slot, value), size in zip(slots, sizes):
            for pid, via in tracked(value):
                if (size is not None and largest is not None and size < largest
                        and not (op == "mul" and _per_sample_modulation(value, slots, shape))):
                    kind = "added to" if op in ("add", "sub") else "scales"
                    flow.consumed(pid, f"{kind} a larger tensor in {op} (a learned scale, offset or constant)")
                else:
                    out.append((pid, via + (op,)))
        return out
    if op in METADATA_READS:
        return []
    if op in BANK_REDUCTIONS and shape is not None and param_shape is not None:
        return _bank_reduction(flow, op, slots, tracked, shape, param_shape)
    reason = _reduction_reason(op, slots) if op in REDUCTIONS else f"used by {op}"
    for _, value in slots:
        for pid, _via in tracked(value):
            flow.consumed(pid, reason)
    return []


def _reduced_dims(slots: list[tuple[int | str, Any]], ndim: int) -> list[int]:
    """The axes a reduction call names (normalised to be non-negative); empty for "all axes"."""
    dims = [v for slot, v in slots if slot in (1, "dim", "axis") and isinstance(v, int) and not isinstance(v, bool)]
    return sorted({d % ndim for d in dims}) if ndim else []


def _bank_axis(param: tuple[int, ...], reduced: tuple[int, ...], dims: list[int]) -> int | None:
    """The axis of ``param`` that a reduction of its derived tensor ``reduced`` sums over, if any.

    A kernel bank ``(N, *kernel)`` is expanded to the batch, weighted per sample and summed over
    the bank axis: ``(B, N, *kernel) -> (B, *kernel)``. The bank axis is the one axis ``j`` of the
    parameter whose size is the product of the reduced sizes, and without which the parameter's
    shape is the trailing part of what the reduction keeps. ``None`` when no axis, or more than
    one, fits (e.g. a bank ``(4, 4, 4, 3, 3)`` summed over a size-4 axis is ambiguous).
    """
    if not dims or len(param) < 3:
        return None
    size = math.prod(reduced[d] for d in dims)
    kept = tuple(n for i, n in enumerate(reduced) if i not in dims)
    rest = len(param) - 1
    if len(kept) < rest:
        return None
    fits = [j for j in range(len(param))
            if param[j] == size and param[:j] + param[j + 1:] == kept[len(kept) - rest:]]
    return fits[0] if len(fits) == 1 else None


def _bank_reduction(
    flow: Flow,
    op: str,
    slots: list[tuple[int | str, Any]],
    tracked: Callable[[Any], list[tuple[int, tuple[str, ...]]]],
    shape: Callable[[Any], tuple[int, ...] | None],
    param_shape: Callable[[int], tuple[int, ...] | None],
) -> list[tuple[int, tuple[str, ...]]]:
    """Follow a parameter through a sum over its kernel-bank axis; consume it otherwise."""
    first = next((v for s, v in slots if s in (0, "input", "self")), None)
    own = shape(first) if first is not None else None
    out: list[tuple[int, tuple[str, ...]]] = []
    for _slot, value in slots:
        for pid, via in tracked(value):
            pshape = param_shape(pid)
            axis = None
            if value is first and own is not None and pshape is not None:
                axis = _bank_axis(tuple(pshape), tuple(own), _reduced_dims(slots, len(own)))
            if axis is None:
                flow.consumed(pid, _reduction_reason(op, slots))
            else:
                out.append((pid, via + (BankSum(op, axis),)))
    return out


def _reduction_reason(op: str, slots: list[tuple[int | str, Any]]) -> str:
    """``"sum over dim 1"``: a reduction, with the axes it reduces when the call names them."""
    # flat_slots spreads a tuple of dims over several entries of the same slot
    dims = [v for slot, v in slots if slot in (1, "dim", "axis") and isinstance(v, int) and not isinstance(v, bool)]
    if len(dims) == 1:
        return f"{op} over dim {dims[0]} (a reduction discovery does not follow)"
    if dims:
        return f"{op} over dims {', '.join(map(str, dims))} (a reduction discovery does not follow)"
    return f"{op} over all dims (a reduction discovery does not follow)"


def _per_sample_modulation(value: Any, slots: list[tuple[int | str, Any]],
                           shape: Callable[[Any], tuple[int, ...] | None] | None) -> bool:
    """Whether ``value`` is a kernel that a product only broadcasts along a leading batch dim.

    A modulated convolution multiplies its kernel ``(1, C_out, C_in, k, k)`` by per-sample styles
    ``(B, 1, C_in, 1, 1)``. With a 1x1 kernel and few output channels (to-RGB layers) the styles
    can hold more entries than the kernel, so "the smaller operand is a scale" would depend on the
    batch size. The kernel keeps its identity when the product's shape equals its own in every
    dimension but a leading one where it has size 1; a gain ``(C_out, 1, 1, 1)`` or a bias does not.
    """
    if shape is None:
        return False
    own = shape(value)
    maybe = [shape(v) for _, v in slots if not isinstance(v, (bool, int, float, complex))]
    shapes = [s for s in maybe if s is not None]
    if own is None or len(shapes) != len(maybe):
        return False
    try:
        out = tuple(torch.broadcast_shapes(*[torch.Size(s) for s in shapes]))
    except (RuntimeError, TypeError, ValueError):
        return False
    own = tuple(own)
    return len(own) == len(out) >= 2 and own[0] == 1 and out[0] != 1 and own[1:] == out[1:]


# --------------------------------------------------------------------------------------------
# Module-level knowledge (fx leaves)
# --------------------------------------------------------------------------------------------

MODULE_KERNELS: dict[type, str] = {
    nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d",
    nn.ConvTranspose1d: "conv_transpose1d", nn.ConvTranspose2d: "conv_transpose2d",
    nn.ConvTranspose3d: "conv_transpose3d", nn.Linear: "linear", nn.Bilinear: "bilinear",
    nn.modules.linear.NonDynamicallyQuantizableLinear: "linear",
}
MODULE_REASONS: dict[type, str] = {
    nn.Embedding: "embedding table", nn.EmbeddingBag: "embedding table",
    nn.PReLU: "activation parameter",
}


def base_type(module: nn.Module) -> type:
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]
    return cls


def kernel_weight_of(module: nn.Module) -> tuple[str, tuple[str, ...]] | None:
    """The local name of the parameter behind ``module.weight`` and the transforms in between."""
    if parametrize.is_parametrized(module, "weight"):
        # a ParametrizationList (a ModuleList) under module.parametrizations, by is_parametrized
        plist = cast(nn.ModuleList, cast(nn.ModuleDict, module.parametrizations)["weight"])
        if "original" in plist._parameters:
            names = tuple(type(p).__name__.lstrip("_").lower() for p in plist)
            return "parametrizations.weight.original", names
        return None
    if "weight_orig" in module._parameters and "weight" not in module._parameters:
        hooks = [type(h).__name__ for h in module._forward_pre_hooks.values()]
        label = "spectral_norm" if "SpectralNorm" in hooks else "weight hook"
        return "weight_orig", (label,)
    if module._parameters.get("weight") is not None:
        return "weight", ()
    return None


def is_norm_module(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                               nn.LocalResponseNorm)) or type(module).__name__.endswith("Norm")


def rnn_op(module: nn.Module) -> str | None:
    """The functional op of a recurrent module (``"lstm"``, ``"gru"``, ``"rnn_tanh"``, ``"rnn_relu"``)."""
    if not isinstance(module, nn.RNNBase):
        return None
    mode = module.mode.lower()
    return mode if mode in RNN_OPS else None


def rnn_weights(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The matmul operands of a recurrent module: ``weight_ih_l*`` / ``weight_hh_l*`` (2-D)."""
    if rnn_op(module) is None:
        return []
    return [(n, p) for n, p in module._parameters.items()
            if p is not None and n.startswith("weight_") and p.dim() == 2]


def module_kernels(module: nn.Module) -> dict[int, tuple[str, tuple[str, ...]]]:
    """``id(param) -> (op, via)`` for the weights of every conv/linear/RNN module, by module type."""
    found: dict[int, tuple[str, tuple[str, ...]]] = {}
    for sub in module.modules():
        op = rnn_op(sub)
        if op is not None:
            for _, param in rnn_weights(sub):
                found[id(param)] = (op, ())
        kernel = MODULE_KERNELS.get(base_type(sub))
        weight = kernel_weight_of(sub) if kernel is not None else None
        if kernel is not None and weight is not None:
            found[id(sub.get_parameter(weight[0]))] = (kernel, weight[1])
    return found



def kernel_macs(op: str, args: Sequence[Any], kwargs: Mapping[str, Any], out: Any, transposed: bool) -> int | None:
    """Dense multiply-accumulates of one kernel call, from its actual tensors."""
    family = _kernel_family(op)
    if family is None or not isinstance(out, torch.Tensor):
        return None
    tensors = [v for _, v in flat_slots(args, kwargs) if isinstance(v, torch.Tensor)]
    if family == "conv":
        if len(tensors) < 2:
            return None
        x, w = tensors[0], tensors[1]
        if transposed or op.startswith("conv_transpose"):
            return x.numel() * w.shape[1] * math.prod(w.shape[2:])
        return out.numel() * w.shape[1] * math.prod(w.shape[2:])
    if op == "linear":
        return out.numel() * tensors[1].shape[-1] if len(tensors) >= 2 else None
    if op == "bilinear":
        return out.numel() * tensors[2].shape[1] * tensors[2].shape[2] if len(tensors) >= 3 else None
    if op in ("matmul", "mm", "bmm", "addmm", "baddbmm", "addbmm"):
        a = tensors[1] if op in _ADD_FIRST else tensors[0]
        return out.numel() * (a.shape[-1] if a.dim() else 1)
    return None
