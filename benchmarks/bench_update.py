"""Cost of one global prune-and-grow update (and of mask enforcement) vs the number of weights.

For N from 1M to 50M weights in 10 conv-shaped tensors (out = in channels, 3x3), at density 0.1
(ERK), with a dense gradient and Adam state in place: the wall time of

* one global RigL update (``DynamicSparsity.prune_and_grow``, drop fraction 0.5: magnitude prune,
  gradient growth, optimizer-state reset at changed positions) - what SDST/DDST do on G;
* one DDST density step of D (+0.05 of the weights, global gradient growth);
* one mask enforcement (``MaskedWeights.apply_``) - what runs after every optimizer step;

and, as the baseline measured in the same run on the same tensors, one dense ``Adam.step()``
(what every training step already pays). Each is the best of 3; the ratios to the Adam step say
how many optimizer steps one update costs. The scaling exponent is the slope of log(time) vs
log(N).

Run from the repository root: ``python -m benchmarks.bench_update [--sizes 1,2,5,10,25,50]``
(millions of weights).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
from typing import Any

import torch
from torch import nn

from benchmarks.common import best_of, fit_exponent, load_average, machine
from sparsegan.balance import DensityController
from sparsegan.masks import MaskedWeights
from sparsegan.schedules import ConstantDropFraction, UpdateSchedule
from sparsegan.strategies import DynamicSparsity
from sparsegan.strategies.ddst import ControlledDensity

DEFAULT_SIZES = (1, 2, 5, 10, 25, 50)


def _setup(total: int, density: float, seed: int = 0) -> tuple[MaskedWeights, torch.optim.Optimizer, DynamicSparsity]:
    channels = max(1, round(math.sqrt(total / 10 / 9)))
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(channels, channels, 3, 3, generator=gen) * 0.05) for _ in range(10)]
    names = [f"layer{i}.weight" for i in range(10)]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    optimizer.step()  # creates exp_avg / exp_avg_sq
    weights = MaskedWeights(names, params)
    algo = DynamicSparsity(density, "erk", update=UpdateSchedule(1), drop_fraction=ConstantDropFraction(0.5))
    weights.set_masks(algo.initial_masks({n: tuple(p.shape) for n, p in zip(names, params)}, generator=gen))
    weights.apply_()
    return weights, optimizer, algo


def _measure(total: int, density: float, repeats: int) -> dict[str, Any]:
    """Time one update, one density step and one enforcement at ``total`` weights."""
    weights, optimizer, algo = _setup(total, density)
    gen = torch.Generator().manual_seed(1)
    t_adam, _ = best_of(optimizer.step, repeats)  # the baseline: one dense Adam step on the same weights
    weights.apply_()  # the Adam steps moved inactive weights; masked training would have re-zeroed them
    t_update, all_update = best_of(lambda: algo.prune_and_grow(weights, optimizer, gen, 0.5), repeats)
    t_apply, _ = best_of(weights.apply_, repeats)
    ctrl = ControlledDensity(density, controller=DensityController(density), update=UpdateSchedule(1))
    saved = [m.clone() for m in weights.masks]

    def step_up() -> None:
        weights.set_masks([m.clone() for m in saved])
        ctrl.resize(weights, optimizer, gen, density + 0.05)

    t_resize, _ = best_of(step_up, repeats)
    row = {"weights": weights.total, "prune_and_grow_s": t_update, "prune_and_grow_all_s": all_update,
           "d_density_step_s": t_resize, "enforce_s": t_apply, "adam_step_s": t_adam,
           "prune_and_grow_vs_adam": t_update / t_adam, "d_density_step_vs_adam": t_resize / t_adam,
           "enforce_vs_adam": t_apply / t_adam, "load_average": load_average()}
    return row


def run(*, sizes: tuple[float, ...] = DEFAULT_SIZES, density: float = 0.1, repeats: int = 3) -> dict[str, Any]:
    """Measure every size; return the rows, the fitted exponents and the machine description."""
    rows = []
    for millions in sizes:
        rows.append(_measure(int(millions * 1e6), density, repeats))
        print(f"update benchmark: {millions}M weights, prune+grow {rows[-1]['prune_and_grow_s']:.3f}s",
              file=sys.stderr, flush=True)
        gc.collect()  # free this size's tensors before the next
    ns = [r["weights"] for r in rows]
    result = {
        "density": density, "drop_fraction": 0.5, "rows": rows, "machine": machine(),
        "exponent": {key: fit_exponent(ns, [r[key] for r in rows])
                     for key in ("prune_and_grow_s", "d_density_step_s", "enforce_s", "adam_step_s")},
    }
    at_25 = [r for r in rows if abs(r["weights"] - 25e6) / 25e6 < 0.02]
    result["prune_and_grow_at_25M_s"] = at_25[0]["prune_and_grow_s"] if at_25 else None
    return result


def to_markdown(res: dict[str, Any]) -> str:
    """A Markdown section with the results table."""
    lines = [
        (f"10 conv tensors (C x C x 3 x 3), density {res['density']} (ERK), drop fraction "
         f"{res['drop_fraction']}, dense gradient and Adam state present; best of 3."),
        "",
        ("| weights | dense Adam step (s, baseline) | one global prune+grow (s) | ratio to Adam step "
         "| one D density step +0.05 (s) | ratio | one mask enforcement (ms) | ratio |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['weights'] / 1e6:.1f}M | {r['adam_step_s']:.3f} | {r['prune_and_grow_s']:.3f} | "
                     f"{r['prune_and_grow_vs_adam']:.1f}x | {r['d_density_step_s']:.3f} | "
                     f"{r['d_density_step_vs_adam']:.1f}x | {r['enforce_s'] * 1e3:.1f} | {r['enforce_vs_adam']:.2f}x |")
    e = res["exponent"]
    at25 = res["prune_and_grow_at_25M_s"]
    verdict = "n/a" if at25 is None else ("met" if at25 <= 1.0 else "**missed**")
    lines += ["", (f"Scaling exponent (time ~ N^k): prune+grow k = {e['prune_and_grow_s']:.2f}, density step "
                   f"k = {e['d_density_step_s']:.2f}, enforcement k = {e['enforce_s']:.2f} "
                   f"(dense Adam step k = {e['adam_step_s']:.2f}). "
                   f"Target <= 1 s at 25M: {'n/a' if at25 is None else f'{at25:.3f} s'} ({verdict}).")]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                        help="millions of weights, comma-separated")
    args = parser.parse_args()
    result = run(sizes=tuple(float(s) for s in args.sizes.split(",")))
    print(json.dumps(result, indent=2, default=str))
    print(to_markdown(result))
