"""Per-layer density allocation for sparse networks.

Given the shapes of the maskable weights of a network and a global target
density, this module decides how dense each layer should be and turns those
densities into exact integer numbers of active weights.

Three named distributions are provided:

* ``"uniform"``: every layer gets the target density.
* ``"erk"`` (Erdős-Rényi-Kernel): a layer with weight shape
  ``(n_out, n_in, *kernel)`` gets density
  ``eps * (sum(shape) / prod(shape)) ** power``.
* ``"er"`` (Erdős-Rényi): like ERK but only the first two dimensions count,
  i.e. ``eps * ((shape[0] + shape[1]) / (shape[0] * shape[1])) ** power``.

For ER and ERK, ``eps`` is solved so that the whole network hits the target
number of active weights ``density * total_numel``.  A layer whose density would
exceed 1 is made dense and ``eps`` is re-solved for the remaining layers, until
no layer exceeds 1.

Example:
    >>> shapes = {"fc1": (4, 2), "fc2": (8, 4), "fc3": (2, 8)}
    >>> counts = allocate(shapes, 0.5, "erk")
    >>> sum(counts.values())
    28
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Mapping, Sequence

import torch

__all__ = [
    "check_density",
    "DISTRIBUTIONS",
    "DistributionFn",
    "active_counts",
    "allocate",
    "er_densities",
    "erk_densities",
    "layer_densities",
    "random_mask",
    "uniform_densities",
]

logger = logging.getLogger(__name__)

DistributionFn = Callable[[Mapping[str, tuple[int, ...]], float, float], dict[str, float]]
"""Signature of a registered distribution: ``(shapes, density, power) -> densities``."""

# Relative tolerance used to snap ``density * numel`` products that are integers
# up to floating point noise (e.g. ``0.29 * 100 == 28.999999999999996``).
_SNAP_TOL = 1e-9


def check_density(density: float, what: str = "density") -> float:
    """Validates that ``density`` is a real number in ``(0, 1]``.

    Args:
        density: The value to check.
        what: Name of the value used in error messages.

    Returns:
        ``density`` as a Python float.

    Raises:
        TypeError: If ``density`` is not a real number.
        ValueError: If ``density`` is not in ``(0, 1]``.
    """
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"{what} must be a float in (0, 1], got {type(density).__name__}")
    value = float(density)
    if not (0.0 < value <= 1.0):  # also rejects NaN
        raise ValueError(
            f"{what} must be in (0, 1] (the fraction of weights kept active), got {density!r}; "
            "for 90% sparsity use 0.1"
        )
    return value


def _normalize_shapes(shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """Validates weight shapes and converts them to tuples of ints.

    Args:
        shapes: Ordered mapping from layer name to weight shape.

    Returns:
        A new ordered dict with tuple shapes.

    Raises:
        TypeError: If ``shapes`` is not a mapping or a shape holds non-integers.
        ValueError: If ``shapes`` is empty, or a shape has fewer than two
            dimensions or a non-positive dimension.
    """
    if not isinstance(shapes, Mapping):
        raise TypeError(
            f"shapes must be a mapping from layer name to weight shape, got {type(shapes).__name__}"
        )
    if len(shapes) == 0:
        raise ValueError(
            "no maskable weights: `shapes` is empty; pass at least one layer name -> weight shape"
        )
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        try:
            dims = tuple(operator.index(d) for d in shape)
        except TypeError as exc:
            raise TypeError(
                f"shape of layer {name!r} must be a sequence of ints, got {shape!r}"
            ) from exc
        if len(dims) < 2:
            raise ValueError(
                f"layer {name!r} has a {len(dims)}-D shape {dims}; only weights with at least "
                "2 dimensions can be sparsified (leave biases and norm parameters dense)"
            )
        if any(d <= 0 for d in dims):
            raise ValueError(f"layer {name!r} has a non-positive dimension in shape {dims}")
        out[str(name)] = dims
    return out


def uniform_densities(
    shapes: Mapping[str, tuple[int, ...]], density: float, power: float = 1.0
) -> dict[str, float]:
    """Gives every layer the same density.

    Args:
        shapes: Ordered mapping from layer name to weight shape.
        density: Target density in ``(0, 1]``.
        power: Ignored; accepted for a uniform registry signature.

    Returns:
        Mapping from layer name to ``density``.
    """
    del power
    return {name: float(density) for name in shapes}


def _scaled_densities(
    shapes: Mapping[str, tuple[int, ...]], density: float, raw: Mapping[str, float]
) -> dict[str, float]:
    """Solves ``eps`` so that densities ``eps * raw[l]`` (capped at 1) hit the target.

    Layers whose density would exceed 1 are made dense and ``eps`` is re-solved
    for the rest.  Because making a layer dense only frees budget, ``eps`` never
    decreases between iterations, so every layer that exceeds 1 is made dense at
    once and the loop ends after at most ``len(shapes)`` iterations.

    Args:
        shapes: Ordered mapping from layer name to weight shape.
        density: Target global density in ``(0, 1]``.
        raw: Unnormalised per-layer density factors (all positive).

    Returns:
        Mapping from layer name to density in ``(0, 1]``.
    """
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    if density >= 1.0:
        return {name: 1.0 for name in shapes}
    target = density * sum(numel.values())
    dense: set[str] = set()
    while True:
        free = [name for name in shapes if name not in dense]
        if not free:  # only reachable through floating point noise
            return {name: 1.0 for name in shapes}
        budget = target - sum(numel[name] for name in dense)
        eps = budget / sum(raw[name] * numel[name] for name in free)
        exceeding = {name for name in free if eps * raw[name] > 1.0}
        if not exceeding:
            break
        dense |= exceeding
    logger.debug("solved eps=%g with dense layers %s", eps, sorted(dense))
    return {name: 1.0 if name in dense else min(1.0, eps * raw[name]) for name in shapes}


def erk_densities(
    shapes: Mapping[str, tuple[int, ...]], density: float, power: float = 1.0
) -> dict[str, float]:
    """Erdős-Rényi-Kernel densities: ``eps * (sum(shape) / prod(shape)) ** power``.

    Args:
        shapes: Ordered mapping from layer name to weight shape (at least 2-D).
        density: Target global density in ``(0, 1]``.
        power: Exponent applied to the ERK factor (1 gives the standard ERK).

    Returns:
        Mapping from layer name to density in ``(0, 1]``.
    """
    raw = {name: (sum(s) / math.prod(s)) ** power for name, s in shapes.items()}
    return _scaled_densities(shapes, density, raw)


def er_densities(
    shapes: Mapping[str, tuple[int, ...]], density: float, power: float = 1.0
) -> dict[str, float]:
    """Erdős-Rényi densities: ``eps * ((s0 + s1) / (s0 * s1)) ** power``.

    Only the first two dimensions of each shape are used, so convolution kernels
    of different spatial sizes but equal channel counts get equal densities.

    Args:
        shapes: Ordered mapping from layer name to weight shape (at least 2-D).
        density: Target global density in ``(0, 1]``.
        power: Exponent applied to the ER factor.

    Returns:
        Mapping from layer name to density in ``(0, 1]``.
    """
    raw = {name: ((s[0] + s[1]) / (s[0] * s[1])) ** power for name, s in shapes.items()}
    return _scaled_densities(shapes, density, raw)


DISTRIBUTIONS: dict[str, DistributionFn] = {
    "uniform": uniform_densities,
    "er": er_densities,
    "erk": erk_densities,
}
"""Registry of named distributions: name -> ``fn(shapes, density, power)``."""


def layer_densities(
    shapes: Mapping[str, Sequence[int]],
    density: float,
    distribution: str | Mapping[str, float] | Callable[[str, tuple[int, ...]], float] = "erk",
    *,
    power: float = 1.0,
) -> dict[str, float]:
    """Computes the density of every layer.

    Args:
        shapes: Ordered mapping from layer name to weight shape.  Every shape
            must have at least two dimensions.
        density: Global target density in ``(0, 1]``.  With ``density == 1``
            every layer is dense.  Ignored (but still validated) when
            ``distribution`` is a mapping or a callable.
        distribution: One of the names in `DISTRIBUTIONS` (``"uniform"``,
            ``"er"``, ``"erk"``; case-insensitive), a mapping that gives the
            density of every layer directly (it must name exactly the layers of
            ``shapes``), or a callable ``(name, shape) -> density`` called once
            per layer.
        power: Exponent of the ER/ERK factor.  Must be finite.

    Returns:
        Ordered mapping (same order as ``shapes``) from layer name to a density
        in ``(0, 1]``.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``density`` is out of range, ``shapes`` is empty or holds
            a shape with fewer than two dimensions, the distribution name is
            unknown, or a custom density is missing, extra, or out of range.
    """
    density = check_density(density)
    norm = _normalize_shapes(shapes)
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not math.isfinite(power):
        raise ValueError(f"power must be a finite number, got {power!r}")

    if isinstance(distribution, str):
        key = distribution.lower()
        if key not in DISTRIBUTIONS:
            raise ValueError(
                f"unknown distribution {distribution!r}; known names are "
                f"{sorted(DISTRIBUTIONS)}, or pass a mapping/callable of per-layer densities"
            )
        if density >= 1.0:
            return {name: 1.0 for name in norm}
        result = DISTRIBUTIONS[key](norm, density, float(power))
        return {name: result[name] for name in norm}

    if isinstance(distribution, Mapping):
        missing = [name for name in norm if name not in distribution]
        extra = [name for name in distribution if name not in norm]
        if missing or extra:
            raise ValueError(
                "the density mapping must cover exactly the maskable layers; "
                f"missing: {missing}, unknown: {extra}"
            )
        return {
            name: check_density(distribution[name], f"density of layer {name!r}") for name in norm
        }

    if callable(distribution):
        return {
            name: check_density(distribution(name, shape), f"density of layer {name!r}")
            for name, shape in norm.items()
        }

    raise TypeError(
        "distribution must be a name, a mapping of layer densities, or a callable "
        f"(name, shape) -> density; got {type(distribution).__name__}"
    )


def _snap(value: float) -> float:
    """Rounds ``value`` to the nearest integer if it is one up to float noise."""
    nearest = round(value)
    if abs(value - nearest) <= _SNAP_TOL * max(1.0, abs(value)):
        return float(nearest)
    return value


def _spread(counts: list[int], caps: list[int], order: list[int], amount: int) -> int:
    """Adds ``amount`` (may be negative) to ``counts`` respecting per-layer bounds.

    Units go one per layer in ``order``; any amount beyond one unit per layer is
    spread evenly in bulk rounds, so the cost is ``O(len(counts) ** 2)`` and not
    proportional to ``amount``.

    Args:
        counts: Current counts, modified in place.
        caps: For additions, the per-layer upper bounds; for removals, the
            per-layer lower bounds.
        order: Layer indices in priority order.
        amount: Number of units to add (positive) or remove (negative).

    Returns:
        The part of ``amount`` that could not be placed (0 when fully placed).
    """
    sign = 1 if amount > 0 else -1
    left = abs(amount)
    while left > 0:
        room = {i: abs(caps[i] - counts[i]) for i in order if counts[i] != caps[i]}
        if not room:
            break
        if left >= len(room):
            step = min(left // len(room), min(room.values()))
            for i in room:
                counts[i] += sign * step
            left -= step * len(room)
        else:
            for i in order:
                if left == 0:
                    break
                if i in room:
                    counts[i] += sign
                    left -= 1
    return sign * left


def active_counts(
    shapes: Mapping[str, Sequence[int]],
    densities: Mapping[str, float],
    *,
    total: int | None = None,
) -> dict[str, int]:
    """Turns per-layer densities into exact integer numbers of active weights.

    Each layer starts from ``floor(d_l * n_l)`` (with ``n_l`` its number of
    weights); the remaining units are handed out by the largest-remainder
    method (ties go to the earlier layer) until the counts sum to ``total``, or
    to ``round(sum(d_l * n_l))`` when ``total`` is None.  If units must be taken
    away, they are taken from layers with density below 1 first, smallest
    remainder first.  The result is deterministic.

    Every count is clamped to ``[1, n_l]``: each layer keeps **at least one
    active weight** so that no layer is disconnected.  When the clamp forces
    more active weights than ``total`` (e.g. ``total`` smaller than the number
    of layers), the sum exceeds ``total`` and a warning is logged.

    Args:
        shapes: Ordered mapping from layer name to weight shape.
        densities: Density in ``(0, 1]`` of every layer in ``shapes``.
        total: Required total number of active weights, in
            ``[0, sum(n_l)]``.  None means ``round(sum(d_l * n_l))``.

    Returns:
        Ordered mapping from layer name to its number of active weights.

    Raises:
        ValueError: If ``densities`` does not name exactly the layers of
            ``shapes``, a density is out of range, or ``total`` is out of range.
    """
    norm = _normalize_shapes(shapes)
    names = list(norm)
    missing = [name for name in names if name not in densities]
    extra = [name for name in densities if name not in norm]
    if missing or extra:
        raise ValueError(
            f"densities must name exactly the layers of shapes; missing: {missing}, "
            f"unknown: {extra}"
        )
    numel = [math.prod(norm[name]) for name in names]
    dens = [check_density(densities[name], f"density of layer {name!r}") for name in names]
    exact = [_snap(d * n) for d, n in zip(dens, numel, strict=True)]
    if total is None:
        target = round(_snap(math.fsum(exact)))
    else:
        if isinstance(total, bool):
            raise TypeError("total must be an int or None, got bool")
        target = operator.index(total)
        if not 0 <= target <= sum(numel):
            raise ValueError(
                f"total must be in [0, {sum(numel)}] (the number of maskable weights), got {total}"
            )

    counts = [min(max(math.floor(e), 1), n) for e, n in zip(exact, numel, strict=True)]
    remainders = [e - math.floor(e) for e in exact]
    indices = range(len(names))
    deficit = target - sum(counts)
    if deficit > 0:
        order = sorted(indices, key=lambda i: (-remainders[i], i))
        left = _spread(counts, numel, order, deficit)
        assert left == 0, "total was validated against the number of weights"
    elif deficit < 0:
        order = sorted(indices, key=lambda i: (dens[i] >= 1.0, remainders[i], i))
        left = _spread(counts, [1] * len(names), order, deficit)
        if left:
            logger.warning(
                "keeping at least one active weight in each of the %d layers needs %d active "
                "weights, more than the requested total of %d",
                len(names),
                sum(counts),
                target,
            )
    return dict(zip(names, counts, strict=True))


def allocate(
    shapes: Mapping[str, Sequence[int]],
    density: float,
    distribution: str | Mapping[str, float] | Callable[[str, tuple[int, ...]], float] = "erk",
    *,
    power: float = 1.0,
) -> dict[str, int]:
    """Computes the exact number of active weights of every layer.

    For the named distributions the counts sum to exactly
    ``round(density * total_numel)``, unless the at-least-one-weight-per-layer
    clamp of `active_counts` forces a few more.  For a custom mapping or
    callable, the counts sum to ``round(sum(d_l * n_l))`` of the given
    densities (same clamp).

    Args:
        shapes: Ordered mapping from layer name to weight shape.
        density: Global target density in ``(0, 1]``.
        distribution: Name, mapping or callable; see `layer_densities`.
        power: Exponent of the ER/ERK factor.

    Returns:
        Ordered mapping from layer name to its number of active weights.

    Raises:
        TypeError: See `layer_densities`.
        ValueError: See `layer_densities`.
    """
    densities = layer_densities(shapes, density, distribution, power=power)
    total: int | None = None
    if isinstance(distribution, str):
        numel = sum(math.prod(shape) for shape in shapes.values())
        total = round(_snap(float(density) * numel))
    return active_counts(shapes, densities, total=total)


def random_mask(
    shape: Sequence[int],
    active: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draws a boolean mask with exactly ``active`` True entries.

    The positions are uniformly random: a permutation is drawn with
    `torch.randperm` on the CPU (so ``generator`` must be a CPU generator and the
    result is the same on every device), then the mask is moved to ``device``.

    Args:
        shape: Shape of the mask.
        active: Number of True entries, in ``[0, prod(shape)]``.
        generator: Optional CPU random generator for reproducibility.
        device: Device of the returned mask (default: CPU).

    Returns:
        A ``torch.bool`` tensor of the given shape.

    Raises:
        TypeError: If ``active`` is not an int.
        ValueError: If ``active`` is out of range or ``shape`` has a negative
            dimension.
    """
    dims = tuple(operator.index(d) for d in shape)
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must have non-negative dimensions, got {dims}")
    if isinstance(active, bool):
        raise TypeError("active must be an int, got bool")
    active = operator.index(active)
    numel = math.prod(dims)
    if not 0 <= active <= numel:
        raise ValueError(f"active must be in [0, {numel}] for shape {dims}, got {active}")
    flat = torch.zeros(numel, dtype=torch.bool)
    if active:
        flat[torch.randperm(numel, generator=generator)[:active]] = True
    mask = flat.reshape(dims)
    return mask if device is None else mask.to(device)
