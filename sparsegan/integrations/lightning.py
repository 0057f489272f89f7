"""PyTorch Lightning integration: a callback that wraps a GAN ``LightningModule``.

GANs in Lightning use manual optimization (``self.automatic_optimization = False``) and call
``opt.step()`` themselves; the wrapper's optimizer hooks sit on the underlying torch optimizers,
so the module's ``training_step`` stays unchanged::

    callback = SparseGANCallback(strategies.DDST(0.1, 0.1), latent=lambda n: torch.randn(n, 128),
                                 real=datamodule.train_dataloader())
    trainer = lightning.Trainer(callbacks=[callback])
    trainer.fit(gan_module, datamodule)

The callback's state (masks, counters, balance ratio) is saved in Lightning checkpoints and
restored on resume.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch

from sparsegan.strategies import Strategy
from sparsegan.wrapper import SparseGANWrapper

__all__ = ["SparseGANCallback"]

logger = logging.getLogger(__name__)


class SparseGANCallback(pl.Callback):
    """Wraps ``pl_module.<generator>`` and ``pl_module.<discriminator>`` when fitting starts.

    Args:
        strategy: The sparse training strategy (or a registered name).
        generator: Attribute name of the generator on the LightningModule.
        discriminator: Attribute name of the discriminator.
        optimizer_order: Positions of (G's, D's) optimizers in ``configure_optimizers``' output.
        **wrapper_kwargs: Passed on to :class:`~sparsegan.SparseGANWrapper` (``latent=``,
            ``real=``, ``seed=``, ``g_ema=``, ...).

    Attributes:
        wrapper: The :class:`~sparsegan.SparseGANWrapper` (``None`` before ``fit`` starts).
    """

    def __init__(self, strategy: Strategy | str, *, generator: str = "generator",
                 discriminator: str = "discriminator", optimizer_order: tuple[int, int] = (0, 1),
                 **wrapper_kwargs: Any) -> None:
        super().__init__()
        self.strategy = strategy
        self.attributes = (generator, discriminator)
        self.optimizer_order = optimizer_order
        self.wrapper_kwargs = wrapper_kwargs
        self.wrapper: SparseGANWrapper | None = None
        self._pending_state: dict[str, Any] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Find G, D and their optimizers on the module and wrap them."""
        if self.wrapper is not None:
            return
        if pl_module.automatic_optimization:
            raise ValueError("SparseGANCallback needs manual optimization (self.automatic_optimization = "
                             "False in the LightningModule), the usual setup for GANs")
        modules = []
        for attr in self.attributes:
            module = getattr(pl_module, attr, None)
            if not isinstance(module, torch.nn.Module):
                raise ValueError(f"the LightningModule has no nn.Module attribute {attr!r}; pass "
                                 f"generator=/discriminator= attribute names to SparseGANCallback")
            modules.append(module)
        optimizers = list(trainer.optimizers)
        try:
            g_opt, d_opt = (optimizers[i] for i in self.optimizer_order)
        except IndexError:
            raise ValueError(f"configure_optimizers returned {len(optimizers)} optimizers; SparseGANCallback "
                             f"expects G's and D's at positions {self.optimizer_order}") from None
        self.wrapper = SparseGANWrapper(modules[0], modules[1], g_opt, d_opt, strategy=self.strategy,
                                        **self.wrapper_kwargs)
        if self._pending_state is not None:
            self.wrapper.load_state_dict(self._pending_state)
            self._pending_state = None
        logger.info("%s", self.wrapper.report())

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the final densities (the hooks stay until :meth:`teardown`)."""
        if self.wrapper is not None:
            logger.info("sparse training done: G density %.4f, D density %.4f",
                        self.wrapper.density("generator"), self.wrapper.density("discriminator"))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the wrapper's hooks after fitting; the weights keep their zeros."""
        if stage == "fit" and self.wrapper is not None:
            self.wrapper.remove()

    def state_dict(self) -> dict[str, Any]:
        """The wrapper's state, saved in Lightning checkpoints."""
        return {"wrapper": self.wrapper.state_dict() if self.wrapper is not None else self._pending_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the wrapper's state (applied when fitting starts if not yet wrapped)."""
        state = state_dict.get("wrapper")
        if state is None:
            return
        if self.wrapper is not None:
            self.wrapper.load_state_dict(state)
        else:
            self._pending_state = state
