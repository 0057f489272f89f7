"""Generate docs/img/ddst_tiny.png: BR and D's density in a tiny real DDST run (CPU, seconds).

Run from the repository root: ``python docs/_scripts/ddst_tiny.py``.

The committed image was drawn by an earlier version of sparsegan (fresh-latent BR estimator, D
decisions counted in D steps). Run now, the script measures BR with the default estimator, on
the loop's own G steps (``br_estimator="step"``), and D decides every 10 iterations (G steps;
with one D step per G step the same count), so the redrawn curves will differ.
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

import sparsegan
from sparsegan.strategies import DDST

ITERATIONS = 400
torch.manual_seed(0)
G = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
D = nn.Sequential(nn.Linear(2, 64), nn.LeakyReLU(0.2), nn.Linear(64, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1))
g_opt = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.0, 0.9))
d_opt = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.0, 0.9))
rng = torch.Generator().manual_seed(0)

# d_update_every in iterations (G steps); BR is measured by the default probe on the loop's own
# G steps (its latents, D's scores, the real batch of the D step), so no real= is needed
sg = sparsegan.SparseGANWrapper(
    G, D, g_opt, d_opt, strategy=DDST(0.3, 0.3, d_update_every=10, br_every=2, br_window=5,
                                      total_steps=ITERATIONS),
    latent=lambda n: torch.randn(n, 8))

for it in range(ITERATIONS):
    # made-up "real" data: a Gaussian blob off the origin
    x, z = torch.randn(16, 2, generator=rng) * 0.2 + 1.0, torch.randn(16, 8, generator=rng)
    d_loss = F.relu(1 - D(x)).mean() + F.relu(1 + D(G(z).detach())).mean()
    d_opt.zero_grad()
    d_loss.backward()
    d_opt.step()
    g_loss = -D(G(torch.randn(16, 8, generator=rng))).mean()
    g_opt.zero_grad()
    g_loss.backward()
    g_opt.step()

steps, samples, windowed = zip(*sg.balance.history)            # G steps, per-sample BR, window mean
decisions = sg.algorithm("D").controller.decisions              # (iteration, Decision)
print(f"{len(samples)} BR samples, {sg.balance.skipped} skipped; final BR {sg.balance_ratio:.3f}, "
      f"D density {sg.density('D'):.3f}")
print("actions:", [d.action for _, d in decisions])

fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(7, 4.5))
ax1.plot(steps, samples, ".", ms=3, color="0.6", label="BR sample")
ax1.plot(steps, windowed, color="C0", label="windowed BR (mean of 5)")
for bound in (0.45, 0.55):
    ax1.axhline(bound, color="C3", lw=0.8, ls="--")
ax1.axhline(0.0, color="k", lw=0.5)
ax1.set_ylim(-1.5, 2.0)  # a few single samples lie outside; the window mean is what counts
ax1.set_ylabel("balance ratio")
ax1.legend(loc="best", fontsize=8)
d_steps = [0] + [s for s, _ in decisions]
d_density = [0.3] + [d.density for _, d in decisions]
ax2.step(d_steps, d_density, where="post", color="C1")
ax2.set_ylabel("D density")
ax2.set_xlabel("step (1 D step per G step)")
ax2.set_ylim(0, max(d_density) + 0.05)
fig.suptitle("DDST(0.3, 0.3, d_update_every=10, br_every=2, br_window=5) on a tiny MLP GAN", fontsize=9)
fig.tight_layout()
fig.savefig("docs/img/ddst_tiny.png", dpi=110)
