"""PyTorch Lightning callback and HF Accelerate: the wrapper inside other people's loops."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch", reason="lightning is installed by `make test`")

from sparsegan.integrations.lightning import SparseGANCallback  # noqa: E402
from sparsegan.strategies import DST, Static  # noqa: E402
from tests.conftest import mlp_gan  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class TinyGAN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator, self.discriminator = mlp_gan()

    def training_step(self, batch, batch_idx):
        real = batch[0]
        g_opt, d_opt = self.optimizers()
        z = torch.randn(real.shape[0], 8)
        d_loss = F.relu(1 - self.discriminator(real)).mean() + F.relu(1 + self.discriminator(self.generator(z).detach())).mean()
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        d_opt.step()
        g_loss = -self.discriminator(self.generator(z)).mean()
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()

    def configure_optimizers(self):
        return (torch.optim.Adam(self.generator.parameters(), 1e-3), torch.optim.Adam(self.discriminator.parameters(), 1e-3))


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(64, 2) * 0.2 + 1), batch_size=8)


def _trainer(callback, **kwargs) -> pl.Trainer:
    return pl.Trainer(callbacks=[callback], accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_lightning_callback_fast_dev_run() -> None:
    torch.manual_seed(0)
    module = TinyGAN()
    callback = SparseGANCallback(DST(0.3, 0.3, update_every=1), latent=lambda n: torch.randn(n, 8))
    # Lightning counts every optimizer step: 6 steps = 3 batches, each with one D and one G step
    _trainer(callback, fast_dev_run=6).fit(module, _loader())
    sg = callback.wrapper
    assert sg is not None and sg.steps("G") == sg.steps("D") == 3 and sg.mask_updates("G") == 3
    for name, mask in sg.masks("G").items():
        assert torch.count_nonzero(module.generator.get_parameter(name).detach()[~mask]) == 0
    assert not module.generator._forward_pre_hooks  # teardown removed the hooks


def test_lightning_callback_state_restores_before_wrapping() -> None:
    torch.manual_seed(0)
    first = SparseGANCallback(Static(0.3, 0.3))
    module = TinyGAN()
    _trainer(first, fast_dev_run=2).fit(module, _loader())
    state = first.state_dict()
    second = SparseGANCallback(Static(0.3, 0.3), seed=5)  # different seed: masks come from the state
    second.load_state_dict(state)
    _trainer(second, fast_dev_run=1).fit(module, _loader())
    assert all(torch.equal(second.wrapper.masks("D")[k], v) for k, v in first.wrapper.masks("D").items())
    assert second.wrapper.steps("D") == 1 + 1  # one batch before (fast_dev_run=2), one now


def test_lightning_needs_manual_optimization() -> None:
    class Auto(TinyGAN):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = True

        def training_step(self, batch, batch_idx):
            return self.discriminator(batch[0]).mean()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters())

    with pytest.raises(ValueError, match="manual optimization"):
        _trainer(SparseGANCallback(Static(0.3, 0.3)), fast_dev_run=1).fit(Auto(), _loader())


def test_accelerate_example_runs() -> None:
    pytest.importorskip("accelerate")
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "accelerate_gan.py"), "--steps", "20"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "masks hold: True" in out.stdout


def test_lightning_example_runs() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "lightning_gan.py"), "--steps", "60", "--no-progress"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "G steps 60, G density 0.200" in out.stdout and "masks hold: True" in out.stdout
