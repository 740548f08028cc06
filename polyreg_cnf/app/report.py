"""Compare training runs from their CSV logs: NFE, NLL and training time, as a PNG (and HTML).

Reads ``RUN_DIR/metrics.csv`` as written by Lightning's CSVLogger (every train.py logger kind
except ``none`` writes one) and needs no network::

    python -m polyreg_cnf.app.report runs/cnf-checkerboard-poly-s0 runs/cnf-checkerboard-none-s0 \\
        --out report.png --html report.html --smooth 20

Panels: forward NFE per step, backward NFE per step, NLL per step (train and validation), and
NLL against training time (the cumulative sum of ``time/step_seconds``: the time spent in
training steps, validation excluded). Runs are labelled by folder name, or by hyperparameters
from ``hparams.yaml`` with ``--label reg,poly_coef``.
"""

from __future__ import annotations

import argparse
import base64
import html
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from polyreg_cnf.app.run_log import (
    METRIC_ALIASES,
    ReportError,
    RunLog,
    find_metrics_file,
    load_run,
    read_metrics,
    smooth,
    summarize,
)

__all__ = [
    "METRIC_ALIASES",
    "SOLVER_GAP_WARNING",
    "ReportError",
    "RunLog",
    "find_metrics_file",
    "load_run",
    "main",
    "read_metrics",
    "render_report",
    "solver_lines",
    "smooth",
    "summarize",
    "text_table",
    "write_html",
]

# ------------------------------------------------------------------ training vs evaluation solver
#: ``val/solver_gap`` (mean per-row nats between the training and the evaluation solver's
#: log-densities) above which the run summary warns: a gap this large exceeds the NLL
#: differences the project's model comparisons turn on, so the training solver's numbers no
#: longer stand for the continuous model (a model trained on a coarse grid may game it).
SOLVER_GAP_WARNING = 0.05


def solver_lines(training: str, evaluation: str, solver_gap: float | None) -> list[str]:
    """The run summary's lines on its two solvers and the last ``val/solver_gap``.

    Args:
        training: The training solve, described (:meth:`SolverConfig.describe`).
        evaluation: The evaluation solve, described.
        solver_gap: The last validation's ``val/solver_gap``; None when not measured (same
            method in training and evaluation).

    Example:
        >>> for line in solver_lines("rk4, step_size=0.5", "dopri5, atol=1e-05, rtol=1e-05",
        ...                          0.31):  # doctest: +NORMALIZE_WHITESPACE
        ...     print(line)
        training solver:            rk4, step_size=0.5
        evaluation solver:          dopri5, atol=1e-05, rtol=1e-05 (every val/test NLL)
        solver gap (val, nats):     0.3100
        WARNING: the training solver's log-densities are 0.310 nats per row off the evaluation
        solver's (threshold 0.05): its own-grid NLL does not measure this model; trust the
        evaluation solver's.
    """
    lines = [f"training solver:            {training}",
             f"evaluation solver:          {evaluation} (every val/test NLL)"]
    if solver_gap is None or not math.isfinite(solver_gap):
        return lines
    lines.append(f"solver gap (val, nats):     {solver_gap:.4f}")
    if solver_gap > SOLVER_GAP_WARNING:
        lines.append(f"WARNING: the training solver's log-densities are {solver_gap:.3f} nats per "
                     f"row off the evaluation solver's (threshold {SOLVER_GAP_WARNING:g}): its "
                     f"own-grid NLL does not measure this model; trust the evaluation solver's.")
    return lines


def render_report(runs: Sequence[RunLog], out: str | Path, smooth_window: int = 1,
                  title: str | None = None, dpi: int = 100) -> Path:
    """Draw the four comparison panels of ``runs`` into a PNG.

    Args:
        runs: The runs (one colour each).
        out: PNG file to write (its folder is created).
        smooth_window: Trailing moving average over this many points for the per-step training
            curves (validation points are drawn as logged).
        title: Figure title; default lists the run names.
        dpi: Resolution (the figure is 11 x 8 inches).

    Returns:
        The PNG path.
    """
    if not runs:
        raise ValueError("render_report needs at least one run, got none")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 8), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    (ax_fwd, ax_bwd), (ax_nll, ax_wall) = axes
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for run, colour in zip(runs, colours):
        for ax, metric in ((ax_fwd, "nfe/forward"), (ax_bwd, "nfe/backward")):
            steps, values = run.series(metric)
            if steps.size:
                ax.plot(steps, smooth(values, smooth_window), color=colour, lw=1.2,
                        label=run.name)
        steps, nll = run.series("train/nll")
        val_steps, val_nll = run.series("val/nll")
        if steps.size:
            nll_s = smooth(nll, smooth_window)
            ax_nll.plot(steps, nll_s, color=colour, lw=1.2, label=f"{run.name} train")
            wall = run.wall_time(steps)
            if np.isfinite(wall).any():
                ax_wall.plot(wall, nll_s, color=colour, lw=1.2, label=f"{run.name} train")
        if val_steps.size:
            ax_nll.plot(val_steps, val_nll, "o--", color=colour, ms=4, lw=1,
                        label=f"{run.name} val")
            val_wall = run.wall_time(val_steps)
            if np.isfinite(val_wall).any():
                ax_wall.plot(val_wall, val_nll, "o--", color=colour, ms=4, lw=1,
                             label=f"{run.name} val")
    smoothed = f" (moving average of {smooth_window})" if smooth_window > 1 else ""
    labels = (
        (ax_fwd, "training step", "function evaluations", f"forward NFE per step{smoothed}"),
        (ax_bwd, "training step", "function evaluations", f"backward NFE per step{smoothed}"),
        (ax_nll, "training step", "NLL (nats)", "negative log-likelihood"),
        (ax_wall, "training time (s, sum of step times)", "NLL (nats)", "NLL against time"),
    )
    for ax, xlabel, ylabel, panel_title in labels:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title, fontsize=11)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes,
                    color="grey")
    fig.suptitle(title or "polyreg-cnf: " + " vs ".join(run.name for run in runs), fontsize=12)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


_TABLE_COLUMNS = (
    ("steps", "steps", "{:.0f}"),
    ("train_nll_end", "train NLL (end)", "{:.3f}"),
    ("val_nll_best", "best val NLL", "{:.3f}"),
    ("test_nll", "test NLL", "{:.3f}"),
    ("nfe_forward_mean", "fwd NFE (mean)", "{:.1f}"),
    ("nfe_forward_end", "fwd NFE (end)", "{:.1f}"),
    ("nfe_backward_mean", "bwd NFE (mean)", "{:.1f}"),
    ("nfe_backward_end", "bwd NFE (end)", "{:.1f}"),
    ("test_nfe", "test NFE", "{:.1f}"),
    ("train_seconds", "train time (s)", "{:.1f}"),
)


def _cell(value: float, fmt: str) -> str:
    return "-" if not math.isfinite(value) else fmt.format(value)


def text_table(runs: Sequence[RunLog]) -> str:
    """The summary of every run as an aligned plain-text table."""
    head = ["run"] + [label for _, label, _ in _TABLE_COLUMNS]
    rows = [[run.name] + [_cell(summarize(run)[key], fmt) for key, _, fmt in _TABLE_COLUMNS]
            for run in runs]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head, *rows])


def write_html(runs: Sequence[RunLog], png: str | Path, out: str | Path) -> Path:
    """A self-contained HTML page: the PNG embedded (base64) and the summary table.

    Args:
        runs: The runs of the report.
        png: The rendered report picture.
        out: HTML file to write.

    Returns:
        The HTML path.
    """
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label, _ in _TABLE_COLUMNS)
    body = []
    for run in runs:
        stats = summarize(run)
        cells = "".join(f"<td>{_cell(stats[key], fmt)}</td>" for key, _, fmt in _TABLE_COLUMNS)
        body.append(f"<tr><th title=\"{html.escape(str(run.path))}\">{html.escape(run.name)}"
                    f"</th>{cells}</tr>")
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>polyreg-cnf report</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>\n"
        "<h1>polyreg-cnf report</h1>\n"
        f"<img alt=\"NFE and NLL of the runs\" src=\"data:image/png;base64,{data}\">\n"
        f"<table><tr><th>run</th>{head}</tr>\n" + "\n".join(body) + "\n</table>\n"
        "<p>NFE: function evaluations per training step (forward solve; backward = adjoint). "
        "End values average the last 10% of the logged steps. Training time sums "
        "time/step_seconds (validation excluded).</p>\n</body></html>\n")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------- CLI
def _labels(runs: Sequence[RunLog], keys: Sequence[str]) -> None:
    """Relabel runs from hparams keys; make duplicate folder names unique with the parent."""
    for run in runs:
        parts = [f"{key}={run.hparams[key]}" for key in keys if key in run.hparams]
        if parts:
            run.name = ", ".join(parts)
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = f"{run.path.parent.parent.name}/{run.name}"


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m polyreg_cnf.app.report``."""
    p = argparse.ArgumentParser(prog="python -m polyreg_cnf.app.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run folders holding metrics.csv (or metrics.csv files)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--html", default=None, help="also write a self-contained HTML page here")
    p.add_argument("--smooth", type=int, default=1,
                   help="moving average over N steps for the training curves (default 1: none)")
    p.add_argument("--label", default="",
                   help="comma-separated hparams.yaml keys to label runs with, e.g. reg,poly_coef "
                        "(default: folder names)")
    p.add_argument("--title", default=None, help="figure title")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the report command. Returns the process exit code (2 on a usage or data error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error(f"--smooth must be a positive integer, got {args.smooth}")
    if not args.out.lower().endswith(".png"):
        parser.error(f"--out must name a .png file, got {args.out!r}")
    try:
        runs = [load_run(run) for run in args.runs]
    except (ReportError, OSError) as err:
        print(f"report: error: {err}", file=sys.stderr)
        return 2
    _labels(runs, [k.strip() for k in args.label.split(",") if k.strip()])
    png = render_report(runs, args.out, smooth_window=args.smooth, title=args.title)
    print(text_table(runs))
    print(f"wrote {png}")
    if args.html:
        print(f"wrote {write_html(runs, png, args.html)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
