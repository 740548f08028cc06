"""Keeps the automatic backprop choice of every ODE block consistent, visible and resumable."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from polyreg_cnf.callbacks.step_log import StepLogging, finish_step, log_step, start_step
from typing_extensions import override

from polyreg_cnf.engine.ode import ode_blocks
from polyreg_cnf.engine.strategies import MEMORY_BOUNDED, Auto, AutoDecision, read_choice

__all__ = ["BackpropSelector", "auto_backprop_callbacks"]


class BackpropSelector(L.Callback, StepLogging):
    """Agrees, logs and checkpoints the decision of the model's :class:`~polyreg_cnf.Auto`
    backprop strategies.

    The decisions are kept by the blocks (``ODEBlock.backprop_decision``): after every training
    solve each block proposes direct or memory-bounded backprop from its memory estimate
    (:mod:`polyreg_cnf.engine.memory`). This callback, added by the project's LightningModules
    themselves (``configure_callbacks``), turns the proposals into one decision per step with
    :meth:`~polyreg_cnf.engine.strategies.AutoDecision.agree`:

    - the same on every DDP rank: if any rank's estimate does not fit, every rank is
      memory-bounded (gradients are the same either way, the ranks only differ in memory);
    - printed once whenever it changes and logged per step as ``backprop/memory_bounded``
      (0 or 1);
    - saved in checkpoints as ``"direct"`` or ``"memory_bounded"`` (a checkpoint's older
      ``"adjoint"`` is read as memory-bounded), so a resumed run continues with the choice it
      had;
    - sticky after an out-of-memory fallback.
    """

    def __init__(self) -> None:
        super().__init__()
        self.choice: str | None = None
        self.fell_back = False
        self._announced: str | None = None
        self._decisions: list[AutoDecision] = []

    @staticmethod
    def _find(pl_module: L.LightningModule) -> list[AutoDecision]:
        return [block.backprop_decision for block in ode_blocks(pl_module)
                if isinstance(block.solver.backprop, Auto)]

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The model's blocks do not change during fit: find them once, not on every step.
        self._decisions = self._find(pl_module)
        # A resumed run restores the choice before the first step (load_state_dict ran first).
        if self.choice is not None:
            for decision in self._decisions:
                decision.agree(self.choice, self.fell_back)
            self._announce(self.choice, "restored from the checkpoint")

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        start_step(trainer, batch_idx)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._decisions:
            self._agree(trainer, pl_module)
        finish_step(trainer, self)

    def _agree(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fell_back = any(d.fell_back for d in self._decisions)
        wants_bound = any(d.wants_memory_bound for d in self._decisions)
        # One decision for all ranks: memory-bounded wins if any rank needs it.
        flags = torch.tensor([float(wants_bound), float(fell_back)], device=pl_module.device)
        flags = trainer.strategy.reduce(flags, reduce_op="max")
        self.fell_back = self.fell_back or bool(flags[1] > 0)
        choice = MEMORY_BOUNDED if bool(flags[0] > 0) else "direct"
        changed = choice != self.choice
        self.choice = choice
        for decision in self._decisions:
            decision.agree(choice, self.fell_back)
        if changed:
            why = ("a direct solve ran out of memory; staying memory-bounded for the rest of the "
                   "run" if self.fell_back else "from the memory estimate")
            self._announce(choice, why)
        log_step(pl_module, {"backprop/memory_bounded": float(choice == MEMORY_BOUNDED)})

    def _announce(self, choice: str, why: str) -> None:
        if choice != self._announced:
            what = ("direct" if choice == "direct" else "memory-bounded (the adjoint; step "
                    "checkpoints for penalised solves)")
            rank_zero_info(f"backprop=auto: using {what} backprop ({why}).")
            self._announced = choice

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"choice": self.choice, "fell_back": self.fell_back}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        choice = state_dict.get("choice")
        self.choice = None if choice is None else read_choice(choice)
        self.fell_back = bool(state_dict.get("fell_back", False))


def auto_backprop_callbacks(pl_module: L.LightningModule) -> list[L.Callback]:
    """``[BackpropSelector()]`` if any ODE block of ``pl_module`` backpropagates with ``Auto``.

    The project's LightningModules return this from ``configure_callbacks``, so the choice is
    agreed, logged and checkpointed whoever builds the Trainer.
    """
    if any(isinstance(b.solver.backprop, Auto) for b in ode_blocks(pl_module)):
        return [BackpropSelector()]
    return []
