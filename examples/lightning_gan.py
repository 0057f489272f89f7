"""Sparse GAN training in PyTorch Lightning: a callback, the LightningModule unchanged (two lines).

A small MLP GAN on the 8x8 handwritten digits that ship with scikit-learn, trained with
manual optimization (the usual Lightning GAN setup). ``SparseGANCallback`` wraps the module's
``generator`` and ``discriminator`` when fitting starts and keeps its state in Lightning's
checkpoints.

Run: ``python examples/lightning_gan.py --steps 300`` (``--steps`` counts G steps).
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sparsegan.integrations.lightning import SparseGANCallback  # sparsegan: 1/2
from sparsegan.strategies import DDST

LATENT = 32


class DigitsGAN(pl.LightningModule):
    """Hinge-loss GAN on flattened 8x8 digits, one D step and one G step per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(LATENT, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                       nn.Linear(256, 64), nn.Tanh())
        self.discriminator = nn.Sequential(nn.Linear(64, 256), nn.LeakyReLU(0.2), nn.Linear(256, 256),
                                           nn.LeakyReLU(0.2), nn.Linear(256, 1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        real = batch[0]
        g_opt, d_opt = self.optimizers()
        z = torch.randn(real.shape[0], LATENT, device=self.device)
        fake = self.generator(z)
        d_loss = F.relu(1 - self.discriminator(real)).mean() + F.relu(1 + self.discriminator(fake.detach())).mean()
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        d_opt.step()
        g_loss = -self.discriminator(self.generator(z)).mean()
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()
        self.log_dict({"d_loss": d_loss.detach(), "g_loss": g_loss.detach()}, prog_bar=True)

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        return (torch.optim.Adam(self.generator.parameters(), 2e-4, betas=(0.5, 0.999)),
                torch.optim.Adam(self.discriminator.parameters(), 2e-4, betas=(0.5, 0.999)))


def digits() -> TensorDataset:
    """The scikit-learn digits, scaled to [-1, 1] and flattened."""
    images = torch.tensor(load_digits().images, dtype=torch.float32) / 8.0 - 1.0
    return TensorDataset(images.flatten(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="G steps (Lightning counts G and D steps: twice this)")
    parser.add_argument("--no-progress", action="store_true", help="hide Lightning's progress bar")
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    data = DataLoader(digits(), batch_size=64, shuffle=True, drop_last=True)
    module = DigitsGAN()
    callback = SparseGANCallback(  # sparsegan: 2/2
        DDST(0.2, 0.2, update_every=100, d_update_every=50, br_every=5, br_window=10),
        latent=lambda n: torch.randn(n, LATENT), real=data)
    trainer = pl.Trainer(max_steps=2 * args.steps, accelerator="auto", devices=1, logger=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=not args.no_progress, callbacks=[callback])
    trainer.fit(module, data)
    sg = callback.wrapper
    held = all(torch.count_nonzero(module.generator.get_parameter(n).detach()[~m]) == 0
               for n, m in sg.masks("G").items())
    br = sg.balance_ratio
    print(f"G steps {sg.steps('G')}, G density {sg.density('G'):.3f}, D density {sg.density('D'):.3f}, "
          f"BR {'n/a' if br is None else f'{br:.3f}'}, G mask updates {sg.mask_updates('G')}, masks hold: {held}")


if __name__ == "__main__":
    main()
