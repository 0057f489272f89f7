"""Prune/grow scores and exact top-k mask selection.

A dynamic sparse training update drops the active weights with the lowest
*prune score* and grows the inactive weights with the highest *grow score*.
This module provides the score functions (all sharing the `ScoreFn` signature)
and the two vectorised selection primitives `drop_lowest` and `grow_highest`.

Selection is either *global* (an ``int`` count: the scores of all layers are
concatenated and one top-k is taken) or *per layer* (a sequence of counts).
It is exact: the number of active weights changes by exactly the requested
count.  No Python loop runs over individual weights; for large tensors a
deterministic threshold pre-filter shrinks the top-k input, which keeps a
25M-weight global selection well under a second on a CPU.

Example:
    >>> import torch
    >>> w = torch.tensor([[0.5, -0.1], [0.3, 0.0]])
    >>> m = torch.tensor([[True, True], [True, False]])
    >>> drop_lowest([m], [magnitude_score(w, m)], 1)[0]
    tensor([[ True, False],
            [ True, False]])
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "GROW_SCORES",
    "PRUNE_SCORES",
    "NonFiniteScoreError",
    "ScoreFn",
    "drop_lowest",
    "first_non_finite",
    "growth_gradients",
    "get_score",
    "gradient_score",
    "grow_highest",
    "magnitude_score",
    "momentum_score",
    "random_score",
]

logger = logging.getLogger(__name__)

ScoreFn = Callable[..., Tensor]
"""A score function ``fn(param, mask, *, grad=None, optimizer_state=None, generator=None)``.

It returns a tensor of ``param``'s shape; higher means more important.
"""


class NonFiniteScoreError(ValueError):
    """Scores that cannot be ranked: NaN, or (where a caller asks for finite scores) infinite.

    :func:`drop_lowest` and :func:`grow_highest` raise it for NaN scores (infinities are
    comparable and accepted there); the built-in DST algorithm also raises it for infinite
    scores. The wrapper catches it at a due mask update and skips that update.

    Args:
        message: The error message.
        layer: Index of the first offending layer, in the order of the scores passed.

    Attributes:
        layer: Index of the first offending layer, in the order of the scores passed.
    """

    def __init__(self, message: str, layer: int) -> None:
        super().__init__(message)
        self.layer = layer

    def __reduce__(self) -> tuple[type, tuple[str, int]]:
        return (type(self), (str(self), self.layer))


def first_non_finite(tensors: Sequence[Tensor | None]) -> int | None:
    """Index of the first floating tensor holding a NaN or an infinity (``None`` if there is none).

    Two reductions per tensor (``amax``, ``amin``: NaN propagates through both, ``+inf`` shows in
    the first and ``-inf`` in the second), so no full-size temporary is allocated. ``None``
    entries, empty and non-floating tensors are skipped.

    Args:
        tensors: Tensors to check (e.g. scores, weights or gradients of each layer).

    Returns:
        The index of the first tensor that is not finite, or ``None``.

    Example:
        >>> first_non_finite([torch.ones(2), None, torch.tensor([0.0, float("inf")])])
        2
    """
    for i, tensor in enumerate(tensors):
        if tensor is None or not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        with torch.no_grad():
            extremes = torch.stack([tensor.detach().amax(), tensor.detach().amin()])
        if not bool(torch.isfinite(extremes).all()):
            return i
    return None


def growth_gradients(params: Sequence[Tensor], names: Sequence[str]) -> list[Tensor | None]:
    """Each weight's ``.grad`` for scoring, with zeros for layers the last backward did not reach.

    A masked layer that the forward never runs (a from-RGB conv for another resolution, a head
    used only in another mode) has no gradient after ``backward()``. Its gradient is zero, so it
    is scored as zero and gets no grown weights; a log line names it. Only when *no* weight has
    a gradient are the ``None`` entries kept, so that :func:`gradient_score` can explain the
    usual cause (gradients set to ``None`` between ``backward()`` and ``step()``).

    Args:
        params: The masked weights, in order.
        names: Their names (for the log line).

    Returns:
        One gradient (or ``None``, see above) per weight.
    """
    grads = [p.grad for p in params]
    missing = [name for name, grad in zip(names, grads) if grad is None]
    if not missing or len(missing) == len(grads):
        return grads
    logger.info("no gradient for %d masked weight(s) the last backward did not reach (%s%s); scored as zero "
                "gradient", len(missing), ", ".join(missing[:5]), ", ..." if len(missing) > 5 else "")
    return [torch.zeros_like(p) if grad is None else grad for p, grad in zip(params, grads)]


# Below this many candidates a plain ``torch.topk`` is fast enough.
_PREFILTER_MIN = 1 << 20
# Number of evenly strided samples used to estimate the pre-filter threshold.
_PREFILTER_SAMPLES = 1 << 16


def magnitude_score(
    param: Tensor,
    mask: Tensor,
    *,
    grad: Tensor | None = None,
    optimizer_state: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Scores weights by their absolute value ``|param|``.

    Args:
        param: The weight tensor.
        mask: The current boolean mask (unused).
        grad: Unused.
        optimizer_state: Unused.
        generator: Unused.

    Returns:
        A new tensor ``|param|`` (detached).
    """
    del mask, grad, optimizer_state, generator
    return param.detach().abs()


def random_score(
    param: Tensor,
    mask: Tensor,
    *,
    grad: Tensor | None = None,
    optimizer_state: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Scores weights uniformly at random in ``[0, 1)``.

    The scores are drawn as float32 on the CPU with ``generator`` (so results
    are reproducible and device independent) and then moved to
    ``param.device``.

    Args:
        param: The weight tensor (only its shape and device are used).
        mask: The current boolean mask (unused).
        grad: Unused.
        optimizer_state: Unused.
        generator: Optional CPU random generator.

    Returns:
        A float32 tensor of ``param``'s shape on ``param``'s device.
    """
    del mask, grad, optimizer_state
    scores = torch.rand(param.shape, generator=generator, dtype=torch.float32)
    return scores.to(param.device)


def gradient_score(
    param: Tensor,
    mask: Tensor,
    *,
    grad: Tensor | None = None,
    optimizer_state: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Scores weights by the absolute value of their dense gradient ``|grad|``.

    Args:
        param: The weight tensor.
        mask: The current boolean mask (unused).
        grad: The dense gradient of ``param`` (usually ``param.grad``).
        optimizer_state: Unused.
        generator: Unused.

    Returns:
        A new tensor ``|grad|`` (detached).

    Raises:
        ValueError: If ``grad`` is None or its shape differs from ``param``'s.
    """
    del mask, optimizer_state, generator
    if grad is None:
        raise ValueError(
            "gradient growth needs `.grad` of every sparse weight at update time; the update "
            "runs right after optimizer.step(), so do not set gradients to None between "
            "backward() and step() (e.g. call optimizer.zero_grad() before backward(), not "
            "between backward() and step()), or use grow='random'/'momentum'"
        )
    if grad.shape != param.shape:
        raise ValueError(
            f"grad has shape {tuple(grad.shape)} but param has shape {tuple(param.shape)}"
        )
    return grad.detach().abs()


_MOMENTUM_KEYS = ("exp_avg", "momentum_buffer")


def momentum_score(
    param: Tensor,
    mask: Tensor,
    *,
    grad: Tensor | None = None,
    optimizer_state: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Scores weights by the absolute value of the optimizer's first moment.

    The buffer is read from ``optimizer_state`` (``optimizer.state[param]``):
    ``"exp_avg"`` for Adam/AdamW, ``"momentum_buffer"`` for SGD with momentum.

    Args:
        param: The weight tensor.
        mask: The current boolean mask (unused).
        grad: Unused.
        optimizer_state: The optimizer's per-parameter state.
        generator: Unused.

    Returns:
        A new tensor ``|buffer|`` (detached).

    Raises:
        ValueError: If no first-moment buffer is found or its shape is wrong.
    """
    del mask, grad, generator
    state = optimizer_state if optimizer_state is not None else {}
    for key in _MOMENTUM_KEYS:
        buffer = state.get(key)
        if isinstance(buffer, Tensor):
            if buffer.shape != param.shape:
                raise ValueError(
                    f"optimizer state {key!r} has shape {tuple(buffer.shape)} but param has "
                    f"shape {tuple(param.shape)}"
                )
            return buffer.detach().abs()
    raise ValueError(
        f"momentum growth needs a first-moment buffer in the optimizer state (looked for keys "
        f"{list(_MOMENTUM_KEYS)}, found {sorted(state)}); use Adam/AdamW or SGD with momentum>0 "
        "and take at least one optimizer step first, or use grow='gradient'"
    )


PRUNE_SCORES: dict[str, ScoreFn] = {"magnitude": magnitude_score, "random": random_score}
"""Registry of prune scores (lowest scores are dropped)."""

GROW_SCORES: dict[str, ScoreFn] = {
    "gradient": gradient_score,
    "random": random_score,
    "momentum": momentum_score,
}
"""Registry of grow scores (highest scores are grown)."""


def get_score(name: str, kind: Literal["prune", "grow"]) -> ScoreFn:
    """Looks up a score function by name.

    Args:
        name: Registered name (case-insensitive), e.g. ``"magnitude"``.
        kind: ``"prune"`` to search `PRUNE_SCORES`, ``"grow"`` for
            `GROW_SCORES`.

    Returns:
        The score function.

    Raises:
        ValueError: If ``kind`` or ``name`` is unknown.
    """
    registries = {"prune": PRUNE_SCORES, "grow": GROW_SCORES}
    if kind not in registries:
        raise ValueError(f"kind must be 'prune' or 'grow', got {kind!r}")
    registry = registries[kind]
    key = name.lower() if isinstance(name, str) else name
    if key not in registry:
        raise ValueError(f"unknown {kind} score {name!r}; known names are {sorted(registry)}")
    return registry[key]


def _topk_indices(values: Tensor, k: int, *, largest: bool) -> Tensor:
    """Returns the indices of ``k`` extreme entries of a 1-D tensor (unsorted).

    Exact and deterministic.  For large inputs, a threshold estimated from
    evenly strided samples first removes entries that cannot be selected; if
    the estimate keeps fewer than ``k`` entries, plain `torch.topk` is used.

    Args:
        values: 1-D tensor of scores (no NaN).
        k: Number of entries to select, ``0 <= k <= values.numel()``.
        largest: Select the largest entries if True, the smallest otherwise.

    Returns:
        1-D int64 tensor of ``k`` distinct indices into ``values``.
    """
    n = values.numel()
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=values.device)
    if k == n:
        return torch.arange(n, device=values.device)
    if 2 * k > n:  # selecting the complement is cheaper
        rejected = _topk_indices(values, n - k, largest=not largest)
        keep = torch.ones(n, dtype=torch.bool, device=values.device)
        keep[rejected] = False
        return keep.nonzero().squeeze(1)
    if n >= _PREFILTER_MIN:
        sample = values[:: n // _PREFILTER_SAMPLES]
        m = sample.numel()
        frac = k / n
        want = frac * 1.1 + 6.0 * math.sqrt(frac / m) + 8.0 / m
        sk = min(m, math.ceil(want * m))
        bound = torch.topk(sample, sk, largest=largest, sorted=False).values
        if largest:
            candidates = (values >= bound.min()).nonzero().squeeze(1)
        else:
            candidates = (values <= bound.max()).nonzero().squeeze(1)
        if k <= candidates.numel() < n // 2:
            top = torch.topk(values[candidates], k, largest=largest, sorted=False).indices
            return candidates[top]
        logger.debug(
            "top-k pre-filter kept %d of %d entries; using full topk", candidates.numel(), n
        )
    return torch.topk(values, k, largest=largest, sorted=False).indices


def _pick(scores: Tensor, candidates: Tensor, k: int, *, size: int, largest: bool,
          overwrite: bool = False) -> Tensor:
    """Returns the flat indices of the ``k`` extreme scores among ``candidates``.

    Non-candidates are masked with ``-inf`` (or ``+inf``) instead of being
    gathered out, which is cheaper for large candidate sets.  If a selected
    index is not a candidate (possible only when candidate scores tie with the
    fill value), the exact gather-based path is used instead.

    Args:
        scores: 1-D scores.
        candidates: 1-D boolean tensor of eligible positions.
        k: Number of positions to pick, ``0 <= k <= size``.
        size: Number of True entries of ``candidates``.
        largest: Pick the highest (True) or lowest (False) scores.
        overwrite: ``scores`` is a scratch copy the caller no longer needs: mask it in
            place (non-candidate entries are overwritten; candidate entries are kept)
            instead of allocating a masked copy, which saves a full-size allocation.

    Returns:
        1-D int64 tensor of ``k`` distinct flat indices.
    """
    if k == size:
        return candidates.nonzero().squeeze(1)
    if not scores.is_floating_point():
        scores, overwrite = scores.to(torch.float64), True
    fill = -math.inf if largest else math.inf
    if overwrite:
        masked = scores.masked_fill_(~candidates, fill)
    else:
        masked = torch.where(
            candidates, scores, torch.tensor(fill, dtype=scores.dtype, device=scores.device)
        )
    idx = _topk_indices(masked, k, largest=largest)
    if bool(candidates[idx].all()):
        return idx
    idx = candidates.nonzero().squeeze(1)
    return idx[_topk_indices(scores[idx], k, largest=largest)]


def _check_layers(
    masks: Sequence[Tensor], scores: Sequence[Tensor], exclude: Sequence[Tensor] | None = None
) -> None:
    """Validates that masks, scores (and exclude) line up layer by layer.

    Raises:
        TypeError: If a mask or exclude tensor is not boolean.
        NonFiniteScoreError: If a layer's scores contain NaN.
        ValueError: On length or shape mismatches.
    """
    if len(masks) != len(scores):
        raise ValueError(
            f"got {len(masks)} masks but {len(scores)} score tensors; pass one per layer"
        )
    if exclude is not None and len(exclude) != len(masks):
        raise ValueError(f"got {len(masks)} masks but {len(exclude)} exclude tensors")
    for i, (mask, score) in enumerate(zip(masks, scores, strict=True)):
        if mask.dtype != torch.bool:
            raise TypeError(f"mask {i} must have dtype torch.bool, got {mask.dtype}")
        if mask.shape != score.shape:
            raise ValueError(
                f"mask {i} has shape {tuple(mask.shape)} but its scores have shape "
                f"{tuple(score.shape)}"
            )
        # max() propagates NaN: one reduction instead of a full-size isnan() mask
        if score.is_floating_point() and score.numel() and bool(torch.isnan(score.max())):
            raise NonFiniteScoreError(f"scores of layer {i} contain NaN; scores must be comparable numbers", i)
        if exclude is not None:
            if exclude[i].dtype != torch.bool:
                raise TypeError(f"exclude {i} must have dtype torch.bool, got {exclude[i].dtype}")
            if exclude[i].shape != mask.shape:
                raise ValueError(
                    f"exclude {i} has shape {tuple(exclude[i].shape)} but mask has shape "
                    f"{tuple(mask.shape)}"
                )


def _as_counts(count: int | Sequence[int], layers: int) -> int | list[int]:
    """Validates ``count`` as a non-negative int or a per-layer list of them.

    Raises:
        TypeError: If ``count`` is not an int or a sequence of ints.
        ValueError: If a count is negative or the sequence length is wrong.
    """
    if isinstance(count, bool):
        raise TypeError("count must be an int or a sequence of ints, got bool")
    if isinstance(count, Sequence):
        counts = [operator.index(c) for c in count]
        if len(counts) != layers:
            raise ValueError(f"got {len(counts)} per-layer counts for {layers} layers")
        if any(c < 0 for c in counts):
            raise ValueError(f"counts must be non-negative, got {counts}")
        return counts
    try:
        value = operator.index(count)
    except TypeError as exc:
        raise TypeError(
            f"count must be an int (global) or a sequence of ints (per layer), got "
            f"{type(count).__name__}"
        ) from exc
    if value < 0:
        raise ValueError(f"count must be non-negative, got {value}")
    return value


def _select(
    masks: Sequence[Tensor],
    scores: Sequence[Tensor],
    count: int | Sequence[int],
    *,
    eligible: Sequence[Tensor],
    fallback: Sequence[Tensor] | None,
    largest: bool,
    new_value: bool,
    what: str,
) -> list[Tensor]:
    """Flips ``count`` eligible positions with extreme scores to ``new_value``.

    Args:
        masks: Current boolean masks.
        scores: Scores of the same shapes.
        count: Global count or per-layer counts.
        eligible: First-choice candidate positions per layer.
        fallback: Second-choice candidate positions per layer (used only when
            there are not enough first-choice candidates), or None.
        largest: Pick the highest (True) or lowest (False) scores.
        new_value: Value written to the selected positions.
        what: Description of the candidates for error messages.

    Returns:
        New masks.
    """
    counts = _as_counts(count, len(masks))
    if isinstance(counts, list):
        groups = [([i], c) for i, c in enumerate(counts)]
    else:
        groups = [(list(range(len(masks))), counts)]
    out = list(masks)
    for layer_ids, k in groups:
        if k == 0 or not layer_ids:
            if k:
                raise ValueError(f"cannot select {k} {what}: there are no layers")
            for i in layer_ids:
                out[i] = masks[i].clone()
            continue
        device = masks[layer_ids[0]].device
        flat_scores = torch.cat([scores[i].detach().reshape(-1).to(device) for i in layer_ids])
        tiers = [eligible] if fallback is None else [eligible, fallback]
        flat_tiers = [torch.cat([t[i].reshape(-1).to(device) for i in layer_ids]) for t in tiers]
        tier_sizes = [int(torch.count_nonzero(t)) for t in flat_tiers]
        if k > sum(tier_sizes):
            where = f"in layer {layer_ids[0]}" if isinstance(counts, list) else "in total"
            raise ValueError(f"cannot select {k} {what}: only {sum(tier_sizes)} available {where}")
        chosen: list[Tensor] = []
        left = k
        for tier, size in zip(flat_tiers, tier_sizes, strict=True):
            if left == 0:
                break
            take = min(left, size)
            # flat_scores is this function's own copy: the last tier that is needed may mask it in place
            chosen.append(_pick(flat_scores, tier, take, size=size, largest=largest, overwrite=take == left))
            left -= take
        flat_new = torch.cat([masks[i].reshape(-1).to(device) for i in layer_ids])
        flat_new[torch.cat(chosen)] = new_value
        sizes = [masks[i].numel() for i in layer_ids]
        for i, part in zip(layer_ids, torch.split(flat_new, sizes), strict=True):
            # copy so that returned masks own their memory instead of viewing one buffer
            out[i] = part.reshape(masks[i].shape).to(masks[i].device, copy=True)
    return out


def drop_lowest(
    masks: Sequence[Tensor],
    scores: Sequence[Tensor],
    count: int | Sequence[int],
    *,
    min_active: int = 0,
) -> list[Tensor]:
    """Deactivates the ``count`` active positions with the lowest scores.

    Args:
        masks: Boolean masks, one per layer (not modified).
        scores: Prune scores of the same shapes (not modified).  Scores of
            inactive positions are ignored.
        count: An int selects globally across all layers (scores compared
            across layers); a sequence gives one count per layer.
        min_active: Keep at least this many active positions in every layer
            (its highest-scoring ones are never dropped), so that a global
            selection cannot disconnect a layer.

    Returns:
        New boolean masks with exactly ``count`` fewer True entries (in total,
        or per layer).  Every dropped position was active and has a score no
        higher than any position that stays active (within the selection
        group).  Ties are broken deterministically.

    Raises:
        TypeError: If a mask is not boolean or ``count`` has the wrong type.
        NonFiniteScoreError: If a layer's scores contain NaN (a ``ValueError``).
        ValueError: On mismatched layers/shapes, or a count larger
            than the number of active positions.
    """
    _check_layers(masks, scores)
    eligible = list(masks)
    if min_active > 0:
        eligible = []
        for mask, score in zip(masks, scores):
            keep = min(min_active, int(torch.count_nonzero(mask)))
            protected = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
            if keep:
                values = score if score.is_floating_point() else score.to(torch.float64)
                flat = torch.where(mask, values, float("-inf")).flatten()
                # argmax is ~6x cheaper than topk(k=1) on a CPU, and min_active=1 is the common case
                protected[flat.argmax() if keep == 1 else torch.topk(flat, keep).indices] = True
            eligible.append(mask & ~protected.view_as(mask))
    return _select(
        masks,
        scores,
        count,
        eligible=eligible,
        fallback=None,
        largest=False,
        new_value=False,
        what="active positions to drop",
    )


def grow_highest(
    masks: Sequence[Tensor],
    scores: Sequence[Tensor],
    count: int | Sequence[int],
    *,
    exclude: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """Activates the ``count`` inactive positions with the highest scores.

    Args:
        masks: Boolean masks, one per layer (not modified).
        scores: Grow scores of the same shapes (not modified).  Scores of
            active positions are ignored.
        count: An int selects globally across all layers; a sequence gives one
            count per layer.
        exclude: Optional boolean tensors marking inactive positions that
            should not be grown (typically the positions just dropped).  They
            are used only as a lowest-priority fallback when there are not
            enough other inactive positions.

    Returns:
        New boolean masks with exactly ``count`` more True entries (in total,
        or per layer).

    Raises:
        TypeError: If a mask/exclude tensor is not boolean or ``count`` has the
            wrong type.
        NonFiniteScoreError: If a layer's scores contain NaN (a ``ValueError``).
        ValueError: On mismatched layers/shapes, or a count larger
            than the number of inactive positions.
    """
    _check_layers(masks, scores, exclude)
    inactive = [~mask for mask in masks]
    if exclude is None:
        eligible, fallback = inactive, None
    else:
        eligible = [free & ~ex.to(free.device) for free, ex in zip(inactive, exclude, strict=True)]
        fallback = [free & ex.to(free.device) for free, ex in zip(inactive, exclude, strict=True)]
    return _select(
        masks,
        scores,
        count,
        eligible=eligible,
        fallback=fallback,
        largest=True,
        new_value=True,
        what="inactive positions to grow",
    )
