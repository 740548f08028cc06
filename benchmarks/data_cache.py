"""Time the tabular cache: first setup (preprocess + write cache) vs. a cache hit (memory map).

Generates a POWER-shaped file (1.6 million rows x 8 float64 columns) in a temporary folder and,
for each repeat, times ``prepare_data(); setup()`` on a fresh TabularDataModule twice: once with
no cache (preprocessing and writing the cache) and once with the cache in place. Also times
``cache=False`` (preprocessing only, nothing written). Reports medians over the repeats.

Usage:
    python -m benchmarks.data_cache [--rows 1600000] [--repeats 3]
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
from benchmarks.common import table


def timed_setup(root: Path, cache: bool = True) -> tuple[float, TabularDataModule]:
    """Seconds of ``prepare_data(); setup()`` on a fresh module, and the module."""
    start = time.perf_counter()
    dm = TabularDataModule("power", root, cache=cache)
    dm.prepare_data()
    dm.setup()
    return time.perf_counter() - start, dm


def arguments(parser: argparse.ArgumentParser) -> None:
    """The study's flags."""
    parser.add_argument("--rows", type=int, default=1_600_000)
    parser.add_argument("--repeats", type=int, default=3)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """First setup, cache hit and no cache, ``repeats`` times each, on a generated file."""
    root = Path(tempfile.mkdtemp(prefix="polyreg_cache_bench."))
    try:
        (root / "power").mkdir()
        data = np.random.default_rng(0).normal(size=(args.rows, 8))
        np.save(root / "power" / "data.npy", data)
        source_mb = (root / "power" / "data.npy").stat().st_size / 2**20
        del data

        cold, warm, nocache = [], [], []
        mmapped = None
        for _ in range(args.repeats):
            shutil.rmtree(root / "power" / tabular.CACHE_DIR, ignore_errors=True)
            seconds, _ = timed_setup(root)
            cold.append(seconds)
            seconds, dm = timed_setup(root)
            warm.append(seconds)
            train = dm.arrays()["train"]
            mmapped = isinstance(train.base, np.memmap) or isinstance(train, np.memmap)
            shapes = {k: list(v.shape) for k, v in dm.arrays().items()}
            del dm, train
            seconds, _ = timed_setup(root, cache=False)
            nocache.append(seconds)
        cache_mb = sum(p.stat().st_size for p in (root / "power" / tabular.CACHE_DIR).iterdir()
                       ) / 2**20
    finally:
        shutil.rmtree(root, ignore_errors=True)

    return {
        "command": args.command, "rows": args.rows, "repeats": args.repeats,
        "source_MiB": round(source_mb, 1), "cache_MiB": round(cache_mb, 1),
        "split_shapes": shapes, "train_memory_mapped": bool(mmapped),
        "mmap_min_bytes": tabular.MMAP_MIN_BYTES,
        "first_setup_s": {"median": statistics.median(cold), "all": cold},
        "cache_hit_setup_s": {"median": statistics.median(warm), "all": warm},
        "no_cache_setup_s": {"median": statistics.median(nocache), "all": nocache},
        "speedup_cache_hit_vs_first": statistics.median(cold) / statistics.median(warm),
        "machine": {"nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "numpy": np.__version__}}


def markdown(result: dict[str, Any]) -> str:
    """The three cases' medians and runs."""
    m = result["machine"]
    lines = [
        "# Tabular cache benchmark (POWER-shaped data)",
        "",
        f"Command: `{result['command'].strip()}`  ",
        f"Machine: nproc={m['nproc']}, {m['platform']}, Python {m['python']}, "
        f"numpy {m['numpy']}  ",
        f"Data: {result['rows']} x 8 float64 ({result['source_MiB']} MiB); cache "
        f"{result['cache_MiB']} MiB float32, splits {result['split_shapes']}; train "
        f"memory-mapped: {result['train_memory_mapped']}.",
        "",
        f"Each figure is the median of {result['repeats']} runs of `prepare_data(); setup()` "
        "on a fresh TabularDataModule.",
        "",
        *table(["case", "median (s)", "runs (s)"], [
            [label, f"{result[key]['median']:.3f}",
             ", ".join(f"{s:.3f}" for s in result[key]["all"])]
            for label, key in (("first setup: preprocess + write cache", "first_setup_s"),
                               ("second setup: cache hit (mmap)", "cache_hit_setup_s"),
                               ("cache=False: preprocess only", "no_cache_setup_s"))]),
    ]
    lines += ["", f"Cache hit is {result['speedup_cache_hit_vs_first']:.0f}x faster than the "
                  "first setup."]
    return "\n".join(lines) + "\n"


STUDY = common.Study("data_cache", __doc__, measure, markdown, arguments)

main = STUDY.main

if __name__ == "__main__":
    sys.exit(main())
