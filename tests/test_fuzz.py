"""An invariant fuzz test: random sequences of what a training script does to a wrapped GAN.

A hypothesis state machine drives one wrapped MLP GAN under Static, DST, SDST or DDST (with a
scripted balance ratio fed through ``observe``) through random sequences of:

* optimizer steps of D or G (with a balance-ratio sample after each G step under DDST),
* steps whose loss is NaN or inf (a diverged step),
* steps that a ``GradScaler`` skips (backward, then no ``optimizer.step()``),
* ``state_dict()`` saved and loaded into freshly built models, optimizers and wrapper,
* ``remove()`` and wrapping the same modules again.

After every operation it checks what the wrapper promises (``docs/guarantees.md``):

* every inactive weight is exactly 0 (also after NaN / inf);
* the active counts are exact: each network keeps the count it was wrapped with, except DDST's D,
  whose count is its controller's density times its size;
* optimizer state (Adam's moments) is zero wherever a position became active since the previous
  operation (regrown weights start fresh), and at every inactive position right after wrapping.

The default run tries 30 sequences; ``SPARSEGAN_FUZZ_EXAMPLES=500 pytest -m slow tests/test_fuzz.py``
runs the long one (also part of the default run when the variable is set).
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from sparsegan import SparseGANWrapper
from sparsegan.strategies import DDST, DST, SDST, Static
from tests.conftest import mlp_gan

LATENT = 4
STRATEGIES = {
    "static": lambda: Static(0.3, 0.3),
    "dst": lambda: DST(0.3, 0.3, update_every=2),
    "sdst": lambda: SDST(0.3, 0.3, update_every=2),
    "ddst": lambda: DDST(0.3, 0.3, update_every=3, d_update_every=2, br_every=1, br_window=2, br_bounds=(0.4, 0.6)),
}
NETS = ("generator", "discriminator")


def _models(seed: int) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    G, D = mlp_gan(latent=LATENT, hidden=12)
    return G, D, torch.optim.Adam(G.parameters(), 1e-2), torch.optim.Adam(D.parameters(), 1e-2)


class WrappedGAN(RuleBasedStateMachine):
    """One wrapped GAN and the operations a training script applies to it."""

    @initialize(name=st.sampled_from(sorted(STRATEGIES)), seed=st.integers(0, 3))
    def wrap(self, name: str, seed: int) -> None:
        self.name, self.seed = name, seed
        self.G, self.D, self.g_opt, self.d_opt = _models(seed)
        self.rng = torch.Generator().manual_seed(seed)
        self._wrap()

    def _wrap(self) -> None:
        self.sg = SparseGANWrapper(self.G, self.D, self.g_opt, self.d_opt, strategy=STRATEGIES[self.name](),
                                   br_estimator=None, seed=self.seed)
        self.wrapped_counts = {n: self._active(n) for n in NETS}
        self.before = self._masks()
        self._check_state(everywhere=True)

    # ------------------------------------------------------------------ helpers

    def _modules(self) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
        return {"generator": (self.G, self.g_opt), "discriminator": (self.D, self.d_opt)}

    def _masks(self) -> dict[str, dict[str, torch.Tensor]]:
        return {n: self.sg.masks(n) for n in NETS}

    def _active(self, net: str) -> int:
        return sum(int(m.sum()) for m in self.sg.masks(net).values())

    def _check_state(self, *, everywhere: bool = False) -> None:
        """Optimizer state is zero at newly active positions (or at every inactive one)."""
        now = self._masks()
        for net, (module, optimizer) in self._modules().items():
            params = dict(module.named_parameters())
            for pname, mask in now[net].items():
                where = ~mask if everywhere else mask & ~self.before[net][pname]
                state = optimizer.state.get(params[pname], {})
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and value.shape == mask.shape and bool(where.any()):
                        assert torch.count_nonzero(value[where]) == 0, f"{net}.{pname}: {key} not reset"
        self.before = now

    def _step(self, net: str, factor: float = 1.0) -> None:
        z = torch.randn(8, LATENT, generator=self.rng)
        if net == "discriminator":
            real = torch.randn(8, 2, generator=self.rng) * 0.1 + 1.0
            loss = F.relu(1 - self.D(real)).mean() + F.relu(1 + self.D(self.G(z).detach())).mean()
            optimizer = self.d_opt
        else:
            loss = -self.D(self.G(z)).mean()
            optimizer = self.g_opt
        optimizer.zero_grad()
        (loss * factor).backward()
        optimizer.step()
        if net == "generator" and self.name == "ddst":
            # a scripted sample: BR = 0.25 + 0.5 * u, so the controller grows, holds or prunes D
            u = float(torch.rand((), generator=self.rng))
            self.sg.observe(d_real=1.0, d_fake_before=0.0, d_fake_after=0.25 + 0.5 * u)

    # ------------------------------------------------------------------ rules

    @rule(net=st.sampled_from(NETS))
    def step(self, net: str) -> None:
        self._step(net)
        self._check_state()

    @rule(net=st.sampled_from(NETS), poison=st.sampled_from([math.nan, math.inf]))
    def diverged_step(self, net: str, poison: float) -> None:
        self._step(net, poison)
        self._check_state()

    @rule(net=st.sampled_from(NETS))
    def skipped_step(self, net: str) -> None:
        module, optimizer = self._modules()[net]
        optimizer.zero_grad()
        module(torch.randn(4, LATENT if net == "generator" else 2, generator=self.rng)).float().mean().backward()
        steps = self.sg.steps(net)
        # GradScaler found inf/NaN: no optimizer.step(), so nothing may change
        assert self.sg.steps(net) == steps
        self._check_state()

    @rule()
    def save_and_load(self) -> None:
        saved = copy.deepcopy({"G": self.G.state_dict(), "D": self.D.state_dict(), "g_opt": self.g_opt.state_dict(),
                               "d_opt": self.d_opt.state_dict(), "sg": self.sg.state_dict()})
        steps = {n: self.sg.steps(n) for n in NETS}
        self.sg.remove()
        self.G, self.D, self.g_opt, self.d_opt = _models(self.seed + 100)
        self.sg = SparseGANWrapper(self.G, self.D, self.g_opt, self.d_opt, strategy=STRATEGIES[self.name](),
                                   br_estimator=None, seed=self.seed)
        self.G.load_state_dict(saved["G"])
        self.D.load_state_dict(saved["D"])
        self.g_opt.load_state_dict(saved["g_opt"])
        self.d_opt.load_state_dict(saved["d_opt"])
        self.sg.load_state_dict(saved["sg"])
        self.sg.apply_masks()
        assert {n: self.sg.steps(n) for n in NETS} == steps
        for net in NETS:
            assert all(torch.equal(self.before[net][k], v) for k, v in self.sg.masks(net).items())

    @rule()
    def remove_and_wrap_again(self) -> None:
        self.sg.remove()
        assert not self.sg.enforcing
        self._wrap()

    # ------------------------------------------------------------------ invariants

    @invariant()
    def inactive_weights_are_exactly_zero(self) -> None:
        if not hasattr(self, "sg"):
            return
        for net, (module, _) in self._modules().items():
            params = dict(module.named_parameters())
            for pname, mask in self.sg.masks(net).items():
                assert torch.count_nonzero(params[pname].detach()[~mask]) == 0, f"{net}.{pname} violates its mask"

    @invariant()
    def active_counts_are_exact(self) -> None:
        if not hasattr(self, "sg"):
            return
        for net in NETS:
            if self.name == "ddst" and net == "discriminator":
                algorithm: Any = self.sg._networks[net].algorithm  # the controller's target density
                total = sum(m.numel() for m in self.sg.masks(net).values())
                expected = max(round(algorithm.density * total), len(self.sg.masks(net)))
                assert self._active(net) == expected
            else:
                assert self._active(net) == self.wrapped_counts[net]


EXAMPLES = int(os.environ.get("SPARSEGAN_FUZZ_EXAMPLES", "30"))
_SETTINGS = settings(max_examples=EXAMPLES, stateful_step_count=12, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.too_slow])

TestWrappedGAN = WrappedGAN.TestCase
TestWrappedGAN.settings = _SETTINGS
if EXAMPLES >= 500:
    TestWrappedGAN = pytest.mark.slow(TestWrappedGAN)
