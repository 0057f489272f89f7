"""The ``sparsegan`` command line: ``demo``, ``compare`` and ``inspect``.

* ``sparsegan demo``: train a small SNGAN with a sparse strategy (DDST-strict by default) on an embedded
  dataset (scikit-learn's digits) or your own images, with a progress bar; write a sample grid,
  a plot of the balance ratio and the densities, metrics JSON and a checkpoint.
* ``sparsegan compare``: Dense, Static, SDST, DDST-relax and DDST-strict at the same generator
  density, with fixed seeds; print the paper-style table (quality, final D density, training
  FLOPs vs dense, wall time) and write a combined plot.
* ``sparsegan inspect MODULE:ATTR``: the discovery dry run (what would be masked, and why
  anything would not) for a module class or factory.

Also available as ``python -m sparsegan``. The work itself lives in the library
(:mod:`sparsegan.data`, :mod:`sparsegan.training`, :mod:`sparsegan.metrics`); this module only
parses arguments, reports progress and writes files.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect as _inspect
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CLIError", "build_parser", "main"]

logger = logging.getLogger("sparsegan.cli")

COMPARE_DEFAULT = ("dense", "static", "sdst", "ddst-relax", "ddst-strict")

PAPER_BR_BOUNDS = (0.45, 0.55)
"""The paper's DDST bounds, chosen for SNGAN on CIFAR-10 (G 4.3M weights); ``--br-bounds paper``."""

DEFAULT_BR_BOUNDS = "warmup"
"""The command line's default DDST bounds: 0.9x-1.1x of the BR of the controller's first full
window (:class:`sparsegan.balance.DensityController`), which needs no calibration for a model whose
BR scale is unknown. The hand-calibrated band of the previous versions, (0.029, 0.066), was
measured with the fresh-latent estimator on one model and does not carry to the step estimator."""


class CLIError(Exception):
    """A user error the command line reports as one line on stderr (exit status 2)."""


# ---------------------------------------------------------------------------------------- arguments


def _density(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"density must be a number in (0, 1], got {text!r}") from None
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise argparse.ArgumentTypeError(
            f"density must be in (0, 1] (the fraction of weights kept), got {text}; "
            "use 1 for a dense network")
    return value


def _strategy(text: str) -> str:
    from sparsegan.training import STRATEGY_NAMES

    key = text.strip().lower().replace("_", "-")
    if key not in STRATEGY_NAMES:
        raise argparse.ArgumentTypeError(f"unknown strategy {text!r}; choose from {', '.join(STRATEGY_NAMES)}")
    return key


def _strategy_list(text: str) -> list[str]:
    names = [part for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one strategy name")
    return [_strategy(n) for n in names]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _threads(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    return _positive_int(text)


def _bounds(text: str) -> tuple[float, float] | str:
    if text.strip().lower() == "paper":
        return PAPER_BR_BOUNDS
    if text.strip().lower() == "warmup":
        return "warmup"
    try:
        lower, upper = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOWER,UPPER (e.g. 0.45,0.55), 'paper' or 'warmup', got {text!r}") from None
    if not 0.0 <= lower < upper <= 1.0:
        raise argparse.ArgumentTypeError(f"need 0 <= LOWER < UPPER <= 1, got {text}")
    return lower, upper


def _decay(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a decay in [0, 1) (0 disables the EMA), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a decay in [0, 1) (e.g. 0.99; 0 disables the EMA), got {text}")
    return value


def _shape(text: str) -> tuple[int, ...]:
    parts = [p for p in text.replace("x", ",").replace(" ", ",").split(",") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 2,3,32,32, got {text!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(f"expected a shape of positive sizes like 2,3,32,32, got {text!r}")
    return shape


def _add_training_options(p: argparse.ArgumentParser, *, steps: int, out: str) -> None:
    p.add_argument("--g-density", type=_density, default=0.1, help="generator density (default 0.1)")
    p.add_argument("--d-density", type=_density, default=None,
                   help="initial discriminator density (default: the G density, for every strategy)")
    p.add_argument("--steps", type=_positive_int, default=steps,
                   help=f"training iterations = generator steps (default {steps})")
    p.add_argument("--n-critic", type=_positive_int, default=2, help="D steps per G step (default 2; the paper: 5)")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="batch size (default 32)")
    p.add_argument("--channels", type=_positive_int, default=32, help="width of G and D (default 32)")
    p.add_argument("--d-pooling", choices=("mean", "sum"), default="mean",
                   help="D's global pooling: mean (default; keeps an untrained D's logits inside the hinge margin) "
                        "or SNGAN's sum")
    p.add_argument("--data", default="digits",
                   help="'digits' (default), 'faces', a folder of images, or an .npz file")
    p.add_argument("--image-size", type=int, choices=(16, 32, 64), default=16, help="image side (default 16)")
    p.add_argument("--schedule", choices=("compressed", "paper"), default="compressed",
                   help="mask-update intervals scaled to the run (default) or as published")
    p.add_argument("--g-updates", type=_positive_int, default=4,
                   help="intervals between G prune-and-grow updates under the compressed schedule: N-1 updates, "
                        "1 keeps G static (default 4)")
    p.add_argument("--br-bounds", type=_bounds, default=DEFAULT_BR_BOUNDS,
                   help="DDST balance-ratio bounds: LOWER,UPPER, 'paper' for 0.45,0.55, or 'warmup' (default): "
                        "0.9x-1.1x of the BR of the controller's first full window; see docs/cli.md")
    p.add_argument("--ema", type=_decay, default=0.99, help="G-EMA decay (default 0.99; 0 to disable)")
    p.add_argument("--eval-samples", type=_positive_int, default=2000,
                   help="generated images for the metrics (default 2000)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA if available, else CPU), 'cpu', 'cuda', ...")
    p.add_argument("--threads", type=_threads, default="auto",
                   help="CPU threads for torch: a number, or 'auto' (default): torch's default, reduced to the "
                        "cores other processes leave free (oversubscribed OpenMP threads can make CPU training "
                        "10x slower)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", default=out, help=f"output folder (default {out})")
    p.add_argument("--cache-dir", default=None,
                   help="where the metric's feature extractor is cached (default: $SPARSEGAN_CACHE or ~/.cache/sparsegan)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``sparsegan`` command."""
    parser = argparse.ArgumentParser(
        prog="sparsegan",
        description="Sparse and balanced dynamic sparse training of GANs (demo, comparison, discovery dry run).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser("demo", help="train a sparse SNGAN on an embedded dataset and write samples, plots, metrics",
                          description="Train a small SNGAN with a sparse strategy (DDST-strict by default) and write "
                                      "samples.png, balance.png, metrics.json and checkpoint.pt to --out.")
    demo.add_argument("--strategy", type=_strategy, default="ddst-strict",
                      help="dense, static, sdst, ddst (= ddst-relax), ddst-strict or dst (default ddst-strict, "
                           "whose seed-0 run is stable; see results/compare for all strategies over 6 seeds)")
    _add_training_options(demo, steps=1000, out="runs/demo")

    compare = sub.add_parser("compare", help="Dense vs Static vs SDST vs DDST at the same G density",
                             description="Train each strategy with the same seeds and print the paper-style table.")
    compare.add_argument("--strategies", type=_strategy_list, default=list(COMPARE_DEFAULT),
                         help=f"comma-separated strategies (default {','.join(COMPARE_DEFAULT)})")
    compare.add_argument("--repeats", type=_positive_int, default=1, help="seeds per strategy, for mean ± std (default 1)")
    compare.add_argument("--jobs", type=_positive_int, default=1,
                         help="runs trained in parallel worker processes, CPU only (default 1); the --threads are "
                              "divided among them")
    _add_training_options(compare, steps=1000, out="runs/compare")

    insp = sub.add_parser("inspect", help="show which weights sparsegan would mask in a module",
                          description="Print sparsegan.discover()'s report for MODULE:ATTR, where MODULE is a "
                                      "module path (pkg.models) or a .py file and ATTR an nn.Module class, a "
                                      "factory function or a module instance. A factory may return several "
                                      "modules, e.g. a (G, D) tuple or a dict of them: each is reported.")
    insp.add_argument("target", metavar="MODULE:ATTR")
    insp.add_argument("--input-shape", type=_shape, action="append", default=None,
                      help="shape of a random example input, e.g. 2,3,32,32 (enables export/runtime discovery and "
                           "MACs); give it once per module, in order, when ATTR makes several (e.g. --input-shape "
                           "2,128 --input-shape 2,3,32,32 for a (G, D) pair)")
    insp.add_argument("--methods", default="fx,export,runtime", help="discovery cascade (default fx,export,runtime)")
    return parser


# ---------------------------------------------------------------------------------------- helpers


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"bad --device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return name


def choose_threads(requested: int | str = "auto", *, device: str = "cpu") -> int:
    """The number of torch CPU threads to use.

    ``"auto"`` keeps torch's default unless other processes already keep the cores busy (1-minute
    load average): then it uses the cores left free, at least one. With more OpenMP threads than
    free cores, every parallel region waits for a descheduled thread, and small CPU models were
    measured to run 10-50x slower per iteration; one thread per free core avoids that. An explicit
    ``OMP_NUM_THREADS`` is respected.
    """
    import torch

    default = torch.get_num_threads()
    if requested != "auto":
        return int(requested)
    if device != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return default
    try:
        busy = os.getloadavg()[0]
    except OSError:
        return default
    free = (os.cpu_count() or default) - busy
    return max(1, min(default, int(free + 0.5)))


def _set_threads(args: argparse.Namespace, device: str) -> int:
    import torch

    threads = choose_threads(args.threads, device=device)
    if threads != torch.get_num_threads():
        logger.info("using %d CPU thread(s) (torch default %d)", threads, torch.get_num_threads())
        torch.set_num_threads(threads)
    return threads


def _load_data(args: argparse.Namespace) -> Any:
    from sparsegan.data import DatasetError, load_dataset

    try:
        return load_dataset(args.data, image_size=args.image_size)
    except DatasetError as exc:
        raise CLIError(str(exc)) from None
    except ImportError as exc:
        raise CLIError(f"loading {args.data!r} needs {exc.name or exc}: pip install 'sparsegan[demo,metrics]'") from None


def _config(args: argparse.Namespace, strategy: str, seed: int) -> Any:
    from sparsegan.training import TrainConfig, default_d_density

    d_density = args.d_density if args.d_density is not None else default_d_density(strategy, args.g_density)
    return TrainConfig(  # the D density is resolved here, so metrics.json records the one used
        strategy=strategy, g_density=args.g_density, d_density=d_density, iterations=args.steps,
        n_critic=args.n_critic, batch_size=args.batch_size, g_channels=args.channels, d_channels=args.channels,
        d_pooling=args.d_pooling,
        ema=args.ema if args.ema and args.ema > 0 else None, schedule=args.schedule, g_updates=args.g_updates, seed=seed,
        device=_device(args.device), br_bounds=args.br_bounds,
    )


def _progress(total: int, desc: str, enabled: bool) -> tuple[Callable[[int, dict[str, Any]], None], Callable[[], None]]:
    """A tqdm bar showing G/D loss, BR and D density; a no-op when disabled or tqdm is missing."""
    if not enabled:
        return (lambda it, stats: None), (lambda: None)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return (lambda it, stats: None), (lambda: None)
    bar = tqdm(total=total, desc=desc, unit="it", dynamic_ncols=True)

    def update(it: int, stats: dict[str, Any]) -> None:
        bar.update(1)
        if it % 10 == 0 or it == total:
            br = stats.get("br")
            bar.set_postfix(G=f"{stats['g_loss']:.3f}", D=f"{stats['d_loss']:.3f}",
                            BR="n/a" if br is None else f"{br:.3f}", dD=f"{stats['d_density']:.3f}", refresh=False)

    return update, bar.close


def _extractor(args: argparse.Namespace, size: int) -> Any:
    from sparsegan.metrics import cache_dir, digits_feature_extractor

    folder = Path(args.cache_dir) if args.cache_dir else cache_dir()
    if not any(folder.glob(f"digits-features-*-{size}px-*.pt")):
        print(f"training the metric's digit classifier (first use; cached in {folder})", flush=True)
    start = time.perf_counter()
    net = digits_feature_extractor(size, cache=args.cache_dir)
    logger.info("feature extractor ready in %.1fs (held-out digit accuracy %.4f)", time.perf_counter() - start, net.accuracy)
    return net


def _evaluate(result: Any, data: Any, extractor: Any, real_features: Any, n: int) -> dict[str, Any]:
    from sparsegan.metrics import evaluate_images
    from sparsegan.training import generate

    cfg = result.config
    fake = generate(result.generator, n, cfg.latent_dim, seed=cfg.seed + 10_000)
    metrics = {"generator": evaluate_images(data.images, fake, extractor, real_features=real_features, seed=cfg.seed)}
    if result.sg.ema is not None:
        fake_ema = generate(result.ema_generator, n, cfg.latent_dim, seed=cfg.seed + 10_000)
        metrics["ema"] = evaluate_images(data.images, fake_ema, extractor, real_features=real_features, seed=cfg.seed)
    return metrics


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    _write_text(path, json.dumps(clean(payload), indent=2, default=_json_default) + "\n")


def _version() -> str:
    from sparsegan import __version__

    return __version__


@contextlib.contextmanager
def _output_folder(path: str) -> Iterator[Path]:
    """The output folder, checked writable before any training; removed again on failure if it was new and is empty.

    Raises:
        CLIError: If the path is a file, or the folder cannot be created or written to.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {path!r} is a file, not a folder; pass a folder path")
    created = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".sparsegan-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        _remove_empty(created)
        raise CLIError(f"cannot write to the output folder {path!r}: {exc.strerror or exc}; pass a writable --out") from None
    try:
        yield out
    except BaseException:
        _remove_empty(created)
        raise


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove the folders this run created (deepest first), where they are still empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix) that replaces it once the block succeeds."""
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _write_text(path: Path, text: str) -> None:
    with _atomic(path) as tmp:
        tmp.write_text(text)


def _check_configs(args: argparse.Namespace, strategies: Sequence[str]) -> None:
    """Build every run's strategy without training, so a bad combination fails before anything is written."""
    from sparsegan.training import build_strategy

    for name in strategies:
        config = _config(args, name, args.seed)
        try:
            build_strategy(config.strategy, g_density=config.g_density, d_density=config.d_density,
                           iterations=config.iterations, schedule=config.schedule, br_bounds=config.br_bounds,
                           g_updates=config.g_updates)
        except (ValueError, TypeError) as exc:
            raise CLIError(f"{name}: {exc}") from None


# ---------------------------------------------------------------------------------------- demo


def _cmd_demo(args: argparse.Namespace) -> int:
    begin = time.perf_counter()
    _check_configs(args, [args.strategy])
    data = _load_data(args)
    with _output_folder(args.out) as out:
        return _demo(args, out, data, begin)


def _demo(args: argparse.Namespace, out: Path, data: Any, begin: float) -> int:
    import torch

    from sparsegan.metrics import extract_features, inception_fid
    from sparsegan.training import generate, plot_runs, save_image_grid, train

    config = _config(args, args.strategy, args.seed)
    threads = _set_threads(args, config.device)
    print(f"sparsegan demo: {args.strategy} on {data.name} ({len(data)} images, {data.image_size}px), "
          f"G density {args.g_density}, {args.steps} iterations, device {config.device}"
          + (f" ({threads} thread{'s' * (threads > 1)})" if config.device == "cpu" else ""), flush=True)
    try:
        extractor = _extractor(args, data.image_size)
    except Exception as exc:  # noqa: BLE001 - metrics are a bonus: the demo still trains
        logger.warning("metrics disabled: could not prepare the feature extractor: %s", exc)
        extractor = None
    update, close = _progress(args.steps, args.strategy, not args.no_progress)
    try:
        result = train(config, data, callback=update)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    finally:
        close()

    n_eval = args.eval_samples
    metrics: dict[str, Any] = {}
    if extractor is not None:
        metrics = _evaluate(result, data, extractor, extract_features(extractor, data.images), n_eval)
    fid = inception_fid(data.images, generate(result.generator, min(n_eval, len(data)), config.latent_dim))
    grid = generate(result.ema_generator, 64, config.latent_dim, seed=config.seed + 20_000)
    with _atomic(out / "samples.png") as tmp:
        save_image_grid(grid, tmp)
    with _atomic(out / "real.png") as tmp:
        save_image_grid(data.images[:64], tmp)
    bounds = _resolved_bounds(result, args.br_bounds)
    controller = getattr(result.sg.algorithm("discriminator"), "controller", None)
    cap = controller.max_density if controller is not None and controller.mode == "strict" else None
    with _atomic(out / "balance.png") as tmp:
        plot_runs({args.strategy: result}, tmp, bounds=bounds, d_cap=cap)
    with _atomic(out / "checkpoint.pt") as tmp:
        torch.save({
            "generator": result.generator.state_dict(),
            "discriminator": result.discriminator.state_dict(),
            "ema": result.sg.ema.module.state_dict() if result.sg.ema is not None else None,
            "sparsegan": result.sg.state_dict(),
            "config": config.to_dict(),
        }, tmp)
    _write_text(out / "report.txt", result.sg.report() + "\n")
    summary = result.summary()
    payload = {
        "config": config.to_dict(), "data": repr(data), "strategy": result.strategy, "summary": summary,
        "metrics": metrics, "inception_fid": fid,
        "feature_extractor_accuracy": None if extractor is None else extractor.accuracy,
        "history": result.history, "balance": result.balance,
        "wall_time_train_s": result.wall_time, "wall_time_total_s": time.perf_counter() - begin,
    }
    _write_json(out / "metrics.json", payload)

    flops = summary["flops_ratio"]
    br = summary["balance_ratio"]
    weights = {n: result.sg.weight_density(n) for n in ("generator", "discriminator")}
    kept_dense = (f" (of all weight tensors, counting those left dense: G {weights['generator']:.4f}, "
                  f"D {weights['discriminator']:.4f})"
                  if abs(weights["generator"] - summary["g_density"]) > 1e-9
                  or abs(weights["discriminator"] - summary["d_density"]) > 1e-9 else "")
    lines = [
        (f"final densities: G {summary['g_density']:.4f}, D {summary['d_density']:.4f}{kept_dense}; "
         f"windowed BR {'n/a' if br is None else f'{br:.4f}'}"),
        f"training FLOPs vs dense: G {flops['generator']:.3f}, D {flops['discriminator']:.3f}, total {flops['total']:.3f}",
    ]
    if metrics:
        g = metrics["generator"]
        lines.append(f"digits FD {g['fd']:.3f}, KID {g['kid_mean']:.4f} ± {g['kid_std']:.4f} "
                     f"(feature extractor accuracy {extractor.accuracy:.3f})"
                     + (f"; EMA FD {metrics['ema']['fd']:.3f}" if "ema" in metrics else ""))
    lines.append("Inception FID: " + (f"{fid:.3f}" if fid is not None else "skipped (no cached Inception weights)"))
    hint = _bounds_hint(result, bounds, warmup=args.br_bounds == "warmup")
    if hint:
        lines.append(hint)
    lines.append(f"wall time: {result.wall_time:.1f}s training, {time.perf_counter() - begin:.1f}s total")
    lines.append(f"wrote {out}/samples.png (64 samples of the EMA generator), real.png, balance.png, metrics.json, "
                 "checkpoint.pt, report.txt" if result.sg.ema is not None else
                 f"wrote {out}/samples.png (64 samples of G), real.png, balance.png, metrics.json, checkpoint.pt, "
                 "report.txt")
    print("\n".join(lines))
    return 0


def _resolved_bounds(result: Any, bounds: tuple[float, float] | str) -> tuple[float, float] | None:
    """The bounds a run used: the given pair, or what its controller's warm-up fixed (None: none yet)."""
    if bounds != "warmup":
        return bounds  # type: ignore[return-value]  # a pair once 'warmup' is excluded
    controller = getattr(result.sg.algorithm("discriminator"), "controller", None)
    return controller.bounds if controller is not None else None


def _bounds_hint(result: Any, bounds: tuple[float, float] | None, *, warmup: bool = False) -> str | None:
    """A note when DDST's windowed BR stayed on one side of the bounds for most of the run."""
    if bounds is None or not result.config.strategy.startswith("ddst") or len(result.balance) < 10:
        return None
    windowed = [b[2] for b in result.balance]
    below = sum(v <= bounds[0] for v in windowed) / len(windowed)
    above = sum(v >= bounds[1] for v in windowed) / len(windowed)
    if max(below, above) < 0.8:
        return None
    side = "below the lower" if below >= above else "above the upper"
    action = "pruning" if below >= above else "growing"
    if warmup:
        return (f"note: the windowed balance ratio was {side} warm-up bound for {max(below, above):.0%} of the run, "
                f"so DDST kept {action} D. The warm-up bounds are fixed from the BR of the run's first tenth; on "
                "the demo's model BR rises as G learns, so D grows to its maximum, strict's cap or 1 (see results/compare/README.md). "
                "Fixed bounds (--br-bounds LOWER,UPPER) are the other choice.")
    return (f"note: the windowed balance ratio was {side} bound for {max(below, above):.0%} of the run, so DDST "
            f"kept {action} D. The balance ratio scales with the number of "
            "active generator weights and with the data, so fixed bounds fit one model: the paper's (--br-bounds "
            "paper) were chosen for SNGAN on CIFAR-10. Try --br-bounds warmup, or calibrate with `python -m "
            "benchmarks.br_calibration` (Static runs over D densities; bounds = the BR band of the runs with the "
            "best FD) and pass --br-bounds LOWER,UPPER.")


# ---------------------------------------------------------------------------------------- compare


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: Sequence[float], digits: int = 3) -> str:
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _per_seed(values: Sequence[float], digits: int = 2) -> str:
    """Every seed's value (up to 6 seeds), else the median and range: GAN runs this small collapse
    now and then, and one collapse moves a mean over 3 seeds more than any strategy does."""
    if len(values) <= 6:
        return " / ".join(f"{v:.{digits}f}" for v in values)
    return f"median {statistics.median(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def _seed_wins(runs: list[dict[str, Any]], reference: list[dict[str, Any]], network: str = "generator") -> str:
    """On how many shared seeds a strategy's FD (of ``network``: "generator" or "ema") is below
    the reference strategy's."""
    def fd(run: dict[str, Any]) -> float:
        return run["metrics"].get(network, {}).get("fd", math.nan)

    ref = {r["seed"]: fd(r) for r in reference}
    paired = [(fd(r), ref[r["seed"]]) for r in runs if r["seed"] in ref]
    paired = [(a, b) for a, b in paired if not (math.isnan(a) or math.isnan(b))]
    if not paired:
        return "n/a"
    return f"{sum(a < b for a, b in paired)}/{len(paired)}"


def compare_table(rows: dict[str, list[dict[str, Any]]], *, reference: str = "static") -> str:
    """The paper-style Markdown table from per-strategy lists of run records.

    Args:
        rows: Strategy name -> its runs' records (``seed``, ``summary``, ``metrics``).
        reference: The strategy the others are paired with, seed by seed, in two "FD below"
            columns, for G and for its EMA (left out when it was not run).

    Returns:
        The table. With more than one seed it also lists each seed's FD.
    """
    several = any(len(runs) > 1 for runs in rows.values())
    paired = reference in rows and len(rows) > 1
    header = ["strategy", "FD (G) ↓"]
    header += ["FD (G) per seed"] if several else []
    header += [f"G FD below {reference}'s", f"EMA FD below {reference}'s"] if paired else []
    header += ["FD (EMA) ↓", "KID ↓", "final D density", "train FLOPs G", "train FLOPs D", "train FLOPs total",
               "wall time s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, runs in rows.items():
        def col(get: Callable[[dict[str, Any]], float], digits: int = 3, runs: list[dict[str, Any]] = runs) -> str:
            return _fmt([get(r) for r in runs], digits)

        cells = [name, col(lambda r: r["metrics"]["generator"]["fd"], 2)]
        if several:
            cells.append(_per_seed([r["metrics"]["generator"]["fd"] for r in sorted(runs, key=lambda r: r["seed"])]))
        if paired:
            cells += (["-", "-"] if name == reference else
                      [_seed_wins(runs, rows[reference]), _seed_wins(runs, rows[reference], "ema")])
        cells += [
            col(lambda r: r["metrics"].get("ema", {}).get("fd", math.nan), 2),
            col(lambda r: r["metrics"]["generator"]["kid_mean"], 3),
            col(lambda r: r["summary"]["d_density"], 3),
            col(lambda r: r["summary"]["flops_ratio"]["generator"], 3),
            col(lambda r: r["summary"]["flops_ratio"]["discriminator"], 3),
            col(lambda r: r["summary"]["flops_ratio"]["total"], 3),
            col(lambda r: r["summary"]["wall_time_s"], 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class _CompareRun:
    """One finished ``compare`` run, as a worker process hands it back (no modules, only data)."""

    name: str
    seed: int
    record: dict[str, Any]
    history: dict[str, list[Any]]
    balance: list[tuple[int, float, float]]
    samples: Any  # a (64, C, H, W) CPU tensor for the first seed, else None
    wall_time: float


def _compare_one(args: argparse.Namespace, name: str, seed: int, data: Any, extractor: Any, real_features: Any,
                 progress: bool) -> _CompareRun:
    """Train and evaluate one (strategy, seed) of ``compare``; runs in the main process or a worker."""
    from sparsegan.training import generate, train

    config = _config(args, name, seed)
    update, close = _progress(args.steps, f"{name} seed {seed}", progress)
    try:
        result = train(config, data, callback=update)
    except ValueError as exc:
        raise CLIError(f"{name}: {exc}") from None
    finally:
        close()
    record = {"seed": seed, "summary": result.summary(),
              "metrics": _evaluate(result, data, extractor, real_features, args.eval_samples),
              "history": result.history, "balance": result.balance}
    samples = (generate(result.ema_generator, 64, config.latent_dim, seed=seed + 20_000)
               if seed == args.seed else None)
    return _CompareRun(name, seed, record, result.history, result.balance, samples, result.wall_time)


def _compare_worker(job: tuple[argparse.Namespace, str, int, int, dict[str, Any]]) -> _CompareRun:
    """A worker process's share of ``compare --jobs``: the main process's extractor, rebuilt here."""
    import torch

    from sparsegan.metrics import DigitsFeatureExtractor, extract_features

    args, name, seed, threads, saved = job
    torch.set_num_threads(threads)
    data = _load_data(args)
    extractor = DigitsFeatureExtractor(data.image_size)
    extractor.load_state_dict(saved["state_dict"])
    extractor.accuracy = saved["accuracy"]
    extractor.eval().requires_grad_(False)
    return _compare_one(args, name, seed, data, extractor, extract_features(extractor, data.images), progress=False)


def _cmd_compare(args: argparse.Namespace) -> int:
    begin = time.perf_counter()
    strategies = list(dict.fromkeys(args.strategies))
    _check_configs(args, strategies)
    if min(args.jobs, args.repeats * len(strategies)) > 1 and not _device(args.device).startswith("cpu"):
        raise CLIError("--jobs > 1 runs on CPU only (the runs would share one accelerator); use --device cpu or --jobs 1")
    data = _load_data(args)
    with _output_folder(args.out) as out:
        return _compare(args, out, data, strategies, begin)


def _compare(args: argparse.Namespace, out: Path, data: Any, strategies: list[str], begin: float) -> int:
    from sparsegan.metrics import extract_features
    from sparsegan.training import plot_runs, save_image_grid

    threads = _set_threads(args, _device(args.device))
    jobs = [(name, args.seed + repeat) for repeat in range(args.repeats) for name in strategies]
    workers = min(args.jobs, len(jobs))
    per_worker = max(1, threads // workers)
    print(f"sparsegan compare: {', '.join(strategies)} on {data.name} ({len(data)} images, {data.image_size}px), "
          f"G density {args.g_density}, {args.steps} iterations x {args.repeats} seed(s), "
          + (f"{workers} worker processes x {per_worker} CPU thread(s)" if workers > 1 else f"{threads} CPU thread(s)"),
          flush=True)
    extractor = _extractor(args, data.image_size)  # trained (and cached) once, handed to the workers
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in strategies}
    curves: dict[str, _CompareRun] = {}

    def finished(run: _CompareRun) -> None:
        rows[run.name].append(run.record)
        if run.samples is not None:
            curves[run.name] = run
            with _atomic(out / f"samples_{run.name}.png") as tmp:
                save_image_grid(run.samples, tmp)
        g = run.record["metrics"]["generator"]
        summary = run.record["summary"]
        print(f"  {run.name:12s} seed {run.seed}: FD {g['fd']:.3f}  D density {summary['d_density']:.3f}  "
              f"FLOPs total {summary['flops_ratio']['total']:.3f}  {run.wall_time:.0f}s", flush=True)

    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: a forked child of a process that has run torch's thread pools can deadlock
        saved = {"state_dict": extractor.state_dict(), "accuracy": extractor.accuracy}
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for run in pool.map(_compare_worker, [(args, name, seed, per_worker, saved) for name, seed in jobs]):
                finished(run)
    else:
        real_features = extract_features(extractor, data.images)
        for name, seed in jobs:
            finished(_compare_one(args, name, seed, data, extractor, real_features, progress=not args.no_progress))
    table = compare_table(rows)
    bounds = args.br_bounds
    with _atomic(out / "compare.png") as tmp:
        plot_runs(curves, tmp, bounds=None if bounds == "warmup" else bounds)
    header = (f"G density {args.g_density}, {args.steps} iterations (n_critic {args.n_critic}, batch {args.batch_size}, "
              f"width {args.channels}), data {data.name} {data.image_size}px, {args.repeats} seed(s) from {args.seed}, "
              f"schedule {args.schedule}{f' (G update intervals {args.g_updates})' if args.schedule == 'compressed' else ''}, "
              f"BR bounds {bounds}; FD/KID on digits-classifier features "
              f"(extractor accuracy {extractor.accuracy:.3f}), {args.eval_samples} samples; FLOPs are training FLOPs "
              "relative to dense.")
    _write_text(out / "compare.md", header + "\n\n" + table + "\n")
    _write_json(out / "compare.json", {"args": {k: v for k, v in vars(args).items() if k != "func"},
                                       "runs": rows, "extractor_accuracy": extractor.accuracy,
                                       "wall_time_total_s": time.perf_counter() - begin})
    print()
    print(table)
    print(f"\n{header}\nwrote {out}/compare.md, compare.json, compare.png, samples_*.png "
          f"({time.perf_counter() - begin:.0f}s)")
    return 0


# ---------------------------------------------------------------------------------------- inspect


def load_target(target: str) -> Any:
    """Import ``MODULE:ATTR`` (a dotted module path or a ``.py`` file, then a dotted attribute)."""
    if ":" not in target:
        raise CLIError(f"expected MODULE:ATTR (e.g. mypkg.models:Generator or models.py:Generator), got {target!r}")
    module_path, _, attr = target.rpartition(":")
    if not module_path or not attr:
        raise CLIError(f"expected MODULE:ATTR, got {target!r}")
    if module_path.endswith(".py") or os.sep in module_path or Path(module_path).is_file():
        file = Path(module_path)
        if not file.is_file():
            raise CLIError(f"no such file: {module_path}")
        name = f"_sparsegan_inspect_{abs(hash(str(file.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, file)
        if spec is None or spec.loader is None:
            raise CLIError(f"cannot import {module_path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, str(file.resolve().parent))
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - report the user's import error in one line
            raise CLIError(f"importing {module_path} failed: {type(exc).__name__}: {exc}") from None
        finally:
            sys.path.pop(0)
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_path)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if missing and not (module_path == missing or module_path.startswith(missing + ".")):
                raise CLIError(f"importing {module_path!r} failed because it imports {missing!r}, which is not "
                               f"installed here (pip install {missing.split('.')[0]})") from None
            raise CLIError(f"cannot import module {module_path!r}: {exc} (is it installed, or on the path? run "
                           "sparsegan from the folder that holds it, or pass a .py file)") from None
        except Exception as exc:  # noqa: BLE001
            raise CLIError(f"importing {module_path!r} failed: {type(exc).__name__}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            available = sorted(n for n in dir(obj) if not n.startswith("_"))[:20]
            raise CLIError(f"{module_path} has no attribute {attr!r} (available: {', '.join(available)})")
        obj = getattr(obj, part)
    return obj


def _instantiate(obj: Any, target: str) -> list[tuple[str, Any]]:
    """The module(s) ``target`` names, as ``(label, module)`` pairs.

    A class or function is called without arguments; it may return one module, a tuple/list
    of modules (labelled by position) or a dict of them (labelled by key).
    """
    from torch import nn

    if isinstance(obj, nn.Module):
        return [(target, obj)]
    if not callable(obj):
        raise CLIError(f"{target} is a {type(obj).__name__}, not an nn.Module class, factory or instance")
    try:
        made = obj()
    except TypeError as exc:
        signature = ""
        try:
            signature = str(_inspect.signature(obj))
        except (TypeError, ValueError):
            pass
        raise CLIError(f"{target} must be callable without arguments to build the module"
                       f"{signature and ' ' + signature}: {exc}; write a small factory function with the "
                       "arguments you want") from None
    except Exception as exc:  # noqa: BLE001
        raise CLIError(f"building {target} failed: {type(exc).__name__}: {exc}") from None
    if isinstance(made, nn.Module):
        return [(target, made)]
    if isinstance(made, dict):
        items = [(f"{target}()[{key!r}]", value) for key, value in made.items()]
    elif isinstance(made, (tuple, list)):
        items = [(f"{target}()[{index}]", value) for index, value in enumerate(made)]
    else:
        raise CLIError(f"{target}() returned {type(made).__name__}, not a torch.nn.Module "
                       "(or a tuple, list or dict of them)")
    if not items:
        raise CLIError(f"{target}() returned an empty {type(made).__name__}; return the module(s) to inspect")
    wrong = [f"{label} is a {type(value).__name__}" for label, value in items if not isinstance(value, nn.Module)]
    if wrong:
        raise CLIError(f"{target}() must return nn.Modules only: {'; '.join(wrong)}")
    return items


def _cmd_inspect(args: argparse.Namespace) -> int:
    import torch

    from sparsegan.discovery import DiscoveryError, discover

    models = _instantiate(load_target(args.target), args.target)
    shapes: list[tuple[int, ...]] = args.input_shape or []
    if shapes and len(shapes) != len(models):
        raise CLIError(f"{args.target} makes {len(models)} module(s) but --input-shape was given {len(shapes)} "
                       f"time(s); give it once per module, in order ({', '.join(label for label, _ in models)}), "
                       "or not at all")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    for index, (label, model) in enumerate(models):
        example = torch.randn(*shapes[index]) if shapes else None
        try:
            result = discover(model, example, methods=methods)
        except (DiscoveryError, ValueError) as exc:
            raise CLIError(f"{label}: {exc}" if len(models) > 1 else str(exc)) from None
        total = sum(p.numel() for p in model.parameters())
        masked = sum(w.numel for w in result.weights)
        if len(models) > 1:
            if index:
                print()
            print(f"== {label}: {type(model).__name__} ==")
        print(result.report())
        print(f"\n{len(result.weights)} kernel weights, {masked:,} of {total:,} parameters "
              f"({masked / max(total, 1):.1%}) would be masked")
    if not shapes:
        print("hint: pass --input-shape (e.g. 2,3,32,32) to verify the trace against eager and count MACs")
    return 0


# ---------------------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sparsegan`` command line; return the exit status.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on a usage or input error (one line on stderr), 130 on Ctrl-C.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    if os.environ.get("MPLBACKEND") is None:
        os.environ["MPLBACKEND"] = "Agg"
    commands = {"demo": _cmd_demo, "compare": _cmd_compare, "inspect": _cmd_inspect}
    import torch

    threads = torch.get_num_threads()
    try:
        return commands[args.command](args)
    except CLIError as exc:
        print(f"sparsegan {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if torch.get_num_threads() != threads:  # main() called in-process (tests, notebooks): restore
            torch.set_num_threads(threads)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
