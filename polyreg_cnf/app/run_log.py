"""Reading training runs back from their CSV logs: the metrics table, its aliases and summary.

A run folder holds ``metrics.csv`` as written by Lightning's CSVLogger (every train.py logger
kind except ``none`` writes one). :func:`load_run` reads it into a :class:`RunLog`;
:func:`summarize` reduces a run to the figures the report's table shows. The report itself
(:mod:`polyreg_cnf.app.report`, which re-exports these names) draws and tabulates them.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from polyreg_cnf.engine._checks import check_int
from polyreg_cnf.engine.errors import PolyregCNFError

__all__ = [
    "METRIC_ALIASES",
    "ReportError",
    "RunLog",
    "find_metrics_file",
    "load_run",
    "read_metrics",
    "smooth",
    "summarize",
]

#: A metric and the column names Lightning may have given it: a metric logged with both
#: ``on_step`` and ``on_epoch`` gets ``_step`` / ``_epoch`` suffixes in the CSV.
METRIC_ALIASES: dict[str, tuple[str, ...]] = {
    "train/nll": ("train/nll_step", "train/nll"),
    "val/nll": ("val/nll", "val/nll_epoch"),
    "test/nll": ("test/nll", "test/nll_epoch"),
    "nfe/forward": ("nfe/forward", "nfe/forward_step"),
    "nfe/backward": ("nfe/backward", "nfe/backward_step"),
    "time/step_seconds": ("time/step_seconds", "time/step_seconds_step"),
    "reg/poly": ("reg/poly_step", "reg/poly"),
    "val/nfe": ("val/nfe", "val/nfe_epoch"),
    "test/nfe": ("test/nfe", "test/nfe_epoch"),
    "val/solver_gap": ("val/solver_gap", "val/solver_gap_epoch"),
}


_SEARCH_DEPTH = 3  # how deep below RUN_DIR to look for a single metrics.csv


class ReportError(PolyregCNFError, ValueError):
    """A run folder or log the report cannot use; the message names the file and the fix."""


# ---------------------------------------------------------------------------------- reading
def read_metrics(path: str | Path) -> dict[str, np.ndarray]:
    """Read a Lightning ``metrics.csv`` into float columns, NaN where a cell is empty.

    Lightning writes one row per logging call, with empty cells for the metrics not logged in
    it. The reader is lenient with what interrupted or resumed runs leave behind: short rows
    are padded, cells beyond the header and unparsable cells are ignored (NaN), and a repeated
    header line (a resumed run appending to the file) is skipped.

    Args:
        path: The CSV file.

    Returns:
        Column name -> float64 array, all of the same length (one entry per data row).

    Raises:
        ReportError: The file is empty or has no header.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows or not any(cell.strip() for cell in rows[0]):
        raise ReportError(f"{path} is empty; expected a CSV header line such as "
                          f"'epoch,nfe/forward,...,step' written by Lightning's CSVLogger")
    header = [cell.strip() for cell in rows[0]]
    values = np.full((len(rows) - 1, len(header)), np.nan)
    kept = 0
    for row in rows[1:]:
        if [cell.strip() for cell in row] == header or not any(cell.strip() for cell in row):
            continue
        for col, cell in enumerate(row[:len(header)]):
            values[kept, col] = _to_float(cell)
        kept += 1
    return {name: values[:kept, col] for col, name in enumerate(header) if name}


def _to_float(cell: str) -> float:
    try:
        return float(cell)
    except ValueError:
        return math.nan


def find_metrics_file(run: str | Path) -> Path:
    """The ``metrics.csv`` of a run: ``run`` itself if it is a file, else ``run/metrics.csv``.

    When ``run/metrics.csv`` is missing, a single ``metrics.csv`` up to three folders deeper
    (Lightning's default ``lightning_logs/version_0/``) is accepted.

    Raises:
        ReportError: The folder does not exist, has no metrics.csv, or has several below it.
    """
    run = Path(run)
    if run.is_file():
        return run
    if not run.is_dir():
        raise ReportError(f"run folder {str(run)!r} does not exist; expected a folder holding "
                          f"metrics.csv (a train.py run directory) or the path of a metrics.csv")
    direct = run / "metrics.csv"
    if direct.is_file():
        return direct
    nested = sorted(p for depth in range(2, _SEARCH_DEPTH + 2)
                    for p in run.glob("/".join(["*"] * (depth - 1) + ["metrics.csv"])))
    if len(nested) == 1:
        return nested[0]
    if nested:
        listed = ", ".join(str(p) for p in nested)
        raise ReportError(f"run folder {str(run)!r} has no metrics.csv but several below it "
                          f"({listed}); pass the folder of the one you mean")
    raise ReportError(f"run folder {str(run)!r} has no metrics.csv; expected {str(direct)!r} "
                      f"as written by Lightning's CSVLogger (train.py writes it with every "
                      f"--logger except 'none')")


@dataclass
class RunLog:
    """The logged metrics of one run.

    Attributes:
        name: Label in the legend and the table.
        path: The metrics.csv file.
        columns: Column name -> float array (NaN where not logged), see :func:`read_metrics`.
        hparams: Contents of ``hparams.yaml`` next to the CSV (empty when absent).
    """

    name: str
    path: Path
    columns: dict[str, np.ndarray]
    hparams: dict[str, Any] = field(default_factory=dict)

    def column(self, metric: str) -> str | None:
        """The CSV column holding ``metric`` (see :data:`METRIC_ALIASES`), or None."""
        for name in METRIC_ALIASES.get(metric, (metric,)):
            if name in self.columns and np.isfinite(self.columns[name]).any():
                return name
        return None

    def series(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of the rows where ``metric`` was logged, sorted by step.

        Empty arrays when the run never logged it.
        """
        name = self.column(metric)
        if name is None or "step" not in self.columns:
            return np.empty(0), np.empty(0)
        steps, values = self.columns["step"], self.columns[name]
        keep = np.isfinite(values) & np.isfinite(steps)
        order = np.argsort(steps[keep], kind="stable")
        return steps[keep][order], values[keep][order]

    def wall_time(self, steps: np.ndarray) -> np.ndarray:
        """Training time (s) reached at each of ``steps``: cumulative ``time/step_seconds``.

        NaN everywhere when the run did not log step times.
        """
        t_steps, seconds = self.series("time/step_seconds")
        if t_steps.size == 0:
            return np.full(steps.shape, np.nan)
        # Step s logs the time of the batch that made global step s + 1, so the time spent
        # up to step s is the sum over rows with step <= s.
        return np.interp(steps, t_steps, np.cumsum(seconds))


def load_run(run: str | Path, name: str | None = None) -> RunLog:
    """Read one run: its metrics.csv (see :func:`find_metrics_file`) and hparams.yaml.

    Args:
        run: The run folder (or its metrics.csv).
        name: Label; default the run folder's name.

    Raises:
        ReportError: No usable metrics.csv.
    """
    path = find_metrics_file(run)
    # A resumed train.py run keeps its earlier rows in metrics.part<k>.csv (Lightning's CSV
    # logger starts a fresh metrics.csv); read them first so the curves cover the whole run.
    parts = sorted(path.parent.glob("metrics.part*.csv"),
                   key=lambda p: int("".join(ch for ch in p.stem if ch.isdigit()) or 0))
    columns = _concatenate([read_metrics(p) for p in [*parts, path]])
    if "step" not in columns:
        raise ReportError(f"{path} has no 'step' column (columns: {', '.join(columns)}); "
                          f"expected a metrics.csv written by Lightning's CSVLogger")
    if not len(columns["step"]):
        raise ReportError(f"{path} has a header but no metric rows yet; let the run log a few "
                          f"steps first")
    hparams: dict[str, Any] = {}
    hparams_file = path.parent / "hparams.yaml"
    if hparams_file.is_file():
        import yaml  # a dependency of Lightning

        try:
            loaded = yaml.safe_load(hparams_file.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            loaded = None  # unreadable hyperparameters only cost the label
        hparams = loaded if isinstance(loaded, dict) else {}
    label = name or (Path(run).name if Path(run).is_dir() else path.parent.name)
    return RunLog(name=label, path=path, columns=columns, hparams=hparams)


def _concatenate(tables: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack column tables row-wise; a column missing from a table is NaN there."""
    if len(tables) == 1:
        return tables[0]
    names = list(dict.fromkeys(name for table in tables for name in table))
    out = {}
    for name in names:
        pieces = []
        for table in tables:
            rows = len(next(iter(table.values()))) if table else 0
            pieces.append(table.get(name, np.full(rows, np.nan)))
        out[name] = np.concatenate(pieces)
    return out


# ---------------------------------------------------------------------------------- maths
def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (the first points average fewer).

    Args:
        values: 1-D array without NaN.
        window: Points per average; 1 returns the values unchanged.
    """
    check_int("window", window)
    values = np.asarray(values, dtype=float)
    if window == 1 or values.size == 0:
        return values
    total = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, values.size + 1)
    starts = np.maximum(ends - window, 0)
    return (total[ends] - total[starts]) / (ends - starts)


def summarize(run: RunLog, tail: float = 0.1) -> dict[str, float]:
    """Headline numbers of one run (NaN where not logged).

    Args:
        run: The run.
        tail: Fraction of the last training points averaged for the ``*_end`` numbers.

    Returns:
        ``steps``, ``train_nll_end``, ``val_nll_best``, ``val_nll_last``, ``test_nll``,
        ``nfe_forward_mean``, ``nfe_forward_end``, ``nfe_backward_mean``, ``nfe_backward_end``,
        ``test_nfe``, ``train_seconds``.
    """
    def last(metric: str) -> float:
        values = run.series(metric)[1]
        return float(values[-1]) if values.size else math.nan

    def mean(metric: str, end: bool) -> float:
        values = run.series(metric)[1]
        if values.size == 0:
            return math.nan
        if end:
            values = values[-max(1, int(round(values.size * tail))):]
        return float(values.mean())

    val = run.series("val/nll")[1]
    seconds = run.series("time/step_seconds")[1]
    steps = run.columns["step"][np.isfinite(run.columns["step"])]
    return {
        "steps": float(steps.max() + 1) if steps.size else math.nan,
        "train_nll_end": mean("train/nll", end=True),
        "val_nll_best": float(val.min()) if val.size else math.nan,
        "val_nll_last": float(val[-1]) if val.size else math.nan,
        "test_nll": last("test/nll"),
        "nfe_forward_mean": mean("nfe/forward", end=False),
        "nfe_forward_end": mean("nfe/forward", end=True),
        "nfe_backward_mean": mean("nfe/backward", end=False),
        "nfe_backward_end": mean("nfe/backward", end=True),
        "test_nfe": last("test/nfe"),
        "train_seconds": float(seconds.sum()) if seconds.size else math.nan,
    }


# ---------------------------------------------------------------------------------- drawing
