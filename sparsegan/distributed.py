"""Keeping masks and balance-ratio statistics identical across data-parallel ranks.

Under ``DistributedDataParallel`` every rank runs the same optimizer steps on all-reduced
gradients, and the per-network random generators are seeded identically, so the ranks already
compute the same masks. The wrapper still makes that a guarantee rather than an assumption:

* after every scheduled mask update, the masks are broadcast from rank 0 (one flat ``uint8``
  broadcast per update: cheap, once per update interval);
* each balance-ratio sample is the mean over ranks (one small all-reduce per sample), so the
  density controller takes the same decision everywhere.

FSDP (sharded parameters) is not supported: the masks would have to follow the shards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "broadcast_masks", "all_reduce_mean", "world_size"]


def is_distributed() -> bool:
    """Whether a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def _device_for_collectives(tensor: torch.Tensor) -> torch.device:
    backend = dist.get_backend()
    if backend == "nccl":
        return tensor.device if tensor.is_cuda else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_masks(masks: Sequence[torch.Tensor], src: int = 0) -> list[torch.Tensor]:
    """Rank ``src``'s masks on every rank (returns the input list when not distributed).

    Args:
        masks: Bool masks, identical shapes on every rank.
        src: The rank whose masks win.

    Returns:
        Bool masks on the devices of ``masks``.
    """
    if not is_distributed() or not masks:
        return list(masks)
    device = _device_for_collectives(masks[0])
    flat = torch.cat([m.reshape(-1).to(device=device, dtype=torch.uint8) for m in masks])
    dist.broadcast(flat, src=src)
    out, offset = [], 0
    for m in masks:
        out.append(flat[offset:offset + m.numel()].view(m.shape).to(device=m.device, dtype=torch.bool))
        offset += m.numel()
    return out


def all_reduce_mean(values: Sequence[float], *, like: torch.Tensor | None = None) -> list[float]:
    """The mean of ``values`` over ranks (unchanged when not distributed).

    Args:
        values: Floats, the same count on every rank.
        like: A tensor on the device the backend needs (CUDA for NCCL); CPU otherwise.
    """
    if not is_distributed():
        return list(values)
    device = _device_for_collectives(like if like is not None else torch.empty(0))
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).tolist()
