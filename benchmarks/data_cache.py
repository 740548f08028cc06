"""Time the tabular cache: first setup (preprocess + write cache) vs. a cache hit (memory map).

    python -m benchmarks.data_cache [--rows 1600000] [--repeats 3]

Writes benchmarks/results/data_cache.{json,md}; how it measures: docs/benchmarks.md,
`benchmarks.data_cache`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from polyreg_cnf.datamodules import tabular
from polyreg_cnf.datamodules.tabular import TabularDataModule

from benchmarks import common

#: The cases timed, as the JSON names them, with the report's labels.
CASES = {"first_setup_s": "first setup: preprocess + write cache",
         "cache_hit_setup_s": "second setup: cache hit (mmap)",
         "no_cache_setup_s": "cache=False: preprocess only"}


def timed_setup(root: Path, cache: bool = True) -> tuple[float, TabularDataModule]:
    """Seconds of ``prepare_data(); setup()`` on a fresh module, and the module."""
    start = time.perf_counter()
    dm = TabularDataModule("power", root, cache=cache)
    dm.prepare_data()
    dm.setup()
    return time.perf_counter() - start, dm


FLAGS = {"--rows": dict(type=int, default=1_600_000), "--repeats": dict(type=int, default=3)}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """First setup, cache hit and no cache, ``repeats`` times each, on a generated file."""
    root = Path(tempfile.mkdtemp(prefix="polyreg_cache_bench."))
    folder, seconds = root / "power", {key: [] for key in CASES}
    try:
        folder.mkdir()
        np.save(folder / "data.npy", np.random.default_rng(0).normal(size=(args.rows, 8)))
        for _ in range(args.repeats):
            shutil.rmtree(folder / tabular.CACHE_DIR, ignore_errors=True)
            seconds["first_setup_s"].append(timed_setup(root)[0])
            hit, dm = timed_setup(root)
            seconds["cache_hit_setup_s"].append(hit)
            train = dm.arrays()["train"]
            mmapped = isinstance(train.base, np.memmap) or isinstance(train, np.memmap)
            shapes = {k: list(v.shape) for k, v in dm.arrays().items()}
            del dm, train
            seconds["no_cache_setup_s"].append(timed_setup(root, cache=False)[0])
        source_mb = (folder / "data.npy").stat().st_size / 2**20
        cache_mb = sum(p.stat().st_size for p in (folder / tabular.CACHE_DIR).iterdir()) / 2**20
    finally:
        shutil.rmtree(root, ignore_errors=True)
    medians = {key: statistics.median(values) for key, values in seconds.items()}
    return {
        "command": args.command, "rows": args.rows, "repeats": args.repeats,
        "source_MiB": round(source_mb, 1), "cache_MiB": round(cache_mb, 1),
        "split_shapes": shapes, "train_memory_mapped": bool(mmapped),
        "mmap_min_bytes": tabular.MMAP_MIN_BYTES,
        **{key: {"median": medians[key], "all": seconds[key]} for key in CASES},
        "speedup_cache_hit_vs_first": medians["first_setup_s"] / medians["cache_hit_setup_s"],
        "machine": {"nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "numpy": np.__version__}}


def markdown(result: dict[str, Any]) -> str:
    """The three cases' medians and runs."""
    return "\n".join([
        *common.suite_header("Tabular cache benchmark (POWER-shaped data)",
                             result["command"].strip(), result["machine"]),
        f"Data: {result['rows']} x 8 float64 ({result['source_MiB']} MiB); cache "
        f"{result['cache_MiB']} MiB float32, splits {result['split_shapes']}; train "
        f"memory-mapped: {result['train_memory_mapped']}.",
        "",
        f"Each figure is the median of {result['repeats']} runs of `prepare_data(); setup()` "
        "on a fresh TabularDataModule.",
        "",
        *common.table(["case", "median (s)", "runs (s)"],
               [[label, f"{result[key]['median']:.3f}",
                 ", ".join(f"{s:.3f}" for s in result[key]["all"])]
                for key, label in CASES.items()]),
        "",
        f"Cache hit is {result['speedup_cache_hit_vs_first']:.0f}x faster than the first "
        "setup."]) + "\n"


STUDY = common.Study("data_cache", __doc__, measure, markdown, flags=FLAGS)
main = STUDY.main

if __name__ == "__main__":
    sys.exit(main())
