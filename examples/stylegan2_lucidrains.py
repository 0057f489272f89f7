"""StyleGAN2 from lucidrains' stylegan2-pytorch, trained with its own losses and made sparse by two added lines.

The loop follows ``stylegan2_pytorch.Trainer.train()``: style mixing, the style network ``S``
trained through G's optimizer, lucidrains' hinge loss (D scores *real* images low), a gradient
penalty every 4 steps and ``G`` scored by ``D(fake).mean()``. Left out for brevity: EMA,
path-length regularisation (lucidrains starts it after 5000 steps) and gradient accumulation.
The two lines marked ``# sparsegan: 1/2`` and ``# sparsegan: 2/2`` are the only difference from
the plain loop: delete them and this is a dense StyleGAN2 run. With them, the modulated
convolutions of G get dynamic sparse training at ``--g-density`` and D's density is steered by
the balance ratio (DDST), starting at ``--d-density``. Neither network can be traced by
``torch.fx``; sparsegan finds the kernels through ``torch.export``.

Data: random crops of the two photos that ship with scikit-learn (``load_sample_images``),
downscaled to 32x32, in [0, 1] as lucidrains' loader gives them. Nothing is downloaded.

``from sparsegan.adapters import stylegan2`` is not one of the two lines: on a machine without
CUDA, ``import stylegan2_pytorch`` fails on a module-level CUDA assert, and lucidrains' own
``StyleGAN2``/``Trainer`` classes call ``.cuda()``; the adapter imports the module and provides
CPU versions of its noise helpers (see ``sparsegan.adapters.stylegan2``).

Run: ``python examples/stylegan2_lucidrains.py --steps 300`` (a minute or two on a laptop CPU).
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_sample_images
from sparsegan.adapters import stylegan2

import sparsegan  # sparsegan: 1/2

LS = stylegan2.import_stylegan2()  # the module stylegan2_pytorch.stylegan2_pytorch


def photo_crops(n: int, image_size: int, seed: int = 0) -> torch.Tensor:
    """``n`` random square crops of sklearn's sample photos, ``(n, 3, size, size)`` in [0, 1]."""
    rng = np.random.default_rng(seed)
    photos = [torch.tensor(p, dtype=torch.float32).permute(2, 0, 1) / 255 for p in load_sample_images().images]
    crops = []
    for _ in range(n):
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(image_size * 2, image_size * 6))
        top = int(rng.integers(photo.shape[1] - side))
        left = int(rng.integers(photo.shape[2] - side))
        crops.append(F.interpolate(photo[None, :, top:top + side, left:left + side], size=image_size,
                                   mode="area")[0])
    return torch.stack(crops)


def style_list(n: int, layers: int, latent_dim: int, mixed_prob: float, device: torch.device) -> list:
    """lucidrains' ``noise_list`` / ``mixed_list`` (which call ``.cuda()``), on any device."""
    if float(torch.rand(())) < mixed_prob:
        tt = int(torch.rand(()) * layers)
        return [(torch.randn(n, latent_dim, device=device), tt),
                (torch.randn(n, latent_dim, device=device), layers - tt)]
    return [(torch.randn(n, latent_dim, device=device), layers)]


def zero_fraction(model: torch.nn.Module) -> float:
    """Fraction of exactly-zero entries among the model's >= 2-D parameters."""
    kernels = [p for p in model.parameters() if p.dim() >= 2]
    return sum(int((p == 0).sum()) for p in kernels) / sum(p.numel() for p in kernels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training iterations")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--latent-dim", type=int, default=64)
    parser.add_argument("--network-capacity", type=int, default=2, help="lucidrains' default: 16")
    parser.add_argument("--style-depth", type=int, default=2, help="lucidrains' default: 8")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--mixed-prob", type=float, default=0.9)
    parser.add_argument("--g-density", type=float, default=0.3)
    parser.add_argument("--d-density", type=float, default=0.5)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--save", default=None, help="write the final G, D and S state dicts here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.manual_seed(0)
    device = torch.device(args.device)
    images = photo_crops(1024, args.image_size).to(device)

    # what lucidrains' StyleGAN2.__init__ builds, without its .cuda()
    S = LS.StyleVectorizer(args.latent_dim, args.style_depth, lr_mul=0.1).to(device)
    G = LS.Generator(args.image_size, args.latent_dim, args.network_capacity).to(device)
    D = LS.Discriminator(args.image_size, args.network_capacity).to(device)
    stylegan2.init_weights(S, G, D)
    G_opt = torch.optim.Adam(list(G.parameters()) + list(S.parameters()), lr=args.lr, betas=(0.5, 0.9))
    D_opt = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.5, 0.9))
    sg = sparsegan.SparseGANWrapper(G, D, G_opt, D_opt, strategy=sparsegan.strategies.DDST(args.g_density, args.d_density, update_every=50, total_steps=args.steps, d_update_every=50, br_window=10), latent=stylegan2.latent(G, S), real=lambda n: images[torch.randint(len(images), (n,), device=device)])  # noqa: F841  # sparsegan: 2/2

    batch, num_layers = args.batch_size, G.num_layers
    for step in range(args.steps):
        apply_gradient_penalty = step % 4 == 0

        # train the discriminator
        D_opt.zero_grad()
        w_styles = LS.styles_def_to_tensor(LS.latent_to_w(S, style_list(batch, num_layers, args.latent_dim,
                                                                         args.mixed_prob, device)))
        noise = stylegan2.image_noise(batch, args.image_size, device=device)
        generated_images = G(w_styles, noise)
        fake_output, fake_q_loss = D(generated_images.clone().detach())
        image_batch = images[torch.randint(len(images), (batch,), device=device)].requires_grad_()
        real_output, real_q_loss = D(image_batch)
        divergence = (F.relu(1 + real_output) + F.relu(1 - fake_output)).mean()
        disc_loss = divergence
        if apply_gradient_penalty:
            gp = LS.gradient_penalty(image_batch, real_output)
            disc_loss = disc_loss + gp
        disc_loss.backward()
        D_opt.step()

        # train the generator
        G_opt.zero_grad()
        w_styles = LS.styles_def_to_tensor(LS.latent_to_w(S, style_list(batch, num_layers, args.latent_dim,
                                                                         args.mixed_prob, device)))
        noise = stylegan2.image_noise(batch, args.image_size, device=device)
        generated_images = G(w_styles, noise)
        fake_output, _ = D(generated_images)
        gen_loss = fake_output.mean()
        gen_loss.backward()
        G_opt.step()

        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            print(f"step {step + 1:4d}  D {disc_loss.item():.3f}  G {gen_loss.item():.3f}")

    print(f"entries of >= 2-D parameters that are exactly 0: G {zero_fraction(G):.1%}, D {zero_fraction(D):.1%}")
    if args.save:
        torch.save({"G": G.state_dict(), "D": D.state_dict(), "S": S.state_dict()}, args.save)


if __name__ == "__main__":
    main()
