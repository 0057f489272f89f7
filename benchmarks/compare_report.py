"""Per-seed tables and the benchmark target from one or more ``sparsegan compare`` outputs.

``sparsegan compare`` writes ``compare.json`` per run folder; runs of one comparison may be spread
over several folders (one per strategy group, run side by side). This script merges them by
strategy and seed and prints, in Markdown:

* every seed's FD (of G and of its EMA) per strategy, with median and the seed-paired count of
  "below Static's" (a seed on which both collapsed is left out of that count, and shown);
* the share of the median Static->Dense gap each strategy closes,
  ``(median Static - median X) / (median Static - median Dense)``;
* collapsed runs: FD above ``--collapse`` times Dense's median (default 10x);
* final D density and training FLOPs, and, for DDST, the BR bounds the run used;
* the benchmark target of the ADAPT issue: DDST-relax below Static on >= 75 % of seeds, closing
  >= 50 % of the median gap, with no collapse.

Run from the repository root::

    python -m benchmarks.compare_report results/compare/g01-1000/*/compare.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["load_runs", "report", "warmup_bounds"]


def load_runs(paths: Sequence[str | Path]) -> dict[str, dict[int, dict[str, Any]]]:
    """Strategy -> seed -> run record, merged over ``compare.json`` files (a later file wins a tie).

    A run made with an explicit ``--d-density`` is listed apart, as e.g. ``static-d1.0``.
    """
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        d_density = data.get("args", {}).get("d_density")
        for strategy, records in data["runs"].items():
            name = strategy if d_density is None else f"{strategy}-d{d_density}"
            for record in records:
                record.setdefault("iterations", data.get("args", {}).get("steps"))
                runs.setdefault(name, {})[int(record["seed"])] = record
    return runs


def warmup_bounds(record: dict[str, Any]) -> tuple[float, float] | None:
    """The BR bounds a DDST run used: its summary's, else rebuilt from its warm-up (mean of the samples
    up to its first acting decision) for runs recorded before the summary held them."""
    saved = record["summary"].get("br_bounds")
    if saved is not None:
        return (float(saved[0]), float(saved[1]))
    if not record["summary"].get("d_decisions") or not record.get("iterations"):
        return None
    # the compressed schedule's default warm-up: 10 relax intervals of iterations // 100
    warmup = 10 * max(1, int(record["iterations"]) // 100)
    samples = [sample for step, sample, _ in record["balance"] if step <= warmup]
    mean = sum(samples) / len(samples) if samples else math.nan
    return (0.9 * mean, 1.1 * mean) if 0 < 1.1 * mean <= 1 else None


def _fd(record: dict[str, Any], network: str) -> float:
    return float(record["metrics"].get(network, {}).get("fd", math.nan))


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def report(runs: dict[str, dict[int, dict[str, Any]]], *, collapse: float = 10.0, reference: str = "static",
           dense: str = "dense", dense_median: float | None = None) -> str:
    """The Markdown report (see the module docs)."""
    seeds = sorted(set.intersection(*(set(r) for r in runs.values()))) if runs else []
    lines = [f"Seeds: {', '.join(map(str, seeds))} (those every strategy ran)", ""]
    medians: dict[tuple[str, str], float] = {}
    for network, label in (("generator", "G"), ("ema", "EMA")):
        header = ["strategy"] + [f"seed {s}" for s in seeds] + ["median", f"below {reference}'s", "gap closed",
                                                                "collapsed"]
        lines += [f"FD of {label} (lower is better)", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        for name in runs:
            medians[(name, network)] = _median([_fd(runs[name][s], network) for s in seeds])
        threshold = collapse * medians.get((dense, network), dense_median if dense_median is not None else math.nan)
        for name, by_seed in runs.items():
            values = [_fd(by_seed[s], network) for s in seeds]
            cells = [name] + [f"**{v:.2f}**" if v > threshold else f"{v:.2f}" for v in values]
            cells.append(f"{medians[(name, network)]:.2f}")
            if reference in runs and name != reference:
                ref = [_fd(runs[reference][s], network) for s in seeds]
                # a seed on which both collapsed says nothing about which is better
                both = [a > threshold and b > threshold for a, b in zip(values, ref)]
                wins = sum(a < b for (a, b), dead in zip(zip(values, ref), both) if not dead)
                cells.append(f"{wins}/{len(seeds) - sum(both)}" + (f" (+{sum(both)} both collapsed)" if any(both) else ""))
            else:
                cells.append("-")
            gap = medians.get((reference, network), math.nan) - medians.get((dense, network), math.nan)
            closed = (medians.get((reference, network), math.nan) - medians[(name, network)]) / gap if gap else math.nan
            cells.append("-" if name in (reference, dense) else f"{closed:.0%}")
            cells.append(str(sum(v > threshold for v in values)) if math.isfinite(threshold) else "n/a")
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Bold: collapsed (FD above {collapse:g}x Dense's median, {threshold:.1f}).", ""]
    header = ["strategy", "final D density (median [min, max])", "train FLOPs total (median)", "BR bounds used"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, by_seed in runs.items():
        densities = [by_seed[s]["summary"]["d_density"] for s in seeds]
        flops = [by_seed[s]["summary"]["flops_ratio"]["total"] for s in seeds]
        bounds = [warmup_bounds(by_seed[s]) for s in seeds]
        shown = ", ".join(f"({b[0]:.3f}, {b[1]:.3f})" for b in bounds if b is not None) or "-"
        lines.append(f"| {name} | {statistics.median(densities):.2f} [{min(densities):.2f}, {max(densities):.2f}] "
                     f"| {statistics.median(flops):.3f} | {shown} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="compare.json files")
    parser.add_argument("--collapse", type=float, default=10.0, help="collapse threshold in Dense medians (10)")
    parser.add_argument("--dense-median", type=float, default=None,
                        help="Dense's median FD when the files hold no Dense run (sets the collapse threshold)")
    args = parser.parse_args(argv)
    print(report(load_runs(args.files), collapse=args.collapse, dense_median=args.dense_median))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
