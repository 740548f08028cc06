"""DDP on CPU: seconds per training epoch with 1 and 2 processes on a MINIBOONE-shaped table.

    python -m benchmarks.ddp_scaling [--repeats 3] [--rows 36488]

Writes benchmarks/results/ddp_scaling.{json,md}; how it measures: docs/benchmarks.md,
`benchmarks.ddp_scaling`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.tables import mixture_rows


def epoch_seconds(data: Path, out: Path, processes: int) -> float:
    """Training wall time of one epoch through train.py with ``processes`` processes."""
    argv = ["--model", "cnf", "--reg", "poly", "--data", str(data), "--nhidden", "2",
            "--hdim-factor", "20", "--nonlinearity", "softplus", "--layer-type", "concat",
            "--num-blocks", "1", "--batch-size", "1000",
            "--max-epochs", "1", "--limit-val-batches", "0", "--early-stop-patience", "0",
            "--no-test", "--logger", "none",
            "--accelerator", "cpu", "--devices", str(processes), "--threads", "1",
            "--output-dir", str(out), *(["--strategy", "ddp"] if processes > 1 else [])]
    return common.train_py(argv, out.parent, env=dict(os.environ, OMP_NUM_THREADS="1"))[1]


FLAGS = {"--repeats": dict(type=int, default=3), "--rows": dict(type=int, default=36488)}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One and two processes, ``repeats`` times each, alternating."""
    results: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "miniboone_shaped.npy"
        np.save(data, mixture_rows(args.rows, 43))  # a correlated Gaussian mixture
        for rep in range(args.repeats):
            for n in (1, 2):
                secs = epoch_seconds(data, Path(tmp) / f"runs{rep}-{n}", n)
                results[n].append(secs)
                print(f"processes={n} repeat={rep}: {secs:.1f} s/epoch", flush=True)
    med = {n: statistics.median(v) for n, v in results.items()}
    return {"command": args.command, "machine": common.machine(), "rows": args.rows,
            "columns": 43, "seconds_per_epoch": {str(n): v for n, v in results.items()},
            "median": {str(n): m for n, m in med.items()}, "speedup": med[1] / med[2]}


def markdown(payload: dict[str, Any]) -> str:
    """Seconds per epoch with one and two processes."""
    m, med = payload["machine"], payload["median"]
    return "\n".join([
        *common.header("ddp_scaling", "DDP on CPU: one epoch of a MINIBOONE-shaped table",
                       payload["command"],
                       f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, lightning "
                       f"{m['lightning']}, commit {m['git_commit']}, {m['date']}. Data: "
                       f"generated, {payload['rows']} rows x 43."),
        *common.table(["processes", "seconds per epoch (median)", "all repeats", "speed-up"],
                      [[n, f"{med[n]:.1f}",
                        ", ".join(f"{v:.1f}" for v in payload["seconds_per_epoch"][n]),
                        f"{med['1'] / med[n]:.2f}x"] for n in ("1", "2")])]) + "\n"


STUDY = common.Study("ddp_scaling", __doc__, measure, markdown, flags=FLAGS)
main = STUDY.main

if __name__ == "__main__":
    sys.exit(main())
