"""Small shared helpers: unwrapping wrapped modules, snapshotting state, comparing outputs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = [
    "unwrap_model",
    "preserved_state",
    "outputs_match",
    "as_args",
    "first_batch_size",
    "named_parameters_with_aliases",
    "format_table",
    "unwrap_optimizer",
]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the user's module inside DDP / DataParallel / ``torch.compile`` wrappers.

    Args:
        model: A module, possibly wrapped (``DistributedDataParallel``, ``DataParallel``,
            ``torch.compile``'s ``OptimizedModule``), possibly several times.

    Returns:
        The innermost module whose parameters the user's optimizer holds.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            break
    return model


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside framework wrappers (Lightning's ``LightningOptimizer``,
    Accelerate's ``AcceleratedOptimizer``), whose ``step`` the wrapper's hooks must follow."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
            optimizer = inner
        else:
            break
    return optimizer


def named_parameters_with_aliases(module: nn.Module) -> dict[int, list[str]]:
    """Map ``id(parameter)`` to every name it has in ``module`` (tied weights have several).

    The first name is the canonical one: the one ``module.named_parameters()`` reports.
    """
    names: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


@contextlib.contextmanager
def preserved_state(*modules: nn.Module) -> Iterator[None]:
    """Run a block with no lasting effect on ``modules`` or on the global RNG.

    Restores, on exit: every buffer's value (BatchNorm running statistics, spectral-norm ``u``/``v``,
    counters), plain tensor attributes set by forward hooks (legacy spectral norm's ``weight``),
    each submodule's ``training`` flag, and the CPU and CUDA random number generator states.
    Parameters are not copied: the block must not modify them.
    """
    buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
    attrs: list[tuple[nn.Module, str, Any]] = []
    flags: list[tuple[nn.Module, bool]] = []
    for module in modules:
        for buf in module.buffers():
            buffers.append((buf, buf.detach().clone()))
        for sub in module.modules():
            flags.append((sub, sub.training))
            for key, value in list(vars(sub).items()):
                if isinstance(value, torch.Tensor) and not key.startswith("_"):
                    attrs.append((sub, key, value))
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, saved in buffers:
                if buf.shape == saved.shape:
                    buf.copy_(saved)
        for sub, key, value in attrs:
            vars(sub)[key] = value
        for sub, flag in flags:
            sub.training = flag
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def module_device(module: nn.Module, device: torch.device | str | None = None) -> torch.device:
    """``device`` if given, else the device of the module's first parameter (CPU if it has none)."""
    if device is not None:
        return torch.device(device)
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def module_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of the module's first floating-point parameter (``None`` if it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def to_module(value: Any, module: nn.Module) -> Any:
    """Move every tensor in ``value`` (a tensor or a nested tuple/list/dict) to ``module``'s device.

    Floating-point tensors also take the dtype of the module's floating-point parameters, so a
    ``latent=lambda n: torch.randn(n, 128)`` (CPU, float32) feeds a CUDA or bfloat16 model
    unchanged. Integer and bool tensors (labels, masks) keep their dtype; non-tensors pass
    through; tensors already in place are returned as they are (no copy).

    Args:
        value: What a ``latent=`` / ``real=`` callable or a loader returned.
        module: The module that consumes it.

    Returns:
        ``value`` with its tensors on the module's device (and floating dtype).
    """
    device, dtype = module_device(module), module_dtype(module)

    def move(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        cast = dtype if dtype is not None and leaf.is_floating_point() and leaf.dtype != dtype else None
        if leaf.device == device and cast is None:
            return leaf
        return leaf.to(device=device, dtype=cast, non_blocking=True)

    return pytree.tree_map(move, value)


@contextlib.contextmanager
def isolated_rng(seed: int | None = None) -> Iterator[None]:
    """Run a block without touching the global RNG streams (CPU and every initialised CUDA device).

    Args:
        seed: If given, the block runs with the global RNG seeded to this value.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def as_args(example_inputs: Any) -> tuple[Any, ...]:
    """Normalise an example input to a tuple of positional arguments.

    A tensor becomes a one-tuple; a list or tuple is taken as the positional arguments.
    """
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


def outputs_match(a: Any, b: Any, *, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    """Whether two (nested) module outputs have the same structure and close tensor values."""
    leaves_a, spec_a = pytree.tree_flatten(a)
    leaves_b, spec_b = pytree.tree_flatten(b)
    if spec_a != spec_b or len(leaves_a) != len(leaves_b):
        return False
    for x, y in zip(leaves_a, leaves_b):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape:
                return False
            if x.is_floating_point() or x.is_complex():
                if not torch.allclose(x.detach(), y.detach(), rtol=rtol, atol=atol, equal_nan=True):
                    return False
            elif not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def first_batch_size(args: Sequence[Any]) -> int:
    """The leading dimension of the first tensor in ``args`` (1 if there is none)."""
    for leaf in pytree.tree_leaves(list(args)):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return 1


def format_table(rows: Sequence[Sequence[object]]) -> list[str]:
    """Left-aligned plain-text columns, one string per row (the first row is the header)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
