"""The ``sparsegan`` command line: a shortened demo and compare, inspect, and bad inputs."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import sparsegan.metrics
from sparsegan.cli import compare_table, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def extractor_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sparsegan-cache")


@pytest.fixture(autouse=True)
def quick_extractor(monkeypatch: pytest.MonkeyPatch, extractor_cache: Path) -> None:
    """Train the metric's feature extractor for 2 epochs (cached per module) instead of 10."""
    monkeypatch.setattr(sparsegan.metrics, "digits_feature_extractor",
                        functools.partial(sparsegan.metrics.digits_feature_extractor, epochs=2))
    monkeypatch.setenv("SPARSEGAN_CACHE", str(extractor_cache))


@pytest.fixture(autouse=True)
def no_cached_inception(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An empty torch hub folder, so Inception weights cached on the user's machine do not change the outputs."""
    import torch

    hub = tmp_path.parent / f"{tmp_path.name}-torch-hub"  # beside the test's folder, not inside it
    hub.mkdir()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))


def _tiny(out: Path) -> list[str]:
    return ["--steps", "8", "--batch-size", "8", "--channels", "8", "--n-critic", "1", "--eval-samples", "64",
            "--no-progress", "--out", str(out), "--device", "cpu"]


def test_demo_writes_samples_plots_metrics_and_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    out = tmp_path / "demo"
    assert main(["demo", *_tiny(out)]) == 0
    for name in ("samples.png", "real.png", "balance.png", "metrics.json", "checkpoint.pt", "report.txt"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["strategy"] == "ddst-strict"
    assert metrics["config"]["d_density"] == 0.1  # the D density used (G's), not null
    # every weight tensor of the demo's SNGAN is masked: the two densities agree
    assert metrics["summary"]["weight_density"]["generator"] == pytest.approx(metrics["summary"]["g_density"])
    assert metrics["summary"]["g_density"] == pytest.approx(0.1, abs=0.01)
    assert 0 < metrics["summary"]["flops_ratio"]["total"] < 1
    assert metrics["metrics"]["generator"]["fd"] > 0 and "kid_mean" in metrics["metrics"]["ema"]
    assert metrics["inception_fid"] is None  # no cached Inception weights on this machine
    assert len(metrics["history"]["iteration"]) >= 2 and metrics["balance"]
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert {"generator", "discriminator", "ema", "sparsegan", "config"} <= set(checkpoint)
    text = capsys.readouterr().out
    assert "training FLOPs vs dense" in text and "digits FD" in text
    assert "samples.png (64 samples of the EMA generator)" in text


def test_demo_on_a_users_npz_with_a_static_strategy(tmp_path: Path) -> None:
    import numpy as np

    images = np.random.default_rng(0).integers(0, 256, (40, 20, 20, 3), dtype=np.uint8)
    np.savez(tmp_path / "mine.npz", images=images)
    out = tmp_path / "run"
    assert main(["demo", "--strategy", "static", "--g-density", "0.3", "--d-density", "0.5",
                 "--data", str(tmp_path / "mine.npz"), *_tiny(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["summary"]["d_density"] == pytest.approx(0.5, abs=0.01)
    assert "channels=3" in metrics["data"]


def test_compare_prints_the_table_for_all_strategies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", *_tiny(out), "--steps", "6"]) == 0
    text = capsys.readouterr().out
    for name in ("dense", "static", "sdst", "ddst-relax", "ddst-strict"):
        assert f"| {name} |" in text
    assert "train FLOPs total" in text
    results = json.loads((out / "compare.json").read_text())
    assert set(results["runs"]) == {"dense", "static", "sdst", "ddst-relax", "ddst-strict"}
    dense = results["runs"]["dense"][0]["summary"]
    assert dense["flops_ratio"]["total"] == pytest.approx(1.0) and dense["d_density"] == 1.0
    assert results["runs"]["static"][0]["summary"]["flops_ratio"]["total"] < 0.5
    assert (out / "compare.png").stat().st_size > 0 and (out / "compare.md").is_file()


def test_compare_repeats_give_mean_and_std(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rep"
    assert main(["compare", *_tiny(out), "--steps", "4", "--strategies", "static", "--repeats", "2"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| static |"))
    assert "±" in row
    runs = json.loads((out / "compare.json").read_text())["runs"]["static"]
    assert [r["seed"] for r in runs] == [0, 1]


def test_compare_jobs_in_worker_processes_match_the_sequential_runs(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--steps", "4", "--strategies", "static,ddst", "--repeats", "2"]
    assert main(["compare", *_tiny(tmp_path / "seq"), *args, "--threads", "1"]) == 0
    assert main(["compare", *_tiny(tmp_path / "par"), *args, "--threads", "2", "--jobs", "2"]) == 0
    assert "2 worker processes x 1 CPU thread(s)" in capsys.readouterr().out
    seq = json.loads((tmp_path / "seq" / "compare.json").read_text())["runs"]
    par = json.loads((tmp_path / "par" / "compare.json").read_text())["runs"]
    for name in ("static", "ddst"):
        assert [r["seed"] for r in par[name]] == [0, 1]
        # the seed reaches the run (else equal numbers below would show nothing): seeds 0 and 1 differ
        assert seq[name][0]["history"]["g_loss"] != pytest.approx(seq[name][1]["history"]["g_loss"], rel=1e-6)
        assert par[name][0]["metrics"]["generator"]["fd"] != par[name][1]["metrics"]["generator"]["fd"]
        for a, b in zip(seq[name], par[name], strict=True):
            # same seeds, same extractor (handed to the workers), one thread: the same numbers
            assert b["metrics"]["generator"]["fd"] == pytest.approx(a["metrics"]["generator"]["fd"], rel=1e-6)
            assert b["history"]["g_loss"] == pytest.approx(a["history"]["g_loss"], rel=1e-6)
            assert b["summary"]["d_density"] == a["summary"]["d_density"]
    assert (tmp_path / "par" / "samples_ddst.png").stat().st_size > 0


def _record(seed: int, fd: float, ema: float | None = None) -> dict[str, Any]:
    return {"seed": seed, "metrics": {"generator": {"fd": fd, "kid_mean": 0.5}, "ema": {"fd": fd + 1 if ema is None else ema}},
            "summary": {"d_density": 0.1, "wall_time_s": 10.0,
                        "flops_ratio": {"generator": 0.1, "discriminator": 0.2, "total": 0.15}}}


def test_compare_table_lists_seeds_and_pairs_them_with_static() -> None:
    rows = {"static": [_record(0, 10.0), _record(1, 6.0), _record(2, 9.0)],
            "ddst": [_record(1, 5.0, 1.0), _record(0, 80.0, 1.0), _record(2, 8.0, 20.0)]}  # finished out of order
    lines = compare_table(rows).splitlines()
    assert lines[0].startswith("| strategy | FD (G) ↓ | FD (G) per seed | G FD below static's | EMA FD below static's | "
                               "FD (EMA) ↓ |")
    # ddst: mean (80 + 5 + 8) / 3 = 31.00, sample std sqrt((49^2 + 26^2 + 23^2) / 2) = sqrt(1803) = 42.46;
    # G wins on seeds 1 and 2; EMA (static's EMA = FD + 1: 11, 7, 10) wins on seeds 0 and 1
    assert lines[3].startswith("| ddst | 31.00 ± 42.46 | 80.00 / 5.00 / 8.00 | 2/3 | 2/3 | 7.33 ± 10.97 |")
    assert lines[2].startswith("| static | 8.33 ± 2.08 | 10.00 / 6.00 / 9.00 | - | - |")
    many = {"static": [_record(s, float(s)) for s in range(7)]}
    assert "| static | 3.00 ± 2.16 | median 3.00 [0.00, 6.00] |" in compare_table(many)  # one strategy: no pairing
    single = compare_table({"dense": [_record(0, 2.0, 9.0)], "static": [_record(0, 3.0)]})
    assert single.splitlines()[0].startswith("| strategy | FD (G) ↓ | G FD below static's | EMA FD below static's | FD (EMA) ↓ |")
    assert single.splitlines()[2].startswith("| dense | 2.00 | 1/1 | 0/1 | 9.00 |")


def test_compare_jobs_need_the_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", *_tiny(tmp_path / "x")[:-2], "--device", "meta", "--jobs", "2"]) == 2
    assert "--jobs > 1 runs on CPU only" in capsys.readouterr().err


def test_inspect_a_file_and_a_module_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_file = tmp_path / "my_models.py"
    model_file.write_text(
        "from torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, 8, 3)\n"
        "        self.norm = nn.BatchNorm2d(8)\n"
        "        self.head = nn.Linear(8, 2)\n"
        "    def forward(self, x):\n"
        "        return self.head(self.norm(self.conv(x)).mean((2, 3)))\n"
        "def build():\n"
        "    return Net()\n"
    )
    assert main(["inspect", f"{model_file}:Net", "--input-shape", "2,3,8,8"]) == 0
    text = capsys.readouterr().out
    assert "conv.weight" in text and "head.weight" in text and "norm.weight" in text
    assert "2 kernel weights" in text
    assert main(["inspect", f"{model_file}:build"]) == 0
    assert "--input-shape" in capsys.readouterr().out  # the hint without an example input
    assert main(["inspect", "sparsegan.training:SNGANDiscriminator", "--input-shape", "2,3,32,32"]) == 0
    text = capsys.readouterr().out
    assert "weight_orig" in text and "spectral_norm" in text


def test_inspect_a_factory_of_several_modules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_file = tmp_path / "gan_models.py"
    model_file.write_text(
        "from torch import nn\n"
        "def build_gan():\n"
        "    G = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 6))\n"
        "    D = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(12, 1))\n"
        "    return G, D\n"
        "def by_name():\n"
        "    return {'generator': nn.Linear(4, 4)}\n"
        "def bad():\n"
        "    return (nn.Linear(2, 2), 'not a module')\n"
    )
    assert main(["inspect", f"{model_file}:build_gan", "--input-shape", "2,4", "--input-shape", "2,1,4,4"]) == 0
    text = capsys.readouterr().out
    g_part, d_part = text.split("== ")[1:]
    assert g_part.startswith(f"{model_file}:build_gan()[0]: Sequential")
    assert d_part.startswith(f"{model_file}:build_gan()[1]: Sequential")
    # G: two Linear kernels (4*12 + 12*6 = 120 weights of 138 parameters); D: conv 27 + linear 12 of 43
    assert "2 kernel weights, 120 of 138 parameters" in g_part and "0.weight" in g_part and "2.weight" in g_part
    assert "2 kernel weights, 39 of 43 parameters" in d_part
    assert "hint: pass --input-shape" not in text
    assert main(["inspect", f"{model_file}:by_name"]) == 0
    text = capsys.readouterr().out
    assert "1 kernel weights, 16 of 20 parameters" in text and "== " not in text  # one module: no header
    # one shape for two modules is ambiguous; a non-module in the tuple is named
    assert main(["inspect", f"{model_file}:build_gan", "--input-shape", "2,4"]) == 2
    err = capsys.readouterr().err
    assert "makes 2 module(s) but --input-shape was given 1 time(s)" in err and "build_gan()[1]" in err
    assert main(["inspect", f"{model_file}:bad"]) == 2
    assert "bad()[1] is a str" in capsys.readouterr().err


def test_bad_inputs_fail_with_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["demo", "--data", str(empty), *_tiny(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "contains no images" in err and "Traceback" not in err

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--strategy", "magic"])
    assert exc.value.code == 2
    assert "unknown strategy 'magic'" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--g-density", "0"])
    assert exc.value.code == 2
    assert "density must be in (0, 1]" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exc:
        main(["compare", "--strategies", "static,nope"])
    assert exc.value.code == 2 and "unknown strategy 'nope'" in capsys.readouterr().err

    assert main(["inspect", "sparsegan.training:NoSuchModel"]) == 2
    assert "has no attribute 'NoSuchModel'" in capsys.readouterr().err
    assert main(["inspect", "no_such_package.models:Net"]) == 2
    assert "cannot import module" in capsys.readouterr().err
    assert main(["inspect", "sparsegan.training:STRATEGY_NAMES"]) == 2
    assert "not an nn.Module" in capsys.readouterr().err


def test_python_dash_m_and_the_console_script() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "sparsegan", "demo", "--d-density", "0"], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120, check=False)
    assert done.returncode == 2 and "density must be in (0, 1]" in done.stderr
    script = shutil.which("sparsegan", path=os.path.dirname(sys.executable)) or shutil.which("sparsegan")
    if script is None:
        pytest.skip("the sparsegan console script is not installed (pip install -e .)")
    done = subprocess.run([script, "--help"], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0 and "demo" in done.stdout and "compare" in done.stdout and "inspect" in done.stdout


def test_thread_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from sparsegan.cli import choose_threads

    # a made-up 8-core machine where torch defaults to 8 threads (the test suite itself runs on 1)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    previous = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        assert choose_threads(3) == 3
        monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        assert choose_threads("auto") == 8  # an idle machine: torch's default
        monkeypatch.setattr(os, "getloadavg", lambda: (5.2, 0.0, 0.0))
        assert choose_threads("auto") == 3  # the cores left free
        monkeypatch.setattr(os, "getloadavg", lambda: (11.0, 0.0, 0.0))
        assert choose_threads("auto") == 1  # every core busy: one thread, never zero
        assert choose_threads("auto", device="cuda") == 8
        monkeypatch.setenv("OMP_NUM_THREADS", "8")
        assert choose_threads("auto") == 8  # the user's explicit setting wins
    finally:
        torch.set_num_threads(previous)


def test_bad_arguments_fail_before_any_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "new" / "run"
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--ema", "1.5", "--out", str(out)])
    assert exc.value.code == 2 and "expected a decay in [0, 1)" in capsys.readouterr().err
    # a combination only the strategy can refuse (strict's D starts above its 0.5 cap) fails before
    # the header is printed and before the folder is made
    assert main(["demo", "--strategy", "ddst-strict", "--d-density", "0.9", *_tiny(out)]) == 2
    captured = capsys.readouterr()
    assert "sparsegan demo:" not in captured.out and "ddst-strict:" in captured.err
    assert not (tmp_path / "new").exists()


def test_an_unusable_out_is_refused_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert main(["demo", *_tiny(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["compare", "--strategies", "static", *_tiny(a_file / "sub")]) == 2
    captured = capsys.readouterr()
    assert "cannot write to the output folder" in captured.err and "sparsegan compare:" not in captured.out


def test_a_failed_run_leaves_no_empty_folder_and_no_partial_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sparsegan.training

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(sparsegan.training, "train", broken)
    out = tmp_path / "fresh" / "run"
    with pytest.raises(RuntimeError, match="out of memory"):
        main(["demo", *_tiny(out)])
    assert not (tmp_path / "fresh").exists()


def test_outputs_are_written_atomically(tmp_path: Path) -> None:
    from sparsegan.cli import _atomic

    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), _atomic(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    with _atomic(target) as tmp:
        assert tmp.suffix == ".json" and tmp.parent == tmp_path
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_version_and_import_errors_that_say_why(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from sparsegan import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"sparsegan {__version__}"
    (tmp_path / "needs_dep.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "needs_dep:Net"]) == 2
    assert "because it imports 'no_such_dependency_xyz', which is not installed" in capsys.readouterr().err


def test_the_bounds_note_does_not_suggest_warmup_to_a_warmup_run() -> None:
    from types import SimpleNamespace

    from sparsegan.cli import _bounds_hint

    run = SimpleNamespace(config=SimpleNamespace(strategy="ddst-strict"),
                          balance=[(i, 0.3, 0.3) for i in range(20)])  # always above (0.05, 0.06)
    warm = _bounds_hint(run, (0.05, 0.06), warmup=True)
    assert warm is not None and "above the upper warm-up bound for 100%" in warm and "Try --br-bounds warmup" not in warm
    fixed = _bounds_hint(run, (0.05, 0.06))
    assert fixed is not None and "Try --br-bounds warmup" in fixed
    assert _bounds_hint(run, (0.2, 0.4)) is None  # inside the band
