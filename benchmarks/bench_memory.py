"""Memory overhead per masked weight: sparsegan vs rigl-torch on the same plain conv net.

The model is one rigl-torch supports: a stack of plain ``nn.Conv2d`` layers (3 -> 512, then ten
512 -> 512 3x3 convs: ~23.6M weights) and a linear head, trained with Adam. Each measurement runs
in a fresh subprocess: build the model and optimizer, take one training step (so gradients and
Adam state exist, as in a real run), read the resident set size (RSS, after ``malloc_trim``),
attach the sparsity tool at density 0.1, read RSS again, then train a few steps including one
mask update and read RSS and the peak RSS (``ru_maxrss``).

* steady overhead = RSS after attaching (and after the update) - RSS before, per masked weight;
* update peak = peak RSS during the steps with the update - RSS before, per masked weight
  (transient: scores, top-k buffers; an upper bound, since the peak is process-wide).

sparsegan wraps the conv net as the generator of a GAN whose discriminator is a 10 -> 1 linear
layer (a GAN needs two networks); rigl-torch's default ``uniform`` distribution keeps the first
layer dense, so each tool's masked-weight count is its own.

Run from the repository root: ``python -m benchmarks.bench_memory``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _model() -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 512, 3, padding=1), nn.ReLU()]
    for _ in range(10):
        layers += [nn.Conv2d(512, 512, 3, padding=1), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)]
    return nn.Sequential(*layers)


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(tool: str) -> dict[str, Any]:
    from benchmarks.common import rss_bytes

    torch.manual_seed(0)
    empty = rss_bytes()  # the baseline's start: before the model exists
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.randn(4, 3, 4, 4), torch.randint(10, (4,))

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    loss().backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    before = rss_bytes()
    dense_state = before - empty  # weights + gradients + Adam moments (+ the tiny forward's buffers)
    if tool == "sparsegan":
        from sparsegan import SparseGANWrapper
        from sparsegan.strategies import DST

        D = nn.Linear(10, 1)
        d_opt = torch.optim.Adam(D.parameters(), lr=1e-4)
        sg = SparseGANWrapper(model, D, opt, d_opt,
                              strategy=DST(0.1, 1.0, networks="generator", update_every=3, drop_fraction=0.3),
                              latent=lambda n: torch.randn(n, 3, 4, 4))
        masked = sum(m.numel() for m in sg.masks("generator").values())
        attached = rss_bytes()
        peak_before = _peak_bytes()
        for _ in range(4):  # step 3 runs a global prune-and-grow
            opt.zero_grad()
            loss().backward()
            opt.step()
        updated = sg.mask_updates("generator")
    elif tool == "rigl":
        from rigl_torch.RigL import RigLScheduler

        scheduler = RigLScheduler(model, opt, dense_allocation=0.1, T_end=1000, delta=3, alpha=0.3,
                                  ignore_linear_layers=False)
        masked = sum(m.numel() for m in scheduler.backward_masks if m is not None)
        attached = rss_bytes()
        peak_before = _peak_bytes()
        for _ in range(4):  # step 3 is a RigL step
            opt.zero_grad()
            loss().backward()
            if scheduler():
                opt.step()
        updated = scheduler.rigl_steps
    else:
        raise ValueError(tool)
    after = rss_bytes()
    peak = _peak_bytes()
    return {
        "tool": tool, "masked_weights": masked, "mask_updates": updated,
        "model_weights": sum(p.numel() for p in model.parameters()),
        "dense_state_bytes_per_weight": dense_state / sum(p.numel() for p in model.parameters()),
        "steady_vs_dense_state": (attached - before) / dense_state,
        "after_update_vs_dense_state": (after - before) / dense_state,
        "steady_bytes_per_weight": (attached - before) / masked,
        "after_update_bytes_per_weight": (after - before) / masked,
        # None: the update's transient stayed below the process's earlier peak (model build / wrapping)
        "update_peak_bytes_per_weight": (peak - before) / masked if peak > peak_before else None,
        "earlier_peak_bytes_per_weight": (peak_before - before) / masked,
        "rss_before_mb": before / 2**20, "rss_attached_mb": attached / 2**20, "rss_after_mb": after / 2**20,
        "peak_mb": peak / 2**20,
    }


def run() -> dict[str, Any]:
    """Measure both tools, each in its own subprocess."""
    from benchmarks.common import machine

    results = {"machine": machine(), "tools": {}}
    for tool in ("sparsegan", "rigl"):
        done = subprocess.run([sys.executable, "-m", "benchmarks.bench_memory", "--child", tool], cwd=ROOT,
                              capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
            results["tools"][tool] = {"error": last}
            continue
        results["tools"][tool] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def to_markdown(res: dict[str, Any]) -> str:
    """A Markdown section with the results table."""
    lines = [
        ("Plain conv net (3->512 + ten 512->512 3x3 convs + linear head, 23.6M weights), Adam, density 0.1; "
         "RSS deltas in fresh processes, per masked weight. Baseline, measured in the same processes: the dense "
         "training state (weights + gradients + Adam moments) per model weight; the ratio columns give each "
         "tool's overhead as a fraction of it."),
        "",
        ("| tool | masked weights | dense training state (B/weight, baseline) | steady overhead (B/weight) "
         "| ratio | after a mask update (B/weight) | ratio | transient peak during update (B/weight) |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for tool, r in res["tools"].items():
        if "error" in r:
            lines.append(f"| {tool} | error: {r['error']} | | | | | | |")
            continue
        peak = r["update_peak_bytes_per_weight"]
        peak_text = (f"{peak:.2f}" if peak is not None
                     else f"<= {r['earlier_peak_bytes_per_weight']:.2f} (below the earlier process peak)")
        lines.append(f"| {tool} | {r['masked_weights'] / 1e6:.2f}M | {r['dense_state_bytes_per_weight']:.2f} | "
                     f"{r['steady_bytes_per_weight']:.2f} | {r['steady_vs_dense_state']:.3f} | "
                     f"{r['after_update_bytes_per_weight']:.2f} | {r['after_update_vs_dense_state']:.3f} | "
                     f"{peak_text} |")
    tools = res["tools"]
    if all(t in tools and "error" not in tools[t] for t in ("sparsegan", "rigl")):
        a, b = tools["sparsegan"], tools["rigl"]
        lines += ["", (f"sparsegan / rigl-torch steady overhead per masked weight: "
                       f"{a['steady_bytes_per_weight'] / b['steady_bytes_per_weight']:.2f}x; after a mask update: "
                       f"{a['after_update_bytes_per_weight'] / b['after_update_bytes_per_weight']:.2f}x.")]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(_child(sys.argv[2])))
    else:
        result = run()
        print(json.dumps(result, indent=2, default=str))
        print(to_markdown(result))
