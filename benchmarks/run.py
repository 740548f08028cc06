"""Run a named benchmark suite: several arms x workloads x seeds; write JSON, markdown and PNGs.

    python -m benchmarks.run --suite quick            # smoke run, minutes
    python -m benchmarks.run --suite full --jobs 2    # the README's comparison
    python -m benchmarks.run --suite long --workloads mixture16 --jobs 2      # one workload
    python -m benchmarks.run --suite long --cached-only   # summarise every finished long run

Arms and workloads: benchmarks/harness.py. Results: benchmarks/results/<suite>.json, .md,
_nfe.png (long suites also _probes.png); finished runs are cached in results/.cache/<suite>/, so
the same command resumes an interrupted suite. Every comparison between arms is seed-paired.
What each suite is for, and how it is sized: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common, harness
from benchmarks.common import UsageError, machine, spread, table, write_json
from benchmarks.harness import ARMS, WORKLOADS, Arm, Workload, definitions, fmt, run_one, summarise
from benchmarks.pool import PoolStopped, run_pool

RESULTS = common.RESULTS

#: The suites (what each is for and how it is sized: docs/benchmarks.md).
SUITES = {
    "quick": dict(workloads={"checkerboard": 200}, seeds=(0, 1, 2),
                  arms=("ffjord", "tpr_paper", "ffjord_matched", "rnode", "tpr_fast")),
    "matched": dict(workloads={"checkerboard": 3000}, seeds=(0,),
                    arms=("ffjord_matched", "tpr_carry")),
    "engineering": dict(workloads={"checkerboard": 500}, seeds=(0, 1, 2),
                        arms=("ffjord_matched", "tpr_paper", "tpr_seminorm", "tpr_carry_only",
                              "tpr_carry", "tpr_fast", "tpr_fast_exact", "ffjord_direct")),
    "full": dict(workloads={"checkerboard": 1500, "8gaussians": 1000, "breast_cancer": 1000,
                            "vae_digits": 420},
                 seeds=(0, 1, 2),
                 arms=("ffjord", "tpr_paper", "ffjord_matched", "rnode", "tpr_fast",
                       "ffjord_direct")),
    "vae": dict(workloads={"vae_digits": 420}, seeds=(0, 1, 2),
                arms=("ffjord_base_direct", "tpr_fast", "ffjord_base_direct_hard",
                      "tpr_fast_hard"),
                pairs={"tpr_fast": "ffjord_base_direct",
                       "tpr_fast_hard": "ffjord_base_direct_hard"}),
    "sweep": dict(workloads={"checkerboard": 6000, "mixture16": 4000}, seeds=(0,),
                  arms=("ffjord_direct", "tpr_fast", "tpr_fast_c1", "tpr_fast_c20",
                        "tpr_fast_c50", "tpr_fast_k4", "tpr_fast_m2"),
                  baselines=("ffjord_direct",), ckpt_every=1000, probe_every=1000),
    "long": dict(workloads={"checkerboard": 10000, "8gaussians": 6000, "mixture16": 8000},
                 seeds=(0, 1, 2),
                 arms=("ffjord_direct", "tpr_fast", "tpr_fast_c1"),
                 baselines=("ffjord_direct",), ckpt_every=1000, probe_every=1000,
                 keep_models=True),
    "long_cosine": dict(workloads={"8gaussians": 6000, "mixture16": 8000}, seeds=(0, 1, 2),
                        arms=("ffjord_direct_cos", "tpr_fast_cos"),
                        baselines=("ffjord_direct_cos",), ckpt_every=1000, probe_every=1000,
                        keep_models=True),
    "long_fresh": dict(workloads={"checkerboard": 10000}, seeds=(3, 4, 5),
                       arms=("ffjord_direct", "tpr_fast_c1", "tpr_fast_late"),
                       baselines=("ffjord_direct",), ckpt_every=1000, probe_every=1000,
                       keep_models=True, beside="long"),
    "long_small": dict(workloads={"checkerboard": 2000}, seeds=(0, 1),
                       arms=("ffjord_direct", "tpr_fast"), baselines=("ffjord_direct",),
                       ckpt_every=500, probe_every=500, keep_models=True),
}

# Rough relative cost per step, to start the longest runs first when running in parallel.
_COST = {"ffjord": 3.0, "tpr_paper": 1.4, "tpr_seminorm": 1.2, "rnode": 1.1,
         "ffjord_matched": 1.0, "tpr_carry_only": 1.0, "tpr_carry": 0.9, "tpr_fast_exact": 0.8,
         "tpr_fast": 0.6, "ffjord_direct": 0.6, "tpr_fast_c1": 0.65, "ffjord_direct_cos": 0.6,
         "tpr_fast_cos": 0.6, "tpr_fast_late": 0.6}
_WORKLOAD_COST = {"checkerboard": 1.0, "8gaussians": 0.8, "breast_cancer": 0.4,
                  "vae_digits": 2.0, "mixture16": 0.8}


def _cache_file(cache: Path, w: Workload, arm: Arm, seed: int) -> Path:
    return cache / f"{w.name}-{w.steps}-{arm.name}-{seed}.json"


def _load_cached(path: Path, w: Workload, arm: Arm) -> dict[str, Any] | None:
    """A cached run, if it was made with the same workload and arm definitions."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return None if any(data.get(k) != v for k, v in definitions(w, arm).items()) else data["run"]


def model_file(suite: str, w: Workload, arm: Arm, seed: int) -> Path:
    """Where a suite that keeps its models (``keep_models``) keeps this run's final model."""
    return RESULTS / ".models" / suite / (_cache_file(Path(suite), w, arm, seed).stem + ".pt")


def suite_workload(suite: str, wname: str) -> Workload:
    """Workload ``wname`` as suite ``suite`` trains it (its length and validation interval)."""
    steps = SUITES[suite]["workloads"][wname]
    return dataclasses.replace(WORKLOADS[wname], steps=steps,
                               eval_every=max(1, min(WORKLOADS[wname].eval_every, steps // 4)))


def _run_and_cache(w: Workload, arm: Arm, seed: int, cache: Path, ckpt_every: int = 0,
                   probe_every: int = 0, keep_models: bool = False) -> dict[str, Any]:
    # Long runs checkpoint in a work folder beside the cache (outside git): the same command
    # resumes them.
    extra: dict[str, Any] = {}
    if ckpt_every:
        extra.update(work_dir=RESULTS / ".work" / cache.name
                     / _cache_file(cache, w, arm, seed).stem, ckpt_every=ckpt_every)
    if probe_every:
        extra["probe_every"] = probe_every
    if keep_models:
        extra["model_path"] = model_file(cache.name, w, arm, seed)
    run = run_one(w, arm, seed, **extra)
    write_json(_cache_file(cache, w, arm, seed), {**definitions(w, arm), "run": run})
    return run


FLOOR = 8  # dopri5 evaluations of a one-step solve (2 to pick the first step + 6)


def _pair(arms: dict[str, Any], aname: str, base: str, key: str,
          transform: Callable[[float], float] | None = None) -> dict[str, Any]:
    """``aname`` against ``base`` in ``key``, seed by seed (harness.paired), each value
    optionally ``transform``-ed (a ratio into a reduction), with its seeds and spread."""
    p = arms[aname][f"paired_to_{base}"]
    values = p[key]["per_seed"]
    if transform is not None:
        values = [None if v is None else transform(v) for v in values]
    return {"seeds": p["seeds"], "per_seed": values, **spread(values)}


def goals(summary: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals per workload, from the summary (absent where an arm is missing); each
    comparison seed-paired, its median the verdict."""
    out: dict[str, Any] = {}
    for wname, arms in summary.items():
        g: dict[str, Any] = {}
        if "ffjord" in arms and "tpr_paper" in arms:
            cut = _pair(arms, "tpr_paper", "ffjord", "total_nfe", lambda r: 1 - r)
            gap = _pair(arms, "tpr_paper", "ffjord", "test_nll")
            g["paper_settings"] = {"total_nfe_reduction": cut, "test_nll_diff": gap,
                                   # "Unchanged quality": at most 0.05 nats worse.
                                   "met": cut["median"] >= 0.40 and gap["median"] <= 0.05}
        if "ffjord_matched" in arms:
            for aname in [a for a in ("tpr_fast", "ffjord_direct", "tpr_carry", "rnode")
                          if a in arms]:
                sp = arms[aname]["speedup_to_ffjord_matched_final_val"]
                gap = _pair(arms, aname, "ffjord_matched", "test_nll")
                g[f"matched_{aname}"] = {
                    "speedup_median": sp["median"], "speedup_per_seed": sp["per_seed"],
                    "test_nll_diff": gap,
                    "met": sp["median"] is not None and sp["median"] >= 1.5
                    and gap["median"] <= 0.05}
            if "tpr_fast" in arms and "ffjord_direct" in arms:
                # The regularizer's own share: arm 5 against the same engineering without it.
                same = functools.partial(_pair, arms, "tpr_fast", "ffjord_direct")
                g["tpr_vs_same_engineering"] = {
                    "seconds_per_step_ratio": same("seconds_per_step", lambda r: 1 / r),
                    "forward_nfe_ratio": same("forward_nfe"), "test_nll_diff": same("test_nll")}
            # The floor is per solve; a VAE test batch runs several (importance samples).
            toy = wname in WORKLOADS and WORKLOADS[wname].kind == "toy"
            for aname in [a for a in ("tpr_paper", "tpr_fast") if toy and a in arms]:
                test_nfe = arms[aname]["test_nfe"]["median"]
                g[f"test_nfe_{aname}"] = {
                    "test_nfe": test_nfe, "times_floor": test_nfe / FLOOR,
                    "test_nll_diff": _pair(arms, aname, "ffjord_matched", "test_nll")}
        out[wname] = g
    return out


BASE = "ffjord_direct"  # arm (3b): the baseline of the sweep and long suites


def _reached(entry: dict[str, Any] | None) -> str:
    return "-" if entry is None else f"{entry['reached']}/{entry['of']}"


def _speedup(entry: dict[str, Any] | None) -> dict[str, Any]:
    """A speed-up entry (harness.speedups) over all seeds: its per-seed values (None: never
    reached), the range of the reached and the median counting an unreached seed as 0 (so a
    median exists whenever most seeds got there; None if none did)."""
    if entry is None:
        return {**spread([]), "per_seed": []}
    values = entry["per_seed"]
    return {**spread(values, skip_none=True), "per_seed": values,
            "median": entry.get("median_unreached_as_zero", entry["median"]) or None}


def long_goals(summary: dict[str, Any], base_arm: str = BASE) -> dict[str, Any]:
    """Issue 14's long-run goals per workload and TPR arm against ``base_arm`` ((3b)), seed by
    seed; the median over seeds decides each goal, except test NFE, which every seed must meet."""
    out: dict[str, Any] = {}
    for wname, arms in summary.items():
        if base_arm not in arms:
            continue
        g: dict[str, Any] = {}
        for aname, e in arms.items():
            if aname == base_arm:
                continue
            within, exact, nfe_within, smoothed, nfe_smoothed = (e.get(
                f"{kind}_to_{base_arm}_final_val{margin}") for kind, margin in (
                ("speedup", "_within_0.01"), ("speedup", ""), ("nfe_speedup", "_within_0.01"),
                ("speedup", "_smoothed_within_0.01"), ("nfe_speedup", "_smoothed_within_0.01")))
            fewer = _pair(arms, aname, base_arm, "forward_nfe_last10pct", lambda r: 1 - r)
            gap = _pair(arms, aname, base_arm, "test_nll")
            test_nfe = _pair(arms, aname, base_arm, "test_nfe")
            speed, nfe_speed = _speedup(within), _speedup(nfe_within)
            speedup = speed["median"]
            g[aname] = {
                "seeds": e[f"paired_to_{base_arm}"]["seeds"],
                "speedup_within_0.01": speedup, "speedup_exact": _speedup(exact)["median"],
                "speedup_within_0.01_per_seed": speed,
                "nfe_speedup_within_0.01": nfe_speed["median"],
                "nfe_speedup_within_0.01_per_seed": nfe_speed,
                "reached_within_0.01": _reached(within), "reached_exact": _reached(exact),
                # The same on curves averaged over 5 evaluations (a robustness check).
                "speedup_smoothed_within_0.01": _speedup(smoothed)["median"],
                "nfe_speedup_smoothed_within_0.01": _speedup(nfe_smoothed)["median"],
                "reached_smoothed_within_0.01": _reached(smoothed),
                "forward_nfe_last10pct_reduction": fewer, "test_nll_diff": gap,
                "test_nfe_ratio": test_nfe,
                "met": (speedup is not None and speedup >= 1.3 and fewer["median"] is not None
                        and fewer["median"] >= 0.20 and gap["median"] <= 0.05),
                "test_nfe_met": bool(test_nfe["per_seed"]) and all(
                    r is not None and r <= 1.0 for r in test_nfe["per_seed"])}
        out[wname] = g
    return out


def beside_goals(goals_here: dict[str, Any], goals_other: dict[str, Any]) -> dict[str, Any]:
    """The seed-paired goals of the workloads and arms two suites share (a suite of fresh seeds
    ``beside`` an earlier one): the per-seed values of both (the other suite's first),
    summarised together as :func:`long_goals` summarises them."""
    out: dict[str, Any] = {}
    for wname, arms in goals_here.items():
        for aname, mine in arms.items():
            other = goals_other.get(wname, {}).get(aname)
            if other is None:
                continue
            entry: dict[str, Any] = {"seeds": [*other["seeds"], *mine["seeds"]]}
            for key in ("speedup_within_0.01_per_seed", "nfe_speedup_within_0.01_per_seed",
                        "forward_nfe_last10pct_reduction", "test_nll_diff", "test_nfe_ratio"):
                values = [*other[key]["per_seed"], *mine[key]["per_seed"]]
                if key.endswith("speedup_within_0.01_per_seed"):
                    # A summarise()-style speed-up entry, read the way long_goals reads one.
                    raw = harness.speedups(values)
                    entry[key] = {**_speedup(raw), "reached": _reached(raw)}
                else:
                    entry[key] = {"per_seed": values, **spread(values)}
            out.setdefault(wname, {})[aname] = entry
    return out


def _spread_text(v: dict[str, Any], fmt: str, scale: float = 1.0, unit: str = "",
                 seeds_if_none: bool = False) -> str:
    """'median [min, max] (seeds: a, b, c)' of a seed-paired entry, each value x ``scale``."""
    per = ", ".join("-" if x is None else format(scale * x, fmt) for x in v["per_seed"])
    if v["median"] is None:
        return f"- (seeds: {per})" if seeds_if_none else "-"
    lo, hi = sorted((scale * v["min"], scale * v["max"]))
    return (f"{format(scale * v['median'], fmt)}{unit} [{format(lo, fmt)}, {format(hi, fmt)}] "
            f"(seeds: {per})")


_signed = functools.partial(_spread_text, fmt="+.4f")
_times = functools.partial(_spread_text, fmt=".2f", unit="x")
_pct = functools.partial(_spread_text, fmt=".0f", scale=100, unit=" %")
_speed_text = functools.partial(_spread_text, fmt=".2f", unit="x", seeds_if_none=True)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _reached_text(v: dict[str, Any] | None) -> str:
    """A speed-up entry (harness.speedups) as its median, '(k/n)' where a seed never reached."""
    if v is None or v["median"] is not None:
        return _x(v and v["median"])
    zero = v.get("median_unreached_as_zero")
    return f"{_x(zero)} ({_reached(v)})" if zero else _reached(v)


def paired_lines(arms: dict[str, Any], base: str) -> list[str]:
    """A markdown table of every arm against ``base``, seed by seed (harness.paired), with the
    training seconds to ``base``'s final validation NLL and the speed-ups there."""
    def to_base(e: dict[str, Any], kind: str, show: Callable[[Any], str]) -> str:
        return " / ".join(show(e.get(f"{kind}_to_{base}_final_val{margin}"))
                          for margin in ("", "_within_0.01"))

    rows = [[aname, *(("-",) * 5 if p is None else (
                _signed(p["test_nll"]), _times(p["test_nfe"]), _times(p["forward_nfe_last10pct"]),
                _times(p["total_nfe"]), _spread_text(p["seconds_per_step"], ".3f", unit="x"))),
             to_base(e, "seconds", lambda v: fmt(v, 0)), to_base(e, "speedup", _reached_text),
             to_base(e, "nfe_speedup", _reached_text)]
            for aname, e in arms.items() if (p := e.get(f"paired_to_{base}")) is not None
            or f"speedup_to_{base}_final_val" in e]
    label = ARMS[base].label if base in ARMS else base
    return [f"Against {label}, seed by seed (each seed's difference or ratio with the same "
            "seed's baseline run; median [min, max] over seeds, then the per-seed values):", "",
            *table(["arm", "test NLL diff (nats)", "test NFE ratio", "fwd NFE ratio, last 10 %",
                    "total NFE ratio", "s/step ratio", "s to its final val (exact / within 0.01)",
                    "speed-up (exact / within 0.01)", "NFE speed-up (exact / within 0.01)"],
                   rows), ""]


#: The goal tables' columns: a header, the goal entry's key and its cell (from the value and the
#: entry); a table shows the columns whose key some goal of it has.
_GOAL_COLUMNS: tuple[tuple[str, str, Callable[[Any, dict[str, Any]], str]], ...] = (
    ("fewer total NFE (>= 40 %)", "total_nfe_reduction", lambda x, _: _pct(x)),
    ("wall-time speed-up to the baseline's final val (>= 1.5)", "speedup_per_seed",
     lambda x, v: _speed_text({**spread(x, skip_none=True), "per_seed": x,
                               "median": v["speedup_median"]})),
    ("wall-time speed-up to the baseline's final val within 0.01 (>= 1.3)",
     "speedup_within_0.01_per_seed",
     lambda x, v: f"{_speed_text(x)} (reached {v.get('reached_within_0.01', x.get('reached'))})"),
    ("the same in NFE", "nfe_speedup_within_0.01_per_seed", lambda x, _: _speed_text(x)),
    ("steps per second / the baseline's", "seconds_per_step_ratio", lambda x, _: _times(x)),
    ("fwd NFE ratio", "forward_nfe_ratio", lambda x, _: _times(x)),
    ("fewer fwd NFE, last 10 % (>= 20 %)", "forward_nfe_last10pct_reduction",
     lambda x, _: _pct(x)),
    ("test NLL diff (<= 0.05)", "test_nll_diff", lambda x, _: _signed(x)),
    (f"test NFE = multiple of the floor {FLOOR}", "times_floor",
     lambda x, v: f"{v['test_nfe']:.0f} = {x:.1f}x"),
    ("test NFE / the baseline's (every seed <= 1)", "test_nfe_ratio", lambda x, v: _times(x) + (
        f" ({'met' if v['test_nfe_met'] else 'not met'})" if "test_nfe_met" in v else "")),
    ("the speed-up on curves averaged over 5 evaluations: wall / NFE (reached)",
     "reached_smoothed_within_0.01", lambda x, v: f"{_x(v['speedup_smoothed_within_0.01'])} / "
     f"{_x(v['nfe_speedup_smoothed_within_0.01'])} ({x})"),
    ("met", "met", lambda x, _: "met" if x else "not met"),
)


def goal_lines(goals: dict[str, dict[str, Any]]) -> list[str]:
    """A markdown table of seed-paired goals (``{workload: {goal or arm: entry}}``)."""
    entries = [(wname, name, v) for wname, g in goals.items() for name, v in g.items()]
    shown = [c for c in _GOAL_COLUMNS if any(c[1] in v for *_, v in entries)]
    return table(["workload", "goal (arm)", *(header for header, *_ in shown)],
                 [[wname, name, *(show(v[key], v) if key in v else "-" for _, key, show in shown)]
                  for wname, name, v in entries]) if entries else [
        "None: the suite lacks the arms its goals compare."]


def _header(payload: dict[str, Any]) -> list[str]:
    """Title, command, machine, runs, steps and seeds of a suite's markdown; where to read it."""
    jobs = payload["machine"]["parallel_jobs"]
    ran = (f"{jobs} at once, one torch thread each" if jobs else
           "trained by earlier invocations (this one only summarised the cache)")
    return common.suite_header(
        f"Benchmark suite `{payload['suite']}`", payload["command"], payload["machine"],
        f"Runs: {ran}; {payload['seconds']:.0f} s in all ({payload['trained_runs']} trained by "
        f"this command, {payload['cached_runs']} taken from the cache).  ",
        f"Training steps: {payload['steps']}; seeds {payload['seeds']}.  ",
        *([f"**Note.** {payload['note']}  "] if payload.get("note") else []),
        *([f"**Partial: {payload['missing_runs']} runs of the suite had not finished; "
           "figures are over the runs that had.**  "] if payload["missing_runs"] else []),
        "How to read the tables: docs/benchmarks.md, \"Reading the reports\".", "")


def markdown(payload: dict[str, Any]) -> str:
    """A suite's report: per workload each arm's own figures, every arm against each baseline
    (seed-paired) and the probes over training; then the goals (seed-paired)."""
    suite, lines = payload["suite"], _header(payload)
    for wname, arms in payload["summary"].items():
        lines += [f"## {wname}", "", *table(
            ["arm", "fwd NFE (all / last 10 %)", "bwd NFE", "total NFE", "s/step", "train s",
             "test NLL", "test NFE", "gap"],
            [[ARMS[aname].label, f"{fmt(e['forward_nfe'])} / {fmt(e['forward_nfe_last10pct'])}",
              *(fmt(e[k], d) for k, d in (
                  ("backward_nfe", 1), ("total_nfe", 1), ("seconds_per_step", 3),
                  ("train_seconds", 0), ("test_nll", 4), ("test_nfe", 1), ("tolerance_gap", 4)))]
             for aname, e in arms.items()]), ""]
        for base in [b for b in arms if any(f"paired_to_{b}" in e for e in arms.values())]:
            lines += paired_lines(arms, base)
        probes = probe_medians(payload["runs"], wname)
        if probes:
            lines += ["Over training (medians of seeds; test NFE per solve of 2,000 test rows at "
                      "1e-5 / polynomial penalty / path length over displacement):", "",
                      *table(["arm", *(f"step {p['step']}" for p in
                                       next(iter(probes.values())))],
                             [[aname, *(f"{p['test_nfe']:.0f} / {p['penalty']:.3g} / "
                                        f"{p['path_ratio']:.3f}" for p in meds)]
                              for aname, meds in probes.items()]), ""]
    lines += ["## Goals (each seed against its own baseline)", "",
              *goal_lines(payload.get("goals", {})), ""]
    if (beside := payload.get("beside")) and beside["goals"]:
        seeds = next(iter(next(iter(beside["goals"].values())).values()))["seeds"]
        lines += [f"## Beside suite `{beside['suite']}` (seeds {beside['seeds']})", "",
                  f"The arms both suites ran, each seed against its own baseline; seeds "
                  f"{beside['seeds']} are from `{beside['suite']}.json`, the others from this "
                  f"suite. Median [range] over all of them, then the per-seed values in seed "
                  f"order {seeds}.", "", *goal_lines(beside["goals"]), ""]
    lines.append(f"![forward NFE per step]({suite}_nfe.png)")
    if any(r.get("probes") for r in payload["runs"]):
        lines += ["", f"![test NFE and straightness over training]({suite}_probes.png)"]
    return "\n".join(lines) + "\n"


def probe_medians(runs: list[dict[str, Any]], wname: str) -> dict[str, list[dict[str, float]]]:
    """Per arm of workload ``wname`` (in run order): each probe's step and the medians over
    seeds of its test NFE, penalty and path ratio, up to the shortest seed's last probe."""
    per_arm: dict[str, list[list[dict[str, float]]]] = {}
    for r in runs:
        if r["workload"] == wname and r.get("probes"):
            per_arm.setdefault(r["arm"], []).append(r["probes"])
    return {aname: [{"step": per_seed[0][k]["step"],
                     **{key: float(np.median([p[k][key] for p in per_seed]))
                        for key in ("test_nfe", "penalty", "path_ratio")}}
                    for k in range(min(len(p) for p in per_seed))]
            for aname, per_seed in per_arm.items()}


def plot(runs: list[dict[str, Any]], out: Path, smooth: int = 25) -> None:
    """``<out>_nfe.png``: total NFE per step (median over seeds, moving average over ``smooth``
    steps) per arm, a panel per workload; where runs have probes, ``<out>_probes.png``: test NFE
    and path length / displacement over training (:func:`probe_medians`)."""
    workloads = sorted({r["workload"] for r in runs})
    fig, axes = common.figure(1, len(workloads), (6 * len(workloads), 4))
    for ax, wname in zip(axes[0], workloads):
        for aname in sorted({r["arm"] for r in runs if r["workload"] == wname}):
            nfe = [r["nfe_per_step"] for r in runs if (r["workload"], r["arm"]) == (wname, aname)]
            n = min(len(f["forward"]) for f in nfe)
            total = np.median([np.add(f["forward"][:n], f["backward"][:n]) for f in nfe], axis=0)
            k = max(1, min(smooth, n))
            smoothed = np.convolve(total, np.ones(k) / k, mode="valid")
            ax.plot(np.arange(len(smoothed)) + k // 2, smoothed, label=aname)
        ax.set(title=f"{wname}: total NFE per training step (median of seeds)",
               ylabel="forward + backward NFE")
    panels = [(fig, axes, "nfe")]
    workloads = sorted({r["workload"] for r in runs if r.get("probes")})
    if workloads:
        fig, axes = common.figure(2, len(workloads), (6 * len(workloads), 7))
        for col, wname in enumerate(workloads):
            for aname, meds in sorted(probe_medians(runs, wname).items()):
                for row, key in enumerate(("test_nfe", "path_ratio")):
                    axes[row][col].plot([p["step"] for p in meds], [p[key] for p in meds],
                                        marker="o", label=aname)
            axes[0][col].set_title(f"{wname}: test NFE at 1e-5 (median of seeds)")
            axes[1][col].set_title(f"{wname}: path length / displacement")
        panels.append((fig, axes, "probes"))
    for fig, axes, name in panels:
        for ax in axes.flat:
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        common.save_figure(fig, out.with_name(f"{out.name}_{name}.png"))


def arguments(parser: argparse.ArgumentParser) -> None:
    """The suite runner's flags."""
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


def subset(given: str | None, valid: list[Any], what: str, where: str) -> list[Any]:
    """The comma-separated ``given`` names (all of ``valid`` when None), each one of ``valid``."""
    if given is None:
        return list(valid)
    kind = type(valid[0])
    try:
        chosen = [kind(x) for x in given.split(",")]
    except ValueError:
        raise UsageError(f"--{what} takes comma-separated integers, got {given!r}") from None
    if bad := [x for x in chosen if x not in valid]:
        raise UsageError(f"{what} {bad} are not in {where}; valid: {', '.join(map(str, valid))}")
    return chosen


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Train (or take from the cache) every run of the suite; summarise them; draw the plots."""
    suite = SUITES[args.suite]
    arms = subset(args.arms, list(ARMS), "arms", "benchmarks/harness.py") if args.arms \
        else list(suite["arms"])
    workloads = {w: suite["workloads"][w] for w in
                 subset(args.workloads, list(suite["workloads"]), "workloads",
                        f"suite {args.suite!r}")}
    if not 1 <= args.jobs <= (os.cpu_count() or 1):
        raise UsageError(f"--jobs must be between 1 and the {os.cpu_count()} cores, got "
                         f"{args.jobs}")
    cache = RESULTS / ".cache" / args.suite
    start = time.perf_counter()
    planned = {(wname, aname, seed): (suite_workload(args.suite, wname), ARMS[aname], seed)
               for wname, seed, aname in itertools.product(workloads, suite["seeds"], arms)}
    done = {} if args.fresh else {
        key: run for key, (work, arm, seed) in planned.items()
        if (run := _load_cached(_cache_file(cache, work, arm, seed), work, arm)) is not None}
    todo = [key for key in planned if key not in done]
    print(f"{len(done)} runs cached in {cache}, {len(todo)} to run with {args.jobs} job(s)",
          flush=True)
    if args.cached_only and not done:
        raise UsageError(f"--cached-only: no finished runs of suite {args.suite!r} in {cache}")
    missing, todo = (len(todo), []) if args.cached_only else (0, todo)
    # Seed by seed (an interrupted suite leaves whole seeds, which pair with their baseline),
    # the longest runs of a seed first.
    todo.sort(key=lambda k: (k[2], -planned[k][0].steps * _COST.get(k[1], 1.0)
                             * _WORKLOAD_COST.get(k[0], 1.0)))
    opts = {k: suite[k] for k in ("ckpt_every", "probe_every", "keep_models") if k in suite}

    def finished(i: int, result: dict[str, Any]) -> None:
        done[todo[i]] = result
        print(f"[{time.perf_counter() - start:6.0f} s] finished {' '.join(map(str, todo[i]))}",
              flush=True)
    pooled([functools.partial(_run_and_cache, *planned[k], cache, **opts) for k in todo],
           args.jobs, finished)
    runs = [done[key] for key in planned if key in done]
    # A summary of the cache trained nothing itself: how the runs shared the machine is the
    # training invocations' business (the suite's docs name them). Threads: each run's.
    info = {**machine(), "parallel_jobs": None if args.cached_only else args.jobs,
            "torch_threads": harness.RUN_THREADS}
    payload = {"suite": args.suite, "command": args.command, "machine": info,
               "seeds": list(suite["seeds"]), "seconds": time.perf_counter() - start,
               "steps": workloads, "note": suite.get("note"), "pairs": suite.get("pairs", {}),
               "missing_runs": missing, "trained_runs": len(todo),
               "cached_runs": len(runs) - len(todo),
               "summary": summarise(runs, **{k: suite[k] for k in ("baselines", "pairs")
                                             if k in suite}),
               "runs": [{k: v for k, v in r.items() if k != "nfe_per_step"} for r in runs]}
    payload["goals"] = (long_goals(payload["summary"], suite["baselines"][0])
                        if "baselines" in suite else goals(payload["summary"]))
    if suite.get("beside") and (RESULTS / f"{suite['beside']}.json").exists():
        other = json.loads((RESULTS / f"{suite['beside']}.json").read_text())
        payload["beside"] = {"suite": suite["beside"], "seeds": other["seeds"],
                             "goals": beside_goals(payload["goals"], other["goals"])}
    plot(runs, args.out)
    return payload


def pooled(calls: list[functools.partial], jobs: int,
           finished: Callable[[int, Any], None]) -> None:
    """Run ``calls`` here (``jobs`` 1) or in a pool, each result to ``finished`` as it ends; a
    signal exits with its status (the same command resumes the rest)."""
    if jobs == 1:
        for i, call in enumerate(calls):
            finished(i, call())
        return
    try:
        run_pool(calls, jobs, finished)
    except PoolStopped as exc:
        print(f"{exc}; the same command resumes", file=sys.stderr)
        sys.exit(exc.exit_code)


STUDY = common.Study("run", __doc__, measure, markdown, arguments,
                     report=lambda args: RESULTS / args.suite)

main = STUDY.main

if __name__ == "__main__":
    sys.exit(main())
