"""What the project's LightningModules share: optimiser, backprop selector, checkpoint kind."""

from __future__ import annotations

from typing import Any, ClassVar

import lightning as L
import torch
from typing_extensions import override

from polyreg_cnf.callbacks.backprop import auto_backprop_callbacks
from polyreg_cnf.callbacks.step_log import StepLogging, finish_step, start_step
from polyreg_cnf.models.checkpoint import check_checkpoint_kind, stamp_checkpoint_kind
from polyreg_cnf.models.schedule import optimizer_config

__all__ = ["FlowSystem"]


class FlowSystem(L.LightningModule, StepLogging):
    """Base of :class:`~polyreg_cnf.models.CNFDensityEstimator` and
    :class:`~polyreg_cnf.models.vae.CNFVAE`.

    Subclasses set :attr:`optimizer`, ``lr``, ``weight_decay`` and ``lr_schedule``, and say in
    :meth:`checkpoint_kind` what a checkpoint of theirs must match to load. Their per-step
    metrics go through :func:`~polyreg_cnf.callbacks.step_log.log_step` (one logger call per
    step for the module and the project's callbacks together); this class opens and writes
    each step's row.
    """

    #: The optimiser class (FFJORD: Adam for density estimation, Adamax for the VAE).
    optimizer: ClassVar[type[torch.optim.Optimizer]] = torch.optim.Adam

    def checkpoint_kind(self) -> tuple[str, dict[str, Any]]:
        """The model kind and the shape fields a checkpoint is stamped with."""
        raise NotImplementedError

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        start_step(self.trainer, batch_idx)

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Runs after every callback's on_train_batch_end: the step's row is complete.
        finish_step(self.trainer, self)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        kind, fields = self.checkpoint_kind()
        stamp_checkpoint_kind(checkpoint, kind, **fields)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        kind, fields = self.checkpoint_kind()
        check_checkpoint_kind(checkpoint, kind, **fields)

    @override
    def configure_callbacks(self) -> list[L.Callback]:
        """The backprop selector when a block backpropagates with ``Auto`` (agreed across
        ranks)."""
        return auto_backprop_callbacks(self)

    @override
    def configure_optimizers(self) -> Any:
        opt = self.optimizer(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return optimizer_config(opt, self.lr_schedule,
                                lambda: self.trainer.estimated_stepping_batches)
