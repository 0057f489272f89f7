"""Small models and a training loop shared by the tests (all CPU, all made-up data)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

# One intra-op thread: the models here are tiny, and on a small shared CPU OpenMP's spinning threads
# make them 10-40x slower. Subprocesses (examples, DDP workers) inherit the environment variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

LATENT = 16


class ConvGenerator(nn.Module):
    """SNGAN-style tiny generator: linear -> BN -> upsample/conv blocks -> tanh (8x8 images)."""

    def __init__(self, latent: int = LATENT, channels: int = 16, sn: Callable[[nn.Module], nn.Module] | None = None):
        super().__init__()
        wrap = sn or (lambda m: m)
        self.fc = wrap(nn.Linear(latent, channels * 4 * 4))
        self.bn0 = nn.BatchNorm2d(channels)
        self.conv1 = wrap(nn.Conv2d(channels, channels, 3, padding=1))
        self.bn1 = nn.BatchNorm2d(channels)
        self.up = wrap(nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1))
        self.out = wrap(nn.Conv2d(channels, 1, 3, padding=1))
        self.channels = channels

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(-1, self.channels, 4, 4)
        h = F.relu(self.bn1(self.conv1(F.relu(self.bn0(h)))))
        return torch.tanh(self.out(F.relu(self.up(h))))


class ConvDiscriminator(nn.Module):
    """SNGAN-style tiny discriminator on 1x8x8 images with a configurable spectral norm."""

    def __init__(self, channels: int = 16, sn: Callable[[nn.Module], nn.Module] | None = spectral_norm):
        super().__init__()
        wrap = sn or (lambda m: m)
        self.conv1 = wrap(nn.Conv2d(1, channels, 3, padding=1))
        self.conv2 = wrap(nn.Conv2d(channels, channels, 4, stride=2, padding=1))
        self.fc = wrap(nn.Linear(channels * 4 * 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv1(x), 0.2)
        h = F.leaky_relu(self.conv2(h), 0.2)
        return self.fc(h.flatten(1))


def mlp_gan(latent: int = 8, hidden: int = 32) -> tuple[nn.Module, nn.Module]:
    g = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))
    d = nn.Sequential(nn.Linear(2, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
                      nn.Linear(hidden, 1))
    return g, d


def adam(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(module.parameters(), lr=2e-4, betas=(0.0, 0.9))


def real_batch(n: int, generator: torch.Generator, shape: tuple[int, ...] = (2,)) -> torch.Tensor:
    """Made-up "real" data: a Gaussian blob off the origin."""
    return torch.randn(n, *shape, generator=generator) * 0.2 + 1.0


def train(G: nn.Module, D: nn.Module, g_opt: torch.optim.Optimizer, d_opt: torch.optim.Optimizer, steps: int,
          *, latent: int, data_shape: tuple[int, ...] = (2,), seed: int = 0, batch: int = 16,
          n_critic: int = 1, on_iteration: Callable[[int], None] | None = None,
          rng: torch.Generator | None = None) -> list[float]:
    """A plain hinge-loss GAN loop, exactly as a user would write it (no sparsegan calls)."""
    rng = rng if rng is not None else torch.Generator().manual_seed(seed)
    losses = []
    for it in range(steps):
        for _ in range(n_critic):
            real = real_batch(batch, rng, data_shape)
            z = torch.randn(batch, latent, generator=rng)
            d_loss = F.relu(1 - D(real)).mean() + F.relu(1 + D(G(z).detach())).mean()
            d_opt.zero_grad()
            d_loss.backward()
            d_opt.step()
        z = torch.randn(batch, latent, generator=rng)
        g_loss = -D(G(z)).mean()
        g_opt.zero_grad()
        g_loss.backward()
        g_opt.step()
        losses += [d_loss.item(), g_loss.item()]
        if on_iteration is not None:
            on_iteration(it)
    return losses


def assert_masks_hold(sg, G: nn.Module, D: nn.Module) -> None:
    """Every inactive weight is exactly 0 and every mask is bool."""
    for name, module in (("generator", G), ("discriminator", D)):
        params = dict(module.named_parameters())
        for pname, mask in sg.masks(name).items():
            assert mask.dtype == torch.bool
            assert torch.count_nonzero(params[pname].detach()[~mask]) == 0, f"{name}.{pname} violates its mask"


@pytest.fixture
def conv_gan() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return ConvGenerator(), ConvDiscriminator()
