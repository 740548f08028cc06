"""Seconds per training step with the trajectory polynomial regularizer vs without, per preset.

Usage:
    python -m benchmarks.step_cost [--seeds 0 1] [--presets toy power ...] [--steps toy=300 ...]
    python -m benchmarks.step_cost --render benchmarks/results/step_cost.json

Writes benchmarks/results/step_cost.{json,md}. How it measures and how to read the report:
docs/benchmarks.md, `benchmarks.step_cost` and "Reading the reports".
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import common
from benchmarks.common import UsageError, table
from benchmarks.tables import mixture_rows, write_mixture_table

#: The goal of issue 14: TPR's seconds per step at most this multiple of the baseline's.
GOAL = 1.05
#: Training steps per run of each build-made preset (the front door runs its whole preset).
#: power and miniboone take 2-3 s per step on one CPU thread, so their runs are short.
PRESET_STEPS = {"toy": 300, "power": 25, "miniboone": 25, "table": 250, "vae": 300}
PRESETS = (*PRESET_STEPS, "front_door")
#: Training rows of the generated files: whole batches of each preset's batch size.
TRAIN_ROWS = {"power": 80_000, "miniboone": 20_000, "table": 16_384}
#: Raw columns of the standard files (POWER keeps 6 of 8 after preprocessing).
RAW_COLUMNS = {"power": 8, "miniboone": 43}


# ------------------------------------------------------------------------------ data
def maf_split_sizes(n: int) -> tuple[int, int, int]:
    """(train, validation, test) rows of the MAF split of ``n`` rows (POWER, MINIBOONE): test is
    the last ``int(0.1 n)`` rows, validation the last ``int(0.1 rest)`` of the rest."""
    test = int(0.1 * n)
    val = int(0.1 * (n - test))
    return n - test - val, val, test


def table_split_sizes(n: int) -> tuple[int, int, int]:
    """(train, validation, test) rows of the user-table split (10 % validation, 10 % test)."""
    return n - 2 * int(0.1 * n), int(0.1 * n), int(0.1 * n)


def rows_for_train(train: int, split: Callable[[int], tuple[int, int, int]]) -> int:
    """The smallest row count whose ``split`` leaves exactly ``train`` training rows.

    Raises:
        ValueError: ``train`` < 1, or no row count gives ``train`` training rows.
    """
    if train < 1:
        raise ValueError(f"train must be a positive number of rows, got {train!r}")
    n = train
    while split(n)[0] < train:  # the training rows never shrink as n grows
        n += 1
    if split(n)[0] != train:
        raise ValueError(f"no row count leaves exactly {train} training rows")
    return n


def write_standin_data(root: Path) -> dict[str, Any]:
    """Write POWER, MINIBOONE (standard layout under ``root``) and the 16-D table; what was
    written (path and rows per set)."""
    from polyreg_cnf.datamodules.tabular import TabularDataModule

    root = Path(root)
    out: dict[str, Any] = {}
    for offset, (name, dim) in enumerate(RAW_COLUMNS.items()):
        rows = rows_for_train(TRAIN_ROWS[name], maf_split_sizes)
        path = root / name / "data.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, mixture_rows(rows, dim, seed=1000 + offset))
        out[name] = dict(path=str(path), rows=rows, raw_columns=dim)
        dm = TabularDataModule(name, root)  # preprocessed here, not by two lockstep processes
        dm.prepare_data()
        dm.setup()
    rows = rows_for_train(TRAIN_ROWS["table"], table_split_sizes)
    facts = write_mixture_table(root / "mixture16.npy", rows=rows, dim=16)
    out["table"] = dict(path=str(root / "mixture16.npy"), rows=rows, raw_columns=16,
                        true_nll_raw=facts["true_nll_raw"])
    return out


# ------------------------------------------------------------------------------ measuring
def step_stats(history: Sequence[Sequence[float]],
               cpu: Sequence[float] | None = None) -> dict[str, float]:
    """Per-step means of a run's (forward NFE, backward NFE, seconds) rows, the first step left
    out (under ``backprop="auto"`` it measures on the adjoint); ``seconds_all`` is the mean over
    every step, ``seconds_median`` the median step, ``adjoint_steps`` the later steps with
    backward NFE > 0, and ``cpu_seconds`` the mean of ``cpu`` (CPU seconds per step).

    Raises:
        ValueError: Fewer than two steps, or ``cpu`` not one value per step.
    """
    if len(history) < 2:
        raise ValueError(f"need at least 2 training steps, got {len(history)}")
    forward, backward, seconds = np.asarray(history[1:], dtype=float).T
    out = dict(steps=len(history), seconds=float(seconds.mean()),
               seconds_median=float(np.median(seconds)),
               seconds_all=float(np.mean([r[2] for r in history])), forward=float(forward.mean()),
               backward=float(backward.mean()), adjoint_steps=int((backward > 0).sum()),
               first_seconds=float(history[0][2]))
    if cpu is not None:
        if len(cpu) != len(history):
            raise ValueError(f"cpu has {len(cpu)} steps, history {len(history)}")
        out["cpu_seconds"] = float(np.mean(cpu[1:]))
    return out


def backprop_label(stats: dict[str, float]) -> str:
    """``direct``, ``adjoint`` or ``mixed (k/n adjoint)`` for the steps after the first."""
    k, n = int(stats["adjoint_steps"]), int(stats["steps"]) - 1
    return "direct" if k == 0 else "adjoint" if k == n else f"mixed ({k}/{n} adjoint)"


def read_metrics_csv(path: str | Path) -> list[tuple[int, int, float]]:
    """(forward NFE, backward NFE, seconds) per training step from a run's ``metrics.csv``, in
    step order (training-step rows are those with ``time/step_seconds``)."""
    with open(path, newline="") as handle:
        rows = sorted((int(r["step"]), int(float(r["nfe/forward"])), int(float(r["nfe/backward"])),
                       float(r["time/step_seconds"]))
                      for r in csv.DictReader(handle) if r.get("time/step_seconds"))
    return [row[1:] for row in rows]


def step_clock() -> Any:
    """A Lightning callback listing the CPU seconds of each training step (``.seconds``; from the
    start to the end of the batch, the window of NFEMonitor's wall clock)."""
    import lightning as L

    class StepClock(L.Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._t0 = 0.0

        def on_train_batch_start(self, *args: Any) -> None:
            self._t0 = time.process_time()

        def on_train_batch_end(self, *args: Any) -> None:
            self.seconds.append(time.process_time() - self._t0)

    return StepClock()


def preset_config(preset: str, reg: str, seed: int, steps: int, data_root: Path, out: str,
                  **extra: Any) -> Any:
    """The resolved configuration of a build-made run: the preset's, ``steps`` long, without
    validation (so without early stopping) and test, writing under ``out``."""
    from polyreg_cnf.app.config import resolve

    data = {"toy": dict(data="checkerboard"),  # the options naming the preset's data
            "power": dict(data="power", data_dir=str(data_root)),
            "miniboone": dict(data="miniboone", data_dir=str(data_root)),
            "table": dict(data=str(Path(data_root) / "mixture16.npy")),
            "vae": dict(model="vae", data="digits", max_epochs=None)}[preset]
    return resolve(dict(data, reg=reg, seed=seed, max_steps=steps,
                        limit_val_batches=0, early_stop_patience=0, test=False, logger="none",
                        plot_every=0, ckpt_every=0, progress=False, output_dir=out, **extra))


def run_preset(preset: str, reg: str, seed: int, steps: int, data_root: Path,
               callbacks: Sequence[Any] = (), **extra: Any) -> dict[str, Any]:
    """Train one build-made run of ``preset`` for ``steps`` steps; its per-step figures.
    ``callbacks`` follow the run's own; ``extra`` options (``accelerator="gpu"``) join the preset's.
    """
    from polyreg_cnf.app.build import build
    from polyreg_cnf.engine.ode import ode_blocks

    with tempfile.TemporaryDirectory() as tmp:
        config = preset_config(preset, reg, seed, steps, data_root, tmp, **extra)
        clock = step_clock()  # before the caller's: a lockstep wait must come after its reading
        run = build(config, callbacks=[clock, *callbacks])
        threads = torch.get_num_threads()
        load = os.getloadavg()[0]
        start = time.perf_counter()
        run.trainer.fit(run.model, run.datamodule)
        wall = time.perf_counter() - start
        blocks = ode_blocks(run.model)
        stats = step_stats(run.monitor.history, clock.seconds)
    return dict(preset=preset, reg=reg, seed=seed, **stats, backprop=backprop_label(stats),
                backprop_config=config.ode.backprop,
                final_choice=sorted({str(getattr(b.solver.backprop, "choice", None))
                                     for b in blocks}),
                torch_threads=threads, fit_wall=wall, load_start=load,
                load_end=os.getloadavg()[0])


def front_door_command(reg: str, seed: int | None = None,
                       backprop: str | None = None) -> list[str]:
    """The ``train.py`` flags of the front door with ``--reg reg`` (plus the given changes)."""
    return ["--model", "vae", "--reg", reg, *(["--seed", str(seed)] if seed is not None else []),
            *(["--backprop", backprop] if backprop is not None else [])]


def lockstep(mine: Any, other: Any, timeout: float = 900) -> Any:
    """A Lightning callback for strict turn-taking between two training processes: a step runs
    only while holding ``mine``; at its end (after the clocks have read it) the turn goes to the
    other process and this one waits for it back.

    Args:
        mine: This process's semaphore (a ``multiprocessing`` semaphore starting at 0 or 1).
        other: The partner's semaphore.
        timeout: Seconds to wait for the turn before giving up (the partner died).
    """
    import lightning as L

    def take_turn() -> None:
        if not mine.acquire(timeout=timeout):
            raise RuntimeError(f"lockstep: the partner process did not hand back the turn "
                               f"within {timeout:.0f} s")

    class Lockstep(L.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            take_turn()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                               batch_idx: int) -> None:
            other.release()
            take_turn()

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            other.release()

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            other.release()

    return Lockstep()


def _pair_worker(results: Any, mine: Any, other: Any, preset: str, reg: str, seed: int,
                 steps: int, data_root: str) -> None:
    try:
        results.put((reg, run_preset(preset, reg, seed, steps, Path(data_root),
                                     callbacks=[lockstep(mine, other)])))
    except BaseException as err:  # report it; the parent raises
        other.release()
        results.put((reg, f"{type(err).__name__}: {err}\n{traceback.format_exc()[-3000:]}"))


def run_pair(preset: str, seed: int, steps: int, data_root: Path,
             order: Sequence[str] = ("none", "poly")) -> list[dict[str, Any]]:
    """Both arms of a pair in two processes training in lockstep (:func:`lockstep`).

    ``order[0]`` trains the first step. Returns the two runs' figures in ``order``.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    turns = {reg: ctx.Semaphore(0) for reg in order}
    partner = dict(zip(order, reversed(order)))
    procs = [ctx.Process(target=_pair_worker, args=(results, turns[reg], turns[partner[reg]],
                                                    preset, reg, seed, steps, str(data_root)))
             for reg in order]
    for proc in procs:
        proc.start()
    turns[order[0]].release()  # the first arm starts
    got = dict(results.get(timeout=3600) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    failed = {reg: r for reg, r in got.items() if isinstance(r, str)}
    if failed:
        raise RuntimeError(f"{preset} seed {seed}: {failed}")
    return [dict(got[reg], paired="lockstep") for reg in order]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


#: Fixed-backprop variants of the front door (``--door-backprop``).
DOOR_MODES = ("adjoint", "checkpoint", "bounded")


def run_front_door(reg: str, seed: int | None = None, backprop: str | None = None,
                   timeout: float = 1800) -> dict[str, Any]:
    """Run ``python train.py`` + :func:`front_door_command` in a temporary folder (where its
    ``runs/`` lands); its figures, per step from the run's ``metrics.csv``."""
    argv = front_door_command(reg, seed, backprop)
    with tempfile.TemporaryDirectory() as tmp:
        load = os.getloadavg()[0]
        start, cpu = time.perf_counter(), _children_cpu()
        _, train_wall = common.train_py(argv, Path(tmp), timeout)
        wall, cpu = time.perf_counter() - start, _children_cpu() - cpu
        csvs = sorted(Path(tmp, "runs").glob("*/metrics.csv"))
        if len(csvs) != 1:
            raise RuntimeError(f"expected one metrics.csv under {tmp}/runs, found {csvs}")
        stats = step_stats(read_metrics_csv(csvs[0]))
        config_text = (csvs[0].parent / "config.yaml").read_text()
    return dict(preset="front_door" if backprop is None else f"front_door_{backprop}",
                reg=reg, seed=0 if seed is None else seed, command="python train.py "
                + " ".join(argv), **stats,
                # A fixed choice is what ran; under auto, the backward NFE tell.
                backprop=backprop or backprop_label(stats),
                backprop_config=backprop or "auto", process_wall=wall, process_cpu=cpu,
                train_wall=train_wall,
                threads_option="threads: null" in config_text, load_start=load,
                load_end=os.getloadavg()[0])


# ------------------------------------------------------------------------------ summary
def summarise(runs: Sequence[dict[str, Any]], goal: float = GOAL) -> list[dict[str, Any]]:
    """One row per preset: medians over the seeds with both arms of each arm and of the per-seed
    ratio poly/none (min and max too), and whether the median ratio meets ``goal``."""
    out = []
    for preset in dict.fromkeys(r["preset"] for r in runs):
        arms = {(r["reg"], r["seed"]): r for r in runs if r["preset"] == preset}
        seeds = sorted(s for reg, s in arms if reg == "none" and ("poly", s) in arms)
        if not seeds:
            continue
        def ratios(key: str, arms: dict = arms, seeds: list = seeds) -> dict[str, float]:
            """Median, min and max over seeds of poly / none in ``key``, to 6 decimals."""
            per_seed = [arms["poly", s][key] / arms["none", s][key] for s in seeds]
            return {k: round(f(per_seed), 6)
                    for k, f in (("", statistics.median), ("_min", min), ("_max", max))}

        row: dict[str, Any] = dict(preset=preset, seeds=seeds)
        for reg in ("none", "poly"):
            sel = [arms[reg, s] for s in seeds]
            for key in ("seconds", "forward", "backward"):
                row[f"{key}_{reg}"] = statistics.median(r[key] for r in sel)
            row[f"backprop_{reg}"] = "/".join(dict.fromkeys(r["backprop"] for r in sel))
        row.update({f"ratio{k}": v for k, v in ratios("seconds").items()},
                   ratio_all_steps=ratios("seconds_all")[""],
                   ratio_median_step=ratios("seconds_median")[""])
        if all("cpu_seconds" in arms[reg, s] for reg in ("none", "poly") for s in seeds):
            row.update({f"ratio_cpu{k}": v for k, v in ratios("cpu_seconds").items()})
        row["met"] = bool(row["ratio"] <= goal)
        out.append(row)
    return out


def render(payload: dict[str, Any]) -> str:
    """The results page of a payload (its summary computed again from its runs): command,
    machine, the per-preset table, every run, notes."""
    meta, runs = payload["meta"], payload["runs"]
    lockstep = any(r.get("paired") == "lockstep" for r in runs)
    lines = [
        *common.header(
            "step_cost", "Seconds per training step: TPR (`--reg poly`) vs none, per preset "
            "(issue 14)", meta["command"],
            f"Machine: {meta['machine']}; Python {meta['python']}, torch {meta['torch']}, "
            f"lightning {meta['lightning']}, torchdiffeq {meta['torchdiffeq']}; code at commit "
            f"{meta['git_commit']}. Load average (1 min) at start {meta['load_start']:.2f}, at end "
            f"{meta['load_end']:.2f}; wall time of the whole benchmark "
            f"{meta['wall_seconds']:.0f} s.",
            f"Seeds {meta['seeds']}; steps per run {meta['steps']}; the two arms of a pair "
            + ("train in lockstep. " if lockstep else "run one after the other. ")
            + f"Goal: TPR's seconds per step at most {GOAL}x the unregularized run's with the "
            "same seed."),
        *summary_table(summarise(runs)),
        "", "Every run:", "",
        *table(["preset", "reg", "seed", "steps", "s/step", "s/step all", "median step s",
                "CPU s/step", "first step s", "fwd NFE", "bwd NFE", "backprop", "load at start"],
               [[r["preset"], r["reg"], r["seed"], r["steps"], f"{r['seconds']:.4f}",
                 f"{r['seconds_all']:.4f}", f"{r['seconds_median']:.4f}",
                 f"{r['cpu_seconds']:.4f}" if "cpu_seconds" in r else "-",
                 f"{r['first_seconds']:.3f}", f"{r['forward']:.1f}", f"{r['backward']:.1f}",
                 r["backprop"], f"{r['load_start']:.2f}"] for r in runs]),
    ]
    doors = [r for r in runs if "command" in r]
    if doors:
        lines += ["", "Front door runs (whole preset run, in a subprocess):", "",
                  *table(["command", "training wall s", "process wall s", "process CPU s"],
                         [[f"`{r['command']}`", f"{r['train_wall']:.1f}",
                           f"{r['process_wall']:.1f}", f"{r['process_cpu']:.1f}"]
                          for r in doors])]
    lines += ["", "Data:", ""] + [f"- {n}" for n in meta["data_notes"]]
    if meta.get("notes"):  # older reports wrote their reading here (docs/benchmarks.md)
        lines += ["", "Notes:", ""] + [f"- {n}" for n in meta["notes"]]
    return "\n".join(lines) + "\n"


def summary_table(summary: Sequence[dict[str, Any]]) -> list[str]:
    """The per-preset table of :func:`summarise`'s rows (markdown lines)."""
    return table(["preset", "s/step none", "s/step poly", "ratio poly/none", "ratio, all steps",
                  "ratio, median step", "ratio, CPU time", "fwd NFE none / poly",
                  "bwd NFE none / poly", "backprop none / poly", "<= 1.05x (wall)",
                  "<= 1.05x (CPU)"],
                 [[r["preset"], f"{r['seconds_none']:.4f}", f"{r['seconds_poly']:.4f}",
                   f"{r['ratio']:.3f} ({r['ratio_min']:.3f}-{r['ratio_max']:.3f})",
                   f"{r['ratio_all_steps']:.3f}", f"{r['ratio_median_step']:.3f}",
                   f"{r['ratio_cpu']:.3f} ({r['ratio_cpu_min']:.3f}-{r['ratio_cpu_max']:.3f})"
                   if "ratio_cpu" in r else "-",
                   f"{r['forward_none']:.1f} / {r['forward_poly']:.1f}",
                   f"{r['backward_none']:.1f} / {r['backward_poly']:.1f}",
                   f"{r['backprop_none']} / {r['backprop_poly']}", "met" if r["met"] else "NOT met",
                   "-" if "ratio_cpu" not in r else "met" if r["ratio_cpu"] <= GOAL else "NOT met"]
                  for r in summary])


def machine() -> str:
    """CPU model, core count and OS in one line."""
    return f"{common.cpu_name()}, {os.cpu_count()} cores (nproc), {platform.platform()}"


def _parse_steps(items: Sequence[str]) -> dict[str, int]:
    steps = dict(PRESET_STEPS)
    for item in items:
        name, _, value = item.partition("=")
        if name not in PRESET_STEPS or not value.isdigit() or int(value) < 2:
            raise UsageError(f"--steps wants NAME=N with NAME in {', '.join(PRESET_STEPS)} and "
                             f"N >= 2, got {item!r}")
        steps[name] = int(value)
    return steps


FLAGS = {
    "--seeds": dict(type=int, nargs="+", default=[0, 1]),
    "--presets": dict(nargs="+", default=list(PRESETS), choices=PRESETS),
    "--steps": dict(nargs="*", default=[], metavar="NAME=N",
                    help=f"steps per run (default {PRESET_STEPS})"),
    "--sequential": dict(action="store_true", help="run the two arms of a build-made pair one "
                         "after the other (default: two processes in lockstep)"),
    "--door-backprop": dict(nargs="*", default=["adjoint"], choices=DOOR_MODES,
                            help="front-door pairs with a fixed backprop besides the default "
                                 "auto (bounded: the adjoint for --reg none, step checkpoints "
                                 "for --reg poly); give the flag alone for none")}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every pair of every preset and seed; the report is written again after each run."""
    steps = _parse_steps(args.steps)
    meta: dict[str, Any] = dict(
        command=args.command, machine=machine(), **common.versions(), seeds=args.seeds,
        steps={p: steps[p] for p in args.presets if p in steps},
        load_start=os.getloadavg()[0])
    start = time.perf_counter()
    runs: list[dict[str, Any]] = []

    def add(r: dict[str, Any]) -> None:
        runs.append(r)
        print(f"{r['preset']:>12} {r['reg']:>4} seed {r['seed']}: {r['seconds']:.4f} s/step, "
              f"NFE {r['forward']:.1f} + {r['backward']:.1f}, {r['backprop']}", flush=True)
        meta.update(wall_seconds=time.perf_counter() - start, load_end=os.getloadavg()[0])
        common.write_report(args.out, dict(meta=meta, summary=summarise(runs), runs=runs), render)

    with tempfile.TemporaryDirectory() as data_root:
        written = write_standin_data(Path(data_root))
        meta["data_notes"] = [
            "toy: checkerboard, generated (50,000 training points).",
            *(f"{name}: stand-in `{name}/data.npy` of {w['rows']} rows x {w['raw_columns']} "
              f"columns (a fixed random Gaussian mixture) in the standard format, through the "
              f"standard preprocessing; {TRAIN_ROWS[name]} training rows. Not the real data: "
              f"NFE (and so seconds) differ from a run on the real files."
              for name, w in written.items() if name in RAW_COLUMNS),
            f"table: `benchmarks/tables.py` mixture, {written['table']['rows']} rows x 16, "
            f"{TRAIN_ROWS['table']} training rows.",
            "vae / front door: the embedded 8 x 8 digits (scikit-learn)."]
        for preset in args.presets:
            for i, seed in enumerate(args.seeds):
                order = ("none", "poly") if i % 2 == 0 else ("poly", "none")
                if preset != "front_door" and not args.sequential:
                    pair = run_pair(preset, seed, steps[preset], Path(data_root), order)
                else:
                    # Seed 0 is the front door exactly; other seeds add --seed.
                    pair = [run_front_door(reg, None if seed == 0 else seed)
                            if preset == "front_door" else
                            dict(run_preset(preset, reg, seed, steps[preset], Path(data_root)),
                                 paired="sequential") for reg in order]
                for r in pair:
                    add(r)
            for mode in args.door_backprop if preset == "front_door" else []:
                for reg in ("none", "poly"):
                    backprop = (("checkpoint" if reg == "poly" else "adjoint")
                                if mode == "bounded" else mode)
                    add(dict(run_front_door(reg, None, backprop=backprop),
                             preset=f"front_door_{mode}"))
    meta["torch_threads_seen"] = sorted({r["torch_threads"] for r in runs if "torch_threads" in r})
    meta.update(wall_seconds=time.perf_counter() - start, load_end=os.getloadavg()[0])
    return dict(meta=meta, summary=summarise(runs), runs=runs)


STUDY = common.Study("step_cost", __doc__, measure, render, flags=FLAGS)
main = STUDY.main

if __name__ == "__main__":
    sys.exit(main())
