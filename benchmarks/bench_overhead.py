"""Per-iteration wall time of a wrapped GAN vs the same GAN unwrapped (dense), side by side.

SNGAN-32 (by default at its CIFAR size: G 4.28M / D 1.05M parameters, the torch-mimicry SNGAN32
widths ngf=256, ndf=128; ``--ngf/--ndf`` for narrower copies of the same architecture), batch 32, n_critic 5, Adam, hinge loss, CPU. Variants, each with its own
copy of the models: unwrapped dense; Static(0.1, 0.1); SDST(0.1, 0.1); DDST(0.1, 0.1) relax.
Every wrapped variant runs the BR probe every 10 G steps (the paper's rate), and all use the
paper's update intervals, so no mask update falls inside the timed blocks: the blocks measure the
steady state (mask enforcement after every optimizer step + the probe). The cost of the updates
themselves is measured separately (one G prune-and-grow, one D density change, at this model's
sizes) and amortized over the paper's intervals (G every 500 G steps; D every 1000 iterations,
as in the reference). The probe is the default step estimator (the latents of the loop's own G
step), which reuses D's score of G(z) from the loop's G step.

Timing: blocks of 10 iterations (exactly one probe per block), variants interleaved in rotating
order, several rounds; the ratio of each wrapped block to the adjacent unwrapped block, median
over rounds. Sparse weights do not make dense CPU kernels faster, so the ratios measure the
wrapper's overhead alone.

Run from the repository root: ``python -m benchmarks.bench_overhead [--rounds 4] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import best_of, load_average, machine
from sparsegan import SparseGANWrapper, discover
from sparsegan.balance import BalanceProbe, DensityController
from sparsegan.masks import MaskedWeights
from sparsegan.schedules import ConstantDropFraction, UpdateSchedule
from sparsegan.strategies import DDST, SDST, DynamicSparsity, Static
from sparsegan.strategies.ddst import ControlledDensity
from sparsegan.training import SNGANDiscriminator, SNGANGenerator

LATENT = 128


class _Run:
    """One variant: its own models, optimizers, optional wrapper, and an iteration function."""

    def __init__(self, name: str, strategy: Any, ngf: int, ndf: int, batch: int, n_critic: int, seed: int) -> None:
        torch.manual_seed(seed)
        self.name = name
        self.G, self.D = SNGANGenerator(LATENT, ngf, 32, 3), SNGANDiscriminator(ndf, 32, 3)
        self.g_opt = torch.optim.Adam(self.G.parameters(), lr=2e-4, betas=(0.0, 0.9))
        self.d_opt = torch.optim.Adam(self.D.parameters(), lr=2e-4, betas=(0.0, 0.9))
        self.batch, self.n_critic = batch, n_critic
        self.rng = torch.Generator().manual_seed(seed)
        self.real = torch.randn(256, 3, 32, 32, generator=self.rng).tanh()
        self.sg = None
        if strategy is not None:
            real = self.real
            self.sg = SparseGANWrapper(self.G, self.D, self.g_opt, self.d_opt, strategy=strategy, seed=seed,
                                       latent=lambda n: torch.randn(n, LATENT),
                                       real=lambda n: real[torch.randint(len(real), (n,))], probe_batch_size=batch)

    def iteration(self) -> None:
        n = self.batch
        for _ in range(self.n_critic):
            real = self.real[torch.randint(len(self.real), (n,), generator=self.rng)]
            with torch.no_grad():
                fake = self.G(torch.randn(n, LATENT, generator=self.rng))
            d_loss = F.relu(1 - self.D(real)).mean() + F.relu(1 + self.D(fake)).mean()
            self.d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.d_opt.step()
        g_loss = -self.D(self.G(torch.randn(n, LATENT, generator=self.rng))).mean()
        self.g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        self.g_opt.step()

    def block(self, iterations: int) -> float:
        start = time.perf_counter()
        for _ in range(iterations):
            self.iteration()
        return (time.perf_counter() - start) / iterations


def _masked(module: torch.nn.Module, example: torch.Tensor, density: float) -> tuple[MaskedWeights, Any]:
    """The module's discovered weights under random ERK masks, with a random dense gradient."""
    found = discover(module, example)
    params = dict(module.named_parameters())
    weights = MaskedWeights(found.names, [params[n] for n in found.names])
    algo = DynamicSparsity(density, update=UpdateSchedule(1), drop_fraction=ConstantDropFraction(0.5))
    weights.masks = algo.initial_masks({n: tuple(params[n].shape) for n in found.names},
                                       generator=torch.Generator().manual_seed(0))
    for p in weights.params:  # a dense gradient, as after backward
        p.grad = torch.randn_like(p)
    return weights, algo


def _update_costs(run: _Run, repeats: int) -> dict[str, float]:
    """Wall time of one global G prune-and-grow (drop 0.5) and one D density step (+0.05, by gradient)."""
    gen = torch.Generator().manual_seed(0)
    g_weights, g_algo = _masked(run.G, torch.randn(2, LATENT), 0.1)
    g_time, _ = best_of(lambda: g_algo.prune_and_grow(g_weights, run.g_opt, gen, 0.5), repeats)
    d_weights, _ = _masked(run.D, torch.randn(2, 3, 32, 32), 0.1)
    ctrl = ControlledDensity(0.1, controller=DensityController(0.1, max_density=1.0), update=UpdateSchedule(1))
    state = [m.clone() for m in d_weights.masks]

    def grow_once() -> None:
        d_weights.set_masks([m.clone() for m in state])
        ctrl.resize(d_weights, run.d_opt, gen, 0.15)

    d_time, _ = best_of(grow_once, repeats)
    for p in g_weights.params + d_weights.params:
        p.grad = None
    return {"g_prune_and_grow_s": g_time, "d_density_step_s": d_time}


def component_costs(*, ngf: int = 256, ndf: int = 128, batch: int = 32, n_critic: int = 5, br_every: int = 10,
                    repeats: int = 3) -> dict[str, Any]:
    """The wrapper's added work per iteration, timed piece by piece (best of ``repeats``).

    Wall-clock ratios of whole iterations carry the machine's noise (several percent on a shared
    CPU); the pieces are small and timed by their minimum, so their sum bounds the overhead more
    tightly: ``(n_critic + 1)`` mask enforcements of both networks (an upper bound: each optimizer
    step enforces only its own network) plus one BR probe sample every ``br_every`` iterations,
    against one dense iteration. The forward pre-hook's staleness check (a comparison of
    parameter version counters) is not included.
    """
    dense = _Run("dense", None, ngf, ndf, batch, n_critic, seed=0)
    static = _Run("Static", Static(0.1, 0.1), ngf, ndf, batch, n_critic, seed=0)
    dense.block(1)
    static.block(1)
    t_iteration, _ = best_of(dense.iteration, repeats)
    assert static.sg is not None
    t_enforce, _ = best_of(static.sg.apply_masks, max(5, repeats))
    # the step estimator, as the wrapper runs it: the user's own forwards (not timed) are recorded by
    # its hooks, so a sample costs one G forward and two D forwards (D(G'(z)) and D(x)), no grad
    probe = BalanceProbe(static.G, static.D, estimator="step")
    handles = probe.attach()
    z, real = torch.randn(batch, LATENT), static.real[:batch]
    with torch.no_grad():
        fake = static.G(z)
        static.D(real)
        static.D(fake)
        probe.discriminator_stepped()
        static.D(static.G(z))

    def probe_sample() -> None:
        probe.before_step()
        probe.after_step()

    t_probe, _ = best_of(probe_sample, repeats)
    for handle in handles:
        handle.remove()
    added = (n_critic + 1) * t_enforce + t_probe / br_every
    return {"dense_iteration_s": t_iteration, "enforce_both_s": t_enforce, "probe_sample_s": t_probe,
            "added_per_iteration_s": added, "estimated_ratio": 1.0 + added / t_iteration,
            "config": {"ngf": ngf, "ndf": ndf, "batch": batch, "n_critic": n_critic, "br_every": br_every}}


def run(*, rounds: int = 4, block: int = 10, quick: bool = False, ngf: int = 256, ndf: int = 128) -> dict[str, Any]:
    """Measure and return the results (see the module docs).

    ``ngf``/``ndf`` set the widths (default: torch-mimicry's SNGAN32). One iteration of the full
    width costs ~1.4 TFLOP (n_critic 5, batch 32), i.e. 10-30 s on one CPU core, so a loaded
    small machine may need narrower models (e.g. 64/64, ~16x cheaper) to finish in minutes.
    """
    ngf, ndf, batch, n_critic = (32, 32, 8, 2) if quick else (ngf, ndf, 32, 5)
    info = machine()
    variants: dict[str, Any] = {
        "dense (unwrapped)": None,
        "Static": Static(0.1, 0.1),
        "SDST": SDST(0.1, 0.1, total_steps=100_000),
        "DDST (relax)": DDST(0.1, 0.1, mode="relax", total_steps=100_000),
    }
    runs = [_Run(name, strategy, ngf, ndf, batch, n_critic, seed=0) for name, strategy in variants.items()]
    for r in runs:  # warm-up: allocator, one probe cycle
        r.block(3)
    per_round: list[dict[str, float]] = []
    for k in range(rounds):
        order = runs[k % len(runs):] + runs[:k % len(runs)]
        times = {r.name: r.block(block) for r in order}
        per_round.append(times)
        print(f"overhead round {k + 1}/{rounds}: " + ", ".join(f"{n} {t:.3f}s/it" for n, t in times.items()),
              file=sys.stderr, flush=True)
    base = "dense (unwrapped)"
    results: dict[str, Any] = {"config": {"ngf": ngf, "ndf": ndf, "batch": batch, "n_critic": n_critic,
                                          "g_params": sum(p.numel() for p in runs[0].G.parameters()),
                                          "d_params": sum(p.numel() for p in runs[0].D.parameters()),
                                          "rounds": rounds, "block": block, "br_every": 10},
                               "machine": info, "variants": {}}
    costs = _update_costs(runs[0], repeats=3)
    dense_iter = statistics.median(t[base] for t in per_round)
    amortized = {"Static": 0.0,
                 "SDST": costs["g_prune_and_grow_s"] / 500,
                 "DDST (relax)": costs["g_prune_and_grow_s"] / 500 + costs["d_density_step_s"] / 1000}
    targets = {"Static": 1.03, "SDST": None, "DDST (relax)": 1.05}  # DDST: the ADAPT-fidelity issue's goal
    for r in runs:
        ratios = [t[r.name] / t[base] for t in per_round]
        entry = {"iteration_s_median": statistics.median(t[r.name] for t in per_round),
                 "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
        if r.name in amortized:
            entry["amortized_update_s_per_iteration"] = amortized[r.name]
            entry["ratio_with_updates"] = entry["ratio_median"] + amortized[r.name] / dense_iter
            entry["target"] = targets[r.name]
        results["variants"][r.name] = entry
    results["update_costs_s"] = costs
    results["components"] = component_costs(ngf=ngf, ndf=ndf, batch=batch, n_critic=n_critic)
    results["per_round_s"] = per_round
    results["machine"]["load_average_at_end"] = load_average()
    return results


def to_markdown(res: dict[str, Any]) -> str:
    """A Markdown section with the results table."""
    c = res["config"]
    lines = [
        (f"SNGAN-32 G {c['g_params'] / 1e6:.2f}M / D {c['d_params'] / 1e6:.2f}M parameters (ngf {c['ngf']}, "
         f"ndf {c['ndf']}), batch {c['batch']}, n_critic {c['n_critic']}, densities G 0.1 / D 0.1, BR probe every "
         f"{c['br_every']} G steps; {c['rounds']} rounds of {c['block']}-iteration blocks, variants interleaved."),
        "",
        ("| variant | s / iteration (median) | ratio vs unwrapped (median [min, max]) "
         "| + amortized mask updates | target | met? |"),
        "|---|---|---|---|---|---|",
    ]
    for name, v in res["variants"].items():
        ratio = f"{v['ratio_median']:.3f} [{v['ratio_min']:.3f}, {v['ratio_max']:.3f}]"
        with_updates = f"{v['ratio_with_updates']:.3f}" if "ratio_with_updates" in v else "-"
        target = v.get("target")
        met = "-" if target is None else ("yes" if v["ratio_with_updates"] <= target else "**no**")
        lines.append(f"| {name} | {v['iteration_s_median']:.3f} | {ratio} | {with_updates} | "
                     f"{'-' if target is None else f'<= {target:.2f}'} | {met} |")
    u = res["update_costs_s"]
    if "components" in res:
        lines += ["", components_markdown(res["components"])]
    lines += ["", (f"One global G prune-and-grow (drop fraction 0.5, {c['g_params'] / 1e6:.2f}M-parameter G): "
                   f"{u['g_prune_and_grow_s'] * 1e3:.1f} ms, amortized over 500 G steps; one D density step "
                   f"(+0.05 by gradient): {u['d_density_step_s'] * 1e3:.1f} ms, amortized over 1000 iterations.")]
    return "\n".join(lines)


def components_markdown(c: dict[str, Any]) -> str:
    """One paragraph on :func:`component_costs`."""
    return (f"Piece by piece (best of 3; less noisy than the interleaved blocks): one dense iteration "
            f"{c['dense_iteration_s']:.3f} s; enforcing both networks' masks {c['enforce_both_s'] * 1e3:.1f} ms, "
            f"{c['config']['n_critic'] + 1} times per iteration (upper bound); one BR probe sample "
            f"{c['probe_sample_s'] * 1e3:.0f} ms every {c['config']['br_every']} iterations; added "
            f"{c['added_per_iteration_s'] * 1e3:.0f} ms per iteration, an estimated ratio of "
            f"**{c['estimated_ratio']:.3f}x** for Static (DDST adds the amortized updates above).")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="tiny models (checks that the script runs)")
    parser.add_argument("--ngf", type=int, default=256, help="generator width (default 256, SNGAN32)")
    parser.add_argument("--ndf", type=int, default=128, help="discriminator width (default 128, SNGAN32)")
    parser.add_argument("--components-only", action="store_true",
                        help="only the piece-by-piece estimate (minutes instead of the interleaved blocks)")
    args = parser.parse_args()
    if args.components_only:
        parts = component_costs(ngf=args.ngf, ndf=args.ndf)
        print(json.dumps(parts, indent=2))
        print(components_markdown(parts))
        raise SystemExit(0)
    result = run(rounds=args.rounds, quick=args.quick, ngf=args.ngf, ndf=args.ndf)
    print(json.dumps(result, indent=2, default=str))
    print(to_markdown(result))
