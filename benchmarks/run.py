"""Run a named benchmark suite: several arms x workloads x seeds; write JSON, markdown and a PNG.

    python benchmarks/run.py --suite quick            # smoke run, minutes
    python benchmarks/run.py --suite full --jobs 2    # the README's comparison (under 2 hours)

Arms and workloads are defined in benchmarks/harness.py. Results go to
benchmarks/results/<suite>.json, <suite>.md and <suite>_nfe.png. Every finished run is also kept,
with its per-step NFE, in benchmarks/results/.cache/<suite>/ (committed: the raw data behind the
tables), so an interrupted suite started again with the same command only runs what is missing
(``--fresh`` ignores the cache).

``--jobs N`` trains N runs at once in separate processes, one torch thread each: on a 2-core
machine two single-threaded runs do not slow each other measurably, while two threads in one
process competing with anything else do (see README, "Performance notes").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    ARMS,
    RUN_THREADS,
    WORKLOADS,
    Arm,
    Workload,
    fmt,
    machine,
    plot_nfe,
    run_one,
    summarise,
    write_json,
)

RESULTS = Path(__file__).resolve().parent / "results"

SUITES = {
    "quick": dict(workloads={"checkerboard": 200}, seeds=(0, 1, 2),
                  arms=("ffjord", "tpr_paper", "ffjord_matched", "rnode", "tpr_fast")),
    # A longer look at the matched-tolerance question only (one seed: a probe, not a verdict).
    "matched": dict(workloads={"checkerboard": 3000}, seeds=(0,),
                    arms=("ffjord_matched", "tpr_carry")),
    # Seconds per step of each engineering option alone, TPR at matched tolerance.
    "engineering": dict(workloads={"checkerboard": 500}, seeds=(0, 1, 2),
                        arms=("ffjord_matched", "tpr_paper", "tpr_seminorm", "tpr_carry_only",
                              "tpr_carry", "tpr_fast", "tpr_fast_exact", "ffjord_direct")),
    # Sized to finish in under 2 hours on 2 cores with --jobs 2 (arm (1) at 1e-8/1e-6 is the
    # long pole: about 3x the cost of a matched-tolerance run). Measured per-run costs at the
    # earlier sizes (checkerboard 2000, 8gaussians and breast cancer 1500 steps) added up to
    # about 2.5 hours, hence these.
    "full": dict(workloads={"checkerboard": 1500, "8gaussians": 1000, "breast_cancer": 1000,
                            "vae_digits": 420},
                 seeds=(0, 1, 2),
                 arms=("ffjord", "tpr_paper", "ffjord_matched", "rnode", "tpr_fast",
                       "ffjord_direct")),
}

# Rough relative cost per step, to start the longest runs first when running in parallel.
_COST = {"ffjord": 3.0, "tpr_paper": 1.4, "tpr_seminorm": 1.2, "rnode": 1.1,
         "ffjord_matched": 1.0, "tpr_carry_only": 1.0, "tpr_carry": 0.9, "tpr_fast_exact": 0.8,
         "tpr_fast": 0.6, "ffjord_direct": 0.6}
_WORKLOAD_COST = {"checkerboard": 1.0, "8gaussians": 0.8, "breast_cancer": 0.4,
                  "vae_digits": 2.0}


def _cache_file(cache: Path, w: Workload, arm: Arm, seed: int) -> Path:
    return cache / f"{w.name}-{w.steps}-{arm.name}-{seed}.json"


def _definitions(w: Workload, arm: Arm) -> dict[str, Any]:
    # Through JSON so tuples become lists, as they are in a cached file.
    return json.loads(json.dumps({"workload_def": dataclasses.asdict(w),
                                  "arm_def": dataclasses.asdict(arm)}))


def _load_cached(path: Path, w: Workload, arm: Arm) -> dict[str, Any] | None:
    """A cached run, if it was made with the same workload and arm definitions."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    defs = _definitions(w, arm)
    if any(data.get(k) != v for k, v in defs.items()):
        return None
    return data["run"]


def _run_and_cache(w: Workload, arm: Arm, seed: int, cache: Path) -> dict[str, Any]:
    run = run_one(w, arm, seed)
    write_json(_cache_file(cache, w, arm, seed), {**_definitions(w, arm), "run": run})
    return run


FLOOR = 8  # dopri5 evaluations of a one-step solve (2 to pick the first step + 6)


def _med(entry: dict[str, Any], key: str) -> float | None:
    value = entry.get(key)
    return None if value is None else value.get("median")


def goals(summary: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals per workload, from the summary (None where an arm is missing)."""
    out: dict[str, Any] = {}
    for wname, arms in summary.items():
        g: dict[str, Any] = {}
        if "ffjord" in arms and "tpr_paper" in arms:
            base, tpr = arms["ffjord"], arms["tpr_paper"]
            cut = 1 - _med(tpr, "total_nfe") / _med(base, "total_nfe")
            gap = _med(tpr, "test_nll") - _med(base, "test_nll")
            g["paper_settings"] = {"total_nfe_reduction": cut, "test_nll_diff": gap,
                                   # "Unchanged quality": at most 0.05 nats worse.
                                   "met": cut >= 0.40 and gap <= 0.05}
        if "ffjord_matched" in arms:
            base = arms["ffjord_matched"]
            for aname in ("tpr_fast", "ffjord_direct", "tpr_carry", "rnode"):
                if aname not in arms:
                    continue
                sp = arms[aname]["speedup_to_ffjord_matched_final_val"]
                gap = _med(arms[aname], "test_nll") - _med(base, "test_nll")
                g[f"matched_{aname}"] = {
                    "speedup_median": sp["median"], "speedup_per_seed": sp["per_seed"],
                    "test_nll_diff": gap,
                    "met": sp["median"] is not None and sp["median"] >= 1.5 and gap <= 0.05}
            if "tpr_fast" in arms and "ffjord_direct" in arms:
                # The regularizer's own share: arm 5 against the same engineering without it.
                a, b = arms["tpr_fast"], arms["ffjord_direct"]
                g["tpr_vs_same_engineering"] = {
                    "seconds_per_step_ratio": _med(b, "seconds_per_step")
                    / _med(a, "seconds_per_step"),
                    "forward_nfe_ratio": _med(a, "forward_nfe") / _med(b, "forward_nfe"),
                    "test_nll_diff": _med(a, "test_nll") - _med(b, "test_nll")}
        # The floor is per solve; a VAE test batch runs several (importance samples).
        toy = wname in WORKLOADS and WORKLOADS[wname].kind == "toy"
        for aname in ("tpr_paper", "tpr_fast"):
            if toy and aname in arms and "ffjord_matched" in arms:
                g[f"test_nfe_{aname}"] = {
                    "test_nfe": _med(arms[aname], "test_nfe"),
                    "times_floor": _med(arms[aname], "test_nfe") / FLOOR,
                    "test_nll_diff": _med(arms[aname], "test_nll")
                    - _med(arms["ffjord_matched"], "test_nll")}
        out[wname] = g
    return out


def _speedup(entry: dict[str, Any]) -> str:
    sp = entry.get("speedup_to_ffjord_matched_final_val")
    if sp is None:
        return "-"
    if sp["median"] is not None:
        return f"{sp['median']:.2f}x"
    return f"reached in {sp['reached']}/{sp['of']} seeds"


def markdown(suite: str, payload: dict) -> str:
    m = payload["machine"]
    lines = [f"# Benchmark suite `{suite}`", "",
             f"Command: `{payload['command']}`  ",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch thread(s) "
             f"per run, {m.get('parallel_jobs', 1)} run(s) at once; torch {m['torch']}, "
             f"lightning {m['lightning']}, torchdiffeq {m['torchdiffeq']}; "
             f"commit {m['git_commit']}; {m['date']}; {payload['seconds']:.0f} s in all "
             f"({payload.get('trained_runs', '?')} runs trained by this command, "
             f"{payload.get('cached_runs', 0)} taken from the cache).  ",
             f"Training steps: {payload.get('steps', '?')}.  ",
             *([f"**Partial: {payload['missing_runs']} runs of the suite had not finished; "
                "figures are over the runs that had.**  "] if payload.get("missing_runs") else []),
             "Figures: median [min, max] over seeds "
             f"{list(payload['seeds'])}. NFE = right-hand-side calls per training step, averaged "
             "over training (the paper's code counted 2 per call); backward = adjoint solves, 0 "
             "when backpropagating through the solver. Test NLL at the evaluation tolerance "
             "1e-5 (exact trace; VAE: importance-sampled NLL); test NFE = forward NFE per test "
             "batch and block (floor: 8 for dopri5); gap = NLL at the training tolerance minus "
             "NLL at 1e-5. s to (k) = training seconds until the validation NLL first reaches "
             "arm (k)'s final validation NLL (same seed); speed-up = arm (3)'s time to that "
             "value / this arm's.", ""]
    for wname, arms in payload["summary"].items():
        lines += [f"## {wname}", "",
                  "| arm | fwd NFE | bwd NFE | total NFE | s/step | test NLL | test NFE | gap | "
                  "s to (1) final val | s to (3) final val | speed-up vs (3) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for aname, e in arms.items():
            lines.append(
                f"| {ARMS[aname].label} | {fmt(e['forward_nfe'])} | {fmt(e['backward_nfe'])} | "
                f"{fmt(e['total_nfe'])} | {fmt(e['seconds_per_step'], 3)} | "
                f"{fmt(e['test_nll'], 4)} | {fmt(e['test_nfe'])} | "
                f"{fmt(e['tolerance_gap'], 4)} | "
                f"{fmt(e.get('seconds_to_ffjord_final_val'), 0)} | "
                f"{fmt(e.get('seconds_to_ffjord_matched_final_val'), 0)} | {_speedup(e)} |")
        lines.append("")
    lines += ["## Goals", "",
              "| workload | paper settings: total NFE (2) vs (1) | (5) vs (3): wall time to (3)'s "
              "final val NLL | (3b) vs (3) (engineering alone) | (5) vs (3b): s/step, fwd NFE | "
              "test NFE of (5) / floor 8 |",
              "|---|---|---|---|---|---|"]

    def cell(g: dict[str, Any] | None, kind: str) -> str:
        if g is None:
            return "-"
        if kind == "paper":
            return (f"{-100 * g['total_nfe_reduction']:+.0f} %, NLL {g['test_nll_diff']:+.4f}"
                    f" ({'met' if g['met'] else 'not met'})")
        if kind == "speed":
            sp = g["speedup_median"]
            text = "not reached in every seed" if sp is None else f"{sp:.2f}x"
            per = ", ".join("-" if v is None else f"{v:.2f}" for v in g["speedup_per_seed"])
            return f"{text} (seeds: {per}), NLL {g['test_nll_diff']:+.4f}"
        if kind == "same":
            return (f"{g['seconds_per_step_ratio']:.2f}x faster per step, fwd NFE "
                    f"x{g['forward_nfe_ratio']:.2f}, NLL {g['test_nll_diff']:+.4f}")
        return f"{g['test_nfe']:.0f} = {g['times_floor']:.1f}x, NLL {g['test_nll_diff']:+.4f}"

    for wname, g in payload.get("goals", {}).items():
        lines.append(f"| {wname} | {cell(g.get('paper_settings'), 'paper')} | "
                     f"{cell(g.get('matched_tpr_fast'), 'speed')} | "
                     f"{cell(g.get('matched_ffjord_direct'), 'speed')} | "
                     f"{cell(g.get('tpr_vs_same_engineering'), 'same')} | "
                     f"{cell(g.get('test_nfe_tpr_fast'), 'floor')} |")
    lines += ["", f"![NFE per step]({suite}_nfe.png)"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--arms", default=None, help="comma-separated subset of the arms")
    parser.add_argument("--workloads", default=None,
                        help="comma-separated subset of the suite's workloads")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once, one process and one thread each")
    parser.add_argument("--fresh", action="store_true", help="ignore cached finished runs")
    parser.add_argument("--cached-only", action="store_true",
                        help="train nothing: summarise the finished runs in the cache (the "
                             "output then says how many runs are missing)")
    args = parser.parse_args()
    suite = SUITES[args.suite]
    arms = args.arms.split(",") if args.arms else list(suite["arms"])
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; valid: {', '.join(ARMS)}")
    workloads = dict(suite["workloads"])
    if args.workloads:
        wanted = args.workloads.split(",")
        bad = [w for w in wanted if w not in workloads]
        if bad:
            parser.error(f"workloads {bad} are not in suite {args.suite!r}; valid: "
                         f"{', '.join(workloads)}")
        workloads = {w: workloads[w] for w in wanted}
    if not 1 <= args.jobs <= (os.cpu_count() or 1):
        parser.error(f"--jobs must be between 1 and the {os.cpu_count()} cores, got {args.jobs}")
    cache = RESULTS / ".cache" / args.suite
    start = time.perf_counter()
    todo: list[tuple[Workload, Arm, int]] = []
    done: dict[tuple[str, str, int], dict[str, Any]] = {}
    for wname, steps in workloads.items():
        work = dataclasses.replace(WORKLOADS[wname], steps=steps,
                                   eval_every=max(1, min(WORKLOADS[wname].eval_every, steps // 4)))
        for seed in suite["seeds"]:
            for aname in arms:
                arm = ARMS[aname]
                cached = None if args.fresh else _load_cached(
                    _cache_file(cache, work, arm, seed), work, arm)
                if cached is not None:
                    done[(wname, aname, seed)] = cached
                else:
                    todo.append((work, arm, seed))
    print(f"{len(done)} runs cached in {cache}, {len(todo)} to run with {args.jobs} job(s)",
          flush=True)
    missing = 0
    if args.cached_only:
        missing, todo = len(todo), []
        if not done:
            parser.error(f"--cached-only: no finished runs of suite {args.suite!r} in {cache}")
    todo.sort(key=lambda t: -t[0].steps * _COST.get(t[1].name, 1.0)
              * _WORKLOAD_COST.get(t[0].name, 1.0))
    if args.jobs == 1:
        for work, arm, seed in todo:
            print(f"[{time.perf_counter() - start:6.0f} s] {work.name} {arm.name} seed {seed}",
                  flush=True)
            done[(work.name, arm.name, seed)] = _run_and_cache(work, arm, seed, cache)
    else:
        # spawn: a forked child would inherit torch's thread pools and Lightning state.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            futures = {pool.submit(_run_and_cache, work, arm, seed, cache):
                       (work.name, arm.name, seed) for work, arm, seed in todo}
            for fut in as_completed(futures):
                done[futures[fut]] = fut.result()
                print(f"[{time.perf_counter() - start:6.0f} s] finished "
                      f"{' '.join(map(str, futures[fut]))}", flush=True)
    runs = [done[(w, a, s)] for w in workloads for s in suite["seeds"] for a in arms
            if (w, a, s) in done]
    command = ("python benchmarks/run.py " + " ".join(sys.argv[1:])).strip()
    info = machine()
    info["parallel_jobs"] = args.jobs
    info["torch_threads"] = RUN_THREADS  # what each run uses, not this process
    payload = {"suite": args.suite, "command": command, "machine": info,
               "seeds": list(suite["seeds"]), "seconds": time.perf_counter() - start,
               "steps": workloads, "missing_runs": missing, "trained_runs": len(todo),
               "cached_runs": len(runs) - len(todo),
               "summary": summarise(runs),
               "runs": [{k: v for k, v in r.items() if k != "nfe_per_step"} for r in runs]}
    payload["goals"] = goals(payload["summary"])
    write_json(RESULTS / f"{args.suite}.json", payload)
    plot_nfe(runs, RESULTS / f"{args.suite}_nfe.png")
    text = markdown(args.suite, payload)
    (RESULTS / f"{args.suite}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
