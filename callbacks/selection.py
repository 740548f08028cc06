"""Model selection by validation: the record of every validation NLL, and the one ``last.ckpt``.

A run keeps two checkpoints: ``best.ckpt`` (Lightning's ``ModelCheckpoint`` on ``val/nll``,
made by :func:`polyreg_cnf.app.build.build`) and ``last.ckpt``, written by the
:class:`~polyreg_cnf.callbacks.guard.RunGuard` (on a signal) and by :class:`LastCheckpoint`
(every N steps, at the last step, and again after a validation that followed one of those saves,
so that the file holds that validation's best-so-far record).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn
from polyreg_cnf.callbacks.guard import RunGuard

from polyreg_cnf.engine._checks import check_int

__all__ = ["LR_DROP_FFJORD", "MONITOR", "OVERFIT_NATS", "OVERFIT_SHARE", "TEST_CHECKPOINTS",
           "LastCheckpoint", "LearningRateDrops", "ValidationRecord", "drop_points",
           "overfit_margin"]

#: The metric a run is selected and stopped on (the VAE logs its validation bound under it).
MONITOR = "val/nll"
#: Which weights the final test of a run uses (``--test-ckpt``): the best validation checkpoint
#: or the last weights.
TEST_CHECKPOINTS = ("best", "last")
#: The overfitting warning fires when the last validation NLL exceeds the best by more than
#: ``max(OVERFIT_NATS, OVERFIT_SHARE * |best|)`` (:func:`overfit_margin`).
OVERFIT_NATS = 0.5
OVERFIT_SHARE = 0.05
#: The factor FFJORD's tabular script multiplies its learning rate by at each of its two drops.
LR_DROP_FFJORD = 0.1


def overfit_margin(best: float) -> float:
    """How far above the best validation NLL the last may lie before a run is called overfit.

    .. math:: \\max(0.5\\ \\text{nats},\\ 0.05\\,|\\mathrm{best}|)

    Example:
        >>> overfit_margin(2.0), overfit_margin(-40.0)
        (0.5, 2.0)
    """
    return max(OVERFIT_NATS, OVERFIT_SHARE * abs(best))


def drop_points(patience: int) -> tuple[int, int]:
    """After how many validations without a lower validation NLL the learning rate drops:
    a third and two thirds of the early-stopping ``patience`` (at least one validation).

    FFJORD's tabular script drops after more than ``patience // 3`` and ``2 (patience // 3)``
    validations and stops after more than ``patience``; Lightning's ``EarlyStopping`` stops
    after ``patience``, so the drops here come one validation sooner too, keeping FFJORD's
    spacing: with a patience of 30, after 10 and 20 validations, and the stop after 30.

    Example:
        >>> drop_points(30), drop_points(20), drop_points(2)
        ((10, 20), (6, 13), (1, 1))
    """
    check_int("patience", patience)
    return max(1, patience // 3), max(1, 2 * patience // 3)


def _fitting(trainer: L.Trainer) -> bool:
    return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking


class ValidationRecord(L.Callback):
    """Every validation NLL of the fit, with its training step; saved in checkpoints.

    The value is the one every process sees (``val/nll`` is reduced over the processes), so
    the record is the same on every rank.

    Attributes:
        history: ``(global step, validation NLL)`` in the order the validations ran.

    Example:
        >>> record = ValidationRecord()
        >>> record.load_state_dict({"history": [[100, 3.0], [200, 2.5], [300, 2.9]]})
        >>> record.best(), record.last()
        ((200, 2.5), (300, 2.9))
    """

    def __init__(self) -> None:
        super().__init__()
        self.history: list[tuple[int, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(MONITOR)
        if value is not None and _fitting(trainer):
            self.history.append((int(trainer.global_step), float(value)))

    def best(self) -> tuple[int, float] | None:
        """The lowest validation NLL and its step (the first of equals), or None."""
        finite = [h for h in self.history if math.isfinite(h[1])]
        return min(finite, key=lambda h: h[1]) if finite else None

    def last(self) -> tuple[int, float] | None:
        """The latest validation NLL and its step, or None."""
        return self.history[-1] if self.history else None

    def overfit(self) -> str | None:
        """A warning when the last validation NLL exceeds the best by more than
        :func:`overfit_margin`, else None."""
        best, last = self.best(), self.last()
        if best is None or last is None:
            return None
        gap = last[1] - best[1]
        if not math.isfinite(last[1]) or gap > overfit_margin(best[1]):
            return (f"the last validation NLL ({last[1]:.4f} at step {last[0]}) exceeds the best "
                    f"({best[1]:.4f} at step {best[0]}) by {gap:.4f} nats, more than "
                    f"max({OVERFIT_NATS} nats, {OVERFIT_SHARE:.0%}): the model overfit after "
                    f"step {best[0]}")
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"history": [[step, value] for step, value in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(step), float(value)) for step, value in state_dict["history"]]


class LastCheckpoint(Checkpoint):
    """Writes ``last.ckpt`` every ``every_n_steps`` training steps, beside the guard's saves.

    A save at a batch end comes before that batch's validation; when a validation follows a
    save of the same step, the file is written again after it, once the best checkpoint and the
    early-stopping counter have taken that validation in (Lightning runs checkpoint callbacks
    last, in the order given: put this one after the ``ModelCheckpoint``). A resume then starts
    from exactly the best-so-far record the uninterrupted run had. Every write goes to the one
    path: a run ends with one ``last.ckpt``.

    It also writes the run's last step (in the guard's place: Lightning runs checkpoint callbacks
    after all others, so the file holds every callback's state of that step).

    Args:
        guard: The run's guard: its path is the one written, and its record of the step last
            saved is shared, so no step is written twice by the two.
        every_n_steps: Save interval in training steps (0: only the guard's saves).
    """

    def __init__(self, guard: RunGuard, every_n_steps: int = 0) -> None:
        super().__init__()
        check_int("every_n_steps", every_n_steps, minimum=0)
        if not isinstance(guard, RunGuard):
            raise TypeError(f"guard must be a RunGuard, got {type(guard).__name__}")
        self.guard = guard
        self.every_n_steps = every_n_steps
        guard.final_save = False

    @property
    def path(self) -> Path:
        """The ``last.ckpt`` this writes (the guard's)."""
        return self.guard.last_path

    def _save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path)
        self.guard.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        due = (self.every_n_steps and step % self.every_n_steps == 0) \
            or 0 < trainer.max_steps <= step
        if due and self.guard.interrupted is None and self.guard.saved_step != step:
            self._save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (_fitting(trainer) and self.guard.interrupted is None
                and self.guard.saved_step == trainer.global_step):
            self._save(trainer)


class LearningRateDrops(L.Callback):
    """Multiplies the learning rate by ``factor`` when the validation NLL has not gone lower for
    a third, and again for two thirds, of the early-stopping patience (FFJORD's tabular
    protocol: ``factor`` 0.1).

    A run on the standard tabular sets stops after 30 validations without a lower validation
    NLL; after 10 of them the rate is ten times lower, after 20 a hundred times (see
    :func:`drop_points`). The drops stay when the NLL goes lower again (as in FFJORD), and there
    are two at most. Each acts on every parameter group of every optimizer after the validation
    that reached it, from the next training step on.

    The count of validations without a lower NLL and the drops made are saved in checkpoints
    (the optimizer's state holds the rate itself), so a resumed run drops where the
    uninterrupted one would have. The NLL compared is ``val/nll``, the mean over every process,
    and the decision to drop goes through the strategy's ``reduce_boolean_decision`` as in
    Lightning's ``EarlyStopping``: every rank drops at the same validation.

    Args:
        patience: The early-stopping patience in validations (``--early-stop-patience``).
        factor: Learning-rate multiplier at each drop, in (0, 1].

    Attributes:
        best: The lowest validation NLL so far.
        wait: Validations since the last one that lowered it.
        drops: ``(step, validations without a lower NLL)`` of each drop made.

    Example:
        >>> drops = LearningRateDrops(patience=30)
        >>> drops.points, drops.factor
        ((10, 20), 0.1)
    """

    def __init__(self, patience: int, factor: float = LR_DROP_FFJORD) -> None:
        super().__init__()
        self.points = drop_points(patience)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) \
                or not 0 < factor <= 1:
            raise ValueError(f"factor must be a number in (0, 1], got {factor!r}")
        self.patience = patience
        self.factor = float(factor)
        self.best = math.inf
        self.wait = 0
        self.drops: list[tuple[int, int]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(MONITOR)
        if value is None or not _fitting(trainer):
            return
        value = float(value)
        # The comparison of EarlyStopping (min_delta 0): equal is not lower; NaN never is.
        if value < self.best:
            self.best, self.wait = value, 0
        else:
            self.wait += 1
        due = len(self.drops) < len(self.points) and self.wait >= self.points[len(self.drops)]
        if trainer.strategy.reduce_boolean_decision(due, all=False):
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] *= self.factor
            self.drops.append((int(trainer.global_step), self.wait))

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait,
                "drops": [list(drop) for drop in self.drops]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = float(state_dict["best"])
        self.wait = int(state_dict["wait"])
        self.drops = [(int(step), int(wait)) for step, wait in state_dict["drops"]]
