"""Checks shared by the tests of the third-party GAN adapters (mimicry, stylegan2, stylegan2-torch).

Not a test module itself; the adapter tests import it (``tests/`` is on ``sys.path`` under pytest).
The independent discovery reference, :func:`test_adapters_common.kernel_record`, lives next to it.
"""

from __future__ import annotations

import contextlib
import copy
import signal
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

import sparsegan
from sparsegan import strategies
from sparsegan._utils import as_args
from sparsegan.data import load_digits
from tests.test_adapters_common import assert_discovery_complete, first_tensor, kernel_record, zeroed_reference

STRATEGY_NAMES = ("static", "sdst", "ddst")
G_DENSITY, D_DENSITY = 0.3, 0.5


def make_strategy(name: str, steps: int) -> strategies.Strategy:
    """Static, SDST or DDST with intervals short enough to act within ``steps`` optimizer steps."""
    if name == "static":
        return strategies.Static(G_DENSITY, D_DENSITY)
    if name == "sdst":
        return strategies.SDST(G_DENSITY, D_DENSITY, update_every=2, total_steps=steps)
    if name == "ddst":
        return strategies.DDST(G_DENSITY, D_DENSITY, update_every=2, total_steps=steps, d_update_every=2,
                               br_every=1, br_window=2, br_min_samples=1, density_step=0.1)
    raise ValueError(name)


class RealBatches:
    """``n -> n`` real images drawn (with replacement) from a fixed tensor, with its own RNG."""

    def __init__(self, images: torch.Tensor, seed: int = 0) -> None:
        self.images = images
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, n: int) -> torch.Tensor:
        return self.images[torch.randint(len(self.images), (n,), generator=self.generator)]


def digits(image_size: int, channels: int = 1, *, low: float = -1.0) -> torch.Tensor:
    """sklearn's digits as ``(1797, channels, size, size)`` images in ``[low, 1]`` (offline)."""
    images = load_digits(image_size).images
    if low != -1.0:
        images = (images + 1) / 2 * (1 - low) + low
    return images.expand(-1, channels, -1, -1).contiguous()


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail with ``TimeoutError`` instead of hanging when the block runs longer than ``seconds``."""

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s (a hang?)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_discovery(module: nn.Module, example: Any, *, method: str | None = None) -> Any:
    """Discovery on ``module`` finds exactly the kernels the independent reference records."""
    result = sparsegan.discover(module, example)
    record = kernel_record(module, example)
    assert record, "the reference found no kernel at all"
    assert_discovery_complete(result, record)
    if method is not None:
        assert result.method == method, result.notes
    return result


def outputs(module: nn.Module, example: Any, seed: int = 0) -> torch.Tensor:
    """``module(*example)``'s first tensor in eval mode, with the global RNG seeded (noise inputs)."""
    training = module.training
    module.eval()
    try:
        torch.manual_seed(seed)
        with torch.no_grad():
            return first_tensor(module(*as_args(example)))
    finally:
        module.train(training)


def check_zeroed_reference(dense_copy: nn.Module, wrapped: nn.Module, masks: Mapping[str, torch.Tensor],
                           example: Any) -> None:
    """The wrapped model computes exactly what a dense copy with the masked entries zeroed by hand does.

    ``dense_copy`` is a deep copy of the model taken *before* wrapping. The dense copy itself must
    differ (otherwise the check proves nothing).
    """
    assert masks, "no masks to check"
    reference = zeroed_reference(dense_copy, masks)
    got = outputs(wrapped, example)
    assert torch.equal(got, outputs(reference, example)), "wrapped output differs from the zeroed-weight reference"
    assert not torch.allclose(got, outputs(dense_copy, example)), "masking had no effect on the output"


def assert_masks_hold(sg: sparsegan.SparseGANWrapper, network: str, module: nn.Module) -> int:
    """Every masked-out entry of ``module`` is exactly 0; returns the number of active entries."""
    params = dict(module.named_parameters())
    active = 0
    for name, mask in sg.masks(network).items():
        assert mask.dtype == torch.bool and mask.shape == params[name].shape
        assert torch.count_nonzero(params[name].detach()[~mask]) == 0, f"{network} {name} violates its mask"
        active += int(mask.sum())
    return active


def check_after_training(sg: sparsegan.SparseGANWrapper, G: nn.Module, D: nn.Module, strategy: str,
                         steps: int, d_steps: int | None = None) -> None:
    """What must hold after ``steps`` G steps (and ``d_steps`` D steps) under ``strategy``."""
    d_steps = steps if d_steps is None else d_steps
    assert sg.steps("G") == steps and sg.steps("D") == d_steps
    for network, module in (("G", G), ("D", D)):
        active = assert_masks_hold(sg, network, module)
        total = sum(m.numel() for m in sg.masks(network).values())
        assert active == round(sg.density(network) * total)
        assert all(torch.isfinite(p).all() for p in module.parameters()), f"{network} has non-finite weights"
    assert abs(sg.density("G") - G_DENSITY) < 1e-3
    if strategy == "static":
        assert sg.mask_updates("G") == 0 and sg.mask_updates("D") == 0
        assert abs(sg.density("D") - D_DENSITY) < 1e-3
    elif strategy == "sdst":
        assert sg.mask_updates("G") >= 1, "SDST never rewired G"
        assert sg.mask_updates("D") == 0 and abs(sg.density("D") - D_DENSITY) < 1e-3
    else:
        assert sg.mask_updates("G") >= 1, "DDST never rewired G"
        assert len(sg.balance.history) >= 1, "the balance-ratio probe measured nothing"
        controller = sg.algorithm("D").controller
        decisions = [d for _, d in controller.decisions]
        assert decisions and all(d.balance_ratio is not None for d in decisions)
        assert abs(sg.density("D") - controller.density) < 1e-3
        moved = [d for d in decisions if d.action in ("grow", "prune")]
        assert (sg.mask_updates("D") >= 1) == bool(moved)


def wrap(G: nn.Module, D: nn.Module, g_opt: torch.optim.Optimizer, d_opt: torch.optim.Optimizer, strategy: str,
         steps: int, *, d_example: Any = None, **kwargs: Any) -> tuple[sparsegan.SparseGANWrapper, nn.Module, nn.Module]:
    """Wrap, returning the wrapper and dense deep copies of G and D taken just before.

    The wrapper's own discovery is checked against the reference record on both networks.
    """
    dense_g, dense_d = copy.deepcopy(G), copy.deepcopy(D)
    sg = sparsegan.SparseGANWrapper(G, D, g_opt, d_opt, strategy=make_strategy(strategy, steps), seed=0,
                                    d_example_inputs=d_example, **kwargs)
    g_example = kwargs["latent"](2)
    if d_example is None:
        d_example = outputs(dense_g, g_example)
    assert_discovery_complete(sg.discovery("G"), kernel_record(dense_g, g_example))
    assert_discovery_complete(sg.discovery("D"), kernel_record(dense_d, d_example))
    return sg, dense_g, dense_d


def one_thread() -> Iterator[None]:
    """Generator for a module-scoped fixture: tiny models run fastest (and steadiest) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
