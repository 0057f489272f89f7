"""A small SNGAN and a hinge-loss training loop that uses :class:`~sparsegan.SparseGANWrapper`
exactly as a user would.

This is what ``sparsegan demo`` and ``sparsegan compare`` run, and a worked example of the
library on a real (if tiny) image GAN:

* :class:`SNGANGenerator` / :class:`SNGANDiscriminator`: the ResNet SNGAN of Miyato et al. (2018)
  at 16x16 or 32x32 with configurable width; spectral norm (legacy ``weight_orig`` form) on
  every layer of D, BatchNorm in G;
* :func:`build_strategy`: a strategy by name (``dense``, ``static``, ``sdst``, ``ddst``,
  ``ddst-relax``, ``ddst-strict``, ``dst``) with its schedules either as published
  (``schedule="paper"``) or *compressed* to the length of a short run (the default; see
  :func:`compressed_schedule`);
* :func:`train`: the loop. Only two lines in it concern sparsity: wrapping the models, and
  reading ``sg`` for logging. Everything else (``n_critic`` D steps of hinge loss, one G step,
  Adam(2e-4, (0, 0.9))) is the standard SNGAN recipe.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from sparsegan.balance import Bounds
from sparsegan.data import ImageDataset
from sparsegan.strategies import DDST, DST, SDST, Dense, Static, Strategy, check_density
from sparsegan.strategies.ddst import PAPER_BOUNDS, RELAX_INTERVAL
from sparsegan.wrapper import SparseGANWrapper

__all__ = [
    "POOLINGS",
    "STRATEGY_NAMES",
    "RunCurves",
    "SNGANDiscriminator",
    "SNGANGenerator",
    "Schedule",
    "TrainConfig",
    "TrainResult",
    "build_strategy",
    "compressed_schedule",
    "default_d_density",
    "generate",
    "paper_schedule",
    "plot_runs",
    "save_image_grid",
    "train",
]

logger = logging.getLogger(__name__)

STRATEGY_NAMES: tuple[str, ...] = ("dense", "static", "sdst", "ddst", "ddst-relax", "ddst-strict", "dst")
"""Strategy names :func:`build_strategy` accepts (``ddst`` is ``ddst-relax``)."""


# ---------------------------------------------------------------------------------------- models


class _GBlock(nn.Module):
    """Pre-activation residual block of the SNGAN generator, upsampling by 2."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.relu(self.bn1(x)), scale_factor=2.0, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h))))
        return h + self.shortcut(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _DBlock(nn.Module):
    """Residual block of the SNGAN discriminator, optionally downsampling by 2."""

    def __init__(self, cin: int, cout: int, *, down: bool, first: bool = False) -> None:
        super().__init__()
        self.down, self.first = down, first
        self.conv1 = spectral_norm(nn.Conv2d(cin, cout, 3, padding=1))
        self.conv2 = spectral_norm(nn.Conv2d(cout, cout, 3, padding=1))
        self.shortcut = spectral_norm(nn.Conv2d(cin, cout, 1)) if (cin != cout or down) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.first else F.relu(x)
        h = self.conv2(F.relu(self.conv1(h)))
        if self.down:
            h = F.avg_pool2d(h, 2)
        s = x
        if self.first:  # SNGAN's "optimized" first block: pool, then project
            s = self.shortcut(F.avg_pool2d(s, 2)) if self.shortcut is not None else s
        else:
            s = self.shortcut(s) if self.shortcut is not None else s
            s = F.avg_pool2d(s, 2) if self.down else s
        return h + s


POOLINGS: tuple[str, ...] = ("sum", "mean")
"""Global pooling choices of :class:`SNGANDiscriminator`."""


def _check_image_size(image_size: int) -> int:
    if image_size not in (16, 32, 64):
        raise ValueError(f"image_size must be 16, 32 or 64, got {image_size!r}")
    return image_size


class SNGANGenerator(nn.Module):
    """ResNet SNGAN generator: linear to 4x4, residual upsampling blocks, BN-ReLU-conv-tanh.

    Args:
        latent_dim: Size of the latent vector ``z``.
        channels: Width of every block (``ngf``; 256 in the paper's CIFAR model).
        image_size: 16, 32 or 64 (2, 3 or 4 upsampling blocks).
        out_channels: Image channels (1 grey, 3 RGB).
    """

    def __init__(self, latent_dim: int = 128, channels: int = 64, image_size: int = 32, out_channels: int = 3) -> None:
        super().__init__()
        blocks = int(math.log2(_check_image_size(image_size) // 4))
        self.latent_dim, self.channels = latent_dim, channels
        self.fc = nn.Linear(latent_dim, 4 * 4 * channels)
        self.blocks = nn.Sequential(*[_GBlock(channels, channels) for _ in range(blocks)])
        self.bn = nn.BatchNorm2d(channels)
        self.out = nn.Conv2d(channels, out_channels, 3, padding=1)
        nn.init.xavier_uniform_(self.fc.weight)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Images in ``[-1, 1]`` from latents ``(N, latent_dim)``."""
        h = self.fc(z).view(z.shape[0], self.channels, 4, 4)
        return torch.tanh(self.out(F.relu(self.bn(self.blocks(h)))))


class SNGANDiscriminator(nn.Module):
    """ResNet SNGAN discriminator with spectral norm on every layer; outputs one logit per image.

    Downsampling blocks bring the image to 8x8 (16 px: 1, 32 px: 2, 64 px: 3), followed by two
    plain residual blocks, ReLU, global pooling over the 8x8 positions and a linear layer.

    ``pooling="sum"`` is SNGAN's (and torch-mimicry's) global sum pooling. ``"mean"`` divides
    the same sum by the 64 positions. Spectral norm fixes every layer's scale, so pooling is
    what sets the size of D's logits. With sum pooling, the logits of an untrained D at width 32
    are around 10-15, far outside the hinge loss's margin of 1. In the demo's short runs
    (:class:`TrainConfig`) a sparse G's first samples were then separated at once: D's hinge
    loss was exactly 0 by iteration 20 and Static never recovered on 2 of 8 seeds. That is why
    the demo uses ``"mean"`` (see ``results/compare/README.md``, "The setup").

    Args:
        channels: Width of every block (``ndf``; 128 in the paper's CIFAR model).
        image_size: 16, 32 or 64.
        in_channels: Image channels.
        pooling: ``"sum"`` (SNGAN's) or ``"mean"`` over the final 8x8 feature map.

    Raises:
        ValueError: For an unknown ``pooling`` or ``image_size``.
    """

    def __init__(self, channels: int = 64, image_size: int = 32, in_channels: int = 3, *,
                 pooling: str = "sum") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(map(repr, POOLINGS))}, got {pooling!r}")
        self.pooling = pooling
        downs = int(math.log2(_check_image_size(image_size) // 8))
        layers: list[nn.Module] = [_DBlock(in_channels, channels, down=True, first=True)]
        layers += [_DBlock(channels, channels, down=True) for _ in range(downs - 1)]
        layers += [_DBlock(channels, channels, down=False) for _ in range(2)]
        self.blocks = nn.Sequential(*layers)
        self.fc = spectral_norm(nn.Linear(channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, 1)`` for images ``(N, C, H, W)``."""
        h = F.relu(self.blocks(x))
        h = h.sum(dim=(2, 3)) if self.pooling == "sum" else h.mean(dim=(2, 3))
        return self.fc(h)


# ---------------------------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class Schedule:
    """The intervals of the sparse-training algorithms for one run, all in iterations (G steps).

    Attributes:
        g_update_every: G steps between G's prune-and-grow updates (SDST / DDST / DST).
        d_update_every: Iterations between D-density decisions in relax mode (strict: twice that,
            see :func:`build_strategy`).
        br_every: G steps between balance-ratio samples.
        br_window: BR samples averaged by the controller (``d_update_every // br_every``: the
            window spans relax's interval, as in the reference).
        total_g_steps: Iterations of the run (cosine decays; no update at the end of the run).
    """

    g_update_every: int
    d_update_every: int
    br_every: int
    br_window: int
    total_g_steps: int


def paper_schedule(iterations: int) -> Schedule:
    """The published SNGAN constants: G update every 500 G steps, D decision every 1000 iterations
    (relax; strict every 2000, see :func:`build_strategy`), BR every 10 G steps, window 100 samples
    (1000 iterations)."""
    return Schedule(500, RELAX_INTERVAL, 10, RELAX_INTERVAL // 10, iterations)


REFERENCE_ITERATIONS = 100_000
"""Length of the published runs (iterations), which fixes the proportions of :func:`compressed_schedule`."""


def compressed_schedule(iterations: int, *, g_updates: int = 4) -> Schedule:
    """Schedules scaled to a short run, in the reference's proportions.

    The published runs last 10^5 iterations with a relax decision every 1000 (100 decisions, the
    first once the BR window is full), a window as long as relax's interval (100 samples at every
    10 iterations), and strict deciding half as often. A CPU run lasts ~10^3 iterations; keeping
    the published intervals would mean no D decision at all. So this schedule keeps the
    *proportions*: a relax decision every ``iterations / 100`` iterations (strict: twice that), a
    window spanning exactly one relax interval, a sample every ``interval / 100`` iterations but
    at least every iteration (so at 1000 iterations: a decision every 10 iterations on the mean of
    the last 10 samples, one per iteration).

    G is *not* scaled the same way: ``g_updates`` equal intervals between G prune-and-grow updates,
    i.e. ``g_updates - 1`` updates (none at the end of the run, so ``g_updates=1`` keeps G static).
    Why only 4 intervals (3 updates) by default: a regrown weight starts at 0 and Adam moves it by
    about the learning rate per step, so it needs a few hundred steps at lr 2e-4 to reach the
    magnitude of the weights it competes with (~0.05 here). With updates every 50 steps (20 per
    1000) a regrown weight can reach only ~0.01 before the next magnitude prune, and SDST on the
    digits SNGAN ended at FD 75 against 24 with updates every 250 steps (same 3 seeds, 1000
    iterations; see ``results/compare/README.md``). The published interval, 500 steps, allows ~0.1.

    Args:
        iterations: G steps of the run.
        g_updates: Intervals between G prune-and-grow updates (an update every
            ``iterations // g_updates`` G steps, ``g_updates - 1`` in all).
    """
    iterations = max(1, int(iterations))
    if isinstance(g_updates, bool) or not isinstance(g_updates, int) or g_updates < 1:
        raise ValueError(f"g_updates must be a positive int, got {g_updates!r}")
    decisions = REFERENCE_ITERATIONS // RELAX_INTERVAL
    interval = max(1, iterations // decisions)
    br_every = max(1, interval // (RELAX_INTERVAL // 10))
    return Schedule(
        g_update_every=max(1, iterations // g_updates),
        d_update_every=interval,
        br_every=br_every,
        br_window=max(1, interval // br_every),
        total_g_steps=iterations,
    )


def default_d_density(name: str, g_density: float) -> float:
    """The initial D density a strategy starts from when none is given.

    Every sparse strategy: equal to ``g_density`` (the paper's "balanced" choice, and the
    reference's start for both DDST modes); ``dense``: 1.
    """
    return 1.0 if _canonical(name) == "dense" else g_density


def _canonical(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    if key not in STRATEGY_NAMES:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGY_NAMES)}")
    return "ddst-relax" if key == "ddst" else key


def build_strategy(name: str, *, g_density: float, d_density: float | None = None, iterations: int,
                   schedule: str | Schedule = "compressed",
                   br_bounds: Bounds | None = None, g_updates: int = 4) -> Strategy:
    """A strategy by name with its schedules set for a run of ``iterations`` G steps.

    Args:
        name: One of :data:`STRATEGY_NAMES`.
        g_density: Generator density in (0, 1] (ignored by ``dense``).
        d_density: Initial discriminator density (default: :func:`default_d_density`).
        iterations: G steps of the run.
        schedule: ``"compressed"`` (:func:`compressed_schedule`), ``"paper"``
            (:func:`paper_schedule`) or a :class:`Schedule`.
        br_bounds: DDST's balance-ratio bounds, a pair or ``"warmup"`` (default: the paper's ``(0.45, 0.55)``).
        g_updates: G prune-and-grow intervals per run under the compressed schedule.

    Returns:
        The strategy, ready for :class:`~sparsegan.SparseGANWrapper`.

    Raises:
        ValueError: For an unknown name or schedule, or a density outside (0, 1].
    """
    key = _canonical(name)
    if isinstance(schedule, Schedule):
        sched = schedule
    elif schedule == "compressed":
        sched = compressed_schedule(iterations, g_updates=g_updates)
    elif schedule == "paper":
        sched = paper_schedule(iterations)
    else:
        raise ValueError(f"schedule must be 'compressed', 'paper' or a Schedule, got {schedule!r}")
    if key == "dense":
        return _with_probe_rate(Dense(), sched)
    g_density = check_density(g_density, "g_density")
    d_density = check_density(default_d_density(key, g_density) if d_density is None else d_density, "d_density")
    common: dict[str, Any] = {"update_every": sched.g_update_every, "drop_fraction": 0.5,
                              "total_steps": sched.total_g_steps}
    strategy: Strategy
    if key == "static":
        strategy = Static(g_density, d_density)
    elif key == "dst":
        strategy = DST(g_density, d_density, update_every=sched.g_update_every, drop_fraction=0.5,
                       drop_schedule="cosine", total_steps=sched.total_g_steps)
    elif key == "sdst":
        strategy = SDST(g_density, d_density, **common)
    else:
        mode: Literal["relax", "strict"] = "strict" if key == "ddst-strict" else "relax"
        d_every = sched.d_update_every * (2 if mode == "strict" else 1)
        strategy = DDST(g_density, d_density, mode=mode, d_update_every=d_every, br_every=sched.br_every,
                        br_window=sched.br_window, d_min_density=min(0.05, d_density),
                        br_bounds=br_bounds or PAPER_BOUNDS, **common)
    return _with_probe_rate(strategy, sched)


def _with_probe_rate(strategy: Strategy, sched: Schedule) -> Strategy:
    """Measure BR at the schedule's rate under every strategy, so that all runs can be plotted alike."""
    strategy.br_every, strategy.br_window = sched.br_every, sched.br_window
    return strategy


# ---------------------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    """Everything :func:`train` needs besides the data.

    Attributes:
        strategy: A name from :data:`STRATEGY_NAMES`.
        g_density: Generator density.
        d_density: Initial discriminator density (``None``: :func:`default_d_density`).
        iterations: G steps (each preceded by ``n_critic`` D steps).
        n_critic: D steps per G step.
        batch_size: Real and fake images per step.
        latent_dim: Size of ``z``.
        g_channels: Generator width.
        d_channels: Discriminator width.
        d_pooling: The discriminator's global pooling, ``"mean"`` or SNGAN's ``"sum"`` (see
            :class:`SNGANDiscriminator` for why the demo averages).
        lr: Adam learning rate of both networks.
        betas: Adam betas.
        ema: Decay of the sparse-aware G-EMA (``None``: no EMA).
        schedule: ``"compressed"`` or ``"paper"`` (see :func:`build_strategy`).
        g_updates: G prune-and-grow intervals per run under the compressed schedule.
        br_bounds: DDST's balance-ratio bounds, a pair or ``"warmup"`` (``None``: the paper's ``(0.45, 0.55)``).
        seed: Seed of the weights, the masks, the data order and the latents.
        device: Torch device string.
        log_every: Iterations between history records.
        flush_denormal: Flush denormal floats to zero during training (CPU). A saturated
            discriminator (hinge loss 0) leaves Adam's second moments decaying into the denormal
            range, and a collapsing generator can produce denormal activations; arithmetic on
            denormals is up to ~100x slower on x86, which was observed to stall CPU runs at
            ~2 s/iteration. :func:`train` turns the mode off again when it returns.
    """

    strategy: str = "ddst"
    g_density: float = 0.1
    d_density: float | None = None
    iterations: int = 1000
    n_critic: int = 2
    batch_size: int = 32
    latent_dim: int = 64
    g_channels: int = 32
    d_channels: int = 32
    d_pooling: str = "mean"
    lr: float = 2e-4
    betas: tuple[float, float] = (0.0, 0.9)
    ema: float | None = 0.99
    schedule: str = "compressed"
    g_updates: int = 4
    br_bounds: Bounds | None = None
    seed: int = 0
    device: str = "cpu"
    log_every: int = 10
    flush_denormal: bool = True

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        out["br_bounds"] = list(self.br_bounds) if isinstance(self.br_bounds, tuple) else self.br_bounds
        return out


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        config: The configuration used.
        generator: The trained G (still wrapped: masks enforced by ``sg``).
        discriminator: The trained D.
        sg: The :class:`~sparsegan.SparseGANWrapper`.
        history: Per log point: ``iteration``, ``g_loss``, ``d_loss``, ``g_density``,
            ``d_density``, ``br`` (windowed BR or ``None``).
        balance: ``sg.balance.history``: ``(g_step, sample, windowed)`` per BR sample.
        wall_time: Seconds spent in the loop (excluding model construction and wrapping).
        strategy: ``repr`` of the strategy.
    """

    config: TrainConfig
    generator: nn.Module
    discriminator: nn.Module
    sg: SparseGANWrapper
    history: dict[str, list[Any]]
    balance: list[tuple[int, float, float]]
    wall_time: float
    strategy: str

    @property
    def ema_generator(self) -> nn.Module:
        """The EMA copy of G when the run kept one, else G itself."""
        return self.sg.ema.module if self.sg.ema is not None else self.generator

    def summary(self) -> dict[str, Any]:
        """Final densities (of the masked kernels, and of all weight tensors), BR, BR bounds used (DDST),
        FLOPs ratios, mask updates and wall time (JSON-friendly)."""
        flops = self.sg.flops()
        algorithm = self.sg.algorithm("discriminator")
        controller = getattr(algorithm, "controller", None)
        return {
            "strategy": self.config.strategy,
            "g_density": self.sg.density("generator"),
            "d_density": self.sg.density("discriminator"),
            "weight_density": {n: self.sg.weight_density(n) for n in ("generator", "discriminator")},
            "balance_ratio": self.sg.balance_ratio,
            "flops_ratio": {k: flops[k]["ratio"] for k in ("generator", "discriminator", "total")},
            "inference_flops_ratio": dict(flops["inference"]),
            "mask_updates": {n: self.sg.mask_updates(n) for n in ("generator", "discriminator")},
            "d_decisions": ([(s, d.action, d.density, d.balance_ratio) for s, d in controller.decisions]
                            if controller is not None else []),
            "br_bounds": list(controller.bounds) if controller is not None and controller.bounds else None,
            "wall_time_s": self.wall_time,
        }


def generate(generator: nn.Module, n: int, latent_dim: int, *, seed: int = 1234, batch_size: int = 256,
             device: torch.device | str | None = None) -> torch.Tensor:
    """``n`` images from ``generator`` in eval mode for fixed latents (seeded; global RNG untouched).

    Args:
        generator: The generator.
        n: Number of images.
        latent_dim: Size of ``z``.
        seed: Seed of the latents.
        batch_size: Images per forward pass.
        device: Where to run (default: the generator's device).

    Returns:
        A CPU tensor ``(n, C, H, W)`` in ``[-1, 1]``.
    """
    device = device or next(generator.parameters()).device
    rng = torch.Generator().manual_seed(seed)
    z = torch.randn(n, latent_dim, generator=rng)
    was_training = generator.training
    generator.eval()
    try:
        with torch.no_grad():
            out = [generator(chunk.to(device)).cpu() for chunk in z.split(batch_size)]
    finally:
        generator.train(was_training)
    return torch.cat(out)


Callback = Callable[[int, dict[str, Any]], None]


class RunCurves(Protocol):
    """What :func:`plot_runs` reads from a run: :attr:`TrainResult.history` and :attr:`TrainResult.balance`."""

    history: dict[str, list[Any]]
    balance: list[tuple[int, float, float]]


def train(config: TrainConfig, data: ImageDataset, *, callback: Callback | None = None) -> TrainResult:
    """Train an SNGAN on ``data`` with the configured sparse strategy.

    The loop is the plain SNGAN recipe; sparsity enters only through the wrapper (masks,
    prune-and-grow, the BR probe and the D-density controller all run from its optimizer hooks).

    Args:
        config: The run's configuration.
        data: Training images (moved to ``config.device``).
        callback: Called after every iteration with ``(iteration, stats)``; stats holds
            ``g_loss``, ``d_loss``, ``br``, ``g_density``, ``d_density`` (densities and BR only
            on log iterations, else the last logged values).

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError: For an invalid configuration.
    """
    if config.iterations < 1 or config.n_critic < 1 or config.batch_size < 2:
        raise ValueError("iterations and n_critic must be >= 1 and batch_size >= 2")
    device = torch.device(config.device)
    strategy = build_strategy(config.strategy, g_density=config.g_density, d_density=config.d_density,
                              iterations=config.iterations, schedule=config.schedule,
                              br_bounds=config.br_bounds, g_updates=config.g_updates)
    data = data.to(device)
    torch.manual_seed(config.seed)
    G = SNGANGenerator(config.latent_dim, config.g_channels, data.image_size, data.channels).to(device)
    D = SNGANDiscriminator(config.d_channels, data.image_size, data.channels, pooling=config.d_pooling).to(device)
    g_opt = torch.optim.Adam(G.parameters(), lr=config.lr, betas=config.betas)
    d_opt = torch.optim.Adam(D.parameters(), lr=config.lr, betas=config.betas)
    latent_dim = config.latent_dim

    sg = SparseGANWrapper(
        G, D, g_opt, d_opt, strategy=strategy, seed=config.seed,
        latent=lambda n: torch.randn(n, latent_dim, device=device),
        real=lambda n: data.sample(n),  # the probe seeds the global RNG around this call
        probe_batch_size=config.batch_size, g_ema=config.ema,
    )
    logger.info("%s", sg.report())

    history: dict[str, list[Any]] = {k: [] for k in ("iteration", "g_loss", "d_loss", "g_density", "d_density", "br")}
    flushing = config.flush_denormal and torch.set_flush_denormal(True)
    try:
        wall = _loop(config, data, G, D, g_opt, d_opt, sg, history, callback)
    finally:
        if flushing:
            torch.set_flush_denormal(False)  # PyTorch's default
    return TrainResult(config, G, D, sg, history, list(sg.balance.history), wall, repr(strategy))


def _loop(config: TrainConfig, data: ImageDataset, G: nn.Module, D: nn.Module, g_opt: torch.optim.Optimizer,
          d_opt: torch.optim.Optimizer, sg: SparseGANWrapper, history: dict[str, list[Any]],
          callback: Callback | None) -> float:
    """The SNGAN loop itself (plain PyTorch; the wrapper acts through its hooks); returns seconds."""
    device = torch.device(config.device)
    latent_dim = config.latent_dim
    rng = torch.Generator().manual_seed(config.seed + 1)
    stats: dict[str, Any] = {"g_density": sg.density("generator"), "d_density": sg.density("discriminator"), "br": None}
    n = config.batch_size
    start = time.perf_counter()
    for it in range(1, config.iterations + 1):
        for _ in range(config.n_critic):
            real = data.sample(n, rng)
            z = torch.randn(n, latent_dim, generator=rng).to(device)
            with torch.no_grad():
                fake = G(z)
            d_loss = F.relu(1 - D(real)).mean() + F.relu(1 + D(fake)).mean()
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
        z = torch.randn(n, latent_dim, generator=rng).to(device)
        g_loss = -D(G(z)).mean()
        g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        g_opt.step()

        stats["g_loss"], stats["d_loss"] = g_loss.item(), d_loss.item()
        if it % config.log_every == 0 or it == 1 or it == config.iterations:
            stats.update(g_density=sg.density("generator"), d_density=sg.density("discriminator"),
                         br=sg.balance_ratio)
            history["iteration"].append(it)
            for key in ("g_loss", "d_loss", "g_density", "d_density", "br"):
                history[key].append(stats[key])
            if not (math.isfinite(stats["g_loss"]) and math.isfinite(stats["d_loss"])):
                logger.warning("non-finite loss at iteration %d (G %s, D %s)", it, stats["g_loss"], stats["d_loss"])
        if callback is not None:
            callback(it, dict(stats))
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------- reporting


def save_image_grid(images: torch.Tensor, path: str | os.PathLike[str], *, nrow: int = 8, scale: int | None = None) -> None:
    """Save images ``(N, C, H, W)`` in ``[-1, 1]`` as one PNG grid (1 px black gaps).

    Args:
        images: The images (grey or RGB).
        path: Output file.
        nrow: Images per row.
        scale: Integer nearest-neighbour upscaling (default: enough for ~64 px tiles).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.image

    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, _, h, w = x.shape
    scale = scale or max(1, 64 // max(h, w))
    x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    h, w = h * scale, w * scale
    rows = math.ceil(n / nrow)
    grid = torch.zeros(3, rows * (h + 1) + 1, nrow * (w + 1) + 1)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = x[i]
    matplotlib.image.imsave(os.fspath(path), grid.permute(1, 2, 0).numpy())


def plot_runs(runs: Mapping[str, RunCurves], path: str | os.PathLike[str], *,
              bounds: tuple[float, float] | None = (0.45, 0.55), d_cap: float | None = None) -> None:
    """Plot the balance ratio (with its bounds) and the G/D densities over training, one line per run.

    Args:
        runs: Runs by label: :class:`TrainResult` objects, or anything with their ``history`` and
            ``balance`` attributes (see :class:`RunCurves`).
        path: Output PNG.
        bounds: BR bounds to shade and name in the legend (``None``: none).
        d_cap: D's density cap to mark (DDST-strict's 0.5; ``None``: none).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax_br, ax_d) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, run) in enumerate(runs.items()):
        colour = colours[i % len(colours)]
        if run.balance:
            steps = [b[0] for b in run.balance]
            ax_br.plot(steps, [b[1] for b in run.balance], color=colour, alpha=0.15, linewidth=0.6)
            ax_br.plot(steps, [b[2] for b in run.balance], color=colour, label=f"{label} (windowed)")
        h = run.history
        ax_d.plot(h["iteration"], h["d_density"], color=colour, label=f"{label} D")
        ax_d.plot(h["iteration"], h["g_density"], color=colour, linestyle="--", label=f"{label} G")
    if bounds is not None:
        ax_br.axhspan(bounds[0], bounds[1], color="grey", alpha=0.2, label=f"BR bounds {bounds[0]}-{bounds[1]}")
    windowed = [b[2] for run in runs.values() for b in run.balance]
    if windowed:
        lo, hi = min(windowed + [0.0]), max(windowed + [bounds[1] if bounds else 1.0])
        pad = 0.1 * (hi - lo or 1.0)
        ax_br.set_ylim(lo - pad, hi + pad)  # per-sample outliers stay faint and may be clipped
    ax_br.set_ylabel("balance ratio")
    ax_br.set_title("Balance ratio (faint: per sample) and densities")
    ax_br.legend(fontsize="small", loc="best")
    if d_cap is not None:
        ax_d.axhline(d_cap, color="black", linestyle=":", linewidth=1, label=f"strict cap {d_cap:g}")
    ax_d.set_ylabel("density")
    ax_d.set_xlabel("iteration (G step)")
    ax_d.set_ylim(0, 1.05)
    ax_d.legend(fontsize="small", loc="best", ncol=2)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100)
    plt.close(fig)
