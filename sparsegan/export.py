"""Saving sparse weights compactly: only the active values plus a 1-bit-per-weight mask.

A file written by :func:`save_sparse` holds, for each masked tensor, its active values and its
mask packed 8 positions per byte; every other entry of the state dict (biases, norms, buffers,
dense weights) is stored as is. For a network at density *d* the masked weights take about
``d + 1/32`` of their dense size (float32). :func:`load_sparse` rebuilds the exact state dict.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from sparsegan._utils import unwrap_model

__all__ = ["save_sparse", "load_sparse", "pack_bits", "unpack_bits"]

logger = logging.getLogger(__name__)

FORMAT = "sparsegan-sparse/1"
_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor into ``ceil(numel / 8)`` bytes (most significant bit first)."""
    flat = mask.detach().reshape(-1).to("cpu", torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_bits` for a tensor of ``shape``."""
    bits = (packed.reshape(-1, 1) & _WEIGHTS).ne(0).reshape(-1)
    numel = 1
    for size in shape:
        numel *= size
    return bits[:numel].reshape(shape)


def save_sparse(module: nn.Module, path: str | os.PathLike[str],
                masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Save ``module.state_dict()`` storing masked weights as active values plus packed masks.

    Args:
        module: The (possibly DDP-wrapped) module.
        path: Output file (written with :func:`torch.save`).
        masks: Parameter name -> bool mask, e.g. ``sg.masks("generator")``. When omitted, every
            floating tensor of 2 or more dimensions with at most half its entries non-zero is
            stored sparsely, with its non-zero entries as the mask.

    Returns:
        ``{"dense_bytes": ..., "sparse_bytes": ...}`` for the tensors stored sparsely.

    Raises:
        ValueError: If a mask names an unknown entry, has the wrong shape, or the weight is not
            zero where its mask is False (the mask would not round-trip).
    """
    state = unwrap_model(module).state_dict()
    chosen: dict[str, torch.Tensor] = {}
    if masks is not None:
        for name, mask in masks.items():
            if name not in state:
                raise ValueError(f"mask for {name!r}, which is not in the module's state dict")
            if tuple(mask.shape) != tuple(state[name].shape):
                raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, the tensor {tuple(state[name].shape)}")
            if torch.count_nonzero(state[name].detach()[~mask.to(state[name].device)]):
                raise ValueError(f"{name!r} is not zero where its mask is False; apply the masks first "
                                 "(sg.apply_masks() or sg.finalize())")
            chosen[name] = mask.to(torch.bool)
    else:
        for name, tensor in state.items():
            if tensor.is_floating_point() and tensor.dim() >= 2 and torch.count_nonzero(tensor) * 2 <= tensor.numel():
                chosen[name] = tensor != 0
    entries: dict[str, Any] = {}
    dense_bytes = sparse_bytes = 0
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        if name in chosen:
            mask = chosen[name].cpu()
            values = tensor[mask].clone()
            bits = pack_bits(mask)
            entries[name] = {"shape": tuple(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."),
                             "bits": bits, "values": values}
            dense_bytes += tensor.numel() * tensor.element_size()
            sparse_bytes += values.numel() * values.element_size() + bits.numel()
        else:
            entries[name] = tensor.clone()
    torch.save({"format": FORMAT, "entries": entries}, path)
    logger.info("saved %s: %d sparse tensors, %.1f%% of their dense size", path, len(chosen),
                100.0 * sparse_bytes / max(dense_bytes, 1))
    return {"dense_bytes": float(dense_bytes), "sparse_bytes": float(sparse_bytes)}


def load_sparse(path: str | os.PathLike[str], module: nn.Module | None = None,
                map_location: str | torch.device | None = "cpu") -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_sparse`; optionally load it into ``module``.

    Args:
        path: The file.
        module: If given, ``module.load_state_dict`` is called with the rebuilt state dict.
        map_location: Where to put the tensors.

    Returns:
        The rebuilt (dense) state dict.

    Raises:
        ValueError: If the file is not a sparsegan sparse checkpoint.
    """
    blob = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a sparsegan sparse checkpoint (written by sparsegan.save_sparse)")
    state: dict[str, torch.Tensor] = {}
    for name, entry in blob["entries"].items():
        if isinstance(entry, torch.Tensor):
            state[name] = entry
            continue
        shape = tuple(entry["shape"])
        mask = unpack_bits(entry["bits"], shape)
        dense = torch.zeros(shape, dtype=getattr(torch, entry["dtype"]))
        dense[mask] = entry["values"]
        state[name] = dense
    if module is not None:
        unwrap_model(module).load_state_dict(state)
    return state
