"""Where does this model's balance ratio sit, and which BR band gives the best samples?

The paper chose DDST's BR bounds (0.45, 0.55) from a sweep on SNGAN / CIFAR-10: Static runs with
the generator's density fixed and the discriminator's density varied, plotting the balance ratio
each run settles at against its FID. BR's scale depends on the model, the data, the learning
rate and ``n_critic``, so on another setup the bounds should come from the same kind of sweep.
This script runs it for the demo's SNGAN on digits:

* Static runs at a fixed G density over a list of D densities (and a dense run for reference),
  several seeds each, in parallel worker processes (one torch thread each);
* per run: the mean (and median) per-sample BR over the second half of training, D's hinge loss
  at the end, FD (G and EMA) on the offline digits-classifier features;
* a table (markdown), the raw records (JSON) and a plot of FD against BR.

Usage::

    python -m benchmarks.br_calibration --out results/calibration --jobs 2

Not part of the test run. The bounds it suggests are the BR band of the good sparse runs (FD within
``--tolerance`` of the best; see :func:`recommended_bounds`); pass them to
``sparsegan compare --br-bounds LOW,HIGH``. ``--from-json`` rewrites the table from an earlier run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any


def _run(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run plus its evaluation, in a worker process."""
    import torch

    torch.set_num_threads(1)
    from sparsegan.data import load_dataset
    from sparsegan.metrics import digits_feature_extractor, evaluate_images, extract_features
    from sparsegan.training import TrainConfig, generate, train

    data = load_dataset("digits", image_size=spec["image_size"])
    config = TrainConfig(**spec["config"])
    result = train(config, data)
    extractor = digits_feature_extractor(data.image_size)
    real_features = extract_features(extractor, data.images)
    metrics = {}
    for label, net in (("generator", result.generator), ("ema", result.ema_generator)):
        fake = generate(net, spec["eval_samples"], config.latent_dim, seed=config.seed + 10_000)
        metrics[label] = evaluate_images(data.images, fake, extractor, real_features=real_features, seed=config.seed)
    half = config.iterations // 2
    late = [sample for step, sample, _ in result.balance if step > half and math.isfinite(sample)]
    d_losses = result.history["d_loss"]
    tail = d_losses[-max(1, len(d_losses) // 10):]
    return {
        "label": spec["label"], "seed": config.seed, "g_density": config.g_density,
        "d_density": result.sg.density("discriminator"), "strategy": config.strategy,
        "br_late_mean": statistics.fmean(late) if late else None,
        "br_late_median": statistics.median(late) if late else None,
        "br_samples_late": len(late),
        "d_loss_end": statistics.fmean(tail), "fd": metrics["generator"]["fd"], "fd_ema": metrics["ema"]["fd"],
        "kid": metrics["generator"]["kid_mean"], "classes_covered": metrics["generator"]["classes_covered"], "wall_time_s": result.wall_time,
        "config": config.to_dict(), "balance": result.balance,
    }


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.fmean(values):.3g} ± {statistics.stdev(values):.2g}"


def main(argv: list[str] | None = None) -> int:
    """Run the sweep and write ``calibration.md``, ``calibration.json`` and ``calibration.png``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--g-density", type=float, default=0.1)
    parser.add_argument("--d-densities", default="0.05,0.1,0.2,0.3,0.5,1.0")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--n-critic", type=int, default=2)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)))
    parser.add_argument("--no-dense", action="store_true", help="skip the dense reference runs")
    parser.add_argument("--tolerance", type=float, default=1.25,
                        help="runs with FD <= tolerance x the best sparse FD define the recommended BR band")
    parser.add_argument("--out", default="results/calibration")
    parser.add_argument("--from-json", default=None, help="rewrite the table and plot from this calibration.json")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        for key in ("g_density", "steps", "n_critic", "channels", "seeds", "eval_samples", "jobs"):
            setattr(args, key, saved["args"][key])
        return _write(args, out, saved["runs"], saved.get("elapsed_s", float("nan")))
    base = {"iterations": args.steps, "n_critic": args.n_critic, "g_channels": args.channels,
            "d_channels": args.channels, "schedule": "compressed"}
    specs = []
    d_densities = [float(x) for x in args.d_densities.split(",")]
    for seed in range(args.seeds):
        for d in d_densities:
            specs.append({"label": f"static D {d:g}", "config": {**base, "strategy": "static", "g_density": args.g_density,
                                                                "d_density": d, "seed": seed}})
        if not args.no_dense:
            specs.append({"label": "dense", "config": {**base, "strategy": "dense", "g_density": 1.0, "seed": seed}})
    for spec in specs:
        spec.update(image_size=16, eval_samples=args.eval_samples)

    # one extractor training (cached) before the workers start, so they do not race to train it
    from sparsegan.metrics import digits_feature_extractor
    digits_feature_extractor(16)

    begin = time.perf_counter()
    records = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for record in pool.map(_run, specs):
            records.append(record)
            print(f"{record['label']:14s} seed {record['seed']}: BR(late) {record['br_late_mean']}  "
                  f"D loss {record['d_loss_end']:.3f}  FD {record['fd']:.2f} (EMA {record['fd_ema']:.2f})  "
                  f"{record['wall_time_s']:.0f}s", flush=True)
    return _write(args, out, records, time.perf_counter() - begin)


def _write(args: argparse.Namespace, out: Path, records: list[dict[str, Any]], elapsed: float) -> int:
    labels = list(dict.fromkeys(r["label"] for r in records))
    lines = [f"G density {args.g_density}, {args.steps} iterations, n_critic {args.n_critic}, width {args.channels}, "
             f"digits 16px, {args.seeds} seed(s); BR = mean of per-sample BR over the second half of training; "
             f"FD on digits-classifier features ({args.eval_samples} samples). {elapsed / 60:.0f} min with "
             f"{args.jobs} worker(s).", "",
             "| run | BR (late mean) | BR (late median) | D hinge loss (end) | FD (G) ↓ | FD (EMA) ↓ |",
             "|---|---|---|---|---|---|"]
    for label in labels:
        rows = [r for r in records if r["label"] == label]
        lines.append(f"| {label} | {_mean_std([r['br_late_mean'] for r in rows])} | "
                     f"{_mean_std([r['br_late_median'] for r in rows])} | {_mean_std([r['d_loss_end'] for r in rows])} | "
                     f"{_mean_std([r['fd'] for r in rows])} | {_mean_std([r['fd_ema'] for r in rows])} |")
    band = recommended_bounds(records, tolerance=args.tolerance)
    if band is not None:
        lines += ["", f"Sparse runs with FD within {args.tolerance:g}x of the best sparse run ended with a late BR in "
                  f"({band[0]:.3g}, {band[1]:.3g}): candidate DDST bounds `--br-bounds {band[0]:.2g},{band[1]:.2g}`."]
    (out / "calibration.md").write_text("\n".join(lines) + "\n")
    (out / "calibration.json").write_text(json.dumps({"args": vars(args), "runs": records, "elapsed_s": elapsed}, indent=1, default=str))
    _plot(records, out / "calibration.png")
    print("\n".join(lines))
    return 0


def recommended_bounds(records: list[dict[str, Any]], *, tolerance: float = 1.25) -> tuple[float, float] | None:
    """The BR band of the good sparse runs: ``(min, max)`` late BR of the non-dense runs whose FD is
    at most ``tolerance`` times the best non-dense FD (the paper's "FID is best in a middle band of
    BR", read off this sweep). ``None`` without such runs."""
    sparse = [r for r in records if r["strategy"] != "dense" and r["br_late_mean"] is not None
              and math.isfinite(r["fd"])]
    if not sparse:
        return None
    best = min(r["fd"] for r in sparse)
    good = [r["br_late_mean"] for r in sparse if r["fd"] <= tolerance * best]
    return (min(good), max(good)) if len(good) >= 2 else None


def _plot(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = list(dict.fromkeys(r["label"] for r in records))
    for label in labels:
        rows = [r for r in records if r["label"] == label and r["br_late_mean"] is not None]
        ax.scatter([r["br_late_mean"] for r in rows], [r["fd"] for r in rows], label=label)
    ax.set_xlabel("balance ratio (mean over the second half)")
    ax.set_ylabel("FD (digits features) ↓")
    ax.set_yscale("log")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
