"""SNGAN from torch-mimicry, trained with mimicry's own steps and made sparse by two added lines.

The loop is mimicry's ``Trainer.train()`` written out: ``n_dis`` calls of the discriminator's
``train_step`` (hinge loss), then one of the generator's, per iteration. The two lines marked
``# sparsegan: 1/2`` and ``# sparsegan: 2/2`` are the only difference from the plain loop:
delete them and this is a dense SNGAN run. With them, G is trained with dynamic sparse training
at ``--g-density`` and D's density is steered by the balance ratio (DDST), starting at
``--d-density``, with a controller decision every 50 iterations (G steps, whatever ``--n-dis``
is); the spectrally normalised convolutions keep their spectral norm (their ``weight_orig`` is
what gets masked).

The balance ratio is measured with ``br_estimator="fresh"`` (latents from ``latent=``, real
batches from ``real=``): mimicry's ``train_step`` methods call ``self.forward(...)`` and
``generate_images`` instead of the modules, which bypasses the forward hooks with which the
default ``"step"`` estimator records the loop's own G step. (Left at the default, the wrapper
would fall back to fresh latents on every sample anyway, with a logged warning.)

Data: scikit-learn's 1797 hand-written digits (shipped with scikit-learn, nothing is
downloaded), upscaled to 32x32 and repeated to 3 channels, in [-1, 1] like mimicry's CIFAR-10.

``from sparsegan.adapters.mimicry import import_mimicry`` is not one of the two lines: it is
``import torch_mimicry`` with the shims torch-mimicry 0.1.16 needs on torch 2 without
TensorFlow (see ``sparsegan.adapters.mimicry``).

Run: ``python examples/sngan_mimicry.py --steps 300`` (about two minutes on two CPU cores).
"""

from __future__ import annotations

import argparse
import logging

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sparsegan.adapters.mimicry import import_mimicry, latent
from torch.utils.data import DataLoader, TensorDataset

import sparsegan  # sparsegan: 1/2

mmc = import_mimicry()
from torch_mimicry.training import metric_log  # noqa: E402  (after the import shim)


def digits_dataset(image_size: int = 32) -> TensorDataset:
    """sklearn's digits as 3 x ``image_size`` x ``image_size`` images in [-1, 1], with labels."""
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16 * 2 - 1
    images = F.interpolate(images, size=image_size, mode="bilinear", align_corners=False).clamp(-1, 1)
    return TensorDataset(images.expand(-1, 3, -1, -1).contiguous(), torch.tensor(bunch.target))


def zero_fraction(model: torch.nn.Module) -> float:
    """Fraction of exactly-zero entries among the model's conv/linear kernels (>= 2-D parameters)."""
    kernels = [p for p in model.parameters() if p.dim() >= 2]
    return sum(int((p == 0).sum()) for p in kernels) / sum(p.numel() for p in kernels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training iterations (G steps)")
    parser.add_argument("--n-dis", type=int, default=2, help="D steps per G step (mimicry's SNGAN uses 5)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ngf", type=int, default=32, help="G width (mimicry's default: 256)")
    parser.add_argument("--ndf", type=int, default=32, help="D width (mimicry's default: 128)")
    parser.add_argument("--g-density", type=float, default=0.3)
    parser.add_argument("--d-density", type=float, default=0.5)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--save", default=None, help="write the final G and D state dicts here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.manual_seed(0)
    device = torch.device(args.device)

    dataloader = DataLoader(digits_dataset(32), batch_size=args.batch_size, shuffle=True, drop_last=True)
    netG = mmc.nets.sngan.SNGANGenerator32(nz=128, ngf=args.ngf).to(device)
    netD = mmc.nets.sngan.SNGANDiscriminator32(ndf=args.ndf).to(device)
    optD = torch.optim.Adam(netD.parameters(), 2e-4, betas=(0.0, 0.9))
    optG = torch.optim.Adam(netG.parameters(), 2e-4, betas=(0.0, 0.9))
    sg = sparsegan.SparseGANWrapper(netG, netD, optG, optD, strategy=sparsegan.strategies.DDST(args.g_density, args.d_density, update_every=50, total_steps=args.steps, d_update_every=50, br_window=10), latent=latent(netG), real=dataloader, br_estimator="fresh")  # noqa: F841  # "fresh": mimicry calls G.forward() itself, unseen by the default probe's hooks  # sparsegan: 2/2

    # mimicry's Trainer.train(), written out
    iter_dataloader = iter(dataloader)
    for global_step in range(1, args.steps + 1):
        log_data = metric_log.MetricLog()
        for i in range(args.n_dis):
            try:
                real_batch = next(iter_dataloader)
            except StopIteration:
                iter_dataloader = iter(dataloader)
                real_batch = next(iter_dataloader)
            real_batch = (real_batch[0].to(device), real_batch[1].to(device))
            log_data = netD.train_step(real_batch=real_batch, netG=netG, optD=optD, log_data=log_data,
                                       device=device, global_step=global_step)
            if i == args.n_dis - 1:
                log_data = netG.train_step(real_batch=real_batch, netD=netD, optG=optG, log_data=log_data,
                                           device=device, global_step=global_step)
        if global_step % args.log_every == 0 or global_step == args.steps:
            print(f"step {global_step:4d}  " + "  ".join(f"{k} {log_data[k]:.3f}" for k in log_data.keys()))

    print(f"kernel entries that are exactly 0: G {zero_fraction(netG):.1%}, D {zero_fraction(netD):.1%}")
    if args.save:
        torch.save({"netG": netG.state_dict(), "netD": netD.state_dict()}, args.save)


if __name__ == "__main__":
    main()
