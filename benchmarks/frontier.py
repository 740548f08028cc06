"""The accuracy frontier of a suite's kept models (issue 28, item 4).

    python -m benchmarks.frontier --suite long          # every kept model of the long suite
    python -m benchmarks.frontier --suite long_small    # the small committed case

How it measures, compares and caches: docs/benchmarks.md, `benchmarks.frontier`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from benchmarks import accuracy, common
from benchmarks import run as bench_run
from benchmarks.common import UsageError, machine, median_range, spread, table, write_json
from benchmarks.harness import ARMS, RUN_THREADS, load_final_model

__all__ = ["STUDY", "answer", "few_steps", "main", "markdown", "measure_model", "test_rows"]

def test_rows(dm: Any, rows: int) -> torch.Tensor:
    """The first ``rows`` rows of ``dm``'s test split, as its test loader gives them."""
    x = torch.cat([batch[0] for batch in dm.test_dataloader()])
    if x.shape[0] < rows:
        raise UsageError(f"--rows {rows} is more than the {x.shape[0]} test rows")
    return x[:rows]


def measure_model(suite: str, key: tuple[str, str, int], opts: Mapping[str, int]
                  ) -> dict[str, Any]:
    """The :func:`benchmarks.accuracy.measure` result of ``suite``'s kept model ``key``
    (workload, arm, seed) with ``opts`` (rows, sample_rows, check_rows, batch_size), cached."""
    wname, aname, seed = key
    w, arm = bench_run.suite_workload(suite, wname), ARMS[aname]
    path = bench_run.model_file(suite, w, arm, seed)
    if not path.is_file():
        raise UsageError(f"no kept model {path} (train it with python -m benchmarks.run "
                         f"--suite {suite})")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    cache = bench_run.RESULTS / ".cache" / "frontier" / suite / f"{path.stem}.json"
    made_by = {"model_sha256": sha, "opts": dict(opts)}
    if cache.is_file() and {k: v for k, v in json.loads(cache.read_text()).items()
                            if k in made_by} == made_by:
        return json.loads(cache.read_text())["result"]
    torch.set_num_threads(RUN_THREADS)
    cpu = time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        model, dm = load_final_model(path, w, arm, seed, Path(tmp))
        x = test_rows(dm, opts["rows"])
    result = accuracy.measure(model, x, batch_size=opts["batch_size"],
                              check_rows=opts["check_rows"], sample_rows=opts["sample_rows"],
                              seed=10_000)
    result = {"model": path.name, "cpu_seconds": time.process_time() - cpu, **result}
    write_json(cache, {**made_by, "machine": machine(), "result": result})
    return result


def answer(models: Mapping[tuple[str, str, int], Mapping[str, Any]], base_arm: str
           ) -> dict[str, Any]:
    """Per workload, arm and accuracy: :func:`benchmarks.accuracy.compare_seeds` against the
    same seed's ``base_arm``, with the median and range of the converged NLL difference and of
    the cost ratio (over the seeds where both models meet the accuracy)."""
    out: dict[str, Any] = {}
    for wname, aname in dict.fromkeys((w, a) for w, a, _ in models):
        seeds = [s for w, a, s in models if (w, a) == (wname, aname)
                 and (w, base_arm, s) in models]
        if aname == base_arm or not seeds:
            continue
        base = {s: accuracy.records_of(models[wname, base_arm, s]) for s in seeds}
        mine = {s: accuracy.records_of(models[wname, aname, s]) for s in seeds}
        out.setdefault(wname, {})[aname] = {
            str(e): {**(c := accuracy.compare_seeds(base, mine, e)),
                     "nll_diff": spread([v["nll_diff"] for v in c["per_seed"].values()]),
                     "ratio": spread([v["ratio"] for v in c["per_seed"].values()], True)}
            for e in accuracy.ACCURACIES}
    return out


def few_steps(models: Mapping[tuple[str, str, int], Mapping[str, Any]]) -> dict[str, Any]:
    """Per workload, arm and fixed-grid setting: the NFE and the median and range over seeds of
    the mean per-row error (``abs_d``) and of the sampling RMS error (``sample_rms``)."""
    out: dict[str, Any] = {}
    for wname, aname in dict.fromkeys((w, a) for w, a, _ in models):
        per = [{r["setting"]: r for r in m["settings"] if r["steps"]}
               for (w, a, _), m in models.items() if (w, a) == (wname, aname)]
        out.setdefault(wname, {})[aname] = {
            s: {"seeds": len(per), "nfe": r["nfe"],
                "abs_d": spread([p[s]["mean_abs_d"] for p in per]),
                "sample_rms": spread([p[s]["sample_rms"] for p in per])}
            for s, r in per[0].items()}
    return out


def _costs(result: Mapping[str, Any]) -> dict[str, dict[str, Any] | None]:
    """The cheapest setting at each accuracy (:func:`benchmarks.accuracy.cost_at`), or None."""
    records = accuracy.records_of(result)
    return {str(e): None if (c := accuracy.cost_at(records, e)) is None else
            {"setting": c.setting, "nfe": c.nfe} for e in accuracy.ACCURACIES}


def plot(payload: Mapping[str, Any], path: Path) -> None:
    """Mean per-row error against NFE per batch, one panel per workload, one line per model
    and method family (dopri5 over tolerances, rk4 over steps)."""
    workloads = list(payload["answer"]) or sorted({m["workload"] for m in payload["models"]})
    arms = sorted({m["arm"] for m in payload["models"]})
    first = min(m["seed"] for m in payload["models"])  # one legend entry per arm and method
    fig, axes = common.figure(1, len(workloads), (5.5 * len(workloads), 4.5))
    for ax, wname in zip(axes[0], workloads):
        for m in (m for m in payload["models"] if m["workload"] == wname):
            for method, style in (("dopri5", "-"), ("rk4", ":")):
                pts = [(r["nfe"], r["mean_abs_d"]) for r in m["settings"] if r["method"] == method]
                ax.plot(*zip(*pts), style, marker="o", ms=3, alpha=0.7,
                        color=f"C{arms.index(m['arm'])}",
                        label=f"{m['arm']} ({method})" if m["seed"] == first else None)
        for e in accuracy.ACCURACIES:
            ax.axhline(e, color="grey", lw=0.8, ls="--")
        ax.set(xscale="log", yscale="log", xlabel="NFE per batch", title=wname,
               ylabel="mean |log p - converged log p| per row (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    common.save_figure(fig, path)


def _cost(c: Mapping[str, Any] | None) -> str:
    return "never" if c is None else f"{c['nfe']:.0f} ({c['setting']})"


def _spread(s: Mapping[str, Any], fmt: str) -> str:
    return median_range(s, fmt, " to ")


def markdown(payload: Mapping[str, Any]) -> str:
    """The frontier's page: verdicts, the per-seed comparisons, few-step accuracy, each model."""
    m, base = payload["machine"], payload["base_arm"]
    lines = [f"# Accuracy frontier of suite `{payload['suite']}`", "",
             f"Command: `{payload['command']}`  ",
             f"Machine: {m['cpu']}, {m['cores']} cores shared with other work, {RUN_THREADS} "
             f"torch thread; torch {m['torch']}; commit {m['git_commit']}; {m['date']}. "
             f"Measuring the {len(payload['models'])} models took "
             f"{sum(x['cpu_seconds'] for x in payload['models']):.0f} s of CPU time, one model "
             "at a time.", "",
             f"Rows: the first {payload['rows']:,} rows of each run's test split (the same rows "
             f"for every arm of a seed), batches of {payload['batch_size']:,}; the reference is "
             f"checked against dopri5 at {accuracy.CHECK_TOL:g} on the first "
             f"{payload['check_rows']:,}; sampling error from {payload['sample_rows']:,} latent "
             "draws (the same for every model). The rule (`benchmarks.accuracy`): each TPR arm "
             f"against the same seed's {base}; it loses if its converged NLL is worse by more "
             f"than {payload['nll_margin']} nats, else the cheaper setting (NFE per batch) that "
             "meets the accuracy (mean per-row |d log p| against the converged solve) wins. "
             "Cost ratio = the arm's cost / the baseline's, over the seeds where both meet the "
             "accuracy (whatever their NLLs).", "",
             f"![mean error against NFE]({payload['plot']})", "", "## Verdicts", ""]
    rows = [[wname, aname, e, f"{c['wins']}/{c['ties']}/{c['losses']}/{c['neither']} of "
             f"{len(c['per_seed'])}", _spread(c["ratio"], ".2f"), _spread(c["nll_diff"], "+.4f")]
            for wname, arms in payload["answer"].items() for aname, by_e in arms.items()
            for e, c in by_e.items()]
    lines += [*table(["workload", "arm", "accuracy", "wins/ties/losses/neither",
                      "cost ratio, median (range)", "converged NLL diff, median (range)"],
                     rows), ""]
    for wname, arms in payload["answer"].items():
        lines += [f"## {wname}", ""]
        rows = [[aname, e, seed, f"{v['nll_diff']:+.4f}", _cost(v["other_cost"]),
                 _cost(v["base_cost"]), f"{v['verdict']} ({v['reason']})"]
                for aname, by_e in arms.items() for e, c in by_e.items()
                for seed, v in c["per_seed"].items()]
        lines += [*table(["arm", "accuracy", "seed", "converged NLL diff", "its cost (NFE)",
                          f"{base}'s cost", "verdict"], rows), ""]
    lines += ["## Few steps: mean per-row error of each grid setting", "",
              "Median over seeds (range), nats per row; the sampling RMS error is in the "
              "data's standard deviations (standardised units).", ""]
    for wname, arms in payload["few_steps"].items():
        lines += [f"### {wname}", "", *table(
            ["setting", "NFE", *(f"{a} abs d" for a in arms), *(f"{a} sample RMS" for a in arms)],
            [[s, f"{v['nfe']:.0f}", *(_spread(arms[a][s]["abs_d"], ".2g") for a in arms),
              *(_spread(arms[a][s]["sample_rms"], ".2g") for a in arms)]
             for s, v in next(iter(arms.values())).items()]), ""]
    lines += ["## Each model", ""]
    for model in payload["models"]:
        lines += [f"### {model['workload']}, {model['arm']}, seed {model['seed']}", "",
                  *accuracy.model_table(model), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def arguments(parser: argparse.ArgumentParser) -> None:
    """The frontier's flags."""
    keeping = sorted(k for k, v in bench_run.SUITES.items() if v.get("keep_models"))
    parser.add_argument("--suite", choices=keeping, default="long")
    parser.add_argument("--workloads", default=None, help="comma-separated subset")
    parser.add_argument("--seeds", default=None, help="comma-separated subset (default: all)")
    parser.add_argument("--rows", type=int, default=1000, help="test rows per model")
    parser.add_argument("--sample-rows", type=int, default=500, help="latent draws")
    parser.add_argument("--check-rows", type=int, default=100,
                        help="rows the reference is checked on against 1e-10")
    parser.add_argument("--batch-size", type=int, default=1000, help="rows per batch")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Measure (or read from the cache) every kept model of the suite; compare; plot."""
    suite = bench_run.SUITES[args.suite]
    where = f"suite {args.suite!r}"
    workloads = bench_run.subset(args.workloads, list(suite["workloads"]), "workloads", where)
    seeds = bench_run.subset(args.seeds, list(suite["seeds"]), "seeds", where)
    opts = {"rows": args.rows, "sample_rows": args.sample_rows, "check_rows": args.check_rows,
            "batch_size": args.batch_size}
    if min(opts.values()) < 1:
        raise UsageError(f"--rows, --sample-rows, --check-rows and --batch-size must be >= 1, "
                         f"got {opts}")
    if any(bench_run.WORKLOADS[w].kind == "vae" for w in workloads):
        raise UsageError(f"the frontier measures density models, not the VAE ({workloads})")
    models = {(w, a, s): measure_model(args.suite, (w, a, s), opts)
              for w in workloads for a in suite["arms"] for s in seeds}
    base_arm = suite["baselines"][0]
    payload = {"suite": args.suite, "command": args.command, "machine": machine(),
               **opts, "base_arm": base_arm, "nll_margin": accuracy.NLL_MARGIN,
               "plot": f"{Path(args.out).name}.png", "answer": answer(models, base_arm),
               "few_steps": few_steps(models),
               "models": [{"workload": w, "arm": a, "seed": s, "cost_at": _costs(m), **m}
                          for (w, a, s), m in models.items()]}
    payload = json.loads(json.dumps(payload))  # the page renders as from the committed JSON
    plot(payload, Path(args.out).with_suffix(".png"))
    return payload


STUDY = common.Study("frontier", __doc__, measure, markdown, arguments, report=lambda args: (
    bench_run.RESULTS / f"frontier_{'small' if args.suite == 'long_small' else args.suite}"))

main = STUDY.main

if __name__ == "__main__":
    sys.exit(main())
