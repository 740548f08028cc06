"""Run ``train.py ARGS`` of the checkout in the working directory, timing what its logging costs.

    python -c "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], \
        run_name='__main__')" /path/to/benchmarks/logging_probe.py OUT.json train.py ARGS...

Run by :mod:`benchmarks.logging_cost` with each tree's own interpreter and working directory, so
it imports whatever polyreg_cnf that tree has; it uses the standard library and Lightning only.
It adds up the CPU time (``time.process_time``: user + system of this process) spent

- in each training batch (Lightning's ``_TrainingEpochLoop.advance``: the step, its callbacks,
  its logging; validation runs elsewhere), and
- inside the logging calls made during those batches: ``LightningModule.log`` (``log_dict``
  loops over it), Lightning's per-step write to the loggers
  (``_LoggerConnector.update_train_step_metrics``) and, where the tree has them, the one-row
  logging functions of ``polyreg_cnf.callbacks.step_log``.

Nested logging calls count once. Writes ``{"steps", "step_cpu", "logging_cpu", ...}``.
"""

from __future__ import annotations

import functools
import json
import runpy
import sys
import time
from typing import Any

_state = {"depth": 0, "logging": 0.0, "steps": 0, "step_cpu": 0.0, "in_step": False}


def _timed_logging(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _state["depth"] or not _state["in_step"]:
            return fn(*args, **kwargs)
        _state["depth"] += 1
        start = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            _state["logging"] += time.process_time() - start
            _state["depth"] -= 1
    return wrapper


def _timed_step(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _state["in_step"] = True
        start = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            _state["step_cpu"] += time.process_time() - start
            _state["steps"] += 1
            _state["in_step"] = False
    return wrapper


def _patch_step_log() -> list[str]:
    """Wrap the step_log functions wherever they were imported by name; their names."""
    try:
        from polyreg_cnf.callbacks import step_log

        import polyreg_cnf.app.build  # noqa: F401  (imports the models and callbacks)
    except ImportError:
        return []
    names = []
    for name in ("start_step", "log_step", "finish_step"):
        original = getattr(step_log, name)
        wrapped = _timed_logging(original)
        for module in list(sys.modules.values()):
            if getattr(module, name, None) is original:
                setattr(module, name, wrapped)
        names.append(f"step_log.{name}")
    return names


def main() -> None:
    out, script, *args = sys.argv[1:]
    from lightning.pytorch.core.module import LightningModule
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
    from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import (
        _LoggerConnector,
    )

    LightningModule.log = _timed_logging(LightningModule.log)
    _LoggerConnector.update_train_step_metrics = _timed_logging(
        _LoggerConnector.update_train_step_metrics)
    _TrainingEpochLoop.advance = _timed_step(_TrainingEpochLoop.advance)
    timed = ["LightningModule.log", "_LoggerConnector.update_train_step_metrics",
             *_patch_step_log()]
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise
    with open(out, "w") as handle:
        json.dump({"steps": _state["steps"], "step_cpu": _state["step_cpu"],
                   "logging_cpu": _state["logging"], "timed": timed}, handle)


if __name__ == "__main__":
    main()
