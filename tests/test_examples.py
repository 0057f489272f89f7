"""The third-party GAN examples: they run, reach the densities asked for, and keep the "two lines" promise.

Each example is run as a script (subprocess) for a few steps with small models. The promise is
checked on the text: exactly two lines are marked ``# sparsegan: 1/2`` / ``# sparsegan: 2/2``
(the import and the wrapper), nothing else refers to sparsegan (the adapters' import shims
aside), and the file without those two lines is a plain dense loop that runs.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import sparsegan

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"#\s*sparsegan:\s*([12])/2\s*$")


@functools.cache
def mimicry_kernels() -> dict[str, set[str]]:
    from sparsegan.adapters import mimicry

    G, D = mimicry.build("sngan32", ngf=16, ndf=16, nz=128)
    return {"netG": set(sparsegan.discover(G, torch.randn(2, 128)).names),
            "netD": set(sparsegan.discover(D, torch.randn(2, 3, 32, 32)).names)}


@functools.cache
def lucidrains_kernels() -> dict[str, set[str]]:
    from sparsegan.adapters import stylegan2

    G, D, S = stylegan2.build(image_size=16, latent_dim=32, network_capacity=2)
    return {"G": set(sparsegan.discover(G, stylegan2.latent(G, S)(2)).names),
            "D": set(sparsegan.discover(D, torch.rand(2, 3, 16, 16)).names)}


# script -> (small-model options, kernel names per checkpoint entry, (G key, D key))
EXAMPLES: dict[str, tuple[list[str], Callable[[], dict[str, set[str]]], tuple[str, str]]] = {
    "sngan_mimicry.py": (["--ngf", "16", "--ndf", "16", "--batch-size", "8", "--n-dis", "1"],
                         mimicry_kernels, ("netG", "netD")),
    "stylegan2_lucidrains.py": (["--image-size", "16", "--latent-dim", "32", "--network-capacity", "2",
                                 "--batch-size", "4"], lucidrains_kernels, ("G", "D")),
}


# the third-party package each example trains (installed by `make test`, see requirements/)
REQUIRES = {"sngan_mimicry.py": "torch_mimicry", "stylegan2_lucidrains.py": "stylegan2_pytorch"}


def needs_package(name: str) -> None:
    """Skip, naming the missing package, when the example's GAN package is not installed."""
    package = REQUIRES[name]
    # find_spec, not import: these packages import only through sparsegan's adapters' shims
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{name} needs {package}, which is not installed (pip install -r requirements/testbed.txt)")


def run(script: Path, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"{script.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def density(state: dict[str, torch.Tensor], names: set[str]) -> float:
    assert names and names <= set(state), sorted(names - set(state))
    return sum(int(torch.count_nonzero(state[n])) for n in names) / sum(state[n].numel() for n in names)


def strip_marked(source: str) -> tuple[str, list[str]]:
    """The source without its marked lines, and the marked lines."""
    kept, marked = [], []
    for line in source.splitlines(keepends=True):
        (marked if MARK.search(line.rstrip("\n")) else kept).append(line)
    return "".join(kept), marked


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_trains_at_the_densities_asked(name: str, tmp_path: Path) -> None:
    needs_package(name)
    options, kernels, (g_key, d_key) = EXAMPLES[name]
    checkpoint = tmp_path / "final.pt"
    result = run(ROOT / "examples" / name, "--steps", "3", "--g-density", "0.25", "--d-density", "0.4",
                 "--log-every", "1", "--save", str(checkpoint), *options)
    assert "step    3" in result.stdout
    state = torch.load(checkpoint)
    names = kernels()
    assert density(state[g_key], names[g_key]) == pytest.approx(0.25, abs=1e-3)
    assert density(state[d_key], names[d_key]) == pytest.approx(0.4, abs=1e-3)
    if "S" in state:  # lucidrains' style network is trained by G's optimizer but not wrapped: dense
        assert all(torch.count_nonzero(v) == v.numel() for k, v in state["S"].items() if v.dim() > 1)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_is_a_plain_loop_plus_two_lines(name: str, tmp_path: Path) -> None:
    needs_package(name)
    source = (ROOT / "examples" / name).read_text()
    plain, marked = strip_marked(source)
    assert [MARK.search(line.rstrip("\n")).group(1) for line in marked] == ["1", "2"]
    import_line, wrap_line = (ast.parse(line.split("#")[0].strip()).body for line in marked)
    assert len(import_line) == 1 and isinstance(import_line[0], ast.Import)
    assert [a.name for a in import_line[0].names] == ["sparsegan"]
    assert len(wrap_line) == 1 and "sparsegan.SparseGANWrapper(" in marked[1]
    # nothing else refers to the wrapper or to sparsegan (the adapter import shims aside)
    tree = ast.parse(plain)
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert "sparsegan" not in names and "sg" not in names
    imports = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert all(not m.startswith("sparsegan") or m.startswith("sparsegan.adapters") for m in imports if m)

    options, kernels, (g_key, d_key) = EXAMPLES[name]
    script = tmp_path / name
    script.write_text(plain)
    checkpoint = tmp_path / "dense.pt"
    run(script, "--steps", "2", "--save", str(checkpoint), *options)
    state = torch.load(checkpoint)
    names = kernels()
    assert density(state[g_key], names[g_key]) > 0.99 and density(state[d_key], names[d_key]) > 0.99
