"""One builder: a :class:`~polyreg_cnf.app.config.RunConfig` in, model, DataModule, callbacks,
loggers and Trainer out.

``train.py``, the benchmarks and the tests all make their runs here. What a caller needs beyond
the configuration goes through :func:`build`'s keyword arguments: its own DataModule, extra
callbacks and Trainer plugins, or any Trainer argument (``trainer_kwargs``).

Example:
    >>> import tempfile
    >>> from polyreg_cnf.app.config import resolve
    >>> config = resolve({"data": "8gaussians", "hidden_dims": (8,), "max_steps": 2,
    ...                   "logger": "none", "accelerator": "cpu", "plot_every": 0,
    ...                   "output_dir": tempfile.mkdtemp(), "atol": 1e-3, "rtol": 1e-3})
    >>> run = build(config)
    >>> run.trainer.max_steps, [type(c).__name__ for c in run.callbacks[:4]]
    (2, ['NFEMonitor', 'RunGuard', 'ValidationRecord', 'PolynomialTrajectoryRegularizer'])
    >>> (run.run_dir / "config.yaml").is_file()
    True
    >>> execute(run, quiet=True)
    0
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.loggers import Logger

from polyreg_cnf.app.config import RunConfig
from polyreg_cnf.app.parts import (
    keep_previous_log,
    make_datamodule,
    make_model,
    make_run_dir,
    quiet_libraries,
    resolve_ckpt_path,
    set_threads,
    validation_interval,
    write_config,
)
from polyreg_cnf.app.report import solver_lines
from polyreg_cnf.app.run_logging import (
    NFEProgressBar,
    finish_loggers,
    make_logger,
    run_config,
    wandb_sync_hint,
)
from polyreg_cnf.callbacks import NFEMonitor
from polyreg_cnf.callbacks.guard import NumericalFaultError, RunGuard, describe_solver_failure
from polyreg_cnf.callbacks.plots import TrajectoryPlotter
from polyreg_cnf.callbacks.selection import (
    MONITOR,
    LastCheckpoint,
    LearningRateDrops,
    ValidationRecord,
)
from polyreg_cnf.models.checkpoint import AtomicCheckpointIO

__all__ = ["Run", "TestedWeights", "build", "execute", "load_tested_weights",
           "make_datamodule", "make_model", "stop_reason", "summary_lines", "tested_weights"]


@dataclass(frozen=True)
class Run:
    """Everything :func:`build` made, ready for ``run.trainer.fit(run.model, run.datamodule,
    ckpt_path=run.ckpt_path)`` (or :func:`execute`).

    Attributes:
        config: The configuration it was built from.
        model: The LightningModule.
        datamodule: The DataModule, set up for fitting.
        callbacks: Every callback given to the Trainer (the caller's last).
        loggers: The Lightning loggers (empty for ``logger="none"``).
        trainer: The Trainer.
        run_dir: The run's folder (logs, checkpoints, ``config.yaml``).
        ckpt_path: The checkpoint to resume from, or None for a fresh run.
        monitor: The NFE monitor among ``callbacks``.
        guard: The run guard among ``callbacks`` (signals, numerical faults).
        record: Every validation NLL of the fit, with its step.
        best: The ``ModelCheckpoint`` keeping ``best.ckpt`` (None with checkpointing off).
        early_stop: The ``EarlyStopping`` callback (None when ``early_stop_patience`` is 0).
    """

    config: RunConfig
    model: L.LightningModule
    datamodule: L.LightningDataModule
    callbacks: list[L.Callback]
    loggers: list[Logger]
    trainer: L.Trainer
    run_dir: Path
    ckpt_path: str | None
    monitor: NFEMonitor
    guard: RunGuard
    record: ValidationRecord | None = None
    best: ModelCheckpoint | None = None
    early_stop: EarlyStopping | None = None


def _selection(config: RunConfig, guard: RunGuard, ckpt_dir: Path, checkpointing: bool
               ) -> tuple[list[L.Callback], ModelCheckpoint | None, EarlyStopping | None]:
    """The callbacks that select the model: ``best.ckpt`` (the lowest validation NLL), the
    periodic ``last.ckpt`` and early stopping, in the order Lightning must run them."""
    callbacks: list[L.Callback] = []
    early_stop = None
    patience = config.training.early_stop_patience
    if patience > 0:
        # Checked at each validation (not at epoch ends): patience counts validations.
        early_stop = EarlyStopping(monitor=MONITOR, mode="min", patience=patience,
                                   check_on_train_epoch_end=False)
        callbacks.append(early_stop)
        if config.training.lr_drop < 1:
            callbacks.append(LearningRateDrops(patience, config.training.lr_drop))
    best = None
    if checkpointing:
        # One file, overwritten at each improvement: a run keeps best.ckpt and last.ckpt.
        best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=MONITOR, mode="min",
                               save_top_k=1, save_last=False, auto_insert_metric_name=False,
                               enable_version_counter=False, save_on_train_epoch_end=False)
        # After best (Lightning runs checkpoint callbacks last, in this order), so a last.ckpt
        # written after a validation holds that validation's best-so-far record.
        callbacks += [best, LastCheckpoint(guard, config.output.ckpt_every)]
    return callbacks, best, early_stop


# ------------------------------------------------------------------------------ build
def build(config: RunConfig, *, ckpt_path: str | os.PathLike | None = None,
          datamodule: L.LightningDataModule | None = None,
          callbacks: Sequence[L.Callback] = (), plugins: Sequence[Any] = (),
          trainer_kwargs: dict[str, Any] | None = None) -> Run:
    """Make the run ``config`` describes: seed, data, model, run folder, callbacks, loggers,
    Trainer.

    Sets the torch thread count and the seed, prepares and sets up the data, creates the run
    folder (``output_dir/<run name>``, or the latest one of that name when resuming with
    ``ckpt_path="last"``) and writes ``config.yaml`` there.

    Args:
        config: The run configuration (:func:`polyreg_cnf.app.config.resolve`).
        ckpt_path: Resume from this checkpoint file, or ``"last"``: the latest checkpoint of
            the latest run folder of this name (a fresh run when there is none).
        datamodule: Use this DataModule instead of the one ``config.data`` names (it is
            prepared and set up here); ``config.data`` still says which kind of data it is.
        callbacks: Extra callbacks, after the run's own.
        plugins: Extra Trainer plugins, after the atomic checkpoint writer.
        trainer_kwargs: Trainer arguments that replace the ones derived from ``config``
            (e.g. ``{"enable_checkpointing": False}`` or ``{"limit_test_batches": 2}``).

    Returns:
        The :class:`Run`.

    Raises:
        ValueError: ``ckpt_path`` names no file; bad data (from the DataModule).
        FileNotFoundError: Missing data files.
    """
    if not isinstance(config, RunConfig):
        raise TypeError(f"config must be a RunConfig (see polyreg_cnf.app.config.resolve), got "
                        f"{type(config).__name__}")
    set_threads(config)
    if not config.output.verbose:
        quiet_libraries()
    L.seed_everything(config.training.seed, workers=True, verbose=False)
    dm = make_datamodule(config) if datamodule is None else datamodule
    dm.prepare_data()
    dm.setup("fit")
    model = make_model(config, dm)

    run_dir = make_run_dir(config, resume_last=ckpt_path == "last")
    ckpt_dir = run_dir / "checkpoints"
    resume = resolve_ckpt_path(ckpt_path, ckpt_dir)
    if resume is not None:
        keep_previous_log(run_dir)

    out = config.output
    monitor = NFEMonitor()
    guard = RunGuard(ckpt_dir / "last.ckpt", ckpt_dir / "last-good.ckpt")
    record = ValidationRecord()
    own: list[L.Callback] = [monitor, guard, record]
    regularizer = config.regularizer()
    if regularizer is not None:
        own.append(regularizer)
    checkpointing = bool((trainer_kwargs or {}).get("enable_checkpointing", True))
    selection, best, early_stop = _selection(config, guard, ckpt_dir, checkpointing)
    own += selection
    if config.model == "cnf" and model.dim == 2 and out.plot_every > 0:
        own.append(TrajectoryPlotter(every_n_steps=out.plot_every))
    progress = sys.stdout.isatty() if out.progress is None else out.progress
    if progress:
        own.append(NFEProgressBar())
    poly = config.poly.settings()  # the preset's values where no flag gave one
    hparams = {**config.flat(), "poly_coef": poly["coef"], "poly_samples": poly["num_samples"],
               "poly_order": poly["order"]}
    loggers = make_logger(out.logger, run_dir, run_dir.name, run_config(hparams, regularizer))
    lr_moves = config.training.lr_schedule != "constant" \
        or any(isinstance(c, LearningRateDrops) for c in selection)
    if lr_moves and loggers:
        own.append(LearningRateMonitor(logging_interval="step"))  # logged as lr-<optimizer>
    all_callbacks = [*own, *callbacks]
    write_config(config, run_dir)  # after the CSV logger, which warns about a non-empty folder

    t, hw = config.training, config.hardware
    limit_val: float | int = t.limit_val_batches
    if limit_val > 1 and float(limit_val).is_integer():
        limit_val = int(limit_val)  # Lightning: a float is a fraction, an int a batch count
    kwargs: dict[str, Any] = dict(
        max_steps=-1 if t.max_steps is None else t.max_steps, max_epochs=t.max_epochs,
        accelerator=hw.accelerator, devices=hw.devices if hw.devices == "auto"
        else int(hw.devices), strategy=hw.strategy, num_nodes=hw.num_nodes,
        callbacks=all_callbacks, logger=loggers or False, default_root_dir=str(run_dir),
        limit_val_batches=limit_val, num_sanity_val_steps=0, enable_progress_bar=progress,
        enable_model_summary=False, enable_checkpointing=checkpointing,
        log_every_n_steps=1, plugins=[AtomicCheckpointIO(), *plugins])
    val_every = validation_interval(config, dm)
    if val_every is not None:
        kwargs.update(val_check_interval=val_every, check_val_every_n_epoch=None)
    kwargs.update(trainer_kwargs or {})
    trainer = L.Trainer(**kwargs)
    return Run(config=config, model=model, datamodule=dm, callbacks=all_callbacks,
               loggers=loggers, trainer=trainer, run_dir=run_dir, ckpt_path=resume,
               monitor=monitor, guard=guard, record=record, best=best, early_stop=early_stop)


# ------------------------------------------------------------------------------ execute
@dataclass(frozen=True)
class TestedWeights:
    """The weights a run's final test uses.

    Attributes:
        which: ``"best"`` (the lowest validation NLL) or ``"last"``.
        path: The checkpoint file the test loads, or None for the weights in memory.
        step: The training step of those weights.
        why: Why the last weights were tested when the best were asked for ("" otherwise).
    """

    which: str
    path: str | None
    step: int
    why: str = ""


def tested_weights(run: Run) -> TestedWeights:
    """The weights the final test of ``run`` uses (``--test-ckpt``), after its fit.

    ``best``: ``best.ckpt``, the weights of the lowest validation NLL, when a validation ran
    and checkpointing is on; otherwise the last weights, with the reason.
    """
    step = run.trainer.global_step
    if run.config.training.test_ckpt == "last":
        return TestedWeights("last", None, step)
    best = run.record.best() if run.record is not None else None
    if run.best is None:
        return TestedWeights("last", None, step, "checkpointing is off")
    if best is None or not run.best.best_model_path:
        return TestedWeights("last", None, step, "no validation ran")
    return TestedWeights("best", run.best.best_model_path, best[0])


def load_tested_weights(run: Run) -> TestedWeights:
    """Put the weights the final test uses (:func:`tested_weights`) into ``run.model``.

    Only the weights are loaded: ``trainer.test(ckpt_path=...)`` would also restore the
    callbacks' states of that step (the validation record, the NFE history) that the summary
    reports.
    """
    tested = tested_weights(run)
    if tested.path is not None:
        state = torch.load(tested.path, map_location="cpu", weights_only=True)
        run.model.load_state_dict(state["state_dict"])
    return tested


def stop_reason(run: Run) -> str:
    """Why the fit ended: early stopping (and why), or the step or epoch limit."""
    early, trainer = run.early_stop, run.trainer
    if early is not None and early.stopping_reason != EarlyStoppingReason.NOT_STOPPED:
        best = run.record.best() if run.record is not None else None
        since = f" (best at step {best[0]})" if best is not None else ""
        if early.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED:
            return (f"early, at step {trainer.global_step}: no lower validation NLL in the last "
                    f"{early.patience} validations{since}")
        return f"early, at step {trainer.global_step}: {early.stopping_reason_message}"
    if 0 < trainer.max_steps <= trainer.global_step:
        return f"at the step limit ({trainer.max_steps})"
    return f"at the epoch limit ({trainer.current_epoch} epochs, step {trainer.global_step})"


def execute(run: Run, prog: str = "train.py", quiet: bool = False) -> int:
    """Fit, test (unless ``test`` is off), close the loggers and print the summary.

    Args:
        run: What :func:`build` returned.
        prog: Name used in messages.
        quiet: Print no summary.

    Returns:
        The process exit code: 0 done, 3 numerical fault (the last good weights are saved),
        130 / 143 interrupted by SIGINT / SIGTERM (a checkpoint to resume from is saved).
    """
    trainer, guard, model, dm = run.trainer, run.guard, run.model, run.datamodule
    start = time.perf_counter()
    status = "failed"
    test_metrics: dict[str, float] | None = None
    tested = None
    try:
        try:
            trainer.fit(model, datamodule=dm, ckpt_path=run.ckpt_path)
        except SystemExit:
            if guard.interrupted is None:  # not ours: let it through
                raise
        except NumericalFaultError as err:
            print(f"{prog}: numerical fault: {err}", file=sys.stderr)
            return 3
        except (AssertionError, RuntimeError) as err:
            described = describe_solver_failure(err, trainer.global_step)
            if described is None:
                raise
            saved = (f" The weights of the last good step were saved to {guard.last_good_path}."
                     if guard.fault_step is not None else "")
            print(f"{prog}: numerical fault: {described}{saved}", file=sys.stderr)
            return 3
        wall = time.perf_counter() - start
        if guard.interrupted is not None:
            if trainer.is_global_zero:
                print(f"\ninterrupted by {guard.interrupted} at step {trainer.global_step}; "
                      f"checkpoint saved to {guard.last_path}. Resume with the same flags plus "
                      f"--ckpt-path last (or --ckpt-path {guard.last_path}).")
            status = "killed"
            return 143 if guard.interrupted == "SIGTERM" else 130
        if run.config.training.test:
            tested = load_tested_weights(run)
            results = trainer.test(model, datamodule=dm, verbose=False)
            test_metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
        status = "success"
    finally:
        finish_loggers(run.loggers, status)
    overfit = run.record.overfit() if run.record is not None else None
    if trainer.is_global_zero and overfit is not None:
        print(f"{prog}: warning: {overfit}", file=sys.stderr)
    if trainer.is_global_zero and not quiet:
        print("\n".join(summary_lines(run, test_metrics, wall, tested)))
    return 0


def _last_solver_gap(run: Run) -> float | None:
    """The last validation's ``val/solver_gap`` (None when it was not measured)."""
    return getattr(run.model, "last_solver_gap", None)


def _quality_lines(run: Run, test_metrics: dict[str, float] | None,
                   tested: TestedWeights | None) -> list[str]:
    """The test numbers (or "skipped"), which weights they are of, and the validation record."""
    c, nan = run.config, float("nan")
    names = [("test NLL (nats):", "test/nll")] if c.model == "cnf" else [
        ("test -ELBO (nats):", "test/neg_elbo"), ("test IS-NLL (nats):", "test/is_nll")]
    if test_metrics is None:
        lines = [f"{label:<28}skipped (--no-test)" for label, _ in names]
    else:
        lines = [f"{label:<28}{test_metrics.get(key, nan):.4f}" for label, key in names]
        if "test/bits_per_dim" in test_metrics:
            lines.append(f"test IS-NLL (bits/dim):     {test_metrics['test/bits_per_dim']:.4f}")
        lines.append(f"test NFE per batch:         {test_metrics.get('test/nfe', nan):.1f}")
    if tested is not None:
        what = (f"best validation checkpoint, step {tested.step} ({tested.path})"
                if tested.which == "best" else
                f"last weights, step {tested.step}"
                f"{f' ({tested.why})' if tested.why else ' (--test-ckpt last)'}")
        lines.append(f"tested:                     {what}")
    record = run.record
    best, last = (record.best(), record.last()) if record is not None else (None, None)
    if best is not None and last is not None:
        lines.append(f"validation NLL (nats):      best {best[1]:.4f} at step {best[0]}, last "
                     f"{last[1]:.4f} at step {last[0]} ({len(record.history)} validations)")
    lines.append(f"stopped:                    {stop_reason(run)}")
    return lines


def summary_lines(run: Run, test_metrics: dict[str, float] | None, wall: float,
                  tested: TestedWeights | None = None) -> list[str]:
    """The end-of-run summary: test quality (and which weights were tested), the validation
    record, why the fit stopped, NFE, time, where the files are.

    Args:
        run: The run, after its fit.
        test_metrics: The test's metrics, or None when the test was skipped (``--no-test``).
        wall: Training wall time in seconds.
        tested: The weights the test used (:func:`tested_weights`).
    """
    c, nan = run.config, float("nan")
    summary, window = run.monitor.summary(), run.monitor.window
    best_file = f" (best: {run.best.best_model_path})" if run.best and run.best.best_model_path \
        else ""
    lines = [
        "",
        f"== polyreg-cnf: {c.model} on {c.data}, reg={c.reg}, seed={c.training.seed} ==",
        *_quality_lines(run, test_metrics, tested),
        *solver_lines(c.solver().describe(True), c.solver().describe(False),
                      _last_solver_gap(run)),
        f"forward NFE per step:       {summary.get('forward_mean', nan):.1f} "
        f"(last {window}: {summary.get('forward_last', nan):.1f})",
        f"backward NFE per step:      {summary.get('backward_mean', nan):.1f} "
        f"(last {window}: {summary.get('backward_last', nan):.1f})",
        f"seconds per step:           {summary.get('seconds_mean', nan):.3f}",
        f"wall seconds per step:      {summary.get('wall_seconds_mean', nan):.3f} "
        f"(batch start to next batch start)",
        f"training wall time (s):     {wall:.1f}",
        f"checkpoint:                 {run.guard.last_path}{best_file}",
        f"logs:                       {run.run_dir}",
        f"configuration:              {run.run_dir / 'config.yaml'}",
        f"compare runs:               python -m polyreg_cnf.app.report {run.run_dir} [...] "
        f"--out report.png",
    ]
    sync_hint = wandb_sync_hint(run.loggers)
    if sync_hint:
        lines.append(f"W&B run is offline; upload: {sync_hint}")
    return lines
