"""Logs function evaluations (NFE) of every ODE block: forward, backward, per block, per phase."""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any

import lightning as L
from polyreg_cnf.callbacks.step_log import StepLogging, finish_step, log_step, start_step
from typing_extensions import override

from polyreg_cnf.engine._checks import check_int
from polyreg_cnf.engine.nfe import NFECounter, collect_nfe, record_nfe, reset_nfe

__all__ = ["NFEMonitor"]


class NFEMonitor(L.Callback, StepLogging):
    """Logs NFE per training step and mean NFE per evaluation batch.

    Training (per step): ``nfe/forward``, ``nfe/backward``, ``nfe/total``,
    ``nfe/block_<i>/forward|backward``, ``solver/accepted_steps``, ``solver/rejected_steps``,
    ``time/step_seconds``. Evaluation (per epoch): ``val/nfe`` and ``test/nfe``, the mean forward
    NFE per batch. One evaluation is one call of the ODE right-hand side.

    Counted: every ODE block of the module, and the solves made through the drop-in
    :func:`polyreg_cnf.odeint` / :func:`polyreg_cnf.odeint_adjoint` (directly or through the
    regularizer's ``intercept_torchdiffeq``) during training and evaluation batches, which add up
    in the totals and are logged as ``nfe/odeint/forward|backward`` (the user's function object
    is left alone). Bare torchdiffeq calls are invisible.

    The per-step values join the step's one logger row (:mod:`polyreg_cnf.callbacks.step_log`)
    instead of costing one ``self.log`` call each. The monitor also keeps a running summary
    (:meth:`summary`) that survives checkpoints.

    Args:
        per_block: Also log each block's counts.
        window: Length of the trailing window reported as ``*_last`` in :meth:`summary`.
    """

    def __init__(self, per_block: bool = True, window: int = 100) -> None:
        super().__init__()
        check_int("window", window)
        self.per_block = per_block
        self.window = window
        self.history: list[tuple[int, int, float]] = []  # (forward, backward, seconds) per step
        #: Wall seconds between consecutive training batch starts (what a step costs a user:
        #: logging, the optimizer, data loading included); intervals holding an evaluation
        #: are left out.
        self.intervals: list[float] = []
        self._t0 = 0.0
        self._last_start: float | None = None
        self._eval: list[int] = []
        #: Counts of the drop-in solves of the current batch.
        self.dropin = NFECounter()
        self._counting: ExitStack | None = None

    def _count_dropin(self) -> None:
        """Reset the drop-in counter and count the batch's drop-in solves into it."""
        self._stop_counting()
        self.dropin.reset()
        self._counting = ExitStack()
        self._counting.enter_context(record_nfe(self.dropin))

    def _stop_counting(self) -> None:
        # Backward evaluations still reach the counter: each solve keeps a reference to it.
        if self._counting is not None:
            self._counting.close()
            self._counting = None

    def _collect(self, pl_module: L.LightningModule) -> dict[str, Any]:
        return collect_nfe(pl_module, extra=[self.dropin] if self.dropin.solves else [])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_counting": None}

    # ------------------------------------------------------------------ training
    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        start_step(trainer, batch_idx)
        reset_nfe(pl_module)
        self._count_dropin()
        self._t0 = time.perf_counter()
        if self._last_start is not None:
            self.intervals.append(self._t0 - self._last_start)
        self._last_start = self._t0

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        seconds = time.perf_counter() - self._t0
        self._stop_counting()
        stats = self._collect(pl_module)
        self.history.append((int(stats["forward"]), int(stats["backward"]), seconds))
        values = {
            "nfe/forward": float(stats["forward"]),
            "nfe/backward": float(stats["backward"]),
            "nfe/total": float(stats["total"]),
            "solver/accepted_steps": float(stats["accepted"]),
            "solver/rejected_steps": float(stats["rejected"]),
            "time/step_seconds": seconds,
        }
        blocks = stats["blocks"]
        if self.dropin.solves:
            *blocks, dropin = blocks
            values["nfe/odeint/forward"] = float(dropin["forward"])
            values["nfe/odeint/backward"] = float(dropin["backward"])
        if self.per_block:
            for i, block in enumerate(blocks):
                values[f"nfe/block_{i}/forward"] = float(block["forward"])
                values[f"nfe/block_{i}/backward"] = float(block["backward"])
        log_step(pl_module, values, prog_bar=("nfe/forward", "nfe/backward"))
        finish_step(trainer, self)

    # ------------------------------------------------------------------ evaluation
    def _eval_start(self) -> None:
        self._eval = []
        self._last_start = None  # the next interval would hold this evaluation

    def _eval_batch_start(self, pl_module: L.LightningModule) -> None:
        reset_nfe(pl_module)
        self._count_dropin()

    def _eval_batch_end(self, pl_module: L.LightningModule) -> None:
        self._stop_counting()
        self._eval.append(int(self._collect(pl_module)["forward"]))

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self._stop_counting()

    def _eval_end(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> None:
        if trainer.sanity_checking or not self._eval:
            return
        mean = sum(self._eval) / len(self._eval)
        pl_module.log(name, mean, on_epoch=True, sync_dist=True, batch_size=1)

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start()

    @override
    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                  batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch_start(pl_module)

    @override
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        self._eval_batch_end(pl_module)

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_end(trainer, pl_module, "val/nfe")

    @override
    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start()

    @override
    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                            batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch_start(pl_module)

    @override
    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch_end(pl_module)

    @override
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_end(trainer, pl_module, "test/nfe")
        self.last_test_nfe = sum(self._eval) / max(len(self._eval), 1)

    # ------------------------------------------------------------------ summary and state
    def summary(self) -> dict[str, float]:
        """Mean forward/backward NFE and seconds per training step, overall and over the window.

        ``seconds_*`` time each step from its batch start to its batch end (the figure earlier
        runs recorded); ``wall_seconds_*`` time it from one batch start to the next, which adds
        what Lightning and the callbacks do between steps (logging, the optimizer, data
        loading), evaluations left out.
        """
        out: dict[str, float] = {"steps": float(len(self.history))}
        if not self.history:
            return out
        for label, rows in (("mean", self.history), ("last", self.history[-self.window:])):
            n = len(rows)
            out[f"forward_{label}"] = sum(r[0] for r in rows) / n
            out[f"backward_{label}"] = sum(r[1] for r in rows) / n
            out[f"seconds_{label}"] = sum(r[2] for r in rows) / n
        for label, gaps in (("mean", self.intervals), ("last", self.intervals[-self.window:])):
            if gaps:
                out[f"wall_seconds_{label}"] = sum(gaps) / len(gaps)
        return out

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "intervals": list(self.intervals)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [tuple(r) for r in state_dict.get("history", [])]
        self.intervals = [float(x) for x in state_dict.get("intervals", [])]
