"""The balance ratio (BR) between generator and discriminator, its probe, and the density controller.

For latents ``z``, the generator before (G) and after (G') one update, the current
discriminator D and a real batch ``x``::

    BR = (mean D(G'(z)) - mean D(G(z))) / (mean D(x) - mean D(G(z)))

BR near 0: one G step barely moves D's score of the same fakes (D too strong); BR large: one G
step erases the margin D keeps between real and fake (D too weak). Each measurement is one
*sample*; the controller reads the mean of the samples in a sliding window (a mean of ratios,
not a ratio of means).

* :class:`BalanceRatio` keeps the window, the history and the skipped-sample count.
* :class:`BalanceProbe` measures samples around the generator's optimizer step without leaving a
  trace (own RNG, buffers restored, global RNG untouched).
* :class:`DensityController` turns the windowed BR into a decision on D's density (ADAPT/DDST).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils import _pytree as pytree

from sparsegan._utils import as_args, isolated_rng, module_device, preserved_state

__all__ = ["BalanceRatio", "BalanceProbe", "DensityController", "Decision", "check_bounds"]

logger = logging.getLogger(__name__)

_EPS = 1e-12


def _should_log(skipped: int) -> bool:
    """Log the first 10 skipped samples, then every 100th (a broken run must not flood the log)."""
    return skipped <= 10 or skipped % 100 == 0


def _mean(value: torch.Tensor | float) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean())
    return float(value)


class BalanceRatio:
    """Sliding-window estimate of the balance ratio.

    Args:
        window: Number of most recent samples averaged.

    Attributes:
        history: ``(generator_step, sample, windowed_value)`` for every accepted sample.
        skipped: Number of samples rejected (non-finite inputs or a zero denominator).
    """

    def __init__(self, window: int = 100) -> None:
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int (number of BR samples averaged), got {window!r}")
        self.window = window
        self._samples: deque[float] = deque(maxlen=window)
        self.history: list[tuple[int, float, float]] = []
        self.skipped = 0

    @staticmethod
    def ratio(d_real: torch.Tensor | float, d_fake_before: torch.Tensor | float,
              d_fake_after: torch.Tensor | float) -> float:
        """One BR sample from D's scores (tensors are averaged; floats are taken as means)."""
        real, before, after = _mean(d_real), _mean(d_fake_before), _mean(d_fake_after)
        return (after - before) / (real - before)

    def add(self, d_real: torch.Tensor | float, d_fake_before: torch.Tensor | float,
            d_fake_after: torch.Tensor | float, *, step: int = -1) -> float | None:
        """Add one sample; return it, or ``None`` when it was skipped (and logged).

        Args:
            d_real: D's scores of a real batch (after G's update).
            d_fake_before: D's scores of G(z) before G's update.
            d_fake_after: D's scores of G'(z), the same z, after G's update.
            step: The generator step the sample belongs to (for the history).
        """
        real, before, after = _mean(d_real), _mean(d_fake_before), _mean(d_fake_after)
        if not all(math.isfinite(v) for v in (real, before, after)):
            self.skipped += 1
            if _should_log(self.skipped):
                logger.warning("balance ratio sample skipped at G step %d: non-finite discriminator "
                               "scores (real %s, fake before %s, fake after %s); %d skipped so far",
                               step, real, before, after, self.skipped)
            return None
        if abs(real - before) < _EPS:
            self.skipped += 1
            if _should_log(self.skipped):
                logger.warning("balance ratio sample skipped at G step %d: D(x) equals D(G(z)) (zero "
                               "denominator); %d skipped so far", step, self.skipped)
            return None
        sample = (after - before) / (real - before)
        self._samples.append(sample)
        self.history.append((step, sample, self.value))  # type: ignore[arg-type]
        return sample

    @property
    def value(self) -> float | None:
        """Mean of the samples in the window, or ``None`` before the first sample."""
        return sum(self._samples) / len(self._samples) if self._samples else None

    def __len__(self) -> int:
        """Number of samples currently in the window."""
        return len(self._samples)

    def state_dict(self) -> dict[str, Any]:
        """Window contents, history and skip count."""
        return {"window": self.window, "samples": list(self._samples), "history": list(self.history),
                "skipped": self.skipped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (the window size must match)."""
        if state["window"] != self.window:
            raise ValueError(f"saved BR window is {state['window']}, this one is {self.window}")
        self._samples = deque(state["samples"], maxlen=self.window)
        self.history = [tuple(h) for h in state["history"]]  # type: ignore[misc]
        self.skipped = int(state["skipped"])

    def __repr__(self) -> str:
        value = "None" if self.value is None else f"{self.value:.4f}"
        return f"BalanceRatio(window={self.window}, samples={len(self)}, value={value}, skipped={self.skipped})"


class BalanceProbe:
    """Measures BR samples around the generator's optimizer step, leaving no trace.

    Before G's step it draws ``z`` (from its own generator) and a real batch, and records
    ``D(G(z))``; after the step it records ``D(G'(z))`` and ``D(x)``. Forward passes run under
    ``torch.no_grad()``; every buffer of G and D (BatchNorm statistics, spectral-norm vectors) and
    the global CPU/CUDA RNG states are restored afterwards, so training with and without the probe
    is bit-identical.

    Args:
        generator: G (the module the user trains).
        discriminator: D.
        latent: ``n -> G input`` (a tensor, or a tuple of G's positional arguments).
        real: Real batches: an iterable (e.g. a DataLoader, cycled) or a callable ``n -> batch``.
            A tuple/list batch (image, label) gives D its first element.
        batch_size: Latents per sample; defaults to the real batch's size.
        seed: Seed of the probe's own random generator.

    Limits: D is called with one argument (the image), so a conditional ``D(x, y)`` needs
    :meth:`SparseGANWrapper.observe` instead; the probe runs G and D in whatever train/eval mode
    they are in (BatchNorm batch statistics in training, as in the training step itself).
    """

    def __init__(self, generator: nn.Module, discriminator: nn.Module, latent: Callable[[int], Any],
                 real: Iterable[Any] | Callable[[int], Any], *, batch_size: int | None = None, seed: int = 0) -> None:
        if not callable(latent):
            raise TypeError("latent must be a callable n -> batch of G inputs")
        if not callable(real) and not isinstance(real, Iterable):
            raise TypeError("real must be an iterable of real batches (e.g. a DataLoader) or a callable n -> batch")
        self.generator, self.discriminator = generator, discriminator
        self.latent, self.real = latent, real
        self.batch_size = batch_size
        self.rng = torch.Generator().manual_seed(seed)
        self._iterator: Iterator[Any] | None = None
        self._pending: tuple[tuple[Any, ...], float] | None = None
        self._real: Any = None

    @contextlib.contextmanager
    def _seeded(self) -> Iterator[None]:
        """Seed the global RNG from the probe's generator for the block; restore it afterwards."""
        seed = int(torch.randint(2**62, (1,), generator=self.rng))
        with isolated_rng(seed):
            yield

    def _real_batch(self) -> torch.Tensor:
        with self._seeded():
            if callable(self.real):
                batch = self.real(self.batch_size or 64)
            else:
                try:
                    batch = next(self._iterator) if self._iterator is not None else None
                except StopIteration:
                    batch = None
                if batch is None:
                    self._iterator = iter(self.real)  # type: ignore[arg-type]
                    batch = next(self._iterator)
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        device = module_device(self.discriminator)
        if isinstance(batch, torch.Tensor) and batch.device != device:
            batch = batch.to(device, non_blocking=True)  # a CPU DataLoader feeding a GPU model
        return batch

    @staticmethod
    def _score(output: Any) -> torch.Tensor:
        """D's adversarial score: the output, or its first tensor when D returns several."""
        if isinstance(output, torch.Tensor):
            return output
        return next(x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor))

    def _d(self, x: Any) -> torch.Tensor:
        return self._score(self.discriminator(*as_args(x)))

    def _g(self, z: tuple[Any, ...]) -> Any:
        out = self.generator(*z)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out

    @property
    def pending(self) -> bool:
        """Whether :meth:`before_step` ran and :meth:`after_step` has not yet."""
        return self._pending is not None

    def before_step(self) -> None:
        """Draw ``z`` and record ``mean D(G(z))`` with the generator before its update."""
        real = self._real_batch()
        n = self.batch_size or (real.shape[0] if isinstance(real, torch.Tensor) else 64)
        with self._seeded():
            z = as_args(self.latent(n))
        with preserved_state(self.generator, self.discriminator), torch.no_grad():
            before = _mean(self._d(self._g(z)))
        self._pending = (z, before)
        self._real = real

    def after_step(self) -> tuple[float, float, float] | None:
        """Return ``(mean D(x), mean D(G(z)), mean D(G'(z)))`` for the pending sample (or None)."""
        if self._pending is None:
            return None
        z, before = self._pending
        self._pending = None
        with preserved_state(self.generator, self.discriminator), torch.no_grad():
            after = _mean(self._d(self._g(z)))
            real = _mean(self._d(self._real))
        self._real = None
        return real, before, after

    def state_dict(self) -> dict[str, Any]:
        """The probe's RNG state (a real-batch iterator cannot be saved; it restarts)."""
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the probe's RNG state."""
        self.rng.set_state(state["rng"])


def check_bounds(bounds: tuple[float, float]) -> tuple[float, float]:
    """Validate BR bounds ``(lower, upper)``: ordered, within [0, 1].

    Raises:
        ValueError: naming the problem (the paper uses (0.45, 0.55)).
    """
    try:
        lower, upper = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"br_bounds must be a pair (lower, upper) of numbers, got {bounds!r}") from None
    if not (0.0 <= lower < upper <= 1.0):
        raise ValueError(
            f"br_bounds must satisfy 0 <= lower < upper <= 1, got {bounds!r}; the paper uses (0.45, 0.55)"
        )
    return lower, upper


@dataclass(frozen=True)
class Decision:
    """What the controller decided at one update.

    Attributes:
        action: ``"grow"`` (raise D's density), ``"prune"`` (lower it), ``"dst"`` (at the cap in
            strict mode: prune-and-grow at constant density) or ``"hold"``.
        density: D's target density after the decision.
        balance_ratio: The windowed BR the decision was based on (None: no data yet).
    """

    action: Literal["grow", "prune", "dst", "hold"]
    density: float
    balance_ratio: float | None


class DensityController:
    """Moves the discriminator's density by the balance ratio (ADAPT / DDST).

    * BR >= upper bound: D too weak -> density + ``step`` (up to ``max_density``); in strict mode at
      the cap, a connectivity update (``"dst"``) instead.
    * BR <= lower bound: D too strong -> density - ``step`` (down to ``min_density``).
    * otherwise, or without a BR yet: hold.

    Args:
        density: Initial density of D.
        bounds: ``(lower, upper)`` BR bounds.
        step: Density change per decision.
        min_density: Floor (0.05 in the paper).
        max_density: Cap (1.0 in relax mode, e.g. 0.5 in strict).
        mode: ``"relax"`` or ``"strict"``.
    """

    def __init__(self, density: float, *, bounds: tuple[float, float] = (0.45, 0.55), step: float = 0.05,
                 min_density: float = 0.05, max_density: float = 1.0,
                 mode: Literal["relax", "strict"] = "relax") -> None:
        if mode not in ("relax", "strict"):
            raise ValueError(f"mode must be 'relax' or 'strict', got {mode!r}")
        if not 0.0 < step < 1.0:
            raise ValueError(f"density_step must be in (0, 1), got {step!r}")
        if not 0.0 < min_density <= max_density <= 1.0:
            raise ValueError(f"need 0 < min_density <= max_density <= 1, got {min_density!r}, {max_density!r}")
        if not min_density <= density <= max_density:
            raise ValueError(f"initial D density {density!r} is outside [min_density, max_density] = "
                             f"[{min_density}, {max_density}]")
        self.bounds = check_bounds(bounds)
        self.step, self.min_density, self.max_density, self.mode = step, min_density, max_density, mode
        self.density = float(density)
        self.decisions: list[tuple[int, Decision]] = []

    def decide(self, balance_ratio: float | None, *, step: int = -1) -> Decision:
        """Decide on D's density from the windowed BR (and remember the new density)."""
        lower, upper = self.bounds
        action: Literal["grow", "prune", "dst", "hold"] = "hold"
        density = self.density
        if balance_ratio is not None and balance_ratio >= upper:
            if density < self.max_density - 1e-12:
                density, action = min(self.max_density, round(density + self.step, 10)), "grow"
            elif self.mode == "strict":
                action = "dst"
        elif balance_ratio is not None and balance_ratio <= lower:
            if density > self.min_density + 1e-12:
                density, action = max(self.min_density, round(density - self.step, 10)), "prune"
        decision = Decision(action, density, balance_ratio)
        self.density = density
        self.decisions.append((step, decision))
        return decision

    def state_dict(self) -> dict[str, Any]:
        """Current density and the decision log."""
        return {"density": self.density,
                "decisions": [(s, d.action, d.density, d.balance_ratio) for s, d in self.decisions]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self.density = float(state["density"])
        self.decisions = [(s, Decision(a, d, b)) for s, a, d, b in state["decisions"]]

    def __repr__(self) -> str:
        return (f"DensityController(mode={self.mode!r}, density={self.density:.4f}, bounds={self.bounds}, "
                f"step={self.step}, range=[{self.min_density}, {self.max_density}])")
