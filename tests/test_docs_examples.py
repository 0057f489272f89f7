"""Every ```python block of README.md and docs/**/*.md runs, as written (issue 15).

How it works:

* The fences of each page are parsed (``fenced_blocks``). A block whose info string names Python
  (``python``, ``py``, ``python3``) is code; every other fence (``text``, ``bash``, ``console``,
  unlabelled) is output or a shell command and is not run. Two checks keep the parser honest: it
  must find as many Python blocks as a plain count of the opening fences, and an unlabelled block
  must not be valid Python (an unlabelled code block would otherwise escape).
* One test per page (id = the page's path) runs the page's Python blocks in order in one module
  namespace, so later blocks use the names earlier ones define, exactly as a reader pasting them
  into one session would. A failure names the page, the block's index, its line and its first
  line.
* Blocks that are fragments use placeholders: a user's ``G``, ``D``, optimizers, ``loader``,
  ``strategy=...``. They get small named fixtures, listed below with what each stands for:
  ``SETUP`` (source run in the page's namespace before a given block: tiny models, tensors),
  ``SUBSTITUTE`` (a placeholder *expression* such as ``strategy=...`` replaced by a fixture's
  name, where no name defined beforehand can stand in) and ``EXEMPT`` (blocks not run, each with
  its reason; currently none). Every entry names its block by index *and* by a piece of text the
  block contains, and a test checks that text is still there, so no entry can drift onto
  another block or outlive its block. The pages' ``<!-- not-run -->`` comments are not honoured:
  the blocks they mark are fragments, and run here with their fixtures like every other block.
* The blocks run in a temporary working directory (files they write land there), with the torch
  hub, the torch home and SPARSEGAN_CACHE pointed into it (nothing is downloaded), the global
  RNG state forked (the blocks seed it), the environment restored and matplotlib's figures closed
  afterwards.
"""

from __future__ import annotations

import ast
import os
import re
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PYTHON_INFO = {"python", "py", "python3"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repository root, "/"-separated
    index: int  # among the page's Python blocks, from 0
    line: int  # 1-based line of the opening fence
    info: str  # the fence's language ("" when unlabelled)
    source: str

    @property
    def first_line(self) -> str:
        return next((line.strip() for line in self.source.splitlines() if line.strip()), "")

    def where(self) -> str:
        return f"{self.page} block {self.index} (line {self.line}: {self.first_line!r})"


def pages() -> list[str]:
    docs = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md"))
    return ["README.md", *docs]


def fenced_blocks(page: str) -> list[Block]:
    """Every fenced block of the page, in order; ``index`` counts Python blocks only (others: -1)."""
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    python_index = 0
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        info = (opening["info"].strip().split() or [""])[0].lower().lstrip(".{").rstrip("}")
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not closing.match(lines[j]):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        assert j < len(lines), f"{page}: the fence opened at line {i + 1} is never closed"
        is_python = info in PYTHON_INFO
        blocks.append(Block(page, python_index if is_python else -1, i + 1, info, "\n".join(body) + "\n"))
        python_index += is_python
        i = j + 1
    return blocks


def python_blocks(page: str) -> list[Block]:
    return [b for b in fenced_blocks(page) if b.info in PYTHON_INFO]


PAGES_WITH_PYTHON = [page for page in pages() if python_blocks(page)]


# ---------------------------------------------------------------------------------------------
# Fixtures for placeholders. Each entry: (page, block index, text that block contains) -> ...


@dataclass(frozen=True)
class Setup:
    """Source run in the page's namespace before the block, standing for the named placeholders."""

    page: str
    index: int
    anchor: str
    source: str


@dataclass(frozen=True)
class Substitute:
    """A placeholder expression in the block (``old``), replaced by a fixture (``new``) before it runs."""

    page: str
    index: int
    old: str
    new: str


@dataclass(frozen=True)
class Exempt:
    """A block that is not run, and why (kept short; each entry justified)."""

    page: str
    index: int
    anchor: str
    reason: str


# a user's tiny unconditional GAN: G maps 128-d latents to 2-d points, D scores points
_TINY_GAN_128 = """
import torch
from torch import nn
import sparsegan

torch.manual_seed(0)
G = nn.Sequential(nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 2))
D = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
g_opt = torch.optim.Adam(G.parameters(), lr=1e-3)
d_opt = torch.optim.Adam(D.parameters(), lr=1e-3)
"""

# the user's own (unchanged) training loop, a few hinge-loss steps on made-up points
_TINY_LOOP = """
def train_a_few_steps(G, D, g_opt, d_opt, steps=3, latent_dim=128):
    for _ in range(steps):
        real, z = torch.randn(8, 2) * 0.2 + 1.0, torch.randn(8, latent_dim)
        d_opt.zero_grad(); (torch.relu(1 - D(real)).mean() + torch.relu(1 + D(G(z).detach())).mean()).backward()
        d_opt.step()
        g_opt.zero_grad(); (-D(G(z)).mean()).backward(); g_opt.step()
"""

# the strategy the reader picks, where a block writes strategy=...
_STRATEGY = """
strategy = sparsegan.strategies.Static(0.5, 0.5)
"""

# one optimizer per network, built over the modules the block itself creates (optG/optD placeholders)
_ADAM = """
def adam(module):
    return torch.optim.Adam(module.parameters(), lr=2e-4, betas=(0.0, 0.9))
"""

SETUP: list[Setup] = [
    # README: the user's G, D, their optimizers and a `loader` of real batches, (points, labels)
    Setup("README.md", 0, "G, D, g_optimizer, d_optimizer", _TINY_GAN_128 + _TINY_LOOP + """
from torch.utils.data import DataLoader, TensorDataset
g_optimizer, d_optimizer = g_opt, d_opt
loader = DataLoader(TensorDataset(torch.randn(64, 2) * 0.2 + 1.0, torch.zeros(64, dtype=torch.long)), batch_size=8)
"""),
    # index: the user's G, D and optimizers
    Setup("docs/index.md", 0, "sg = sparsegan.SparseGANWrapper(G, D, g_opt, d_opt", _TINY_GAN_128 + _TINY_LOOP),
    # concepts: "with a wrapper `sg` (as in the Quickstart)": a wrapped tiny GAN, and D's three
    # scores of a training step for sg.observe(d_real=..., ...)
    Setup("docs/concepts.md", 0, 'sg.density("generator")', _TINY_GAN_128 + """
sg = sparsegan.SparseGANWrapper(G, D, g_opt, d_opt, strategy=sparsegan.strategies.Static(0.5, 0.5),
                                latent=lambda n: torch.randn(n, 128), br_estimator=None)
scores_real, scores_fake_before, scores_fake_after = torch.tensor([1.0, 2.0]), torch.tensor([0.0]), 0.5
"""),
    # faq: a notebook session whose G, D are already wrapped by `sg`; strategy= and latent= of the re-wrap
    Setup("docs/faq.md", 0, "sg.remove()", _TINY_GAN_128 + _STRATEGY + """
latent = lambda n: torch.randn(n, 128)  # noqa: E731
sg = sparsegan.SparseGANWrapper(G, D, g_opt, d_opt, strategy=strategy, latent=latent)
"""),
    # adapters: the chosen strategy, and one optimizer per network of the block's own G, D
    Setup("docs/adapters.md", 0, "mimicry.sngan32", "import torch\nimport sparsegan\n" + _STRATEGY + _ADAM),
    # conditional: the user's class count, a conditional G(z, y) (128-d z) with an image-only D(x),
    # and a `loader` of (image, label) batches
    Setup("docs/recipes/conditional.md", 0, "num_classes", """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import sparsegan

torch.manual_seed(0)
num_classes = 3

class G(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.net = nn.Embedding(num_classes, 128), nn.Linear(128, 2)

    def forward(self, z, y):
        return self.net(z * self.embed(y))

G, D = G(), nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
g_opt, d_opt = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
loader = DataLoader(TensorDataset(torch.randn(32, 2), torch.randint(0, num_classes, (32,))), batch_size=8)
"""),
    # own-gan block 0: the user's G (128-d latent), D and optimizers; block 2: the loop's `steps`
    # and the user's iterator of real images (3x8x8, what block 1's G makes)
    Setup("docs/recipes/own-gan.md", 0, "G, D, g_opt, d_opt,", _TINY_GAN_128 + """
steps = 2
batches = iter([torch.rand(4, 3, 8, 8) * 2 - 1 for _ in range(steps)])
"""),
    # own-gan block 3 wraps block 1's G, D with exclude= *instead of* block 1's wrap: undo that one
    Setup("docs/recipes/own-gan.md", 3, "exclude=", "sg.remove()\n" + _STRATEGY),
    # sngan block 1: optimizers of the conditional G, D it builds
    Setup("docs/recipes/sngan.md", 1, "mimicry.cgan_pd32", _ADAM),
    # stylegan2 block 1 wraps M = (S, G) *instead of* G (block 0's wrap): undo that one; its strategy
    Setup("docs/recipes/stylegan2.md", 1, "stylegan2.MappedGenerator", "sg.remove()\n" + _STRATEGY),
    # scaling block 1: the user's Accelerate objects, one CPU process (16-d latent as in the block)
    Setup("docs/scaling.md", 1, "accelerator.prepare", """
import sparsegan
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

accelerator = Accelerator(cpu=True)
G = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))
D = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
g_opt, d_opt = torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3)
data = DataLoader(TensorDataset(torch.randn(64, 2)), batch_size=16)
"""),
]

SUBSTITUTE: list[Substitute] = [
    # the "your own training loop" comment: a few steps of the fixture loop
    Substitute("README.md", 0, "# ... your own training loop, unchanged: d_optimizer.step(), g_optimizer.step(), ...",
               "train_a_few_steps(G, D, g_optimizer, d_optimizer)"),
    Substitute("docs/index.md", 0, "# ... your training loop, unchanged: d_opt.step(), g_opt.step(), ...",
               "train_a_few_steps(G, D, g_opt, d_opt)"),
    # D's scores of one step, for sg.observe
    Substitute("docs/concepts.md", 4, "d_real=..., d_fake_before=..., d_fake_after=...",
               "d_real=scores_real, d_fake_before=scores_fake_before, d_fake_after=scores_fake_after"),
    Substitute("docs/faq.md", 0, "strategy=..., latent=...", "strategy=strategy, latent=latent"),
    Substitute("docs/adapters.md", 0, "optG, optD, strategy=...", "adam(G), adam(D), strategy=strategy"),
    Substitute("docs/adapters.md", 1, "g_opt, d_opt, strategy=...", "adam(G), adam(D), strategy=strategy"),
    Substitute("docs/adapters.md", 2, "g_opt, d_opt, strategy=...", "adam(G), adam(D), strategy=strategy"),
    Substitute("docs/recipes/own-gan.md", 3, "strategy=...", "strategy=strategy"),
    Substitute("docs/recipes/sngan.md", 1, "optG, optD", "adam(G), adam(D)"),
    Substitute("docs/recipes/stylegan2.md", 1, "strategy=...", "strategy=strategy"),
]

EXEMPT: list[Exempt] = []


def _entries() -> list[tuple[str, int, str, str]]:
    """(page, index, anchor, kind) of every fixture and exemption."""
    return ([(s.page, s.index, s.anchor, "Setup") for s in SETUP]
            + [(s.page, s.index, s.old, "Substitute") for s in SUBSTITUTE]
            + [(e.page, e.index, e.anchor, "Exempt") for e in EXEMPT])


def _prepared(block: Block) -> str:
    source = block.source
    for sub in SUBSTITUTE:
        if (sub.page, sub.index) == (block.page, block.index):
            source = source.replace(sub.old, sub.new)
    return source


# ---------------------------------------------------------------------------------------------
# The checks


def test_parser_finds_every_python_block() -> None:
    """The fence parser misses no ```python block that a plain line count sees."""
    opening = re.compile(r"^[ \t]*(`{3,}|~{3,})[ \t]*\{?\.?(python|py|python3)\b", re.IGNORECASE)
    for page in pages():
        counted = sum(bool(opening.match(line)) for line in (ROOT / page).read_text(encoding="utf-8").splitlines())
        assert len(python_blocks(page)) == counted, page
    assert sum(len(python_blocks(page)) for page in pages()) >= 50


def test_unlabelled_blocks_are_not_python() -> None:
    """An unlabelled fence holds a listing, not code (code must say ```python, so that it runs here)."""
    for page in pages():
        for block in fenced_blocks(page):
            if block.info == "":
                try:
                    ast.parse(block.source)
                except SyntaxError:
                    continue
                pytest.fail(f"{page} line {block.line}: an unlabelled block parses as Python; label it ```python "
                            "(then it runs here) or ```text")


def test_fixture_entries_name_existing_blocks() -> None:
    """Every SETUP / SUBSTITUTE / EXEMPT entry names a block that exists and still contains its text."""
    for page, index, anchor, kind in _entries():
        blocks = python_blocks(page) if (ROOT / page).is_file() else []
        assert index < len(blocks), f"{kind} entry for {page} block {index}: the page has {len(blocks)} Python blocks"
        assert anchor in blocks[index].source, f"{kind} entry: {blocks[index].where()} no longer contains {anchor!r}"
    for reason in (e.reason for e in EXEMPT):
        assert reason.strip(), "every exemption says why"


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temporary working directory and caches; the RNG, the environment and figures restored after."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    hub = tmp_path / "torch-hub"
    hub.mkdir()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("SPARSEGAN_CACHE", str(tmp_path / "sparsegan-cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    environ = dict(os.environ)
    with torch.random.fork_rng(devices=[]):
        yield work
    os.environ.clear()
    os.environ.update(environ)
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


@pytest.mark.parametrize("page", PAGES_WITH_PYTHON)
def test_page_runs(page: str, sandbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The page's Python blocks run in order in one namespace, fixtures before the blocks that need them."""
    module = types.ModuleType("docs_example_" + re.sub(r"\W", "_", page.removesuffix(".md")))
    module.__file__ = str(sandbox / "docs_example.py")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # classes defined by blocks can be pickled
    namespace = module.__dict__
    exempt = {(e.page, e.index): e.reason for e in EXEMPT}
    ran = 0
    for block in python_blocks(page):
        for setup in SETUP:
            if (setup.page, setup.index) == (page, block.index):
                exec(compile(setup.source, f"<SETUP before {block.where()}>", "exec"), namespace)
        if (page, block.index) in exempt:
            print(f"NOT RUN: {block.where()}: {exempt[page, block.index]}")
            continue
        # padded so that a traceback's line numbers are the page's own
        code = compile("\n" * block.line + _prepared(block), page, "exec")
        try:
            exec(code, namespace)
        except Exception as exc:  # any failure of a block is the test's failure
            raise AssertionError(f"{block.where()} failed: {type(exc).__name__}: {exc}") from exc
        ran += 1
    print(f"{page}: {ran} Python block(s) run")
    assert ran == len(python_blocks(page)) - sum(p == page for p, _ in exempt)
