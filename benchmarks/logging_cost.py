"""Logging's share of a training step's CPU time, in a baseline checkout and in this one.

    python -m benchmarks.logging_cost --baseline /work/main --steps 60 --repeats 5

For each workload (the authors' checkerboard configuration, ``train.py --data checkerboard
--reg poly`` with its preset, and the VAE front door, ``train.py --model vae --reg poly``) and
each repeat, the baseline tree (with its own ``.venv``) and this tree train at the same time,
each pinned to one core (``taskset``) with one intra-op thread. ``benchmarks/logging_probe.py``
adds up, inside each run, the CPU time (user + system) of the training batches and of the
logging calls made during them (see its docstring), so the machine's load from other processes
does not enter the figures. Validation, the test, plots and the W&B service are off
(``--limit-val-batches 0 --no-test --plot-every 0 --logger csv``): the per-step logging is what
is measured. Reported: the share ``logging CPU / step CPU`` and the CPU milliseconds of logging
per step, median (range) over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, Study, UsageError, machine, median_range, spread, table

#: Workload -> train.py flags (each at its preset's settings).
WORKLOADS = {
    "checkerboard": ["--data", "checkerboard", "--reg", "poly"],
    "vae": ["--model", "vae", "--reg", "poly"],
}
#: What every run adds: one thread, no validation, test, plots or W&B.
COMMON = ["--threads", "1", "--limit-val-batches", "0", "--no-test", "--plot-every", "0",
          "--logger", "csv"]
PROBE = ROOT / "benchmarks" / "logging_probe.py"
#: Runs the probe by path with ``python -c``, so the tree in the working directory (``""``), not
#: the probe's folder, is first on the import path.
_LAUNCH = ("import runpy, sys; sys.argv = sys.argv[1:]; "
           "runpy.run_path(sys.argv[0], run_name='__main__')")


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--baseline", type=Path, required=True,
                        help="the checkout to compare with (its .venv/bin/python runs it)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--repeats", type=int, default=5, help="paired runs per workload")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS),
                        choices=list(WORKLOADS))


def _start(tree: Path, python: Path, flags: list[str], core: int, out: Path,
           work: Path) -> subprocess.Popen:
    pin = ["taskset", "-c", str(core)] if shutil.which("taskset") and os.cpu_count() else []
    argv = [*pin, str(python), "-c", _LAUNCH, str(PROBE), str(out), "train.py", *flags, *COMMON,
            "--output-dir", str(work), "--run-name", out.stem]
    return subprocess.Popen(argv, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _finish(proc: subprocess.Popen, out: Path) -> dict[str, Any]:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(proc.args)} exited {proc.returncode}:\n{err[-3000:]}")
    row = json.loads(out.read_text())
    row["share"] = row["logging_cpu"] / row["step_cpu"]
    row["logging_ms_per_step"] = 1e3 * row["logging_cpu"] / row["steps"]
    row["step_ms"] = 1e3 * row["step_cpu"] / row["steps"]
    return row


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Paired runs of the baseline and this tree, per workload and repeat."""
    base_python = args.baseline / ".venv" / "bin" / "python"
    if not base_python.exists():
        raise UsageError(f"--baseline {args.baseline}: no .venv/bin/python there")
    if args.steps < 5 or args.repeats < 1:
        raise UsageError(f"--steps must be >= 5 and --repeats >= 1, got {args.steps}, "
                         f"{args.repeats}")
    trees = {"baseline": (args.baseline.resolve(), base_python),
             "this": (ROOT, Path(sys.executable))}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory(prefix="logging_cost_") as tmp:
        work = Path(tmp)
        for name in args.workloads:
            flags = [*WORKLOADS[name], "--max-steps", str(args.steps)]
            runs[name] = {tree: [] for tree in trees}
            for rep in range(args.repeats):
                procs = {tree: (_start(path, python, flags, core, work / f"{name}-{tree}-{rep}"
                                       ".json", work), work / f"{name}-{tree}-{rep}.json")
                         for core, (tree, (path, python)) in enumerate(trees.items())}
                for tree, (proc, out) in procs.items():
                    runs[name][tree].append(_finish(proc, out))
                print(name, rep, {t: round(r[-1]["share"], 4) for t, r in runs[name].items()},
                      flush=True)
    summary = {name: {tree: {key: spread([r[key] for r in rows])
                             for key in ("share", "logging_ms_per_step", "step_ms")}
                      for tree, rows in per_tree.items()}
               for name, per_tree in runs.items()}
    load = os.getloadavg()
    return {"meta": {"command": args.command, "machine": machine(), "steps": args.steps,
                     "repeats": args.repeats, "baseline": str(args.baseline),
                     "loadavg_at_end": [round(x, 2) for x in load], "common_flags": COMMON},
            "runs": runs, "summary": summary}


def render(payload: dict[str, Any]) -> str:
    """The markdown report: one row per workload and tree."""
    meta = payload["meta"]
    rows = []
    for name, per_tree in payload["summary"].items():
        for tree, s in per_tree.items():
            rows.append([name, tree, median_range({k: 100 * v for k, v in s["share"].items()},
                                                  ".1f"),
                         median_range(s["logging_ms_per_step"], ".2f"),
                         median_range(s["step_ms"], ".0f")])
    return "\n".join([
        "# Logging's share of a training step (CPU time)", "",
        f"`{meta['command']}`, {meta['repeats']} paired runs of {meta['steps']} steps per "
        f"workload (baseline `{meta['baseline']}` and this tree at the same time, one core and "
        f"one thread each), CPU {meta['machine']['cpu']}, load average at the end "
        f"{meta['loadavg_at_end']}, commit {meta['machine']['git_commit']}, "
        f"{meta['machine']['date']}. Median (min-max).", "",
        *table(["workload", "tree", "logging share of step CPU (%)", "logging CPU ms/step",
                "step CPU ms"], rows, align="llrrr"),
        "", "Logging CPU: `LightningModule.log`, Lightning's per-step write to the loggers and "
        "`polyreg_cnf.callbacks.step_log`, inside training batches "
        "(`benchmarks/logging_probe.py`).", ""])


STUDY = Study("logging_cost", __doc__ or "", measure, render, _arguments)

if __name__ == "__main__":
    sys.exit(STUDY.main())
