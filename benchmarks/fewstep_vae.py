r"""The VAE front door in the few-step study (issue 28, item 5): reported, not scored.

    python -m benchmarks.fewstep_vae --jobs 2     # the verdict's arms (results/fewstep.json's
                                                  # chosen grid and coef), seeds 6-8
    python -m benchmarks.fewstep_vae --arms tpr5_rk4x4 --seeds 6 --epochs 30   # one run

The front door is what a user types, ``python train.py --model vae --reg poly``: the embedded
8 x 8 digits with their preset (30 epochs of 14 steps). Each run is one whole ``train.py``
process (niced, ``--threads 1``, CSV logger) with the flags of one of the verdict's arms
(:func:`argv_of`): ``--reg none|poly|kinetic``, ``--poly-coef C`` for ``tprC_*``, and for
``*_rk4xK`` ``--solver rk4 --step-size T/K`` (K equal steps over each block's [0, T]; the VAE's
T is 0.5, not the toy workloads' 1). Every arm is scored by the default evaluation solver
(dopri5 at 1e-5), which the summary must name (:func:`parse_summary` refuses a run whose
summary does not).

Per run (:func:`run_cell`): test -ELBO and test IS NLL as printed; from ``metrics.csv`` the
last ``val/solver_gap`` (the per-image ELBO gap between the training and the evaluation
solver; not logged where they are the same, so None for the adaptive arms), forward NFE per
training step (first and last tenth, mean) and the number of steps. Two CPU times, both
load-independent (wall time swings 2x on the shared machine): ``process_cpu`` is the whole
child process's (``os.wait4``'s rusage: import, data, training, validations and the test's
importance-sampled NLL, which alone costs about as much as the training), and ``fit_cpu`` the
part between the run folder's ``config.yaml`` being written and its final ``last.ckpt`` (data,
model, training steps and the per-epoch validations; the test excluded), read from the
child's CPU clock sampled every :data:`POLL_S` seconds. ``fit_cpu`` is what the arms compare
on. Each run is cached as ``results/.cache/fewstep/vae-<epochs>-<arm>-<seed>.json``.

The report (:func:`section`) lists every run, then per arm the median (min-max) over seeds and
the seed-paired CPU ratio and IS NLL difference against ``none_adaptive``. No goal is judged.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks import common
from polyreg_cnf.app.presets import VAE_PRESETS

__all__ = ["BASELINE", "EPOCHS", "POLL_S", "argv_of", "cell_path", "collect", "grid_steps",
           "parse_metrics", "parse_summary", "payload", "run_cell", "run_cells", "section",
           "summarise"]

#: The embedded data set of the front door and its preset's length.
DATA = "digits"
EPOCHS: int = VAE_PRESETS[DATA]["max_epochs"]
#: Every arm is compared with this one, seed by seed.
BASELINE = "none_adaptive"
#: Seconds between two readings of a child's CPU clock.
POLL_S = 0.1
CACHE = common.RESULTS / ".cache" / "fewstep"


# ------------------------------------------------------------------------------ one run
def grid_steps(arm_name: str) -> int | None:
    """Fixed rk4 steps per block of an arm (``*_rk4xK``: K), None for an adaptive arm.

    Example:
        >>> grid_steps("tpr5_rk4x4"), grid_steps("none_adaptive")
        (4, None)
    """
    from benchmarks.fewstep import arm

    extra = arm(arm_name).extra
    # fewstep.arm writes the toy workloads' step size, 1/K of their T = 1.
    return None if "step_size" not in extra else round(1.0 / extra["step_size"])


def _block_T() -> float:
    """The front door's end time per block (the VAE preset's resolved ``T``)."""
    from polyreg_cnf.app.schema import resolve

    return float(resolve({"model": "vae", "data": DATA}).flow.T)


def argv_of(arm_name: str, seed: int, epochs: int, output_dir: Path) -> list[str]:
    """The ``train.py`` flags of one front-door run of ``arm_name``.

    Example:
        >>> argv_of("tpr5_rk4x4", 6, 30, Path("runs"))[:8]
        ['--model', 'vae', '--data', 'digits', '--reg', 'poly', '--poly-coef', '5']
    """
    from benchmarks.fewstep import arm

    a = arm(arm_name)
    argv = ["--model", "vae", "--data", DATA, "--reg", a.reg or "none"]
    if a.reg == "poly":
        argv += ["--poly-coef", f"{a.extra['poly_coef']:g}"]
    steps = grid_steps(arm_name)
    if steps is not None:
        argv += ["--solver", "rk4", "--step-size", repr(_block_T() / steps)]
    return [*argv, "--seed", str(seed), "--max-epochs", str(epochs), "--threads", "1",
            "--logger", "csv", "--no-progress", "--ckpt-every", "0",
            "--output-dir", str(output_dir), "--run-name", f"{arm_name}-s{seed}"]


_SUMMARY = {"test_neg_elbo": r"test -ELBO \(nats\):\s*(\S+)",
            "test_is_nll": r"test IS-NLL \(nats\):\s*(\S+)",
            "test_nfe": r"test NFE per batch:\s*(\S+)",
            "training_solver": r"training solver:\s*(.+)",
            "evaluation_solver": r"evaluation solver:\s*(.+)",
            "train_wall": r"training wall time \(s\):\s*(\S+)",
            "run_dir": r"logs:\s*(.+)"}


def parse_summary(stdout: str) -> dict[str, Any]:
    """The figures of ``train.py``'s end-of-run summary.

    Raises:
        ValueError: A line is missing, or the evaluation solver is not dopri5 (every arm must
            be scored by the default evaluation solver).
    """
    out: dict[str, Any] = {}
    for key, pattern in _SUMMARY.items():
        found = re.search(rf"^{pattern}$", stdout, re.MULTILINE)
        if found is None:
            raise ValueError(f"train.py's summary has no {pattern.split(':')[0]!r} line; got:\n"
                             f"{stdout[-2000:]}")
        text = found.group(1).strip()
        out[key] = text if key.endswith(("solver", "dir")) else float(text)
    if not out["evaluation_solver"].startswith("dopri5"):
        raise ValueError(f"the evaluation solver must be the default dopri5, got "
                         f"{out['evaluation_solver']!r}")
    return out


def parse_metrics(path: Path) -> dict[str, Any]:
    """From a run's ``metrics.csv``: steps, forward NFE per step (mean, first and last tenth),
    the last ``val/solver_gap`` (None if never logged) and the validation NLLs.

    Raises:
        ValueError: The file holds no training step.
    """
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    fwd = [float(r["nfe/forward"]) for r in rows if r.get("nfe/forward")]
    if not fwd:
        raise ValueError(f"{path} holds no training step (no nfe/forward value)")
    tenth = max(1, len(fwd) // 10)
    gaps = [float(r["val/solver_gap"]) for r in rows if r.get("val/solver_gap")]
    val = [float(r["val/nll"]) for r in rows if r.get("val/nll")]
    return {"steps": len(fwd), "forward_nfe_mean": statistics.fmean(fwd),
            "forward_nfe_first10pct": statistics.fmean(fwd[:tenth]),
            "forward_nfe_last10pct": statistics.fmean(fwd[-tenth:]),
            "last_solver_gap": gaps[-1] if gaps else None,
            "last_val_nll": val[-1] if val else None, "best_val_nll": min(val, default=None)}


def _cpu_of(pid: int) -> float | None:
    """CPU seconds (user + system) of a live process, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # utime, stime (proc(5)), in clock ticks; read here, not at import, so that importing
    # the study works where there is no /proc
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_at(timeline: Sequence[tuple[float, float]], when: float) -> float:
    """The CPU seconds of a sampled ``(wall time, CPU s)`` timeline at wall time ``when``
    (linear between samples, clamped at the ends)."""
    if not timeline:
        raise ValueError("no CPU sample was taken: the process ended at once, or this system "
                         "has no /proc (the front door's fit CPU is read from Linux's /proc)")
    before = [p for p in timeline if p[0] <= when] or timeline[:1]
    after = [p for p in timeline if p[0] >= when] or timeline[-1:]
    (t0, c0), (t1, c1) = before[-1], after[0]
    return c0 if t1 <= t0 else c0 + (c1 - c0) * (when - t0) / (t1 - t0)


def run_cell(arm_name: str, seed: int, epochs: int = EPOCHS,
             extra_argv: Sequence[str] = ()) -> dict[str, Any]:
    """Train one arm through ``train.py`` (its own niced process) and return its record.

    Args:
        arm_name: An arm of :func:`benchmarks.fewstep.arm`.
        seed: The run's ``--seed``.
        epochs: ``--max-epochs``.
        extra_argv: Flags after the arm's (tests shrink the run with them).

    Raises:
        RuntimeError: ``train.py`` exited non-zero (the message ends with its stderr's tail).
    """
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        argv = [*argv_of(arm_name, seed, epochs, Path(scratch)), *extra_argv]
        out, err = Path(scratch) / "stdout", Path(scratch) / "stderr"
        with open(out, "w") as fo, open(err, "w") as fe:
            proc = subprocess.Popen(["nice", "-n", "10", sys.executable,
                                     str(common.ROOT / "train.py"), *argv],
                                    cwd=scratch, stdout=fo, stderr=fe)
            timeline: list[tuple[float, float]] = []
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                cpu = _cpu_of(proc.pid)
                if cpu is not None:
                    timeline.append((time.time(), cpu))
                time.sleep(POLL_S)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"train.py {' '.join(argv)} exited {proc.returncode}:\n"
                               f"{err.read_text()[-3000:]}")
        summary = parse_summary(out.read_text())
        run_dir = Path(summary.pop("run_dir"))
        # Written when the run folder is made, and (last) when training ends: the test after
        # it is left out of fit_cpu.
        start = (run_dir / "config.yaml").stat().st_mtime
        end = (run_dir / "checkpoints" / "last.ckpt").stat().st_mtime
        fit_cpu = _cpu_at(timeline, end) - _cpu_at(timeline, start)
        metrics = parse_metrics(run_dir / "metrics.csv")
    return {"workload": "vae", "arm": arm_name, "seed": seed, "epochs": epochs,
            "argv": argv_of(arm_name, seed, epochs, Path("runs")) + list(extra_argv),
            **summary, **metrics, "fit_cpu": fit_cpu,
            "process_cpu": usage.ru_utime + usage.ru_stime, "load_at_start": load,
            "commit": common.git_commit(None)}


# ------------------------------------------------------------------------------ many runs
def cell_path(arm_name: str, seed: int, epochs: int) -> Path:
    """The cache file of one run (``vae-<epochs>-<arm>-<seed>.json``)."""
    return CACHE / f"vae-{epochs}-{arm_name}-{seed}.json"


def _one(arm_name: str, seed: int, epochs: int) -> None:
    print("start vae", arm_name, seed, time.strftime("%H:%M:%S"), flush=True)
    common.write_json(cell_path(arm_name, seed, epochs), run_cell(arm_name, seed, epochs))
    print("done vae", arm_name, seed, time.strftime("%H:%M:%S"), flush=True)


def run_cells(arms: Sequence[str], seeds: Sequence[int], epochs: int, jobs: int) -> None:
    """Run the arms x seeds not yet cached, ``jobs`` at a time (a failed run is reported and
    left uncached; the others go on)."""
    todo = [(a, s) for s in seeds for a in arms if not cell_path(a, s, epochs).exists()]
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(_one, a, s, epochs): (a, s) for a, s in todo}
        for done in concurrent.futures.as_completed(futures):
            if done.exception() is not None:
                print("failed vae", *futures[done], done.exception(), file=sys.stderr,
                      flush=True)


def collect(arms: Sequence[str], seeds: Sequence[int], epochs: int) -> list[dict[str, Any]]:
    """The cached runs of ``arms`` x ``seeds`` (missing ones left out)."""
    paths = [cell_path(a, s, epochs) for s in seeds for a in arms]
    return [json.loads(p.read_text()) for p in paths if p.exists()]


def payload(arms: Sequence[str], seeds: Sequence[int], epochs: int) -> dict[str, Any]:
    """The report's ``vae`` entry: what was asked for and the finished runs."""
    return {"data": DATA, "epochs": epochs, "arms": list(arms), "seeds": list(seeds),
            "baseline": BASELINE, "runs": collect(arms, seeds, epochs)}


# ------------------------------------------------------------------------------ report
def summarise(runs: Sequence[Mapping[str, Any]], baseline: str = BASELINE
              ) -> list[dict[str, Any]]:
    """Per arm (in order of appearance): median, min and max over its seeds of the test
    figures, fit CPU and forward NFE, and the seed-paired fit-CPU ratio and IS NLL difference
    against ``baseline`` (over the seeds both have)."""
    base = {r["seed"]: r for r in runs if r["arm"] == baseline}
    out = []
    for name in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == name]
        paired = [(r, base[r["seed"]]) for r in mine if r["seed"] in base]
        out.append({"arm": name, "seeds": len(mine), "paired": len(paired), **{
            key: common.spread([r[key] for r in mine])
            for key in ("test_neg_elbo", "test_is_nll", "fit_cpu", "process_cpu",
                        "forward_nfe_mean", "forward_nfe_last10pct")},
            "cpu_ratio": common.spread([r["fit_cpu"] / b["fit_cpu"] for r, b in paired]),
            "is_nll_diff": common.spread([r["test_is_nll"] - b["test_is_nll"]
                                          for r, b in paired])})
    return out


def _seeds(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


def median_to(entry: Mapping[str, Any], fmt: str) -> str:
    """'median (min to max)' of a :func:`benchmarks.common.spread` entry, '-' without one."""
    # " to ": a range of signed numbers reads badly with "-" between them
    return common.median_range(entry, fmt, " to ")


def _sentences(runs: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]],
               baseline: str) -> list[str]:
    """What the numbers say, computed: the baseline's forward NFE against the grids', how far
    apart the arms' test IS NLLs are on a seed, and the cheapest arm by fit CPU."""
    base = next((r for r in rows if r["arm"] == baseline), None)
    if base is None:
        return [f"No {baseline} run finished: nothing is compared."]
    nfe = base["forward_nfe_mean"]["median"]
    text = (f"The adaptive baseline ({baseline}) takes a median {nfe:.1f} forward evaluations "
            f"per training step ({base['forward_nfe_last10pct']['median']:.1f} over the last "
            f"tenth; {_seeds(base['seeds'])})")
    grids = [r["forward_nfe_mean"]["median"] for r in rows if "_rk4x" in r["arm"]]
    if grids:
        verdict = ("more than the baseline: the grid has no solver work to save here"
                   if min(grids) > nfe else "fewer than the baseline" if max(grids) < nfe
                   else "about as many as the baseline")
        text += (f"; the fixed-grid arms take {min(grids):.1f}-{max(grids):.1f} (their "
                 f"regularizers' evaluations included), {verdict}")
    lines = [text + "."]
    by_seed: dict[int, list[float]] = {}
    for r in runs:
        by_seed.setdefault(r["seed"], []).append(r["test_is_nll"])
    spans = [max(v) - min(v) for v in by_seed.values() if len(v) > 1]
    if spans:
        lines.append(f"On a seed, the arms' test IS NLLs lie within {max(spans):.4f} nats of "
                     f"each other (the widest of {_seeds(len(spans))}).")
    others = [r for r in rows if r["arm"] != baseline and r["cpu_ratio"]["median"] is not None]
    if others:
        fast = min(others, key=lambda r: r["cpu_ratio"]["median"])
        lines.append(f"Seed-paired, the arm with the least fit CPU is {fast['arm']} at "
                     f"{median_to(fast['cpu_ratio'], '.2f')} times the baseline's over "
                     f"{_seeds(fast['paired'])}, its test IS NLL "
                     f"{median_to(fast['is_nll_diff'], '+.4f')} nats from the baseline's.")
    return lines


def section(vae: Mapping[str, Any]) -> list[str]:
    """The report's section on the VAE front door (markdown lines) from the payload's ``vae``
    entry."""
    runs = vae["runs"]
    lines = ["## The VAE front door (reported, not scored)", "",
             f"`python train.py --model vae` on the embedded {vae['data']} ({vae['epochs']} "
             f"epochs), one whole process per run with the arm's flags (`--reg`, `--poly-coef`, "
             f"`--solver rk4 --step-size T/K`), seeds {', '.join(map(str, vae['seeds']))}. Test "
             f"figures from the evaluation solver (dopri5 at 1e-5) on the best validation "
             f"checkpoint. Fit CPU: the child's CPU seconds from its run folder's config.yaml "
             f"to its final last.ckpt (training with its per-epoch validations; the test "
             f"excluded); process CPU: the whole process. Solver gap: the last "
             f"`val/solver_gap` (per-image ELBO, training solver against evaluation solver; "
             f"not logged for the adaptive arms). No goal is judged here.", ""]
    if not runs:
        return [*lines, "(none finished)"]
    lines += common.table(
        ["arm", "seed", "steps", "training solver", "test -ELBO", "test IS NLL",
         "last solver gap", "fwd NFE first / last 10%", "fit CPU s", "process CPU s"],
        [[r["arm"], r["seed"], r["steps"], r["training_solver"], f"{r['test_neg_elbo']:.4f}",
          f"{r['test_is_nll']:.4f}",
          "-" if r["last_solver_gap"] is None else f"{r['last_solver_gap']:.1e}",
          f"{r['forward_nfe_first10pct']:.1f} / {r['forward_nfe_last10pct']:.1f}",
          f"{r['fit_cpu']:.0f}", f"{r['process_cpu']:.0f}"] for r in runs])
    rows = summarise(runs, vae["baseline"])
    lines += ["", f"Per arm, median (min to max) over seeds; ratio and difference against "
                  f"{vae['baseline']}, seed by seed:", ""]
    lines += common.table(
        ["arm", "seeds", "test -ELBO", "test IS NLL", "fit CPU s", "fwd NFE per step",
         "fit CPU ratio", "IS NLL difference"],
        [[r["arm"], r["seeds"], median_to(r["test_neg_elbo"], ".4f"),
          median_to(r["test_is_nll"], ".4f"), median_to(r["fit_cpu"], ".0f"),
          median_to(r["forward_nfe_mean"], ".1f"),
          median_to(r["cpu_ratio"], ".2f"), median_to(r["is_nll_diff"], "+.4f")] for r in rows])
    return [*lines, "", " ".join(_sentences(runs, rows, vae["baseline"]))]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.fewstep_vae``: run (or resume) front-door cells into the cache."""
    from benchmarks.fewstep import VERDICT_SEEDS, arm, verdict_arms

    parser = argparse.ArgumentParser(prog="python -m benchmarks.fewstep_vae",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    report = common.RESULTS / "fewstep.json"
    chosen = json.loads(report.read_text())["selection"]["chosen"] if report.exists() else None
    parser.add_argument("--arms", nargs="+",
                        default=None if chosen is None else
                        verdict_arms(chosen["steps"], chosen["coef"]),
                        help="arms (default: the verdict's, with the grid and coefficient "
                             "that results/fewstep.json's selection chose)")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(VERDICT_SEEDS))
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.jobs < 1:
        parser.error(f"--epochs and --jobs must be >= 1, got {args.epochs}, {args.jobs}")
    if args.arms is None:
        parser.error(f"no {report} to take the chosen grid from: give --arms")
    for name in args.arms:
        try:
            arm(name)
        except ValueError as err:
            parser.error(str(err))
    run_cells(args.arms, args.seeds, args.epochs, args.jobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
