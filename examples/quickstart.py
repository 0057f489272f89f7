"""Quickstart: a plain GAN training loop made sparse with two added lines.

Trains a small MLP GAN on a ring of 8 Gaussians (data made here, nothing downloaded) with
dynamic sparse training on the generator (10% density) and static masks on the discriminator,
then prints the discovery/density report and a crude mode-coverage check.

Run: ``python examples/quickstart.py --steps 600`` (after ``make test`` or ``pip install -e .``;
``make demo`` runs the command-line demo instead, not this script).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

import sparsegan  # added line 1 of 2


def ring_of_gaussians(n: int, generator: torch.Generator, modes: int = 8, radius: float = 2.0) -> torch.Tensor:
    """``n`` points from ``modes`` Gaussians (std 0.05) evenly spaced on a circle."""
    k = torch.randint(modes, (n,), generator=generator)
    angle = 2 * math.pi * k.float() / modes
    centers = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    return centers + 0.05 * torch.randn(n, 2, generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training iterations")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    data_rng = torch.Generator().manual_seed(1)

    latent_dim = 16
    G = nn.Sequential(nn.Linear(latent_dim, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                      nn.Linear(256, 2)).to(device)
    D = nn.Sequential(nn.Linear(2, 256), nn.LeakyReLU(0.2), nn.Linear(256, 256), nn.LeakyReLU(0.2),
                      nn.Linear(256, 1)).to(device)
    g_opt = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.9))
    d_opt = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.9))

    # added line 2 of 2: DST on G (RigL-style), static D, both found automatically.
    sg = sparsegan.SparseGANWrapper(
        G, D, g_opt, d_opt,
        strategy=sparsegan.strategies.DST(0.1, 0.3, networks="generator", update_every=100,
                                          drop_fraction=0.3, drop_schedule="cosine",
                                          total_steps=args.steps),
        latent=lambda n: torch.randn(n, latent_dim, device=device),
    )
    print(sg.report())

    for step in range(1, args.steps + 1):  # the usual loop, unchanged
        real = ring_of_gaussians(args.batch, data_rng).to(device)
        z = torch.randn(args.batch, latent_dim, device=device)
        d_loss = F.relu(1 - D(real)).mean() + F.relu(1 + D(G(z).detach())).mean()
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        g_loss = -D(G(z)).mean()
        g_opt.zero_grad()
        g_loss.backward()
        g_opt.step()
        if step % 100 == 0 or step == args.steps:
            print(f"step {step:5d}  d_loss {d_loss.item():.3f}  g_loss {g_loss.item():.3f}  "
                  f"G density {sg.density('generator'):.3f}  D density {sg.density('discriminator'):.3f}")

    with torch.no_grad():
        fake = G(torch.randn(2000, latent_dim, device=device)).cpu()
    angles = torch.atan2(fake[:, 1], fake[:, 0]) % (2 * math.pi)
    nearest = torch.round(angles / (2 * math.pi / 8)).long() % 8
    radius_ok = (fake.norm(dim=1) - 2.0).abs() < 0.3
    covered = len(set(nearest[radius_ok].tolist()))
    print(f"\nmodes covered: {covered}/8; samples near the ring: {radius_ok.float().mean():.2%}")
    print(f"mask updates on G: {sg.state_dict()['networks']['generator']['mask_updates']}")


if __name__ == "__main__":
    main()
