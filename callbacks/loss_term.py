"""Base for callbacks that add a penalty to the training loss of any LightningModule.

A regularizer is an engine observer (:mod:`polyreg_cnf.engine.observers`), made active around
every training step, plus the loss term this base adds: it never reaches into the model's ODE
blocks.
"""

from __future__ import annotations

import functools
from abc import abstractmethod
from contextlib import ExitStack
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from polyreg_cnf.engine._checks import check_number
from polyreg_cnf.engine.observers import Observer

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

    Subclasses make the observer that records the penalty during a training step and say how
    its records become loss terms.

    Args:
        coef: Weight of the penalty (>= 0).
    """

    #: Metric name of the (unweighted) penalty, e.g. ``"reg/poly"``.
    metric: str = "reg/penalty"

    def __init__(self, coef: float) -> None:
        super().__init__()
        self.coef = check_number("coef", coef)
        self.steps = 0
        self.observer: Observer | None = None
        self._wrapped: L.LightningModule | None = None
        self._step_stack: ExitStack | None = None
        self._added_this_step = False
        self._in_training_step = False
        self._checked_first_step = False

    # -------------------------------------------------------------- what subclasses provide
    @abstractmethod
    def make_observer(self, pl_module: L.LightningModule) -> Observer:
        """The observer that records this step's penalty (made at fit start)."""

    @abstractmethod
    def terms(self) -> dict[str, tuple[float, Tensor]]:
        """This step's records as metric name -> (weight, unweighted value); empty if none."""

    @abstractmethod
    def settings(self) -> dict[str, float | int]:
        """Every setting of the regularizer, as plain values (what a run logs)."""

    @abstractmethod
    def _nothing_to_regularize(self, pl_module: L.LightningModule) -> str | None:
        """After the first training step: why nothing could be regularized, or None if fine."""

    def active_at(self, step: int) -> bool:
        """Whether the penalty is on at training step ``step`` (a schedule's hook; always)."""
        return True

    def _clear(self) -> None:
        """Drop what the observer recorded."""
        if self.observer is not None:
            self.observer.clear()

    # -------------------------------------------------------------- public
    def raw_penalty(self, pl_module: L.LightningModule | None = None) -> Tensor | None:
        """This step's penalty without ``coef`` (inner weights applied), or None."""
        terms = self.terms()
        if not terms:
            return None
        return torch.stack([w * v for w, v in terms.values()]).sum()

    def penalty(self, pl_module: L.LightningModule) -> Tensor:
        """``coef * penalty`` for the current training step, to add to the loss; logs each
        unweighted term under its metric name.

        Returns a zero tensor when nothing was recorded (outside training steps).
        """
        self._added_this_step = True
        terms = self.terms()
        if not terms:
            return torch.zeros((), device=pl_module.device)
        if self._in_training_step:
            for name, (_, value) in terms.items():
                pl_module.log(name, value.detach(), on_step=True, on_epoch=False,
                              prog_bar=name == self.metric, batch_size=1)
        return self.coef * self.raw_penalty()

    # -------------------------------------------------------------- Lightning hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._checked_first_step = False
        self.observer = self.make_observer(pl_module)
        if pl_module.automatic_optimization:
            self._wrap(pl_module)
        else:
            rank_zero_info(
                f"{type(self).__name__}: manual optimization detected; add "
                f"`callback.penalty(self)` to the loss inside training_step before "
                f"manual_backward, or the penalty has no effect.")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._unwrap()
        self._close_step()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self._in_training_step = False
        self._unwrap()
        self._close_step()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._added_this_step = False
        self._in_training_step = True
        self._close_step()
        self._clear()
        if self.observer is not None and self.active_at(trainer.global_step):
            self._step_stack = ExitStack()
            self._step_stack.enter_context(self.observer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        was_active = self._step_stack is not None
        self._close_step()
        if not pl_module.automatic_optimization and was_active:
            self._check_first_step(pl_module)
        self._in_training_step = False
        recorded = bool(self.terms())
        if recorded and not self._added_this_step:
            rank_zero_warn(f"{type(self).__name__}: the solves recorded a penalty but it was "
                           "never added to the loss (manual optimization?): call "
                           "`callback.penalty(self)` in training_step.")
        if recorded:
            self.steps += 1
        self._clear()

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef, "steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict.get("steps", 0))
        if state_dict.get("coef", self.coef) != self.coef:
            rank_zero_warn(f"{type(self).__name__}: checkpoint had coef={state_dict['coef']}, "
                           f"continuing with coef={self.coef} as configured now.")

    # -------------------------------------------------------------- internals
    def _close_step(self) -> None:
        if self._step_stack is not None:
            self._step_stack.close()
            self._step_stack = None

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
            if self._step_stack is None:  # off at this step (a schedule)
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
