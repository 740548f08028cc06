"""Base for callbacks that add a penalty to the training loss of any LightningModule."""

from __future__ import annotations

import functools
from abc import abstractmethod
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from polyreg_cnf.engine.ode import ODEBlock, ode_blocks

__all__ = ["LossTermCallback"]


class LossTermCallback(L.Callback):
    """Adds ``coef * penalty`` to the loss that Lightning backpropagates, on training steps only.

    Under automatic optimization the callback wraps the module's ``training_step`` for the
    duration of ``fit``: the wrapped step returns ``loss + coef * penalty`` (a tensor, or the
    ``"loss"`` entry of a dict), so Lightning's own closure scales it for gradient accumulation
    and runs ONE backward pass. Under manual optimization nothing is wrapped; call
    :meth:`penalty` inside ``training_step`` and add it before ``manual_backward``::

        loss = nll + self.regularizer.penalty(self)
        self.manual_backward(loss)

    Subclasses say how blocks are switched on and off and how their penalties are collected.

    Args:
        coef: Weight of the penalty (>= 0).
    """

    #: Metric name of the (unweighted) penalty, e.g. ``"reg/poly"``.
    metric: str = "reg/penalty"
    #: Whether the penalty can come from something other than ODE blocks (then a module without
    #: blocks is only rejected after its first training step recorded nothing).
    needs_blocks: bool = True

    def __init__(self, coef: float) -> None:
        super().__init__()
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not coef >= 0 \
                or coef == float("inf"):
            raise ValueError(f"coef must be a finite number >= 0, got {coef!r}")
        self.coef = float(coef)
        self.steps = 0
        self._blocks: list[ODEBlock] = []
        self._wrapped: L.LightningModule | None = None
        self._added_this_step = False
        self._in_training_step = False
        self._checked_first_step = False

    # -------------------------------------------------------------- what subclasses provide
    @abstractmethod
    def _start(self, block: ODEBlock) -> None:
        """Switch the block's recording on for one training step."""

    @abstractmethod
    def _stop(self, block: ODEBlock) -> None:
        """Switch the block's recording off and drop what it recorded."""

    @abstractmethod
    def _block_penalty(self, block: ODEBlock) -> Tensor | None:
        """The unweighted penalty the block recorded this step, or None."""

    def _extra_penalty(self) -> Tensor | None:
        """The unweighted penalty recorded this step outside ODE blocks (none by default)."""
        return None

    def _nothing_to_regularize(self, pl_module: L.LightningModule) -> str | None:
        """After the first training step: why nothing could be regularized, or None if fine.

        The default needs ODE blocks, which :meth:`on_fit_start` already checked.
        """
        return None

    # -------------------------------------------------------------- public
    def raw_penalty(self, pl_module: L.LightningModule) -> Tensor | None:
        """Unweighted penalty summed over every ODE block of ``pl_module`` this step."""
        blocks = self._find_blocks(pl_module)
        parts = [p for b in blocks if (p := self._block_penalty(b)) is not None]
        extra = self._extra_penalty()
        if extra is not None:
            parts.append(extra)
        if not parts:
            return None
        return torch.stack(parts).sum()

    def penalty(self, pl_module: L.LightningModule) -> Tensor:
        """``coef * penalty`` for the current training step, to add to the loss; logs it.

        Returns a zero tensor when no block recorded anything (outside training steps).
        """
        raw = self.raw_penalty(pl_module)
        self._added_this_step = True
        if raw is None:
            return torch.zeros((), device=pl_module.device)
        if self._in_training_step:
            pl_module.log(self.metric, raw.detach(), on_step=True, on_epoch=False, prog_bar=True,
                          batch_size=1)
        return self.coef * raw

    # -------------------------------------------------------------- Lightning hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._blocks = ode_blocks(pl_module)
        self._checked_first_step = False
        if not self._blocks and self.needs_blocks:
            raise ValueError(
                f"{type(self).__name__} found no ODE block in {type(pl_module).__name__}: build "
                "the dynamics with polyreg_cnf.ODEBlock (neural ODE) or polyreg_cnf.CNF (flow) "
                "so the callback can reach the trajectories.")
        if pl_module.automatic_optimization:
            self._wrap(pl_module)
        else:
            rank_zero_info(
                f"{type(self).__name__}: manual optimization detected; add "
                f"`callback.penalty(self)` to the loss inside training_step before "
                f"manual_backward, or the penalty has no effect.")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._unwrap()
        for block in self._blocks:
            self._stop(block)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self._in_training_step = False
        self._unwrap()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._added_this_step = False
        self._in_training_step = True
        for block in self._find_blocks(pl_module):
            self._start(block)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if not pl_module.automatic_optimization:
            self._check_first_step(pl_module)
        self._in_training_step = False
        recorded = self.raw_penalty(pl_module) is not None
        if recorded and not self._added_this_step:
            rank_zero_warn(f"{type(self).__name__}: the ODE blocks recorded a penalty but it was "
                           "never added to the loss (manual optimization?): call "
                           "`callback.penalty(self)` in training_step.")
        if recorded:
            self.steps += 1
        for block in self._find_blocks(pl_module):
            self._stop(block)

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef, "steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict.get("steps", 0))
        if state_dict.get("coef", self.coef) != self.coef:
            rank_zero_warn(f"{type(self).__name__}: checkpoint had coef={state_dict['coef']}, "
                           f"continuing with coef={self.coef} as configured now.")

    # -------------------------------------------------------------- internals
    def _find_blocks(self, pl_module: L.LightningModule) -> list[ODEBlock]:
        return self._blocks or ode_blocks(pl_module)

    def _check_first_step(self, pl_module: L.LightningModule) -> None:
        if self._checked_first_step:
            return
        self._checked_first_step = True
        problem = self._nothing_to_regularize(pl_module)
        if problem is not None:
            raise ValueError(problem)

    def _wrap(self, pl_module: L.LightningModule) -> None:
        if self._wrapped is not None:
            return
        original = pl_module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            if out is None:  # the user skipped this batch
                return out
            self._check_first_step(pl_module)
            if isinstance(out, Tensor):
                return out + self.penalty(pl_module)
            if isinstance(out, dict) and "loss" in out:
                return {**out, "loss": out["loss"] + self.penalty(pl_module)}
            raise TypeError(f"{type(self).__name__}: training_step must return a loss tensor or a "
                            f"dict with 'loss', got {type(out).__name__}")

        # An instance attribute shadows the method; Lightning (and its DDP wrapper) look the
        # hook up on the instance, so this is the step they call.
        pl_module.training_step = training_step
        self._wrapped = pl_module

    def _unwrap(self) -> None:
        if self._wrapped is not None:
            self._wrapped.__dict__.pop("training_step", None)
            self._wrapped = None
