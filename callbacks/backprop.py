"""Keeps the automatic backprop choice of every ODE block consistent, visible and resumable."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from polyreg_cnf.engine.ode import ODEBlock, ode_blocks

__all__ = ["BackpropSelector", "auto_backprop_callbacks"]


class BackpropSelector(L.Callback):
    """Agrees, logs and checkpoints the ``backprop="auto"`` choice of the model's ODE blocks.

    Each ODE block whose solver has ``backprop="auto"`` proposes direct backprop or the adjoint
    after every training solve from its own memory estimate (:mod:`polyreg_cnf.engine.memory`).
    "adjoint" here means memory-bounded backprop: the block uses the adjoint for solves output
    at their ends only and step checkpoints for solves with interior output times (the
    penalty's), where the adjoint would stop at each of them (see ``ODEBlock``).
    This callback, added by the project's LightningModules themselves (``configure_callbacks``),
    turns the proposals into one decision per step:

    - the same on every DDP rank: if any rank's estimate does not fit, every rank uses the
      adjoint (gradients are the same either way, the ranks only differ in memory);
    - printed once whenever it changes and logged per step as ``backprop/adjoint`` (0 or 1);
    - saved in checkpoints, so a resumed run continues with the choice it had;
    - sticky after an out-of-memory fallback: a block that ran out of memory in a direct solve
      stays on the adjoint for the rest of the run.
    """

    def __init__(self) -> None:
        super().__init__()
        self.choice: str | None = None
        self.fell_back = False
        self._announced: str | None = None
        self._blocks: list[ODEBlock] = []

    @staticmethod
    def _auto_blocks(pl_module: L.LightningModule) -> list[ODEBlock]:
        return [b for b in ode_blocks(pl_module) if b.solver.backprop == "auto"]

    def _apply(self, blocks: list[ODEBlock]) -> None:
        for block in blocks:
            block.backprop_choice = self.choice
            if self.fell_back:
                block.backprop_fell_back = True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The model's blocks do not change during fit: find them once, not on every step.
        self._blocks = self._auto_blocks(pl_module)
        # A resumed run restores the choice before the first step (load_state_dict ran first).
        if self.choice is not None:
            self._apply(self._blocks)
            self._announce(self.choice, "restored from the checkpoint")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        blocks = self._blocks
        if not blocks:
            return
        fell_back = any(b.backprop_fell_back for b in blocks)
        wants_adjoint = fell_back or any(b.backprop_proposal == "adjoint" for b in blocks)
        # One decision for all ranks: the adjoint wins if any rank needs it.
        flags = torch.tensor([float(wants_adjoint), float(fell_back)], device=pl_module.device)
        flags = trainer.strategy.reduce(flags, reduce_op="max")
        self.fell_back = self.fell_back or bool(flags[1] > 0)
        choice = "adjoint" if bool(flags[0] > 0) else "direct"
        changed = choice != self.choice
        self.choice = choice
        self._apply(blocks)
        if changed:
            why = ("a direct solve ran out of memory; staying on the adjoint for the rest of the "
                   "run" if self.fell_back else "from the memory estimate")
            self._announce(choice, why)
        pl_module.log("backprop/adjoint", float(choice == "adjoint"), on_step=True,
                      on_epoch=False, batch_size=1)

    def _announce(self, choice: str, why: str) -> None:
        if choice != self._announced:
            what = ("direct" if choice == "direct" else "memory-bounded (the adjoint; step "
                    "checkpoints for penalised solves)")
            rank_zero_info(f"backprop=auto: using {what} backprop ({why}).")
            self._announced = choice

    def state_dict(self) -> dict[str, Any]:
        return {"choice": self.choice, "fell_back": self.fell_back}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.choice = state_dict.get("choice")
        self.fell_back = bool(state_dict.get("fell_back", False))


def auto_backprop_callbacks(pl_module: L.LightningModule) -> list[L.Callback]:
    """``[BackpropSelector()]`` if any ODE block of ``pl_module`` has ``backprop="auto"``.

    The project's LightningModules return this from ``configure_callbacks``, so the choice is
    agreed, logged and checkpointed whoever builds the Trainer.
    """
    if any(b.solver.backprop == "auto" for b in ode_blocks(pl_module)):
        return [BackpropSelector()]
    return []
