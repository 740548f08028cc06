"""TPR under model selection: test NLL at the best validation checkpoint and at the last weights.

Small tables overfit: the validation NLL has a minimum and then rises. This benchmark trains
each arm (no regularizer; TPR at coef 5, the paper's) on small tables that overfit, three seeds
each (the seed also draws the split), for a fixed number of steps with a validation every 10
steps and no early stop, and reports per arm:

* the test NLL of the best validation checkpoint (what ``train.py`` now tests by default) and of
  the last weights (what it tested before, ``--test-ckpt last``);
* the step of the best validation, and how many seeds overfit (the last validation NLL above the
  best by more than :func:`polyreg_cnf.callbacks.selection.overfit_margin`);
* per table, TPR's best-validation step minus the baseline's, paired by seed: whether TPR
  changes how soon a model starts to overfit.

Tables (written to a temporary folder, read through the user-table support, ``--data t.npy``),
all bundled with scikit-learn as CSV files, so nothing is downloaded:

* ``breast_cancer200``: 200 rows (a seeded subsample) of the breast-cancer features (569 rows,
  30 columns);
* ``wine178``: all 178 rows of the wine features (13 columns).

Run from the repository root::

    python -m benchmarks.selection            # writes benchmarks/results/selection.{json,md}
    python -m benchmarks.selection --quick    # one seed, fewer steps (a smoke run)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from polyreg_cnf.callbacks.selection import ValidationRecord

from polyreg_cnf.app.build import build, load_tested_weights
from polyreg_cnf.app.config import resolve

RESULTS = Path(__file__).resolve().parent / "results"

#: Arm name -> the options that make it.
ARMS: dict[str, dict[str, Any]] = {
    "none": {"reg": "none"},
    "tpr_c5": {"reg": "poly", "poly_coef": 5.0},
}

#: Table name -> its run settings and arms. Few rows and a learning rate of 2e-2 push both
#: tables past their validation minimum within the run (the baseline's came at step 60 on
#: breast_cancer200 in a first 100-step look); 200 steps leave room for a later minimum under
#: TPR. The whole benchmark is meant to fit ~10 minutes of one core.
TABLES: dict[str, dict[str, Any]] = {
    "breast_cancer200": dict(max_steps=200, val_every=10, batch_size=128, hidden_dims=(64, 64),
                             lr=2e-2, arms=("none", "tpr_c5")),
    "wine178": dict(max_steps=200, val_every=10, batch_size=128, hidden_dims=(64, 64),
                    lr=2e-2, arms=("none", "tpr_c5")),
}

#: Solver tolerances of every run: training, then evaluation (validation and test).
TOLERANCES = dict(atol=1e-3, rtol=1e-3, eval_atol=1e-4, eval_rtol=1e-4)


def write_sklearn_table(path: Path, name: str, rows: int | None = None, seed: int = 0) -> Path:
    """The features of scikit-learn's bundled table ``name`` (``breast_cancer`` or ``wine``),
    read from the CSV file it ships (its first line is a count header, its last column the
    label); ``rows`` rows drawn seeded without replacement, or all of them."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"scikit-learn is not installed; it ships the {name} table")
    csv = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / f"{name}_data.csv"
    if not csv.exists():
        csv = csv.with_name(f"{name}.csv")
    table = np.loadtxt(csv, delimiter=",", skiprows=1)[:, :-1]
    if rows is not None:
        table = table[np.sort(np.random.default_rng(seed).choice(len(table), size=rows,
                                                                 replace=False))]
    np.save(path, table)
    return path


def write_manifold(path: Path, rows: int = 150, seed: int = 0) -> Path:
    """``rows`` rows of 6 columns: smooth functions of a 2-D Gaussian plus 5 % noise."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(rows, 2))
    x = np.stack([z[:, 0], z[:, 1], np.sin(2 * z[:, 0]), z[:, 0] * z[:, 1], np.cos(z[:, 1]),
                  z[:, 0] ** 2 - 1], axis=1)
    np.save(path, x + 0.05 * rng.normal(size=x.shape))
    return path


def run_arm(table: Path, name: str, arm: str, seed: int, out: Path,
            max_steps: int | None = None) -> dict[str, Any]:
    """Train one arm with one seed on one table; test the best and the last weights."""
    settings = {k: v for k, v in TABLES[name].items() if k != "arms"}
    if max_steps is not None:
        settings["max_steps"] = max_steps
    config = resolve({"data": str(table), **settings, **ARMS[arm], "seed": seed,
                      "early_stop_patience": 0, **TOLERANCES, "accelerator": "cpu",
                      "threads": 1, "logger": "none", "progress": False, "plot_every": 0,
                      "ckpt_every": 0, "output_dir": str(out)})
    run = build(config)
    start = time.perf_counter()
    run.trainer.fit(run.model, run.datamodule)
    fit_seconds = time.perf_counter() - start
    if run.guard.interrupted is not None:  # the guard caught SIGTERM/SIGINT: stop the benchmark
        raise SystemExit(f"{name}/{arm}/seed {seed}: interrupted by {run.guard.interrupted}")
    last = run.trainer.test(run.model, run.datamodule, verbose=False)[0]["test/nll"]
    best_step, best_val = run.record.best()
    load_tested_weights(run)  # best.ckpt: the weights of the lowest validation NLL
    best = run.trainer.test(run.model, run.datamodule, verbose=False)[0]["test/nll"]
    return {"table": name, "arm": arm, "seed": seed, "steps": run.trainer.global_step,
            "best_val_step": best_step, "best_val_nll": best_val,
            "last_val_nll": run.record.last()[1], "test_nll_best": float(best),
            "test_nll_last": float(last), "fit_seconds": fit_seconds,
            "val_curve": [list(h) for h in run.record.history]}


def _median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f} to {max(values):.3f})"


def _overfit(run: dict[str, Any]) -> bool:
    """Whether the run's last validation NLL exceeds its best by more than the warning's
    margin (what ``train.py`` warns about)."""
    record = ValidationRecord()
    record.load_state_dict({"history": run["val_curve"]})
    return record.overfit() is not None


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per table and arm: the values of every seed (medians and ranges are the report's)."""
    rows = []
    for name in TABLES:
        for arm in TABLES[name]["arms"]:
            mine = sorted((r for r in runs if r["table"] == name and r["arm"] == arm),
                          key=lambda r: r["seed"])
            if not mine:
                continue
            rows.append({
                "table": name, "arm": arm, "seeds": len(mine),
                "seed": [r["seed"] for r in mine],
                "test_nll_best": [r["test_nll_best"] for r in mine],
                "test_nll_last": [r["test_nll_last"] for r in mine],
                "best_val_step": [r["best_val_step"] for r in mine],
                "overfit": [_overfit(r) for r in mine],
                "steps": mine[0]["steps"],
            })
    return rows


def paired_steps(summary: list[dict[str, Any]], table: str, arm: str,
                 base: str = "none") -> list[int]:
    """``arm``'s best-validation step minus ``base``'s on ``table``, for each seed both ran
    (one seed: the same split and initial weights)."""
    rows = {row["arm"]: row for row in summary if row["table"] == table}
    if arm not in rows or base not in rows or "seed" not in rows[base]:
        return []
    of_base = dict(zip(rows[base]["seed"], rows[base]["best_val_step"]))
    return [step - of_base[seed] for seed, step in zip(rows[arm]["seed"],
                                                       rows[arm]["best_val_step"])
            if seed in of_base]


def markdown(summary: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results table: medians over the seeds, (min to max) in brackets."""
    lines = [
        "# TPR under model selection (benchmarks/selection.py)",
        "",
        f"`python -m benchmarks.selection` on {meta['machine']}, one thread, "
        f"{meta['total_minutes']:.1f} minutes of wall time in all (on a 2-core machine shared "
        "with other jobs). Each run trains for a fixed number of "
        "steps with a validation every 10 steps and no early stop; the test NLL (nats) is given "
        "at the best validation checkpoint (what train.py tests by default) and at the last "
        "weights (`--test-ckpt last`). Medians over the seeds, (min to max) in brackets; the "
        "step of the best validation says how soon an arm starts to overfit; \"overfit\" counts "
        "the seeds whose last validation NLL exceeds the best by more than max(0.5 nats, 5 %) "
        "(train.py's warning).",
        "",
        "| table | arm | seeds | steps | test NLL, best val | test NLL, last | step of best val "
        "| overfit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        steps = row["best_val_step"]
        overfit = row.get("overfit")
        lines.append(
            f"| {row['table']} | {row['arm']} | {row['seeds']} | {row['steps']} | "
            f"{_median_range(row['test_nll_best'])} | {_median_range(row['test_nll_last'])} | "
            f"{statistics.median(steps):.0f} ({min(steps)} to {max(steps)}) | "
            f"{'-' if overfit is None else f'{sum(overfit)} of {len(overfit)}'} |")
    paired = [(table, arm, paired_steps(summary, table, arm))
              for table in dict.fromkeys(row["table"] for row in summary)
              for arm in dict.fromkeys(row["arm"] for row in summary if row["table"] == table)
              if arm != "none"]
    paired = [(table, arm, diffs) for table, arm, diffs in paired if diffs]
    if paired:
        lines += ["", "Step of the best validation, the TPR arm's minus the baseline's, paired "
                  "by seed (same split, same initial weights): median (min to max), and in how "
                  "many seeds TPR's minimum came later / at the same step / sooner.", "",
                  "| table | arm | seeds | later by (steps) | later / same / sooner |",
                  "|---|---|---|---|---|"]
        for table, arm, diffs in paired:
            lines.append(
                f"| {table} | {arm} | {len(diffs)} | {statistics.median(diffs):.0f} "
                f"({min(diffs)} to {max(diffs)}) | {sum(d > 0 for d in diffs)} / "
                f"{sum(d == 0 for d in diffs)} / {sum(d < 0 for d in diffs)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Run every table x arm x seed, write ``results/selection.{json,md}``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.selection",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="one seed and 60 steps per run (a smoke run; results not written)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    seeds = range(1 if args.quick else args.seeds)
    start = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        tables = {"breast_cancer200": write_sklearn_table(tmp / "breast_cancer200.npy",
                                                          "breast_cancer", rows=200),
                  "wine178": write_sklearn_table(tmp / "wine178.npy", "wine")}
        # Seed by seed, so that a benchmark cut short has every table and arm at equal seeds.
        for seed in seeds:
            for name, path in tables.items():
                for arm in TABLES[name]["arms"]:
                    result = run_arm(path, name, arm, seed, tmp / "runs",
                                     max_steps=60 if args.quick else None)
                    runs.append(result)
                    print(f"{name} {arm} seed {seed}: best val at step "
                          f"{result['best_val_step']}, test NLL {result['test_nll_best']:.3f} "
                          f"(best) / {result['test_nll_last']:.3f} (last), "
                          f"{result['fit_seconds']:.0f} s", flush=True)
                    if not args.quick:  # after every run: a cut-short benchmark keeps its runs
                        write(runs, time.perf_counter() - start, complete=False)
    if not args.quick:
        write(runs, time.perf_counter() - start, complete=True)


def write(runs: list[dict[str, Any]], seconds: float, complete: bool) -> None:
    """Write ``results/selection.{json,md}`` (``complete`` False: the runs so far)."""
    meta = {"machine": f"{platform.processor() or platform.machine()} ({platform.system()})",
            "total_minutes": seconds / 60, "complete": complete, "tables": TABLES, "arms": ARMS}
    payload = {"meta": meta, "summary": summarize(runs), "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "selection.json").write_text(json.dumps(
        payload, indent=1, default=lambda v: list(v) if isinstance(v, tuple) else str(v)) + "\n")
    text = render(payload)
    (RESULTS / "selection.md").write_text(text)
    if complete:
        print(text)


def render(payload: dict[str, Any]) -> str:
    """The report of a results file (what ``benchmarks.report`` re-renders from the JSON)."""
    text = markdown(payload["summary"], payload["meta"])
    if not payload["meta"]["complete"]:
        text += "\n(Incomplete: the runs finished so far.)\n"
    return text


#: What ``benchmarks.report`` asks of a study: its report rendered from its JSON.
STUDY = SimpleNamespace(render=render)


if __name__ == "__main__":
    main()
