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
from torch.utils.hooks import RemovableHandle

from sparsegan._utils import as_args, isolated_rng, preserved_state, to_module

__all__ = ["BalanceEstimator", "BalanceRatio", "BalanceProbe", "DensityController", "Decision", "ESTIMATORS",
           "WARMUP", "WARMUP_BAND", "Bounds", "check_bounds"]

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
        self.history.append((step, sample, self.value))  # type: ignore[arg-type]  # value is set: a sample was just added
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
        self.history = [tuple(h) for h in state["history"]]
        self.skipped = int(state["skipped"])

    def __repr__(self) -> str:
        value = "None" if self.value is None else f"{self.value:.4f}"
        return f"BalanceRatio(window={self.window}, samples={len(self)}, value={value}, skipped={self.skipped})"


BalanceEstimator = Literal["step", "fresh"]
"""How the probe measures a BR sample: ``"step"`` (the reference's estimator, on the G step's own
latents) or ``"fresh"`` (freshly drawn latents and real batches; a different, smaller quantity)."""

ESTIMATORS: tuple[str, ...] = ("step", "fresh")

_MAX_CALLS = 16
"""Recent G outputs and D calls the step estimator remembers between D's optimizer steps."""


def _storage(value: Any) -> int | None:
    """Identity of a tensor's storage (views and ``.detach()`` share it), or None for a non-tensor."""
    if isinstance(value, torch.Tensor) and value.layout == torch.strided:
        return value.untyped_storage().data_ptr()
    return None


@dataclass
class _Call:
    """One recorded forward call: its arguments and (detached) output."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any = None


class BalanceProbe:
    """Measures BR samples around the generator's optimizer step, leaving no trace.

    Two estimators:

    * ``"step"`` (default; the reference's): the latents ``z`` are the ones the user's G step
      was just trained on. Forward hooks on G and D record the user's own calls (references to
      the arguments, nothing copied); at G's optimizer step the probe takes ``z`` from G's last
      call and ``D(G_t(z))`` from D's output on that call's images (recomputed only when the
      loop did not score them with D itself), and after the step it runs ``G_{t+1}(z)`` and D
      on it once, plus the current D on the real batch of the last D step. D's extra arguments
      (a class label, ...) are replayed as the user passed them, so conditional GANs work.
      *Which D call was the real one* in a D step: the first D call whose first argument does not
      share storage with an output G produced since the previous D step (``G(z)``,
      ``G(z).detach()`` and views of them do), provided at least one call of the step was on such
      an output (a later call on a mix, as in a gradient penalty, is not taken for the real one). When that cannot be told (no D call of the step
      was on G's output, e.g. fakes passed through ``.clone()`` or an augmentation), a batch
      from ``real=`` is used, or the sample is skipped with a logged warning. Training code that
      calls ``G.forward()`` directly (torch-mimicry's trainer does) bypasses forward hooks; then
      the sample is measured as ``"fresh"`` when ``latent`` and ``real`` are given (logged and
      counted in :attr:`fresh_fallbacks`), else skipped.
    * ``"fresh"``: ``z`` drawn from ``latent`` and a real batch from ``real`` by the probe's own
      random generator, independent of the training step. It measures how far one G step moves
      D's score of *unrelated* fakes, which is smaller and noisier (1.2-2.4x smaller on our
      SNGAN) than the step estimator: bounds chosen for one do not carry to the other.

    Both estimators score with D as it is after G's update (already updated in this iteration),
    under ``torch.no_grad()``; every buffer of G and D (BatchNorm statistics, spectral-norm
    vectors), attributes set by forward hooks and the global CPU/CUDA RNG states are restored
    afterwards, so training with and without the probe is bit-identical.

    Args:
        generator: G (the module the user trains).
        discriminator: D.
        latent: ``n -> G input`` (a tensor, or a tuple of G's positional arguments); needed by
            ``"fresh"`` only.
        real: Real batches: an iterable (e.g. a DataLoader, cycled) or a callable ``n -> batch``.
            A tuple/list batch (image, label) gives D its first element. ``"fresh"`` needs it;
            ``"step"`` uses it only when the D step's real batch cannot be identified.
        estimator: ``"step"`` or ``"fresh"``.
        batch_size: Latents per ``"fresh"`` sample; defaults to the real batch's size.
        seed: Seed of the probe's own random generator.
        d_inputs: ``images -> D's positional inputs`` (a tensor or a tuple), for a D that takes
            more than the image, e.g. ``lambda x: (x, D.real_images_to_rgbs(x))``. When given,
            every D call the probe makes goes through it (the replayed G'(z), a batch from
            ``real``, the fresh estimator), instead of replaying the loop's extra arguments.

    Limits: the probe runs G and D in whatever train/eval mode they are in (BatchNorm batch
    statistics in training, as in the training step itself); ``"fresh"`` calls D with one
    argument (the image), so a conditional ``D(x, y)`` needs ``"step"`` or
    :meth:`SparseGANWrapper.observe`.
    """

    def __init__(self, generator: nn.Module, discriminator: nn.Module, latent: Callable[[int], Any] | None = None,
                 real: Iterable[Any] | Callable[[int], Any] | None = None, *, estimator: BalanceEstimator = "step",
                 batch_size: int | None = None, seed: int = 0,
                 d_inputs: Callable[[torch.Tensor], Any] | None = None) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"balance-ratio estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if latent is not None and not callable(latent):
            raise TypeError("latent must be a callable n -> batch of G inputs")
        if real is not None and not callable(real) and not isinstance(real, Iterable):
            raise TypeError("real must be an iterable of real batches (e.g. a DataLoader) or a callable n -> batch")
        if estimator == "fresh" and (latent is None or real is None):
            raise ValueError("the 'fresh' balance-ratio estimator draws its own latents and real batches: "
                             "pass latent= (n -> G input) and real= (real batches), or use the 'step' estimator")
        self.generator, self.discriminator = generator, discriminator
        self.latent, self.real = latent, real
        self.estimator: BalanceEstimator = estimator
        self.batch_size = batch_size
        if d_inputs is not None and not callable(d_inputs):
            raise TypeError("d_inputs must be a callable images -> D's positional inputs")
        self.d_inputs = d_inputs
        self.rng = torch.Generator().manual_seed(seed)
        self._iterator: Iterator[Any] | None = None
        self._pending: tuple[Callable[[], Any], tuple[Any, ...], dict[str, Any], float, _Call] | None = None
        # the step estimator's record of the user's calls (references only)
        self._g_call: _Call | None = None            # G's last call
        # storages of G's recent outputs, each kept alive so that no storage is reused meanwhile
        self._g_outputs: dict[int, torch.Tensor] = {}
        self._d_calls: list[_Call] = []               # D's calls since its last optimizer step
        self._d_on_fake: _Call | None = None          # D's last call on the output of G's last call
        self._real_call: _Call | None = None          # the real-batch call of the last D step
        self.unidentified = 0                         # D steps whose real batch could not be told apart
        self.fresh_fallbacks = 0                      # G steps measured on fresh latents (no G call seen)
        self._replaying = False                       # the probe's own forwards are not the user's calls
        self.unmatched = 0                            # samples skipped: no D call on G's output to replay

    # ------------------------------------------------------------------ hooks (step estimator)

    def attach(self) -> list[RemovableHandle]:
        """Register the forward hooks that record the user's calls (``"step"`` only); returns their handles."""
        if self.estimator != "step":
            return []
        return [
            self.generator.register_forward_pre_hook(self._g_pre, with_kwargs=True),
            self.generator.register_forward_hook(self._g_post),
            self.discriminator.register_forward_pre_hook(self._d_pre, with_kwargs=True),
            self.discriminator.register_forward_hook(self._d_post),
        ]

    def _g_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._replaying:
            return
        self._g_call = _Call(args, kwargs)
        self._d_on_fake = None

    def _g_post(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._replaying:
            return
        image = _first_tensor(output)
        if self._g_call is not None and image is not None:
            self._g_call.output = image.detach()
            self._remember(self._g_call.output)

    def _remember(self, fake: torch.Tensor) -> None:
        storage = _storage(fake)
        if storage is not None:
            self._g_outputs[storage] = fake
            while len(self._g_outputs) > _MAX_CALLS:  # G sampled many times without a D step (evaluation)
                del self._g_outputs[next(iter(self._g_outputs))]

    def _d_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self._replaying:
            self._d_calls.append(_Call(args, kwargs))

    def _d_post(self, module: nn.Module, args: Any, output: Any) -> None:
        call = self._d_calls[-1] if self._d_calls and not self._replaying else None
        if call is None:
            return
        score = _first_tensor(output)
        call.output = score.detach() if score is not None else None
        fake = self._g_call.output if self._g_call is not None else None
        first = call.args[0] if call.args else None
        if fake is not None and first is not None and _storage(first) == _storage(fake):
            self._d_on_fake = call
        if len(self._d_calls) > _MAX_CALLS:  # D evaluated many times without an optimizer step
            del self._d_calls[0]

    def generator_stepped(self) -> None:
        """Called after G's optimizer step: G's next step, and D's next step, must be seen anew."""
        self._g_call = None
        self._d_calls.clear()  # the G step's own D call must not vouch for the next D step's fakes

    def discriminator_stepped(self) -> None:
        """Called after D's optimizer step: tell its real-batch call apart, then forget the step's calls."""
        if self.estimator != "step":
            return
        fakes = [c for c in self._d_calls if c.args and _storage(c.args[0]) in self._g_outputs]
        reals = [c for c in self._d_calls if c.args and _storage(c.args[0]) not in self._g_outputs]
        if fakes and reals:
            self._real_call = _Call(reals[0].args, reals[0].kwargs)
        elif self._d_calls:
            self.unidentified += 1
            self._real_call = None
            if _should_log(self.unidentified):
                logger.info("balance-ratio probe: could not tell D's real batch from its fakes in this D step "
                            "(no D call had G's output as its first argument); %s (%d such D steps)",
                            "using a batch from real=" if self.real is not None else "the sample will be skipped",
                            self.unidentified)
        self._forget_d_step()

    def _forget_d_step(self) -> None:
        self._d_calls.clear()
        self._g_outputs.clear()
        if self._g_call is not None and self._g_call.output is not None:  # G's last output may be D's next fake
            self._remember(self._g_call.output)

    # ------------------------------------------------------------------ sources

    @contextlib.contextmanager
    def _seeded(self) -> Iterator[None]:
        """Seed the global RNG from the probe's generator for the block; restore it afterwards."""
        seed = int(torch.randint(2**62, (1,), generator=self.rng))
        with isolated_rng(seed):
            yield

    def _real_batch(self) -> torch.Tensor:
        assert self.real is not None
        with self._seeded():
            if callable(self.real):
                batch = self.real(self.batch_size or 64)
            else:
                try:
                    batch = next(self._iterator) if self._iterator is not None else None
                except StopIteration:
                    batch = None
                if batch is None:
                    self._iterator = iter(self.real)
                    batch = next(self._iterator)
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        return to_module(batch, self.discriminator)  # e.g. a CPU DataLoader feeding a GPU model

    def _d(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        score = _first_tensor(self.discriminator(*args, **kwargs))
        if score is None:
            raise TypeError(f"the discriminator returned no tensor ({type(score).__name__}); the balance-ratio "
                            "probe needs D's score")
        return score

    def _score(self, images: Any, rest: tuple[Any, ...] = (), rest_kwargs: Mapping[str, Any] | None = None) -> torch.Tensor:
        """D's score of an image batch: through ``d_inputs`` when given, else with the loop's extra arguments."""
        if self.d_inputs is not None:
            return self._d(*as_args(self.d_inputs(images)))
        return self._d(images, *rest, **(rest_kwargs or {}))

    def check_discriminator(self, images: torch.Tensor) -> None:
        """Score an example image batch the way the probe will, so a D it cannot call fails at wrap time.

        Raises:
            TypeError: If D cannot be called on ``images`` alone (or on ``d_inputs(images)``), with the fix.
        """
        try:
            with isolated_rng(), self._replay():
                self._score(images)
        except TypeError as exc:
            how = "on d_inputs(images)" if self.d_inputs is not None else "on an image batch alone"
            raise TypeError(
                f"the balance-ratio probe calls the discriminator {how}, and that call fails: {exc}. Pass "
                "d_inputs=lambda x: (x, ...) to map an image batch to D's inputs (e.g. lambda x: (x, "
                "D.real_images_to_rgbs(x))), or br_estimator='step' without real= to replay the loop's own D "
                "calls, or br_estimator=None and sg.observe(...)"
            ) from None

    def _g(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return _first_tensor(self.generator(*args, **kwargs))

    @contextlib.contextmanager
    def _replay(self) -> Iterator[None]:
        """The probe's own forwards: no gradient, no lasting effect, and not recorded as the user's calls."""
        self._replaying = True
        try:
            with preserved_state(self.generator, self.discriminator), torch.no_grad():
                yield
        finally:
            self._replaying = False

    @property
    def pending(self) -> bool:
        """Whether :meth:`before_step` ran and :meth:`after_step` has not yet."""
        return self._pending is not None

    def before_step(self) -> bool:
        """Take ``z`` and ``mean D(G(z))`` with the generator before its update.

        Returns:
            Whether a sample is pending (``False``: skipped, and logged, for want of a G call).
        """
        if self.estimator == "fresh":
            return self._before_fresh()
        call = self._g_call
        if call is None:  # the hooks saw no G call since G's last step: the loop calls G.forward() itself
            self.fresh_fallbacks += 1
            can = self.latent is not None and self.real is not None
            if _should_log(self.fresh_fallbacks):
                logger.warning("balance-ratio probe: G's forward hooks saw no call before this G step (does the "
                               "training code call G.forward() directly, as torch-mimicry's does?); %s (%d so far)",
                               "measuring on fresh latents from latent= instead" if can else
                               "sample skipped; pass latent= and real= for a fresh-latent fallback",
                               self.fresh_fallbacks)
            return self._before_fresh() if can else False
        fake = self._d_on_fake
        if fake is not None and fake.output is not None:
            before = _mean(fake.output)
            rest, rest_kwargs = fake.args[1:], fake.kwargs
        elif self.d_inputs is None and any(len(c.args) > 1 or c.kwargs for c in self._d_calls):
            # D takes more than the image (a label): without D's own call on G's output, what to pass is unknown
            return self._unmatched("D was not called on G's output in this G step and takes more than the image. "
                                   "Pass G's output to D as it is, or feed sg.observe(...)")
        else:  # the loop scored something else than G's output (an augmentation, a clone): score it here
            with self._replay():
                before = _mean(self._score(self._g(call.args, call.kwargs)))
            rest, rest_kwargs = (), {}
        real_call = self._real_call
        if real_call is not None:
            real = lambda: self._d(*real_call.args, **real_call.kwargs)  # noqa: E731  # called after G's step
        elif self.real is not None and (rest or rest_kwargs) and self.d_inputs is None:
            return self._unmatched("the D step's real batch could not be identified, and a batch from real= "
                                   "cannot be scored by a D that takes more than the image")
        elif self.real is not None:
            batch = self._real_batch()
            real = lambda: self._score(batch)  # noqa: E731  # called after G's step
        else:
            logger.warning("balance-ratio probe: no real batch for this sample (the D step's real batch could "
                           "not be identified and no real= was given); sample skipped")
            return False
        self._pending = (real, call.args, call.kwargs, before, _Call(rest, rest_kwargs))
        return True

    def _unmatched(self, reason: str) -> bool:
        """Count and log (rate-limited) a sample the step estimator cannot replay; returns False (skipped)."""
        self.unmatched += 1
        if _should_log(self.unmatched):
            logger.warning("balance-ratio probe: %s; sample skipped (%d so far)", reason, self.unmatched)
        return False

    def _before_fresh(self) -> bool:
        real_batch = self._real_batch()
        n = self.batch_size or (real_batch.shape[0] if isinstance(real_batch, torch.Tensor) else 64)
        assert self.latent is not None
        with self._seeded():
            z = as_args(to_module(self.latent(n), self.generator))
        with self._replay():
            before = _mean(self._score(self._g(z, {})))
        self._pending = (lambda: self._score(real_batch), z, {}, before, _Call((), {}))
        return True

    def after_step(self) -> tuple[float, float, float] | None:
        """Return ``(mean D(x), mean D(G(z)), mean D(G'(z)))`` for the pending sample (or None)."""
        if self._pending is None:
            return None
        real, args, kwargs, before, rest = self._pending
        self._pending = None
        with self._replay():
            after = _mean(self._score(self._g(args, kwargs), rest.args, rest.kwargs))
            real_score = _mean(real())
        return real_score, before, after

    def state_dict(self) -> dict[str, Any]:
        """The probe's RNG state (a real-batch iterator cannot be saved; it restarts)."""
        return {"rng": self.rng.get_state(), "estimator": self.estimator}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the probe's RNG state."""
        saved = state.get("estimator", "fresh")
        if saved != self.estimator:
            raise ValueError(f"saved balance-ratio estimator is {saved!r}, this probe's is {self.estimator!r}")
        self.rng.set_state(state["rng"])

    def __repr__(self) -> str:
        return f"BalanceProbe(estimator={self.estimator!r})"


def _first_tensor(output: Any) -> torch.Tensor | None:
    """The output itself, or its first tensor when a module returns several."""
    if isinstance(output, torch.Tensor):
        return output
    return next((x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor)), None)


WARMUP = "warmup"
"""``br_bounds="warmup"``: bounds taken from the balance ratio of the first full window."""

WARMUP_BAND: tuple[float, float] = (0.9, 1.1)
"""The warm-up bounds relative to the first window's BR: the paper's band (0.45, 0.55) is its
centre 0.5 +- 10 %."""

Bounds = tuple[float, float] | Literal["warmup"]


def check_bounds(bounds: Bounds) -> tuple[float, float] | Literal["warmup"]:
    """Validate BR bounds: ``"warmup"``, or ``(lower, upper)`` ordered within [0, 1].

    Raises:
        ValueError: naming the problem (the paper uses (0.45, 0.55)).
    """
    if bounds == WARMUP:
        return WARMUP
    try:
        lower, upper = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"br_bounds must be a pair (lower, upper) of numbers or 'warmup', got {bounds!r}") from None
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

    *Warm-up bounds* (``bounds="warmup"``, our extension, not in the paper): decisions hold until
    :meth:`calibrate` is given the mean BR of a warm-up measured while D is still at its initial
    density (d_G: the paper's balanced start), which fixes the bounds at ``WARMUP_BAND`` (0.9x,
    1.1x) of it. The controller then keeps the balance where the balanced start put it, in the
    paper's relative band width (0.5 +- 10 %), whatever the model's BR scale is.

    Args:
        density: Initial density of D.
        bounds: ``(lower, upper)`` BR bounds, or ``"warmup"``.
        step: Density change per decision.
        min_density: Floor (0.05 in the paper).
        max_density: Cap (1.0 in relax mode, e.g. 0.5 in strict).
        mode: ``"relax"`` or ``"strict"``.
    """

    def __init__(self, density: float, *, bounds: Bounds = (0.45, 0.55), step: float = 0.05,
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
        checked = check_bounds(bounds)
        self.warmup = checked == WARMUP
        self.bounds: tuple[float, float] | None = None if checked == WARMUP else checked  # type: ignore[assignment]  # the pair once 'warmup' is excluded
        self.step, self.min_density, self.max_density, self.mode = step, min_density, max_density, mode
        self.density = float(density)
        self.decisions: list[tuple[int, Decision]] = []

    def decide(self, balance_ratio: float | None, *, step: int = -1) -> Decision:
        """Decide on D's density from the windowed BR (and remember the new density)."""
        action: Literal["grow", "prune", "dst", "hold"] = "hold"
        density = self.density
        if self.bounds is None:  # warm-up: no decision before calibrate() fixed the bounds
            decision = Decision(action, density, balance_ratio)
            self.decisions.append((step, decision))
            return decision
        lower, upper = self.bounds
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

    def calibrate(self, balance_ratio: float) -> bool:
        """Fix warm-up bounds at ``WARMUP_BAND`` times ``balance_ratio`` (the warm-up's mean BR).

        Returns:
            Whether the bounds were fixed (a BR outside ``(0, 1 / 1.1]`` fixes nothing, with a warning).
        """
        if 0.0 < balance_ratio * WARMUP_BAND[1] <= 1.0:
            self.bounds = (balance_ratio * WARMUP_BAND[0], balance_ratio * WARMUP_BAND[1])
            logger.info("DDST warm-up bounds from the warm-up's mean BR %.4f: (%.4f, %.4f)", balance_ratio, *self.bounds)
            return True
        logger.warning("DDST warm-up: the warm-up's mean BR %.4f cannot centre bounds in [0, 1]; trying again at "
                       "the next decision", balance_ratio)
        return False

    def state_dict(self) -> dict[str, Any]:
        """Current density and the decision log."""
        return {"density": self.density, "bounds": self.bounds,
                "decisions": [(s, d.action, d.density, d.balance_ratio) for s, d in self.decisions]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self.density = float(state["density"])
        saved = state.get("bounds", self.bounds)
        if not self.warmup and saved is not None and tuple(saved) != self.bounds:
            raise ValueError(f"saved BR bounds {tuple(saved)} differ from this controller's {self.bounds}")
        self.bounds = None if saved is None else (float(saved[0]), float(saved[1]))
        self.decisions = [(s, Decision(a, d, b)) for s, a, d, b in state["decisions"]]

    def __repr__(self) -> str:
        bounds = self.bounds if self.bounds is not None else "warmup (pending)"
        return (f"DensityController(mode={self.mode!r}, density={self.density:.4f}, bounds={bounds}, "
                f"step={self.step}, range=[{self.min_density}, {self.max_density}])")
