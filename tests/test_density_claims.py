"""``sg.density(net)`` never claims more sparsity than the network's kernels have (issue 14).

For every model of the test suite: after wrapping and a few training steps, ``sg.density(net)``
is at most 0.02 below the true fraction of nonzero entries among the network's conv/linear-like
kernel weights, counted independently of discovery: every parameter of 2 or more dimensions of
every conv, linear, bilinear and recurrent module, plus the kernel banks the test names, and
including kernels that ``exclude=`` keeps dense.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsegan import SparseGANWrapper
from sparsegan.strategies import DDST, DST, Static
from tests.conftest import ConvDiscriminator, ConvGenerator, mlp_gan
from tests.test_discovery import FromRGB, Heads, RecurrentD
from tests.test_guarantees import GeneratorHoldingCritic
from tests.test_kernel_banks import STYLE, BankGenerator, small_d

KERNEL_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                  nn.Linear, nn.Bilinear, nn.RNNBase)


def true_kernel_density(module: nn.Module, extra: tuple[str, ...] = ()) -> float:
    """Nonzero fraction of the kernel weights, found by module type (not by discovery)."""
    kernels = {id(p): p for m in module.modules() if isinstance(m, KERNEL_MODULES)
               for p in m.parameters() if p.dim() >= 2}
    kernels |= {id(p): p for n, p in module.named_parameters() if n in extra}
    nonzero = sum(int(torch.count_nonzero(p.detach())) for p in kernels.values())
    return nonzero / sum(p.numel() for p in kernels.values())


class _SequenceG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 5 * 8)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(z).reshape(-1, 5, 8)


class _HeadsD(Heads):
    """Heads with its inputs shaped like the mlp G's output (2 features)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(2, 8)


class _ImageG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 64)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(z).reshape(-1, 1, 8, 8)


Case = Callable[[], tuple[nn.Module, nn.Module, int, dict[str, Any], tuple[str, ...]]]
CASES: dict[str, Case] = {
    "mlp": lambda: (*mlp_gan(), 8, {}, ()),
    "mlp, a kernel kept dense by exclude=": lambda: (*mlp_gan(), 8, {"exclude": {"generator": "2.weight"}}, ()),
    "conv with spectral norm": lambda: (ConvGenerator(), ConvDiscriminator(), 16, {}, ()),
    "kernel bank": lambda: (BankGenerator(), small_d(), STYLE, {}, ("block.bank",)),
    "kernel bank, einops": lambda: (BankGenerator(True), small_d(), STYLE, {}, ("block.bank",)),
    "D with a from-RGB conv it never runs": lambda: (_ImageG(), FromRGB(), 8, {}, ()),
    "D with a head it never runs": lambda: (mlp_gan()[0], _HeadsD(), 8, {}, ()),
    "LSTM D": lambda: (_SequenceG(), RecurrentD(), 8, {}, ()),
    "G holding D": lambda: (lambda d: (GeneratorHoldingCritic(d), d))(mlp_gan()[1]) + (8, {}, ()),
}
STRATEGIES = {
    "static": lambda: Static(0.2, 0.3),
    "dst": lambda: DST(0.2, 0.3, update_every=1, drop_fraction=0.3),
    "ddst": lambda: DDST(0.2, 0.3, update_every=1, total_steps=4, d_update_every=1, br_every=1, br_window=1,
                         br_min_samples=1, density_step=0.2),
}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_density_is_never_more_than_002_below_the_true_kernel_density(case, strategy) -> None:
    torch.manual_seed(0)
    G, D, latent, options, extra = CASES[case]()
    own = G.net.parameters() if isinstance(G, GeneratorHoldingCritic) else G.parameters()
    g_opt, d_opt = torch.optim.Adam(own, lr=1e-2), torch.optim.Adam(D.parameters(), lr=1e-2)
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=STRATEGIES[strategy](),
                          latent=lambda n: torch.randn(n, latent), **options)
    for _ in range(4):
        z = torch.randn(8, latent)
        d_loss = F.relu(1 + D(G(z).detach())).mean() + F.relu(1 - D(G(z).detach() + 0.5)).mean()
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        g_loss = -D(G(torch.randn(8, latent))).mean()
        g_opt.zero_grad()
        g_loss.backward()
        g_opt.step()
    for name, module, kernels in (("generator", G, extra), ("discriminator", D, ())):
        if case == "G holding D" and name == "generator":
            module = G.net  # the critic inside G is D's, counted under D
        truth = true_kernel_density(module, kernels)
        assert sg.density(name) >= truth - 0.02, f"{name}: density {sg.density(name):.4f}, truly {truth:.4f}"
        if strategy == "static":
            # and it is not merely an upper bound: static masks' active weights are all nonzero
            # after training, so the density is the true one (a DST update grows weights at 0)
            assert sg.density(name) == pytest.approx(truth, abs=0.02), f"{name}: truly {truth:.4f}"
