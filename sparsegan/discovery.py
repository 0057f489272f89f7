"""Find which parameters of an arbitrary module are weights of conv/linear-like ops.

Discovery follows each parameter through the model's dataflow (elementwise scaling, reshapes,
modulation, spectral normalisation) until it reaches an op. A parameter is a *kernel weight* when
it reaches the weight operand of a convolution (1-3d, transposed), a linear / bilinear layer, or an
operand of a matrix product (``matmul``/``mm``/``bmm``/``einsum``). What gets masked is always the
*parameter* (``weight_orig`` under legacy spectral norm, ``parametrizations.weight.original`` under
parametrizations, the un-modulated kernel of a modulated conv), never the derived per-call tensor.

Three ways to see the dataflow are tried in order (the *cascade*):

1. ``"fx"``: :func:`torch.fx` symbolic tracing, with conv/linear modules and hooked modules as
   leaves. Needs no example input. When an example input is given, the traced graph is run and
   compared with the eager model before it is trusted.
2. ``"export"``: the graph of :func:`torch.export.export` (non-strict). Needs an example input;
   works on models fx cannot trace (data-dependent Python, iteration over shapes).
3. ``"runtime"``: a record of one eager forward under a :class:`~torch.overrides.TorchFunctionMode`,
   following tensor identities. Needs an example input; works on anything that runs.

Every parameter ends up either in :attr:`DiscoveryResult.weights` (with the op, the method that
found it and the chain of ops in between) or in :attr:`DiscoveryResult.skipped` with the reason.
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import io
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from sparsegan._utils import (
    as_args,
    first_batch_size,
    format_table,
    named_parameters_with_aliases,
    outputs_match,
    preserved_state,
    unwrap_model,
)
from sparsegan.dataflow import (
    BANK_REDUCTIONS,
    BINARY_PASS,
    MATMUL_LIKE,
    MODULE_KERNELS,
    MODULE_REASONS,
    RNN_OPS,
    SIZE_PRESERVING,
    Flow,
    Use,
    bank_dims,
    base_type,
    flat_slots,
    is_norm_module,
    kernel_macs,
    kernel_weight_of,
    module_kernels,
    op_name,
    propagate,
    rnn_op,
    rnn_weights,
)

__all__ = [
    "WeightRecord",
    "SkippedParameter",
    "DiscoveryResult",
    "DiscoveryError",
    "ParameterFilter",
    "discover",
    "METHODS",
]

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("fx", "export", "runtime")
"""The discovery methods, in the order the cascade tries them."""

ParameterFilter = str | Sequence[str] | Callable[[str, torch.Tensor], bool]
"""A glob pattern, a list of glob patterns, or a callable ``(name, parameter) -> bool``."""


class DiscoveryError(RuntimeError):
    """Raised when no discovery method could analyse a model."""


@dataclass(frozen=True)
class WeightRecord:
    """One parameter found to be the weight of a conv/linear-like op.

    Attributes:
        name: The parameter's name in ``module.named_parameters()`` (the canonical name).
        shape: The parameter's shape.
        op: The op it feeds: ``"conv2d"``, ``"conv_transpose2d"``, ``"linear"``, ``"matmul"``, ...
        method: How it was found: ``"fx"``, ``"export"`` or ``"runtime"``.
        via: The ops between the parameter and the kernel op (e.g. ``("mul", "reshape")``, or
            ``("spectral_norm",)``); empty when the parameter is used directly.
        aliases: Other names of the same parameter object (tied weights); they share one mask.
        macs_per_sample: Dense multiply-accumulates of this weight's op(s) per input sample in
            one forward pass, when an example input was available; otherwise ``None``.
        uses: How many kernel ops use the weight in one forward pass (when known).
        shared_dims: For a *kernel bank* (a parameter ``(N, *kernel)`` whose N kernels are mixed
            per sample by a weighted sum over the bank axis before the conv), the parameter axes
            the sum runs over: its mask is one kernel mask shared along them (see
            ``docs/discovery.md``). Empty for every other weight.
    """

    name: str
    shape: tuple[int, ...]
    op: str
    method: str
    via: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    macs_per_sample: int | None = None
    uses: int = 1
    shared_dims: tuple[int, ...] = ()

    @property
    def numel(self) -> int:
        """Number of entries of the parameter."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class SkippedParameter:
    """A parameter that will not be masked, and why.

    Attributes:
        name: The parameter's canonical name.
        shape: The parameter's shape.
        reason: A short human-readable reason, e.g. ``"bias of conv2d"``.
    """

    name: str
    shape: tuple[int, ...]
    reason: str


@dataclass
class DiscoveryResult:
    """What discovery found in one module.

    Attributes:
        weights: The kernel weights to mask, in ``named_parameters()`` order.
        skipped: Every other parameter, with the reason it is not masked.
        method: The method whose result was used (``"fx"``, ``"export"`` or ``"runtime"``).
        notes: What happened along the cascade (methods that failed and why, verification).
        model_name: The class name of the analysed module.
        unmasked: Kernel weights discovery found but ``include=`` / ``exclude=`` keep dense (also
            listed in ``skipped``); the FLOPs ledger counts them as dense layers.
    """

    weights: list[WeightRecord]
    skipped: list[SkippedParameter]
    method: str
    notes: list[str] = field(default_factory=list)
    model_name: str = ""
    unmasked: list[WeightRecord] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        """Canonical names of the discovered weights."""
        return [w.name for w in self.weights]

    def __len__(self) -> int:
        return len(self.weights)

    def __getitem__(self, name: str) -> WeightRecord:
        for record in self.weights:
            if record.name == name or name in record.aliases:
                return record
        raise KeyError(name)

    def report(self) -> str:
        """A plain-text table of the weights found and the parameters skipped."""
        lines = [f"{self.model_name or 'model'}: {len(self.weights)} kernel weights found by {self.method}"]
        if self.weights:
            rows = [("name", "shape", "op", "found by", "via")]
            for w in self.weights:
                name = w.name + (f" (= {', '.join(w.aliases)})" if w.aliases else "")
                rows.append((name, "x".join(map(str, w.shape)), w.op, w.method, " > ".join(w.via) or "-"))
            lines += format_table(rows)
        return "\n".join(lines + self.skipped_lines())

    def skipped_lines(self) -> list[str]:
        """Report lines for the skipped parameters and the discovery notes."""
        lines = []
        if self.skipped:
            lines.append(f"not masked ({len(self.skipped)} parameters):")
            lines += ["  " + row for row in format_table([("name", "shape", "reason")] + [
                (s.name, "x".join(map(str, s.shape)) or "scalar", s.reason) for s in self.skipped
            ])]
        return lines + [f"note: {note}" for note in self.notes]

    def __str__(self) -> str:
        return self.report()


class _LeafTracer(fx.Tracer):
    """fx tracer that keeps kernel modules and hooked modules opaque (their hooks must run)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if base_type(m) in MODULE_KERNELS or isinstance(m, nn.MultiheadAttention):
            return True
        if module_qualified_name and (m._forward_pre_hooks or m._forward_hooks):
            return True
        return super().is_leaf_module(m, module_qualified_name)


# --------------------------------------------------------------------------------------------
# The three methods
# --------------------------------------------------------------------------------------------


def _fx_flow(module: nn.Module, concrete_args: dict[str, Any] | None
             ) -> tuple[Flow, fx.GraphModule, list[str], list[str]]:
    """The fx graph's dataflow, the traced module, the parameters hidden in opaque modules, and
    the parameters that reach a sum over a named axis (a kernel bank needs shapes to follow)."""
    tracer = _LeafTracer()
    graph = tracer.trace(module, concrete_args=concrete_args)
    gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
    flow = Flow()
    hidden: list[str] = []
    values: dict[str, list[tuple[int, tuple[str, ...]]]] = {}
    shapes: dict[str, int] = {}
    reduced: list[str] = []
    names = {id(p): n for n, p in module.named_parameters()}
    dims = {id(p): p.dim() for p in module.parameters()}

    def tracked(value: Any) -> list[tuple[int, tuple[str, ...]]]:
        return values.get(value.name, []) if isinstance(value, fx.Node) else []

    def numel(value: Any) -> int | None:
        if isinstance(value, fx.Node):
            return shapes.get(value.name)
        return 1 if isinstance(value, (int, float)) else None

    for node in graph.nodes:
        if node.op == "get_attr":
            try:
                obj = module.get_parameter(node.target)
            except AttributeError:
                continue
            values[node.name] = [(id(obj), ())]
            shapes[node.name] = obj.numel()
        elif node.op in ("call_function", "call_method"):
            op = op_name(node.target)
            slots = flat_slots(node.args, node.kwargs)
            out = propagate(flow, op, slots, tracked, numel, lambda v: None)
            if out:
                values[node.name] = out
            if op in BANK_REDUCTIONS and any(isinstance(v, int) and s in (1, "dim", "axis") for s, v in slots):
                first = next((v for s, v in slots if s in (0, "input", "self")), None)
                reduced += [names[pid] for pid, _ in tracked(first) if dims.get(pid, 0) >= 3 and pid in names]
            # Without shapes, carry parameter sizes through size-preserving ops so that a small
            # learned gain can still be told from the kernel it scales.
            sizes = [numel(v) for _, v in slots if isinstance(v, fx.Node)]
            if op in BINARY_PASS and any(s is not None for s in sizes):
                shapes[node.name] = max(s for s in sizes if s is not None)
            elif op in SIZE_PRESERVING and sizes and sizes[0] is not None:
                shapes[node.name] = sizes[0]
        elif node.op == "call_module":
            sub = module.get_submodule(node.target)
            for _slot, value in flat_slots(node.args, node.kwargs):
                for pid, _via in tracked(value):
                    flow.consumed(pid, f"input of module {node.target} ({type(sub).__name__})")
            _leaf_params(flow, sub, node.target, hidden)
    return flow, gm, hidden, reduced


def _leaf_params(flow: Flow, sub: nn.Module, path: str, hidden: list[str]) -> None:
    """Record what an opaque (leaf) module does with its own parameters."""
    prefix = path + "." if path else ""
    kernel = MODULE_KERNELS.get(base_type(sub))
    used: set[int] = set()
    if isinstance(sub, nn.MultiheadAttention):
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
            p = sub._parameters.get(name)
            if p is not None:
                flow.use(id(p), "linear", ())
                used.add(id(p))
        flow.use(id(sub.out_proj.weight), "linear", ())
        used.add(id(sub.out_proj.weight))
    elif rnn_op(sub) is not None:
        for _, param in rnn_weights(sub):
            flow.use(id(param), rnn_op(sub) or "", ())
            used.add(id(param))
    elif kernel is not None:
        found = kernel_weight_of(sub)
        if found is not None:
            param = sub.get_parameter(found[0])
            flow.use(id(param), kernel, found[1])
            used.add(id(param))
    for name, param in sub.named_parameters():
        if id(param) in used:
            continue
        if type(sub) in MODULE_REASONS:
            reason = MODULE_REASONS[type(sub)]
        elif is_norm_module(sub):
            reason = "normalization affine parameter"
        elif name.split(".")[-1].startswith("bias"):
            reason = f"bias of {kernel or rnn_op(sub) or type(sub).__name__}"
        elif kernel is not None:
            reason = f"extra parameter of {type(sub).__name__}"
        else:
            reason = f"inside module {path} ({type(sub).__name__}) that tracing does not look into"
            hidden.append(prefix + name)
        flow.consumed(id(param), reason)


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Silence torch's own logging and warnings while an attempt that may fail runs."""
    loggers = [logging.getLogger(n) for n in ("torch._subclasses.fake_tensor", "torch.fx.experimental.symbolic_shapes", "torch.export", "torch._export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_flow(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Flow:
    with _quiet_torch():
        exported = torch.export.export(module, args, kwargs=kwargs or None, strict=False)
    sig = exported.graph_signature
    flow = Flow()
    values: dict[str, list[tuple[int, tuple[str, ...]]]] = {}
    shapes: dict[int, tuple[int, ...]] = {}
    for placeholder, fqn in sig.inputs_to_parameters.items():
        param = module.get_parameter(fqn)
        values[placeholder] = [(id(param), ())]
        shapes[id(param)] = tuple(param.shape)

    def tracked(value: Any) -> list[tuple[int, tuple[str, ...]]]:
        return values.get(value.name, []) if isinstance(value, fx.Node) else []

    def meta_shape(value: Any) -> torch.Size | None:
        val = value.meta.get("val") if isinstance(value, fx.Node) else None
        return val.shape if isinstance(val, torch.Tensor) else None

    def numel(value: Any) -> int | None:
        if isinstance(value, fx.Node):
            shape = meta_shape(value)
            return math.prod(shape) if shape is not None else None
        return 1 if isinstance(value, (int, float)) else None

    def weight_ndim(value: Any) -> int | None:
        shape = meta_shape(value)
        return len(shape) if shape is not None else None

    for node in exported.graph.nodes:
        if node.op != "call_function":
            continue
        op = op_name(node.target)
        transposed = op == "convolution" and len(node.args) > 6 and bool(node.args[6])
        out = propagate(flow, op, flat_slots(node.args, node.kwargs), tracked, numel, weight_ndim, transposed,
                        shape=meta_shape, param_shape=shapes.get)
        if out:
            values[node.name] = out
    return flow


class _RuntimeRecorder(TorchFunctionMode):
    """Follows parameters through one eager forward by tensor identity; counts kernel MACs."""

    def __init__(self, params: Mapping[int, torch.Tensor]) -> None:
        super().__init__()
        self.flow = Flow()
        self.values: dict[int, list[tuple[int, tuple[str, ...]]]] = {pid: [(pid, ())] for pid in params}
        self.shapes: dict[int, tuple[int, ...]] = {pid: tuple(p.shape) for pid, p in params.items()}
        self.keepalive: list[torch.Tensor] = []

    def _tracked(self, value: Any) -> list[tuple[int, tuple[str, ...]]]:
        return self.values.get(id(value), []) if isinstance(value, torch.Tensor) else []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not torch.is_grad_enabled():
            return out  # e.g. a spectral-norm power iteration: not a trained use of the weight
        op = op_name(func)
        slots = flat_slots(args, kwargs)
        if not any(self._tracked(v) for _, v in slots):
            return out
        transposed = op == "convolution" and len(args) > 6 and bool(args[6])

        def numel(v: Any) -> int | None:
            if isinstance(v, torch.Tensor):
                return v.numel()
            return 1 if isinstance(v, (int, float)) else None

        def weight_ndim(v: Any) -> int | None:
            return v.dim() if isinstance(v, torch.Tensor) else None

        before = {pid: len(u) for pid, u in self.flow.uses.items()}
        carried = propagate(self.flow, op, slots, self._tracked, numel, weight_ndim, transposed,
                            shape=lambda v: tuple(v.shape) if isinstance(v, torch.Tensor) else None,
                            param_shape=self.shapes.get)
        cost = kernel_macs(op, args, kwargs, out, transposed)
        per_weight = _rnn_macs(op, slots, self._tracked) if op in RNN_OPS else {}
        for pid, uses in self.flow.uses.items():
            for use in uses[before.get(pid, 0):]:
                use.macs = per_weight.get(pid, cost)
        if carried:
            for leaf in pytree.tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    self.values[id(leaf)] = carried
                    self.keepalive.append(leaf)
        return out


def _rnn_macs(op: str, slots: list[tuple[int | str, Any]],
              tracked: Callable[[Any], list[tuple[int, tuple[str, ...]]]]) -> dict[int, int]:
    """MACs of each weight of one recurrent call: its size times the time steps of the batch.

    Each weight multiplies one vector per time step and sample (every layer and direction
    runs over the whole sequence), so its MACs are ``numel * T * B``; slot 0 is the padded input
    ``(T, B, F)`` / ``(B, T, F)`` or a packed sequence's data ``(sum of lengths, F)``.
    """
    data = next((v for s, v in slots if s == 0 and isinstance(v, torch.Tensor)), None)
    if data is None or data.dim() < 2:
        return {}
    steps = data.shape[0] * data.shape[1] if data.dim() == 3 else data.shape[0]
    return {pid: value.numel() * steps for slot, value in slots if slot != 0 and isinstance(value, torch.Tensor)
            and value.dim() == 2 for pid, _ in tracked(value)}


# --------------------------------------------------------------------------------------------
# The cascade
# --------------------------------------------------------------------------------------------


def _default_concrete_args(module: nn.Module, n_args: int, kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
    """Bind optional ``forward`` arguments that the example does not pass to their defaults."""
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None
    concrete: dict[str, Any] = {}
    positional = [p for p in sig.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for i, p in enumerate(positional):
        if i < n_args or p.name in kwargs or p.default is inspect.Parameter.empty:
            continue
        if p.default is None or isinstance(p.default, (bool, int, float, str)):
            concrete[p.name] = p.default
    return concrete or None


def _matches(name: str, param: torch.Tensor, spec: ParameterFilter) -> bool:
    if callable(spec):
        return bool(spec(name, param))
    patterns = [spec] if isinstance(spec, str) else list(spec)
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def discover(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    include: ParameterFilter | None = None,
    exclude: ParameterFilter | None = None,
    methods: Iterable[str] = METHODS,
    other_models: Mapping[str, nn.Module] | None = None,
) -> DiscoveryResult:
    """Find the kernel weights of ``model``.

    Args:
        model: Any ``nn.Module`` (DDP / ``torch.compile`` wrappers are looked through).
        example_inputs: Positional arguments for one forward call (a tensor or a tuple). Needed
            by the ``"export"`` and ``"runtime"`` methods, and to verify an fx trace and count
            MACs. Use a small batch (2 is enough).
        example_kwargs: Keyword arguments for that forward call.
        include: Only mask discovered weights whose name matches (glob pattern(s) or a callable
            ``(name, param) -> bool``).
        exclude: Never mask weights whose name matches.
        methods: The cascade to try, in order; a subset of ``("fx", "export", "runtime")``.
        other_models: Models whose parameters are never masked here, by a label (e.g.
            ``{"discriminator": D}`` for a G that keeps D as a submodule): they are skipped with
            the reason ``"a parameter of the discriminator"``, since that model's own masks
            cover them.

    Returns:
        A :class:`DiscoveryResult`; nothing about the model or the global RNG is changed.

    Raises:
        DiscoveryError: If no method could analyse the model (the message says what each
            method reported and how to fix it, typically by passing an example input).
        ValueError: If ``methods`` names an unknown method.
    """
    module = unwrap_model(model)
    methods = tuple(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown discovery method(s) {unknown}; choose from {list(METHODS)}")
    args = as_args(example_inputs)
    kwargs = dict(example_kwargs or {})
    have_example = example_inputs is not None or bool(kwargs)
    aliases = named_parameters_with_aliases(module)
    params = {id(p): p for p in module.parameters()}
    notes: list[str] = []

    reference: dict[str, Any] = {}

    def run_reference() -> dict[str, Any]:
        if not reference:
            recorder = _RuntimeRecorder(params)
            with preserved_state(module):
                module.eval()
                # Grad mode on, even when discover() is called under no_grad: the recorder tells
                # a trained use of a weight from a no-grad side computation (e.g. a spectral-norm
                # power iteration) by the grad mode of the op.
                with torch.enable_grad(), recorder:
                    output = module(*args, **kwargs)
            reference.update(flow=recorder.flow, output=output)
        return reference

    chosen: tuple[str, Flow] | None = None
    for method in methods:
        try:
            if method == "fx":
                concrete = _default_concrete_args(module, len(args), kwargs)
                with preserved_state(module):
                    flow, gm, hidden, reduced = _fx_flow(module, concrete)
                if have_example:
                    ref = run_reference()
                    with preserved_state(module):
                        module.eval()
                        gm.eval()
                        with torch.no_grad():
                            traced_out = gm(*args, **kwargs)
                    if not outputs_match(traced_out, ref["output"]):
                        notes.append("fx: the traced graph's output differs from the eager model's; not trusted")
                        continue
                    notes.append("fx: traced graph verified against eager on the example input")
                else:
                    notes.append("fx: traced without an example input, so the graph was not verified against eager")
                if hidden and any(m != "fx" for m in methods) and have_example:
                    notes.append(f"fx: {len(hidden)} parameters sit inside modules tracing does not enter; trying the next method")
                    continue
                if reduced and any(m != "fx" for m in methods) and have_example:
                    notes.append(f"fx: {', '.join(sorted(set(reduced)))} reach a sum over a named axis (a kernel bank?), "
                                 "which needs the shapes fx does not have; trying the next method")
                    continue
            elif not have_example:
                notes.append(f"{method}: needs an example input, none given")
                continue
            elif method == "export":
                with preserved_state(module):
                    flow = _export_flow(module, args, kwargs)
            else:
                flow = run_reference()["flow"]
        except Exception as exc:  # noqa: BLE001 - every failure is reported, then the next method runs
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            notes.append(f"{method}: {type(exc).__name__}: {message[:300]}")
            logger.debug("discovery method %s failed on %s", method, type(module).__name__, exc_info=True)
            continue
        chosen = (method, flow)
        break

    if chosen is None:
        hint = ("" if have_example else
                " Pass an example input (example_inputs=...) so that torch.export or the runtime "
                "record can analyse the model.")
        raise DiscoveryError(
            f"could not find the weights of {type(module).__name__}: "
            + "; ".join(notes) + "." + hint
        )

    method, flow = chosen
    macs_flow = run_reference()["flow"] if have_example else None
    weights, skipped = _records(module, aliases, params, flow, method, macs_flow,
                                first_batch_size(args) if have_example else 1)
    found = weights
    weights, skipped = _apply_filters(weights, skipped, params, aliases, include, exclude)
    kept_names = {w.name for w in weights}
    unmasked = [w for w in found if w.name not in kept_names]
    if other_models:
        owner = {id(p): label for label, other in other_models.items() for p in unwrap_model(other).parameters()}
        by_name = {names[0]: pid for pid, names in aliases.items()}
        skipped += [SkippedParameter(w.name, w.shape, f"a parameter of the {owner[by_name[w.name]]}")
                    for w in weights if by_name[w.name] in owner]
        weights = [w for w in weights if by_name[w.name] not in owner]
    _warn_unreached(type(module).__name__, weights)
    result = DiscoveryResult(weights, skipped, method, notes, type(module).__name__, unmasked)
    logger.info("discovered %d kernel weights in %s with %s", len(weights), result.model_name, method)
    return result


def _records(
    module: nn.Module,
    aliases: Mapping[int, list[str]],
    params: Mapping[int, torch.Tensor],
    flow: Flow,
    method: str,
    macs_flow: Flow | None,
    batch: int,
) -> tuple[list[WeightRecord], list[SkippedParameter]]:
    weights: list[WeightRecord] = []
    skipped: list[SkippedParameter] = []
    by_module_type = module_kernels(module)
    for pid, names in aliases.items():
        param = params[pid]
        shape = tuple(param.shape)
        uses = flow.uses.get(pid, [])
        # A conv/linear use outranks a matmul use (e.g. a spectral-norm power iteration).
        primary = [u for u in uses if not _is_matmul_label(u.op)] or uses
        unreached = not primary and pid in by_module_type
        if unreached:
            # The rule, the same for every method: the weight of a conv/linear module that the
            # analysed forward does not reach (another resolution's layer, a head used in another
            # mode, a data-dependent branch) is masked by its module type.
            op, via = by_module_type[pid]
            primary = [Use(op, via)]
            method_used = f"{method}+module type"
        else:
            method_used = method
        if not primary:
            skipped.append(SkippedParameter(names[0], shape, flow.reasons.get(pid, ["not used in the forward pass"])[0]))
            continue
        if "embedding table" in flow.reasons.get(pid, ()) and all(_is_matmul_label(u.op) for u in primary):
            # e.g. mimicry's SNEmbedding: the table's only products are its spectral-norm estimate
            skipped.append(SkippedParameter(names[0], shape, f"embedding table (also used by {primary[0].op})"))
            continue
        if param.dim() < 2:
            skipped.append(SkippedParameter(names[0], shape, f"{param.dim()}-D parameter used by {primary[0].op}"))
            continue
        macs: int | None = None
        if macs_flow is not None and unreached and not macs_flow.uses.get(pid):
            macs = 0  # the example forward does not run it: it costs nothing there
        elif macs_flow is not None:
            rt_uses = [u for u in macs_flow.uses.get(pid, []) if _is_matmul_label(u.op) == _is_matmul_label(primary[0].op)]
            known = [u.macs for u in rt_uses if u.macs is not None]
            if rt_uses and len(known) == len(rt_uses):
                macs = sum(known) // max(batch, 1)
        banks = {bank_dims(u.via) for u in primary}
        # one shared mask only when every kernel use mixes the bank over the same axes; a bank
        # also used kernel by kernel gets an ordinary mask (exact, though its FLOPs then drop less)
        shared = banks.pop() if len(banks) == 1 else ()
        weights.append(WeightRecord(
            name=names[0], shape=shape, op=primary[0].op, method=method_used, via=primary[0].via,
            aliases=tuple(names[1:]), macs_per_sample=macs, uses=len(primary), shared_dims=shared,
        ))
    return weights, skipped


def _warn_unreached(model_name: str, weights: Sequence[WeightRecord]) -> None:
    """Name the weights masked by module type alone (the forward did not reach them)."""
    unreached = [w.name for w in weights if w.method.endswith("+module type")]
    if unreached:
        logger.warning(
            "%s: %d weight(s) of conv/linear modules are not reached by the forward on the example input and are "
            "masked by module type (they may run in another mode or at another resolution): %s. Pass exclude= to "
            "keep them dense.", model_name, len(unreached), ", ".join(unreached[:8])
            + (", ..." if len(unreached) > 8 else ""))


def _is_matmul_label(op: str) -> bool:
    return op in MATMUL_LIKE


def _apply_filters(
    weights: list[WeightRecord],
    skipped: list[SkippedParameter],
    params: Mapping[int, torch.Tensor],
    aliases: Mapping[int, list[str]],
    include: ParameterFilter | None,
    exclude: ParameterFilter | None,
) -> tuple[list[WeightRecord], list[SkippedParameter]]:
    if include is None and exclude is None:
        return weights, skipped
    by_name = {names[0]: params[pid] for pid, names in aliases.items()}
    kept: list[WeightRecord] = []
    for record in weights:
        names = (record.name,) + record.aliases
        param = by_name[record.name]
        if include is not None and not any(_matches(n, param, include) for n in names):
            skipped.append(SkippedParameter(record.name, record.shape, "not matched by include="))
        elif exclude is not None and any(_matches(n, param, exclude) for n in names):
            skipped.append(SkippedParameter(record.name, record.shape, "excluded by exclude="))
        else:
            kept.append(record)
    if include is not None:
        named = [s for s in skipped if s.name in by_name and by_name[s.name].dim() >= 2
                 and s.reason != "not matched by include=" and _matches(s.name, by_name[s.name], include)]
        if named:
            listed = "; ".join(f"{s.name!r} ({s.reason})" for s in named[:6])
            raise DiscoveryError(
                f"include= names {len(named)} parameter(s) that discovery did not find as kernel weights: {listed}. "
                "sparsegan masks only weights it can follow into a conv, linear, matmul or RNN op, which fixes the "
                "mask's geometry and the FLOPs it saves; it cannot mask these. Let the weight reach such an op "
                "(an nn module, or F.conv2d / F.linear / a matmul on the parameter), or leave it out of include="
            )
    if include is not None and not callable(include):
        patterns = [include] if isinstance(include, str) else list(include)
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for r in weights for n in (r.name,) + r.aliases):
                logger.warning("include pattern %r matches no discovered kernel weight", pattern)
    return kept, skipped
