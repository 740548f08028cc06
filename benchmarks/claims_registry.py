"""The registry of claims: every benchmark number of README.md and docs/*.md, and its source.

Each :class:`~benchmarks.claims.Claim` names the text it anchors to and computes its slots from
the committed JSON; :data:`EXEMPT` lists the numbers that are not benchmark results, each with
its reason. ``python -m benchmarks.claims --check`` holds the pages to both.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.claims import Claim, Exempt, Results, Value

__all__ = ["CLAIMS", "EXEMPT", "PAGES", "frontier_converged"]

README = "README.md"
RESULTS_MD = "docs/results.md"
PERF = "docs/performance.md"
INDEX = "docs/index.md"
PAGES = [README, RESULTS_MD, PERF, INDEX, "docs/attach.md", "docs/cli.md", "docs/dashboards.md",
         "docs/data.md", "docs/design.md", "docs/long-runs.md", "docs/multi-gpu.md",
         "docs/vae.md"]

CLAIMS: list[Claim] = []


def claim(name: str, page: str, text: str, source: str
          ) -> Callable[[Callable[[Results], dict[str, Value]]], None]:
    """Register the decorated function as the computation of a claim."""
    def register(compute: Callable[[Results], dict[str, Value]]) -> None:
        CLAIMS.append(Claim(name, page, text, source, compute))
    return register


# --- small helpers over the JSON ---------------------------------------------------------------

def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def pct(fraction: float) -> float:
    return 100.0 * fraction


def every(flags: Sequence[bool], of: str = "every") -> str:
    """``of`` ("every") when all flags hold, else "not every" is not a word: callers pick."""
    return of if all(flags) else "not-" + of


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": median(values), "min": min(values), "max": max(values)}


def runs_by_key(data: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
    return {(r["workload"], r["arm"], r["seed"]): r for r in data["runs"]}


def paired(r: Results, suite: str, workload: str, arm: str, key: str,
           base: str = "ffjord_direct") -> list[float]:
    """Per seed: the arm's run value of ``key`` over the same seed's baseline run value."""
    runs = runs_by_key(r(suite))
    seeds = sorted(s for (w, a, s) in runs if (w, a) == (workload, arm))
    return [runs[workload, arm, s][key] / runs[workload, base, s][key] for s in seeds]


def goal(r: Results, suite: str, workload: str, arm: str, key: str) -> dict[str, Any]:
    return r(suite)["goals"][workload][arm][key]


def frontier_converged(r: Results, name: str) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """The frontier's equal-NLL comparison on converged targets, per workload and arm.

    Each model's converged NLL is its test NLL at the tightest measured tolerance (a loose
    point can read below it: solver error, not density). The target is the better of the two
    models' converged NLLs plus the file's margin; each model's cost is its cheapest measured
    point at or below the target; a ratio within the file's ``tie`` of 1 is a tie. Per seed:
    ``verdict`` (wins / ties / loses, as the arm), ``ratio`` (None when one model never gets
    there), ``nfe`` and ``base_nfe``, ``gap`` (arm's converged NLL minus the baseline's) and
    ``gaps`` (arm minus baseline at each tolerance).
    """
    data = r(name)
    base_arm, margin, tie = data["base_arm"], data["margin"], data["tie"]
    curves = {tuple(k): c for k, c in data["curves_by_key"]}

    def conv(curve: list[dict[str, float]]) -> float:
        return min(curve, key=lambda p: p["tol"])["test_nll"]

    def cheapest(curve: list[dict[str, float]], target: float) -> float | None:
        good = [p["test_nfe"] for p in curve if p["test_nll"] <= target]
        return min(good) if good else None

    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for (w, a, s), curve in sorted(curves.items()):
        if a == base_arm:
            continue
        base = curves[w, base_arm, s]
        target = min(conv(base), conv(curve)) + margin
        nb, nm = cheapest(base, target), cheapest(curve, target)
        ratio = nm / nb if nb is not None and nm is not None else None
        if nm is None:
            verdict = "loses"
        elif nb is None:
            verdict = "wins"
        else:
            verdict = "wins" if ratio <= 1 - tie else "loses" if ratio >= 1 + tie else "ties"
        out.setdefault((w, a), []).append({
            "seed": s, "verdict": verdict, "ratio": ratio, "nfe": nm, "base_nfe": nb,
            "gap": conv(curve) - conv(base),
            "gaps": [p["test_nll"] - q["test_nll"] for p, q in zip(curve, base)]})
    return out


def count(entries: list[dict[str, Any]], verdict: str) -> int:
    return sum(e["verdict"] == verdict for e in entries)


def ratios(entries: list[dict[str, Any]]) -> list[float]:
    return [e["ratio"] for e in entries if e["ratio"] is not None]


# --- README.md -------------------------------------------------------------------------------

@claim("readme.long.c1_quality", README,
       "(coef 1 on the checkerboard: median {med}x [{lo}, {hi}] over {n} seeds, {k} of which "
       "reach it; {fresh}x on the fresh seeds 3-5)",
       "long_fresh.json beside.goals.checkerboard.tpr_fast_c1.speedup_within_0.01_per_seed; "
       "long_fresh.json goals.checkerboard.tpr_fast_c1.speedup_within_0.01")
def _(r: Results) -> dict[str, Value]:
    g = r("long_fresh")["beside"]["goals"]["checkerboard"]["tpr_fast_c1"][
        "speedup_within_0.01_per_seed"]
    reached = [v for v in g["per_seed"] if v is not None]
    return {"med": g["median"], "lo": min(reached), "hi": max(reached),
            "n": len(g["per_seed"]), "k": len(reached),
            "fresh": r("long_fresh")["goals"]["checkerboard"]["tpr_fast_c1"][
                "speedup_within_0.01"]}


def _frontier_2d(r: Results) -> dict[str, Value]:
    long = frontier_converged(r, "frontier_long")
    fresh = frontier_converged(r, "frontier_long_fresh")
    gauss = long["8gaussians", "tpr_fast"] + long["8gaussians", "tpr_fast_c1"]
    c1 = long["checkerboard", "tpr_fast_c1"] + fresh["checkerboard", "tpr_fast_c1"]
    c5 = long["checkerboard", "tpr_fast"]
    return {"gr": median(ratios(gauss)), "gk": count(gauss, "wins"), "gn": len(gauss),
            "c1k": count(c1, "wins"), "c1n": len(c1), "c5k": str(count(c5, "wins") or "none")}


@claim("readme.frontier.caption", README,
       "except modestly on 8gaussians ({gr}x in {gk} of {gn} seed pairs, one solver step per "
       "batch); on the checkerboard coef 1 wins in {c1k} of {c1n} seeds and the paper's coef 5 "
       "in {c5k}",
       "frontier_long.json, frontier_long_fresh.json curves_by_key, on converged targets")
def _(r: Results) -> dict[str, Value]:
    return _frontier_2d(r)


@claim("readme.frontier.bullet", README,
       "on 8gaussians both settings need {gr}x the baseline's test evaluations in {gk} of {gn} "
       "seed pairs (one solver step per batch); on the checkerboard coef 1 wins in {c1k} of "
       "{c1n} seeds ({ak} of {an} on seeds 0-2, {bk} of {bn} on the fresh seeds 3-5) and the "
       "paper's coef 5 in {c5k} ({t5} tie; in {n5} seeds its converged NLL stays "
       "{g5lo}-{g5hi} nats above the baseline's). On the 16-D table neither setting wins: "
       "seed 0 of each comes within 0.01 nats of the baseline's converged NLL (coef 5 "
       "{m5}x, coef 1 {m1}x the evaluations), seeds 1 and 2 never do ({tlo}-{thi} nats "
       "above).",
       "frontier_long.json, frontier_long_fresh.json curves_by_key, on converged targets")
def _(r: Results) -> dict[str, Value]:
    long = frontier_converged(r, "frontier_long")
    fresh = frontier_converged(r, "frontier_long_fresh")
    a, b = long["checkerboard", "tpr_fast_c1"], fresh["checkerboard", "tpr_fast_c1"]
    c5 = long["checkerboard", "tpr_fast"]
    never5 = [e["gap"] for e in c5 if e["ratio"] is None]
    t5, t1 = long["mixture16", "tpr_fast"], long["mixture16", "tpr_fast_c1"]
    never_t = [e["gap"] for e in t5 + t1 if e["ratio"] is None]
    return {**_frontier_2d(r), "ak": count(a, "wins"), "an": len(a), "bk": count(b, "wins"),
            "bn": len(b), "t5": count(c5, "ties"), "n5": len(never5), "g5lo": min(never5),
            "g5hi": max(never5), "m5": t5[0]["ratio"], "m1": t1[0]["ratio"],
            "tlo": min(never_t), "thi": max(never_t)}


@claim("readme.fresh.lever", README,
       "on seeds 3-5 it reaches the baseline's quality {q}x sooner (median of 3 seeds, "
       "[{qlo}, {qhi}]) with {f} % [{flo}, {fhi}] fewer forward NFE (`long_fresh.md`). "
       "Starting the paper's penalty late (`--poly-start-step 3000`) was tried and loses "
       "({late}x)",
       "long_fresh.json goals.checkerboard.{tpr_fast_c1,tpr_fast_late}")
def _(r: Results) -> dict[str, Value]:
    g = r("long_fresh")["goals"]["checkerboard"]
    q, f = g["tpr_fast_c1"]["speedup_within_0.01_per_seed"], g["tpr_fast_c1"][
        "forward_nfe_last10pct_reduction"]
    return {"q": q["median"], "qlo": q["min"], "qhi": q["max"], "f": pct(f["median"]),
            "flo": pct(f["min"]), "fhi": pct(f["max"]),
            "late": g["tpr_fast_late"]["speedup_within_0.01"]}


def _step_speed(r: Results, workload: str, variant: str, key: str) -> float:
    return r("step_speed")["summary"][f"{workload}/{variant}"][f"{key}_median"]


@claim("readme.step_speed", README,
       "a whole step takes {cf}x (checkerboard), {tf}x (16-D table) and {vf}x (VAE front door), "
       "and `--divergence compiled` {cc}x, {tc}x and {vc}x, with the same NFE and test NLL; "
       "test-time throughput {ctf}x, {ttf}x and {vtf}x ({ctc}x, {ttc}x and {vtc}x compiled). "
       "Each figure is a median of {n} seeds, measured under a load average of {lo}-{hi} on the "
       "{cores} cores, so differences of a few per cent are noise; the compiled step times leave "
       "out the first {skip} steps, which hold the compilation (up to {comp} s: one compiled run "
       "took {tot}x its baseline's time in total)",
       "step_speed.json summary.<workload>/<variant>.{step,throughput}_ratio_median, "
       "machine.load_average_seen, runs[*].new.{first_steps_seconds,fit_wall}")
def _(r: Results) -> dict[str, Value]:
    data = r("step_speed")
    out: dict[str, Value] = {}
    for short, w in (("c", "checkerboard_authors"), ("t", "mixture16"),
                     ("v", "vae_front_door")):
        for v, var in (("f", "forward"), ("c", "compiled")):
            out[short + v] = data["summary"][f"{w}/{var}"]["step_ratio_median"]
            out[short + "t" + v] = data["summary"][f"{w}/{var}"]["throughput_ratio_median"]
    compiled = [run for run in data["runs"] if run["variant"] == "compiled"]
    lo, hi = data["machine"]["load_average_seen"]
    return {**out, "n": len(data["summary"]["mixture16/forward"]["seeds"]), "lo": lo, "hi": hi,
            "cores": data["machine"]["cpus"], "skip": data["skip"],
            "comp": max(run["new"]["first_steps_seconds"] for run in compiled),
            "tot": max(run["new"]["fit_wall"] / run["baseline"]["fit_wall"] for run in compiled)}


@claim("readme.refactor", README,
       "the one-solve-path refactor against the previous release: {n} quick-suite runs with the "
       "same mean NFE, test NLL and test NFE, to the last digit, in {k} (the summaries are "
       "committed, not the per-step arrays)",
       "refactor_identity.json runs[*] (each field's pair compared)")
def _(r: Results) -> dict[str, Value]:
    runs = r("refactor_identity")["runs"]
    same = [all(v[0] == v[1] for k, v in run.items() if isinstance(v, list)) for run in runs]
    return {"n": len(runs), "k": "all" if all(same) else str(sum(same))}


# --- numbers that are not benchmark results ----------------------------------------------------

EXEMPT: list[Exempt] = [
    # whole pages of settings and usage, no measurement
    *(Exempt(page, r".+", "flags, defaults, exit codes and examples: no measurement")
      for page in ("docs/cli.md", "docs/multi-gpu.md", "docs/long-runs.md", "docs/design.md")),
    Exempt("*", r"\d(?:\.\d+)?e-\d+(?:\s*/\s*\d(?:\.\d+)?e-\d+)?", "a tolerance (a setting)"),
    Exempt("*", r"\(\d[a-z]?\)", "an arm's label: (1)-(5), (3b), (2s), ..."),
    Exempt("*", r"\b\d+-D\b", "a data dimension"),
    Exempt("*", r"\b(?:coef|K|m|T|z)(?: =)? \d+(?:\.\d+)?(?:(?:, | and |-|/)\d+)*",
           "a setting of the penalty or the model"),
    Exempt("*", r"\bseeds? \d+(?:(?:-|, | and )\d+)*", "which seeds (a setting)"),
    Exempt("*", r"\b\d+(?:,\d{3})* (?:steps|rows|samples)\b", "a run length or a data size"),
    Exempt("*", r"\bAAAI 2021\b", "the paper"),
    Exempt("*", r"\bissue \d+", "an issue number"),
    Exempt("*", r"\b2-core\b|\b2 (?:CPU )?cores\b|\b2 CPU cores\b", "the machine"),
    Exempt("*", r"torch 2\.13\.0|torch==2\.13\.0", "the torch version"),
    Exempt("*", r"Python >= 3\.10", "the Python requirement"),
    Exempt("*", r"\b1\.3x\b|\b0\.5x\b|\b1\.05x\b|\b1\.5x\b|\b3x\b", "a goal (a target, not a result)"),
]
