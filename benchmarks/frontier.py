"""The test-cost frontier: test NLL against test evaluations over evaluation tolerances.

    python -m benchmarks.frontier --suite long --jobs 2            # every long-suite model
    python -m benchmarks.frontier --suite long_small --jobs 2  # the small committed case

How it measures: docs/benchmarks.md, `benchmarks.frontier`.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import common
from benchmarks import run as bench_run
from benchmarks.common import UsageError, machine, spread, table, write_json
from benchmarks.harness import ARMS, RUN_THREADS, _set_eval_tolerance, load_final_model
from polyreg_cnf.engine.ode import ode_blocks

#: Evaluation tolerances (atol = rtol), loosest first.
TOLERANCES = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5, 1e-6)
#: "Equal test NLL": within this many nats of the better model's best.
MARGIN = 0.01
#: Samples drawn at each tolerance.
SAMPLES = 10_000
#: A ratio of evaluations within this fraction of 1 is a tie.
TIE = 0.05
#: The suites' own evaluation tolerance: the single point the test-NFE claims were made at.
REFERENCE_TOL = 1e-5


def evaluate(model: torch.nn.Module, batches: list[torch.Tensor],
             tolerances: tuple[float, ...] = TOLERANCES, samples: int = SAMPLES,
             seed: int = 0) -> list[dict[str, float]]:
    """One point of the frontier per tolerance: test NLL, NFE per batch, speed, sampling cost.

    Args:
        model: A density model (``log_prob`` and ``sample``) in eval mode.
        batches: The test set in batches (as the run's test loader gives them).
        tolerances: Evaluation tolerances, atol = rtol.
        samples: Samples to draw at each tolerance (0: no sampling).
        seed: Seed of the sampling noise (the same at every tolerance).

    Returns:
        Per tolerance: ``tol``, ``test_nll`` (mean over rows), ``test_nfe`` (forward NFE per
        batch, summed over blocks, mean over batches), ``rows_per_second``, ``sample_nfe``
        and ``sample_seconds``.
    """
    blocks = ode_blocks(model)
    rows = sum(len(b) for b in batches)
    points = []
    for tol in tolerances:
        _set_eval_tolerance(model, tol, tol)
        nll, nfe, start = 0.0, [], time.perf_counter()
        with torch.no_grad():
            for b in batches:
                for block in blocks:
                    block.nfe.reset()
                nll -= float(model.log_prob(b).sum())
                nfe.append(sum(block.nfe.forward for block in blocks))
        seconds = time.perf_counter() - start
        point = {"tol": tol, "test_nll": nll / rows, "test_nfe": float(np.mean(nfe)),
                 "rows_per_second": rows / seconds, "batch_rows": len(batches[0])}
        if samples:
            for block in blocks:
                block.nfe.reset()
            start = time.perf_counter()
            model.sample(samples, generator=torch.Generator().manual_seed(seed))
            point.update(sample_seconds=time.perf_counter() - start,
                         sample_nfe=float(sum(block.nfe.forward for block in blocks)))
        points.append(point)
    return points


def cheapest_at(curve: list[dict[str, float]], target: float) -> dict[str, float] | None:
    """The point of ``curve`` with the fewest test NFE whose test NLL is at most ``target``."""
    good = [p for p in curve if p["test_nll"] <= target]
    return min(good, key=lambda p: p["test_nfe"]) if good else None


def equal_nll_cost(base: list[dict[str, float]], mine: list[dict[str, float]],
                   margin: float = MARGIN, tie: float = TIE) -> dict[str, Any]:
    """Test evaluations each model needs for the same test NLL: within ``margin`` nats of the
    better of the two models' best NLL over the frontier.

    Each model's cost is its cheapest measured point at or below that NLL (no interpolation
    between tolerances). ``ratio`` = this arm's NFE / the baseline's; the verdict is ``wins``
    (ratio <= 1 - ``tie``, or only this arm reaches the NLL), ``loses`` (ratio >= 1 + ``tie``,
    or only the baseline reaches it) or ``ties``.
    """
    best = min(p["test_nll"] for p in (*base, *mine))
    target = best + margin
    b, m = cheapest_at(base, target), cheapest_at(mine, target)
    ratio = None if b is None or m is None else m["test_nfe"] / b["test_nfe"]
    verdict = common.verdict(None if m is None else m["test_nfe"],
                             None if b is None else b["test_nfe"], tie)
    return {"target_nll": target, "base_nfe": None if b is None else b["test_nfe"],
            "base_tol": None if b is None else b["tol"],
            "nfe": None if m is None else m["test_nfe"], "tol": None if m is None else m["tol"],
            "ratio": ratio, "verdict": verdict}


def _at_tol(mine: list[dict[str, float]], base: list[dict[str, float]],
            tol: float = REFERENCE_TOL) -> float | None:
    """Test NFE ratio (mine / base) at one tolerance, None if either curve lacks it."""
    m = [p["test_nfe"] for p in mine if p["tol"] == tol]
    b = [p["test_nfe"] for p in base if p["tol"] == tol]
    return m[0] / b[0] if m and b and b[0] else None


def answer(curves: dict[tuple[str, str, int], list[dict[str, float]]], base_arm: str
           ) -> dict[str, Any]:
    """Per workload and arm: :func:`equal_nll_cost` seed by seed against ``base_arm`` of the
    same seed, the ratios' median and range, and the workload's verdict (``wins``, ``ties`` or
    ``loses`` when every seed agrees, else ``mixed``)."""
    out: dict[str, Any] = {}
    for (wname, aname, seed), curve in sorted(curves.items()):
        if aname == base_arm or (wname, base_arm, seed) not in curves:
            continue
        entry = out.setdefault(wname, {}).setdefault(aname, {"per_seed": {}})
        base = curves[wname, base_arm, seed]
        entry["per_seed"][seed] = {**equal_nll_cost(base, curve),
                                   "ratio_at_reference_tol": _at_tol(curve, base)}
    for arms in out.values():
        for entry in arms.values():
            verdicts = [v["verdict"] for v in entry["per_seed"].values()]
            entry["ratio"] = spread([v["ratio"] for v in entry["per_seed"].values()], True)
            entry["ratio_at_reference_tol"] = spread(
                [v["ratio_at_reference_tol"] for v in entry["per_seed"].values()], True)
            entry["counts"] = {k: verdicts.count(k) for k in ("wins", "ties", "loses")}
            entry["verdict"] = verdicts[0] if len(set(verdicts)) == 1 else "mixed"
    return out


def _model_file(suite: str, wname: str, aname: str, seed: int) -> Path:
    return bench_run.model_file(suite, bench_run.suite_workload(suite, wname), ARMS[aname], seed)


def _curve_file(suite: str, model: Path) -> Path:
    return bench_run.RESULTS / ".cache" / "frontier" / suite / (model.stem + ".json")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cached_curve(suite: str, wname: str, aname: str, seed: int, samples: int
                 ) -> list[dict[str, float]] | None:
    """The cached curve of one model, or None when it is missing or stale: measured at other
    tolerances or sample counts, or of another model file than the one kept now."""
    model = _model_file(suite, wname, aname, seed)
    file = _curve_file(suite, model)
    if not file.exists():
        return None
    entry = json.loads(file.read_text())
    if (entry["tolerances"] != list(TOLERANCES) or entry["samples"] != samples
            or not model.exists() or entry["model_sha256"] != _sha256(model)):
        return None
    return entry["curve"]


def _remade_file(suite: str, model: Path) -> Path:
    return bench_run.RESULTS / ".cache" / "frontier" / suite / "remade" / (model.stem + ".json")


def remake(suite: str, wname: str, aname: str, seed: int) -> None:
    """Train one run of ``suite`` again, through the suite's own call, to keep its final model.

    Its measurements go to ``.cache/frontier/<suite>/remade/``, not into the suite's cache (see
    the module docstring). Raises ``harness.RunInterrupted`` if stopped; the same call resumes.
    """
    cfg = bench_run.SUITES[suite]
    w, arm = bench_run.suite_workload(suite, wname), ARMS[aname]
    bench_run._run_and_cache(w, arm, seed, bench_run.RESULTS / ".cache" / suite,
                             ckpt_every=cfg.get("ckpt_every", 0),
                             probe_every=cfg.get("probe_every", 0), keep_models=True,
                             record=_remade_file(suite, _model_file(suite, wname, aname, seed)))


def remade_against_measured(suite: str, keys: list[tuple[str, str, int]]) -> list[dict]:
    """For every remade model among ``keys``: its test NLL and mean forward NFE beside those of
    the suite's measured run (the same seed and definitions, possibly older engine code)."""
    out = []
    for wname, aname, seed in keys:
        file = _remade_file(suite, _model_file(suite, wname, aname, seed))
        w = bench_run.suite_workload(suite, wname)
        measured = bench_run._load_cached(
            bench_run._cache_file(bench_run.RESULTS / ".cache" / suite, w, ARMS[aname], seed),
            w, ARMS[aname])
        if not file.exists() or measured is None:
            continue
        remade = json.loads(file.read_text())["run"]
        out.append({"key": [wname, aname, seed], "steps": remade["steps"],
                    "test_nll": [measured["test_nll"], remade["test_nll"]],
                    "forward_nfe": [measured["forward_nfe"], remade["forward_nfe"]],
                    "test_nfe": [measured["test_nfe"], remade["test_nfe"]]})
    return out


def _curve_of(suite: str, wname: str, aname: str, seed: int, samples: int
              ) -> list[dict[str, float]]:
    """The curve of one kept model: cached, or evaluated (the model made again first if it is
    missing) and then cached."""
    torch.set_num_threads(RUN_THREADS)
    w, arm = bench_run.suite_workload(suite, wname), ARMS[aname]
    if w.kind == "vae":
        raise ValueError(f"the frontier measures density models, not the VAE ({wname!r})")
    cached = cached_curve(suite, wname, aname, seed, samples)
    if cached is not None:
        return cached
    path = bench_run.model_file(suite, w, arm, seed)
    if not path.exists():
        remake(suite, wname, aname, seed)
    with tempfile.TemporaryDirectory() as tmp:
        model, dm = load_final_model(path, w, arm, seed, Path(tmp))
        batches = [b[0] for b in dm.test_dataloader()]
        curve = evaluate(model, batches, samples=samples, seed=seed)
    write_json(_curve_file(suite, path),
               {"tolerances": list(TOLERANCES), "samples": samples,
                "model_sha256": _sha256(path), "machine": machine(), "curve": curve})
    return curve


def plot(curves: dict[tuple[str, str, int], list[dict[str, float]]], path: Path,
         base_arm: str) -> None:
    """Test NLL against test NFE per batch, one panel per workload, one line per arm and seed.

    The NLL is drawn relative to the same seed's baseline at the tightest tolerance (its
    converged NLL), so that seeds whose densities differ by more than the arms do line up; a
    seed without a baseline curve is left out of the picture (the tables keep it).
    """
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    workloads = sorted({k[0] for k in curves})
    arms = sorted({k[1] for k in curves})
    colours = {a: f"C{i}" for i, a in enumerate(arms)}
    markers = "osv^D<>"
    fig, axes = common.figure(1, len(workloads), (5.5 * len(workloads), 4.5))
    for ax, wname in zip(axes[0], workloads):
        for (w, aname, seed), curve in sorted(curves.items()):
            base = curves.get((w, base_arm, seed))
            if w != wname or base is None:
                continue
            ref = base[-1]["test_nll"]
            ax.plot([p["test_nfe"] for p in curve], [p["test_nll"] - ref for p in curve],
                    color=colours[aname], marker=markers[seed % len(markers)], alpha=0.8,
                    label=f"{aname} seed {seed}")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.axhline(MARGIN, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        # Plain numbers on the log axis: 2 x 10^1 is harder to read than 20.
        ax.xaxis.set_major_locator(FixedLocator([10, 20, 30, 50, 100, 200, 300, 500]))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("test NFE per batch (log scale; tolerance 1e-2 at the left)")
        ax.set_ylabel(f"test NLL - same seed's {base_arm} at {TOLERANCES[-1]:g} (nats)")
        ax.set_title(f"{wname}: test-cost frontier (lower left is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    common.save_figure(fig, path)


def _seed_text(v: dict[str, Any]) -> str:
    def nfe(x: float | None) -> str:
        return "never" if x is None else f"{x:.0f}"

    ratio = "-" if v["ratio"] is None else f"{v['ratio']:.2f}x"
    return (f"{nfe(v['nfe'])} vs {nfe(v['base_nfe'])} NFE (tol {v['tol']} vs {v['base_tol']}; "
            f"{ratio}, {v['verdict']})")


def _ratio_text(r: dict[str, Any]) -> str:
    return "-" if r["median"] is None else f"{r['median']:.2f}x [{r['min']:.2f}, {r['max']:.2f}]"


def markdown(payload: dict[str, Any]) -> str:
    """The frontier's tables and the answer per workload."""
    m = payload["machine"]
    lines = [f"# Test-cost frontier of suite `{payload['suite']}`", "",
             f"Command: `{payload['command']}`  ",
             f"Machine: {m['cpu']}, {m['cores']} cores, {RUN_THREADS} torch thread per "
             f"evaluation; torch {m['torch']}; commit {m['git_commit']}; {m['date']}.  ",
             f"Models: the suite's final models ({payload['steps']} training steps; seeds "
             f"{payload['seeds']}). Every test row at each evaluation tolerance (atol = rtol), "
             f"exact trace; test NFE = forward NFE per test batch ({payload['batch_rows']} rows), "
             f"rows/s = test rows per second on one thread; sampling = NFE and seconds to draw "
             f"{payload['samples']:,} samples.", "",
             f"Equal-NLL cost: for each seed, the target is the better model's best test NLL over "
             f"the frontier + {MARGIN} nats; each model's cost is its cheapest measured point at "
             f"or below the target; ratio = TPR arm / baseline ({payload['base_arm']}) of the "
             f"same seed. Win: ratio <= {1 - TIE:.2f}; tie: within {TIE:.0%}; loss: ratio >= "
             f"{1 + TIE:.2f} or the NLL is out of the arm's reach. At loose tolerances the NLL "
             "itself carries solver error (it can come out lower than the converged value); "
             "the comparison takes each measured NLL at face value, as a user who loosens the "
             "tolerance would.", ""]
    if payload.get("missing"):
        lines += ["Not measured yet (workload, arm, seed): " + ", ".join(
            f"({w}, {a}, {s})" for w, a, s in payload["missing"]) + ".", ""]
    if remade := payload.get("remade"):
        dnll = max(abs(r["test_nll"][1] - r["test_nll"][0]) for r in remade)
        dnfe = max(abs(r["forward_nfe"][1] / r["forward_nfe"][0] - 1) for r in remade)
        lines += [f"{len(remade)} of these models were made again (the suite's runs kept no "
                  "weights then), with the same definitions and seeds on the current engine: "
                  f"their test NLL is within {dnll:.1e} nats and their mean forward NFE within "
                  f"{dnfe:.1%} of the measured runs' (`remade` in the JSON). The suite's own "
                  "figures stay those of its measured runs.", ""]
    for wname, arms in payload["answer"].items():
        lines += [f"## {wname}", ""]
        for aname, e in arms.items():
            per = "; ".join(f"seed {s}: {_seed_text(v)}" for s, v in e["per_seed"].items())
            med, single = (_ratio_text(e[k]) for k in ("ratio", "ratio_at_reference_tol"))
            lines += [f"**{aname} against {payload['base_arm']}: {e['verdict']}** (NFE ratio at "
                      f"equal NLL, median [range] over seeds: {med}; {e['counts']['wins']} "
                      f"wins, {e['counts']['ties']} ties, {e['counts']['loses']} losses; for "
                      f"comparison, the ratio at the single tolerance {REFERENCE_TOL:g}: "
                      f"{single}). Per seed: {per}.", ""]
        for cell, caption in (
                ("{test_nll:.4f} / {test_nfe:.0f} / {rows_per_second:.0f}",
                 "(test NLL / test NFE per batch / rows per second)"),
                ("{sample_nfe:.0f} / {sample_seconds:.2f} s",
                 f"(sampling {payload['samples']:,}: NFE / seconds)")):
            lines += [*table(["arm", "seed", *(f"{t:g}" for t in TOLERANCES)],
                             [[aname, seed, *(cell.format(**p) for p in curve)]
                              for (w, aname, seed), curve in payload["curves_by_key"]
                              if w == wname]), "", caption, ""]
    lines += [f"![test NLL against test NFE]({payload['plot']})"]
    if "missing" in payload:  # older reports (frontier_small) drew the absolute NLL
        lines += ["", f"(The picture draws each test NLL relative to the same seed's "
                  f"{payload['base_arm']} at tolerance {TOLERANCES[-1]:g}; dashed: {MARGIN} "
                  "nats above it.)"]
    return "\n".join(lines) + "\n"


def arguments(parser: argparse.ArgumentParser) -> None:
    """The frontier's flags."""
    keeping = sorted(k for k, v in bench_run.SUITES.items() if v.get("keep_models"))
    parser.add_argument("--suite", choices=keeping, default="long")
    parser.add_argument("--workloads", default=None,
                        help="comma-separated subset of the suite's workloads")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated subset of the suite's seeds (default: all)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="models evaluated (or trained) at once, one process each")
    parser.add_argument("--samples", type=int, default=SAMPLES,
                        help="samples drawn at each tolerance (0: none)")
    parser.add_argument("--cached-only", action="store_true",
                        help="evaluate and train nothing: report the cached curves")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate (or take from the cache) every kept model of the suite; answer; plot."""
    suite = bench_run.SUITES[args.suite]
    where = f"suite {args.suite!r}"
    workloads = bench_run.subset(args.workloads, list(suite["workloads"]), "workloads", where)
    seeds = bench_run.subset(args.seeds, list(suite["seeds"]), "seeds", where)
    if args.jobs < 1 or args.samples < 0:
        raise UsageError(f"--jobs must be >= 1 and --samples >= 0, got {args.jobs} and "
                         f"{args.samples}")
    keys = [] if args.cached_only else [
        (w, a, s) for w in workloads for a in suite["arms"] for s in seeds]
    start = time.perf_counter()
    bench_run.pooled([functools.partial(_curve_of, args.suite, *k, args.samples) for k in keys],
                     args.jobs, lambda i, result: None)
    # The report covers every model of the suite with a cached curve, not only this call's.
    every = [(w, a, s) for w in suite["workloads"] for a in suite["arms"] for s in suite["seeds"]]
    curves = {k: c for k in every
              if (c := cached_curve(args.suite, *k, args.samples)) is not None}
    if not curves:
        raise UsageError(f"no cached frontier curves for suite {args.suite!r}; run without "
                         "--cached-only first")
    base_arm = suite["baselines"][0]
    plot(curves, args.out.with_suffix(".png"), base_arm)
    return {
        "suite": args.suite, "command": args.command,
        "machine": machine(), "seconds": time.perf_counter() - start,
        "steps": {w: suite["workloads"][w] for w in dict.fromkeys(k[0] for k in curves)},
        "seeds": sorted({k[2] for k in curves}),
        "missing": [list(k) for k in every if k not in curves],
        "base_arm": base_arm, "tolerances": list(TOLERANCES), "margin": MARGIN, "tie": TIE,
        "samples": args.samples, "plot": f"{args.out.name}.png",
        "batch_rows": next(iter(curves.values()))[0]["batch_rows"],
        "answer": answer(curves, base_arm),
        "remade": remade_against_measured(args.suite, list(curves)),
        "curves_by_key": [[list(k), c] for k, c in curves.items()]}


def _report(args: argparse.Namespace) -> Path:
    name = "small" if args.suite == "long_small" else args.suite
    return bench_run.RESULTS / f"frontier_{name}"


STUDY = common.Study("frontier", __doc__, measure, markdown, arguments, report=_report)

main = STUDY.main

if __name__ == "__main__":
    sys.exit(main())
