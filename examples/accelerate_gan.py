"""Sparse GAN training under Hugging Face Accelerate: prepare as usual, then wrap (two lines).

Run: ``python examples/accelerate_gan.py --steps 200`` (CPU here; ``accelerate launch`` for
several GPUs, where the prepared modules are DDP-wrapped and the wrapper keeps masks in sync).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sparsegan  # sparsegan: 1/2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    G = nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 2))
    D = nn.Sequential(nn.Linear(2, 128), nn.LeakyReLU(0.2), nn.Linear(128, 1))
    g_opt = torch.optim.Adam(G.parameters(), 1e-3, betas=(0.5, 0.9))
    d_opt = torch.optim.Adam(D.parameters(), 1e-3, betas=(0.5, 0.9))
    data = DataLoader(TensorDataset(torch.randn(4096, 2) * 0.1 + torch.tensor([1.0, -1.0])), batch_size=64, shuffle=True)
    G, D, g_opt, d_opt, data = accelerator.prepare(G, D, g_opt, d_opt, data)
    device = accelerator.device
    sg = sparsegan.SparseGANWrapper(  # sparsegan: 2/2
        G, D, g_opt, d_opt, strategy=sparsegan.strategies.DST(0.2, 0.3, update_every=50),
        latent=lambda n: torch.randn(n, 16, device=device))

    step = 0
    while step < args.steps:
        for (real,) in data:
            z = torch.randn(real.shape[0], 16, device=device)
            d_loss = F.relu(1 - D(real)).mean() + F.relu(1 + D(G(z).detach())).mean()
            d_opt.zero_grad()
            accelerator.backward(d_loss)
            d_opt.step()
            g_loss = -D(G(z)).mean()
            g_opt.zero_grad()
            accelerator.backward(g_loss)
            g_opt.step()
            step += 1
            if step >= args.steps:
                break
    inner_g = accelerator.unwrap_model(G)
    held = all(torch.count_nonzero(inner_g.get_parameter(n).detach()[~m]) == 0 for n, m in sg.masks("G").items())
    accelerator.print(f"steps {sg.steps('G')}, G density {sg.density('G'):.3f}, mask updates {sg.mask_updates('G')}, "
                      f"masks hold: {held}")


if __name__ == "__main__":
    main()
