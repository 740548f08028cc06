"""Base for callbacks that add a penalty to the training loss of any LightningModule.

A regularizer is an engine observer (:mod:`polyreg_cnf.engine.observers`), made active around
every training step, plus the loss term this base adds: it never reaches into the model's ODE
blocks, and it replaces no method of the user's module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import ExitStack
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from polyreg_cnf.callbacks.step_log import StepLogging, finish_step, log_step, start_step
from torch import Tensor
from typing_extensions import override

from polyreg_cnf.engine._checks import check_number
from polyreg_cnf.engine.observers import Observer

__all__ = ["LossTermCallback"]


class LossTermCallback(L.Callback, StepLogging, ABC):
    """Adds ``coef * penalty`` to the loss that Lightning backpropagates, on training steps only.

    Under automatic optimization the term joins the loss in Lightning's documented
    ``on_before_backward`` hook, which receives the very tensor Lightning is about to call
    ``backward()`` on (the ``training_step`` loss divided by ``accumulate_grad_batches``, and
    multiplied by the loss scale under 16-bit AMP). The callback adds
    ``coef * penalty / accumulate_grad_batches`` (times the same scale) to that tensor in place, so
    ONE backward pass carries both gradients, and each parameter's gradient is bit for bit the one
    of ``training_step`` returning ``loss + coef * penalty``. No Lightning hook lets a callback
    return a different loss, and a second ``backward`` of the penalty alone would need the solve's
    graph kept (memory), run the adjoint a second time, and sum the two gradients in another
    order; the in-place addition is the one route through a documented hook that does none of
    that. Callbacks listed before this one, and Lightning's ``outputs["loss"]`` (a copy taken
    before the hook), see the model's own loss; those after it, and the module's own
    ``on_before_backward``, see the total.

    Under manual optimization nothing is added; call :meth:`penalty` inside ``training_step``
    and add it before ``manual_backward``::

        loss = nll + self.regularizer.penalty(self)
        self.manual_backward(loss)

    Subclasses make the observer that records the penalty during a training step and say how
    its records become loss terms; the abstract methods are enforced (``LossTermCallback(1.0)``
    raises ``TypeError``).

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
            log_step(pl_module, {name: value for name, (_, value) in terms.items()},
                     prog_bar=(self.metric,))
        return self.coef * self.raw_penalty()

    # -------------------------------------------------------------- Lightning hooks
    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._checked_first_step = False
        self.observer = self.make_observer(pl_module)
        if not pl_module.automatic_optimization:
            rank_zero_info(
                f"{type(self).__name__}: manual optimization detected; add "
                f"`callback.penalty(self)` to the loss inside training_step before "
                f"manual_backward, or the penalty has no effect.")

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_step()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self._in_training_step = False
        self._close_step()

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        start_step(trainer, batch_idx)
        self._added_this_step = False
        self._in_training_step = True
        self._close_step()
        self._clear()
        if self.observer is not None and self.active_at(trainer.global_step):
            self._step_stack = ExitStack()
            self._step_stack.enter_context(self.observer)

    @override
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           loss: Tensor) -> None:
        # Manual optimization adds the penalty itself; a schedule may have it off this step;
        # one backward per batch under automatic optimization, but never add twice.
        if (not pl_module.automatic_optimization or self._step_stack is None
                or self._added_this_step):
            return
        self._check_first_step(pl_module)
        # Computed under the precision plugin's training-step context (autocast under AMP),
        # where a training_step adding it itself would compute it.
        with trainer.precision_plugin.train_step_context():
            term = self.penalty(pl_module)
        term = term / trainer.accumulate_grad_batches
        # The same transforms Lightning applied to the training_step loss, in the same order
        # (ClosureResult divides by accumulate_grad_batches, the AMP plugin then scales), so
        # the gradient reaching each term is the one a single ``loss + term`` would get.
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            term = scaler.scale(term)
        loss.add_(term.to(loss.dtype))

    @override
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
        finish_step(trainer, self)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef, "steps": self.steps}

    @override
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
