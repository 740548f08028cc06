"""Per-step training metrics in one logger call per step, without Lightning's result collection.

Each ``LightningModule.log`` call costs about a millisecond of CPU on top of the value itself
(Lightning moves the metric's whole result entry to the value's device on every call;
``log_dict`` is a loop over ``log``), and a training step of the project logged 12 per-step
values that way. The per-step values (logged with ``on_step=True, on_epoch=False``, no
reduction across ranks) need none of that machinery, so the project's models and callbacks
hand them to :func:`log_step` instead, which

- makes them visible at once where ``self.log`` would: ``trainer.callback_metrics`` (as
  tensors) and, for the names given in ``prog_bar``, ``trainer.progress_bar_metrics``;
- gathers every value of a training batch into one row, and writes that row with one
  ``log_metrics`` call per logger (the loggers' documented API), with the step Lightning itself
  would use (``trainer.global_step`` when the batch started) and ``epoch``, at Lightning's
  cadence (``Trainer(log_every_n_steps=...)``, only on batches where the optimizer stepped).

The row is written when the last participant of the step finishes it (:func:`finish_step`):
the module itself when it takes part (its ``on_train_batch_end`` runs after every callback's),
otherwise the last participating callback in ``trainer.callbacks``. The metric names, the
steps and the cadence are the ones ``self.log`` gave; values logged with ``self.log`` by the
user's own module keep going through Lightning.
"""

from __future__ import annotations

import weakref
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import Tensor

__all__ = ["StepLogging", "finish_step", "log_step", "start_step"]


class StepLogging:
    """Marks a callback or LightningModule that logs per-step metrics through :func:`log_step`.

    It must call :func:`start_step` in ``on_train_batch_start`` and :func:`finish_step` in
    ``on_train_batch_end``, so the batch's row is opened before and written after every
    participant has added to it.
    """


@dataclass
class _Row:
    batch: tuple[int, int]  # (epoch, batch_idx): which training batch the row belongs to
    step: int  # trainer.global_step when the batch started: the logged step
    epoch: int
    values: dict[str, float | Tensor] = field(default_factory=dict)
    written: bool = False
    # trainer.callback_metrics / progress_bar_metrics, looked up once per row: each lookup
    # merges Lightning's result collection, which is what this module saves.
    callback_metrics: dict[str, Any] = field(default_factory=dict)
    progress_bar_metrics: dict[str, Any] = field(default_factory=dict)


_ROWS: weakref.WeakKeyDictionary[L.Trainer, _Row] = weakref.WeakKeyDictionary()


def start_step(trainer: L.Trainer, batch_idx: int) -> None:
    """Open the row of the training batch ``batch_idx`` (once per batch, whoever calls first).

    A row the optimizer did not step on (an accumulation micro-batch) is carried into the
    next one, as Lightning keeps the last value of each name until it logs.
    """
    key = (trainer.current_epoch, batch_idx)
    row = _ROWS.get(trainer)
    if row is not None and row.batch == key:
        return
    carried = row.values if row is not None and not row.written else {}
    _ROWS[trainer] = _Row(key, trainer.global_step, trainer.current_epoch, dict(carried),
                          callback_metrics=trainer.callback_metrics,
                          progress_bar_metrics=trainer.progress_bar_metrics)


def log_step(pl_module: L.LightningModule, values: Mapping[str, float | Tensor],
             prog_bar: Collection[str] = ()) -> None:
    """Log ``values`` for the current training step, as ``self.log(name, value, on_step=True,
    on_epoch=False)`` would, at a fraction of the cost.

    Outside a training batch opened by :func:`start_step` (no trainer, or a row already
    written) the values go through ``pl_module.log_dict`` instead.

    Args:
        pl_module: The module being trained.
        values: Metric name -> scalar (a float or a one-element tensor; tensors are detached).
        prog_bar: The names among ``values`` to show in the progress bar.
    """
    trainer = pl_module._trainer
    row = _ROWS.get(trainer) if trainer is not None else None
    if trainer is None or row is None or row.written or not trainer.training:
        shown = set(prog_bar)
        for name, value in values.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1,
                          prog_bar=name in shown)
        return
    callback_metrics, bar = row.callback_metrics, row.progress_bar_metrics
    for name, value in values.items():
        if isinstance(value, Tensor):
            value = value.detach()
            callback_metrics[name] = value
        else:
            value = float(value)
            callback_metrics[name] = torch.tensor(value)
        row.values[name] = value
        if name in prog_bar:
            bar[name] = float(value)


def finish_step(trainer: L.Trainer, caller: object) -> None:
    """Write the batch's row if ``caller`` is the step's last participant and the optimizer
    stepped on this batch, at the ``log_every_n_steps`` cadence.

    Args:
        trainer: The trainer.
        caller: The participant finishing its part (a callback, or the LightningModule).
    """
    row = _ROWS.get(trainer)
    if row is None or row.written or not _is_last(trainer, caller):
        return
    if trainer.global_step == row.step:  # no optimizer step on this batch: keep accumulating
        return
    row.written = True
    every = trainer.log_every_n_steps
    if not row.values or not trainer.loggers or every <= 0 or (row.step + 1) % every:
        return
    metrics: dict[str, Any] = {name: float(v) for name, v in row.values.items()}
    metrics.setdefault("epoch", row.epoch)
    trainer.logged_metrics.update(metrics)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=row.step)
        logger.save()


def _is_last(trainer: L.Trainer, caller: object) -> bool:
    module = trainer.lightning_module
    if isinstance(module, StepLogging):
        return caller is module
    last = None
    for callback in trainer.callbacks:
        if isinstance(callback, StepLogging):
            last = callback
    return caller is last
