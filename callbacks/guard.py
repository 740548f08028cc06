"""Keeps long runs safe: checkpoints on SIGTERM/SIGINT, numerical-fault stops, exact RNG resume."""

from __future__ import annotations

import random
import signal
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from polyreg_cnf.engine import NFELimitError, PolyregCNFError, solver_failure

__all__ = ["NumericalFaultError", "RunGuard", "describe_solver_failure"]

_HINT = ("try a looser --atol/--rtol, a smaller --lr, a --max-nfe cap, or a trajectory "
         "regularizer (--reg poly)")


class NumericalFaultError(PolyregCNFError, RuntimeError):
    """Training produced NaN/inf, or the ODE solver gave up; the message says what to try."""


def _rng_state() -> dict[str, Any]:
    # Plain Python values and tensors only, so checkpoints load with weights_only=True.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "python": list(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RunGuard(L.Callback):
    """Makes a run safe to interrupt and honest about numerical failure.

    * SIGTERM (e.g. a scheduler's pre-emption) and SIGINT (the first Ctrl+C; a second one
      aborts) end the run at the end of the current batch, after saving ``last_path``;
      ``interrupted`` tells the caller. No validation runs after it (Lightning runs one when
      ``should_stop`` is set: the guard sets ``trainer.limit_val_batches = 0``, which turns
      validation off for the rest of the fit) and the caller runs no test. Under DDP the
      processes agree on the batch, whichever of them got the signal. In one process a signal
      during validation stops at the end of the current validation batch (the checkpoint
      resumes the validation); under DDP it is acted on at the first training batch end after
      the validation (docs/long-runs.md).
    * A non-finite gradient (checked after the backward pass, where all DDP processes agree)
      saves the weights of the last good step to ``last_good_path`` and raises
      :class:`NumericalFaultError` naming the step. A :class:`polyreg_cnf.SolverError` (the
      solver gave up, e.g. its step size underflowed; :class:`polyreg_cnf.NFELimitError`
      included) is turned into the same error.
    * The global RNG streams (torch, numpy, python) are saved with each checkpoint and restored
      before the first batch after a resume, so Hutchinson probes and penalty times repeat.
    * The final state is saved to ``last_path`` when training ends.

    Args:
        last_path: Where the latest checkpoint lives (``.../last.ckpt``).
        last_good_path: Where to save the weights of the last good step on a numerical fault.

    Example:
        >>> guard = RunGuard("runs/a/last.ckpt", "runs/a/last_good.ckpt")
        >>> guard.interrupted is None, guard.last_path.name
        (True, 'last.ckpt')
        >>> sorted(guard.state_dict())
        ['rng']
    """

    def __init__(self, last_path: str | Path, last_good_path: str | Path) -> None:
        super().__init__()
        self.last_path = Path(last_path)
        self.last_good_path = Path(last_good_path)
        self.interrupted: str | None = None
        self._sigint = False
        self._sigterm = False
        self._old_sigint: Any = None
        self._pending_rng: dict[str, Any] | None = None
        self._mid_validation: str | None = None
        # A validation that a signal stop skipped or cut short: the checkpoint then resumes at
        # its start (see on_save_checkpoint).
        self._validation_pending = False
        # The RNG streams at the last training batch end: a validation puts them back when it
        # ends, so that validating (its data loader draws a seed) leaves training's random
        # numbers as they were, and a resumed run that validates first draws the same ones.
        self._rng_at_batch_end: dict[str, Any] | None = None
        self._validating = False
        self.fault_step: int | None = None
        #: The global step ``last_path`` was last written at (by this guard, or by a
        #: :class:`~polyreg_cnf.callbacks.selection.LastCheckpoint` sharing it).
        self.saved_step: int | None = None
        #: Whether this guard writes ``last_path`` at the run's last step. A
        #: :class:`~polyreg_cnf.callbacks.selection.LastCheckpoint` takes that save over: Lightning
        #: runs it after every other callback's batch end, so the file holds their states of
        #: that step (this guard's own batch end comes before the regularizer's).
        self.final_save = True

    # ------------------------------------------------------------------ signals
    # Both handlers only set a flag; the run stops at a batch end where every process agrees
    # (_signal_seen). For SIGTERM ours replaces Lightning's handler for the training: Lightning's
    # own handler calls a collective broadcast inside the handler and stops each process at its
    # own epoch end, which hangs a DDP run when one process gets the signal (seen here with the
    # signal on the second of two processes) and, in one process, ended a run signalled between
    # batches with exit code 0 and no checkpoint.
    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self._sigint:  # second Ctrl+C: the user really wants out now
            raise KeyboardInterrupt
        self._sigint = True
        rank_zero_info("\nSIGINT received: saving a checkpoint at the end of this batch "
                       "(press Ctrl+C again to abort at once)")

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        # No forwarding to the processes Lightning's launcher started (Lightning's handler does
        # that): they learn of it at the next batch end, where every process agrees.
        self._sigterm = True

    @staticmethod
    def _install(signum: int, handler: Any) -> Any:
        try:
            return signal.signal(signum, handler)
        except ValueError:  # not the main thread (e.g. a notebook worker): leave it alone
            return None

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._old_sigint = self._install(signal.SIGINT, self._on_sigint)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning installs its SIGTERM handler after on_fit_start and puts back the one from
        # before the fit when the fit ends, so ours goes in here and needs no restoring.
        self._install(signal.SIGTERM, self._on_sigterm)

    def _restore_sigint(self) -> None:
        if self._old_sigint is not None:
            signal.signal(signal.SIGINT, self._old_sigint)
            self._old_sigint = None

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self._pending_rng is not None:
            _set_rng_state(self._pending_rng)
            self._pending_rng = None

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._rng_at_batch_end = _rng_state()
        got = self._signal_seen(trainer)
        if got is None:
            if self.final_save and 0 < trainer.max_steps <= trainer.global_step:
                # The last step: save here, mid-epoch state included, so that extending the
                # run later continues exactly as a longer uninterrupted run would have.
                trainer.save_checkpoint(self.last_path)
                self.saved_step = trainer.global_step
            return
        self._stop(trainer, got, batch_end=True)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A signal that came after the epoch's last batch-end check: stop here rather than one
        # batch into the next epoch (an epoch-end checkpoint resumes exactly).
        got = None if self.interrupted is not None else self._signal_seen(trainer)
        if got is not None:
            self._stop(trainer, got, batch_end=False)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validating = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._validating:
            return
        self._validating = False
        if self._pending_rng is not None:  # a resumed run's first validation: the saved streams
            _set_rng_state(self._pending_rng)
            self._pending_rng = None
        elif self._rng_at_batch_end is not None:
            _set_rng_state(self._rng_at_batch_end)

    @override
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        # A scheduler's grace period may be shorter than a validation at the evaluation
        # tolerance: in one process, stop now (on_exception saves, and the checkpoint resumes
        # inside this validation). Under DDP the processes may hold different numbers of
        # validation batches, so no agreement is possible here: they stop at the first training
        # batch end after the validation.
        if ((self._sigterm or self._sigint) and self.interrupted is None
                and trainer.world_size == 1 and trainer.state.fn == TrainerFn.FITTING
                and not trainer.sanity_checking):
            self._mid_validation = "SIGTERM" if self._sigterm else "SIGINT"
            self._validation_pending = True
            raise SIGTERMException

    def _signal_seen(self, trainer: L.Trainer) -> str | None:
        """The signal any process has received ("SIGTERM" first), the same on every process.

        A scheduler's SIGTERM (or a terminal's Ctrl+C) reaches the processes of a DDP run at
        slightly different points of a step, and saving is collective, so every process must
        decide to stop at the same batch: the flags are reduced with "any" (nothing in one
        process; one two-element all-reduce per step under DDP).
        """
        # Lightning's flag too, in case its handler is the one installed (a non-main thread).
        term = self._sigterm or bool(getattr(trainer, "received_sigterm", False))
        interrupt = self._sigint
        if trainer.world_size > 1:
            flags = torch.tensor([term, interrupt], dtype=torch.float32,
                                 device=trainer.strategy.root_device)
            term, interrupt = (bool(v) for v in
                               trainer.strategy.reduce(flags, reduce_op="max").tolist())
        return "SIGTERM" if term else "SIGINT" if interrupt else None

    def _stop(self, trainer: L.Trainer, got: str, batch_end: bool) -> None:
        # Every process gets here at the same batch (see _signal_seen) and takes part in saving.
        if batch_end:  # (at an epoch's end the epoch's validation has run)
            fetcher = trainer.fit_loop._data_fetcher
            # The same on every process: it depends on the step and the settings only.
            self._validation_pending = bool(
                fetcher is not None
                and trainer.fit_loop.epoch_loop._should_check_val_fx(fetcher))
        trainer.save_checkpoint(self.last_path)
        self.saved_step = trainer.global_step
        self.interrupted = got
        trainer.should_stop = True
        # Lightning validates once more when should_stop is set (an early stop's last check);
        # after a signal that validation could outlast the grace period. With no validation
        # batches, Trainer.enable_validation is false for the rest of the fit.
        trainer.limit_val_batches = 0
        rank_zero_info(f"{got}: saved {self.last_path} at step {trainer.global_step}; resume "
                       f"with --ckpt-path last")

    # ------------------------------------------------------------------ numerical faults
    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        bad = [name for name, p in pl_module.named_parameters()
               if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        if not bad:
            return
        # The optimizer has not stepped yet: the weights are still those of the last good step.
        trainer.save_checkpoint(self.last_good_path, weights_only=False)
        self.fault_step = trainer.global_step
        raise NumericalFaultError(
            f"non-finite gradient at step {trainer.global_step} (in {', '.join(bad[:3])}"
            f"{' ...' if len(bad) > 3 else ''}); the weights of the last good step were saved to "
            f"{self.last_good_path}. The loss or the ODE state diverged: {_HINT}.")

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self._restore_sigint()
        if isinstance(exception, SIGTERMException) and self.interrupted is None \
                and trainer.world_size == 1:
            # Raised inside validation, by on_validation_batch_end above (or by Lightning, if its
            # handler is the one installed): the checkpoint resumes inside the validation.
            # Under DDP the processes need not all be here, so the collective save is skipped.
            trainer.save_checkpoint(self.last_path)
            self.saved_step = trainer.global_step
            self.interrupted = self._mid_validation or "SIGTERM"
            rank_zero_info(f"{self.interrupted}: saved {self.last_path} at step "
                           f"{trainer.global_step}; resume with --ckpt-path last")
            return
        if describe_solver_failure(exception, trainer.global_step) is not None \
                and trainer.world_size == 1:
            # The failing step never reached the optimizer: the weights are the last good ones.
            # (Under DDP the other processes are not here to join the save, so it is skipped.)
            trainer.save_checkpoint(self.last_good_path)
            self.fault_step = trainer.global_step

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_sigint()

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.interrupted is None and self.saved_step != trainer.global_step:
            trainer.save_checkpoint(self.last_path)
            self.saved_step = trainer.global_step

    # ------------------------------------------------------------------ state
    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if not self._validation_pending:
            return
        # A validation was due at this step and the stop skipped it (or cut it short). Lightning
        # resumes past a due validation unless its checkpoint was written inside one, between a
        # batch's start and its end; so the validation's progress is written as "started its
        # first batch, nothing processed": the resumed run then runs the whole validation first,
        # and the validation record, best.ckpt and the early-stopping counter come out as in an
        # uninterrupted run. (Lightning's loop-state layout, 2.6; tests/test_resume.py checks it.)
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get(
            "epoch_loop.val_loop.batch_progress")
        if progress is None:
            return
        total, current = progress["total"], progress["current"]
        done = total["completed"] - (current["completed"] if self._mid_validation else 0)
        progress["total"] = {"ready": done + 1, "started": done + 1, "processed": done,
                             "completed": done}
        progress["current"] = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
        progress["is_last_batch"] = False

    @override
    def state_dict(self) -> dict[str, Any]:
        # Inside (or instead of) a validation: the streams of the batch end before it, the ones
        # the resumed run's training must continue from.
        before_validation = self._validating or self._validation_pending
        if before_validation and self._rng_at_batch_end is not None:
            return {"rng": self._rng_at_batch_end}
        return {"rng": _rng_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_rng = state_dict.get("rng")


def describe_solver_failure(exception: BaseException, step: int) -> NumericalFaultError | None:
    """Turn a solver failure into a NumericalFaultError with advice, or return None.

    Example:
        >>> from polyreg_cnf import SolverError
        >>> error = describe_solver_failure(SolverError("underflow in dt 1e-17"), step=12)
        >>> type(error).__name__, "training step 12" in str(error), "--rtol" in str(error)
        ('NumericalFaultError', True, True)
        >>> describe_solver_failure(KeyError("x"), step=12) is None
        True
    """
    failure = solver_failure(exception)
    if isinstance(failure, NFELimitError):
        return NumericalFaultError(f"at training step {step}: {failure}")
    if failure is not None:
        return NumericalFaultError(
            f"the ODE solver gave up at training step {step} ({failure}): the dynamics became "
            f"too stiff to integrate; {_HINT}.")
    return None
