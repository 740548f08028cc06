"""Training-step time and test throughput: this checkout against an earlier one, side by side.

    python -m benchmarks.step_speed --baseline-tree /tmp/polyreg-b4d2198 \
        [--workloads checkerboard_authors mixture16 vae_front_door] [--seeds 0 1] [--steps 400]

Writes benchmarks/results/step_speed.{json,md}; how it measures: docs/benchmarks.md,
`benchmarks.step_speed`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import site
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import ROOT, table

#: train.py flags of each workload (the rest are the data set's preset and the defaults).
WORKLOADS: dict[str, list[str]] = {
    # The authors' checkerboard configuration: 64-64-64 concat, tanh, exact trace, batch 100,
    # T 0.5, TPR at the paper's settings.
    "checkerboard_authors": ["--data", "checkerboard", "--hidden-dims", "64,64,64",
                             "--layer-type", "concat", "--nonlinearity", "tanh", "--trace",
                             "exact", "--batch-size", "100", "--T", "0.5", "--reg", "poly"],
    # The 16-D table (benchmarks/tables.py) as the long suite trains it: Hutchinson trace.
    "mixture16": ["--data", "{mixture16}", "--hidden-dims", "128,128", "--layer-type", "concat",
                  "--nonlinearity", "softplus", "--num-blocks", "1", "--batch-size", "256",
                  "--reg", "poly"],
    # The front door: python train.py --model vae --reg poly (the digits preset).
    "vae_front_door": ["--model", "vae", "--reg", "poly"],
}
SKIP = 20  # leading steps left out of the step times
#: The seed-paired comparisons of new with baseline: name -> (figure, "ratio" new / baseline or
#: "diff" new - baseline, the report's format).
COMPARED = {"step_ratio": ("seconds_per_step", "ratio", ".2f"),
            "nfe_ratio": ("forward_nfe_per_step", "ratio", ".3f"),
            "nll_diff": ("test_nll", "diff", "+.4f"),
            "throughput_ratio": ("test_rows_per_second", "ratio", ".2f")}


# ------------------------------------------------------------------------------ child
def child(argv: list[str], steps: int, out: Path) -> None:
    """Train one run with this interpreter's polyreg_cnf; write its figures to ``out``."""
    import torch

    from polyreg_cnf.app.build import build
    from polyreg_cnf.app.config import make_parser, parse_command_line, resolve

    torch.set_num_threads(1)
    flags = [*argv, "--max-steps", str(steps), "--val-every", str(steps),
             "--limit-val-batches", "0", "--no-test", "--logger", "none", "--plot-every", "0",
             "--ckpt-every", "0", "--output-dir", tempfile.mkdtemp(), "--threads", "1"]
    parser = make_parser()
    if "--early-stop-patience" in parser.format_help():  # since 1686158: it needs validation
        flags += ["--early-stop-patience", "0"]
    config = resolve(parse_command_line(parser, flags)[0])
    run = build(config)
    start = time.perf_counter()
    run.trainer.fit(run.model, run.datamodule)
    fit_wall = time.perf_counter() - start
    # The NFE monitor's (forward NFE, backward NFE, wall seconds) of each training step
    per_step, _, seconds = zip(*run.monitor.history)
    test = run.trainer.test(run.model, run.datamodule, verbose=False)[0]
    nll_key = "test/nll" if "test/nll" in test else "test/neg_elbo"
    model = run.model.eval()
    run.datamodule.setup("test")
    rows = torch.cat([b[0] if isinstance(b, (list, tuple)) else b
                      for b in run.datamodule.test_dataloader()])[:2000]
    # the VAE has no log_prob: one importance sample's ELBO terms
    score = model.log_prob if hasattr(model, "log_prob") else model.elbo_terms
    throughput = []
    with torch.no_grad():
        for _ in range(3):
            begin = time.perf_counter()
            score(rows)
            throughput.append(len(rows) / (time.perf_counter() - begin))
    out.write_text(json.dumps({
        "seconds_per_step": statistics.median(seconds[SKIP:]),
        "mean_seconds_per_step": statistics.fmean(seconds[SKIP:]),
        "first_steps_seconds": sum(seconds[:SKIP]), "fit_wall": fit_wall,
        "forward_nfe_per_step": statistics.fmean(per_step[SKIP:]),
        "test_nll": float(test[nll_key]), "test_metric": nll_key,
        "test_rows_per_second": statistics.median(throughput), "test_rows": len(rows),
        "divergence": getattr(config.flow, "divergence", "reverse (before forward mode)")}))


# ------------------------------------------------------------------------------ parent
def prepare_baseline(rev: str, folder: Path) -> Path:
    """A folder with the revision's polyreg_cnf (callbacks and datamodules inside)."""
    if folder.exists():
        return folder
    src = folder.with_name(folder.name + "-src")
    src.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
    (folder / "pkg").mkdir(parents=True)
    shutil.copytree(src / "polyreg_cnf", folder / "pkg" / "polyreg_cnf")
    for name in ("callbacks", "datamodules"):
        shutil.copytree(src / name, folder / "pkg" / "polyreg_cnf" / name)
    return folder


def launch(which: str, argv: list[str], steps: int, out: Path, baseline: Path | None
           ) -> subprocess.Popen:
    """One child run (:func:`child`) with the baseline's or this checkout's polyreg_cnf."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT))  # the benchmarks package; the child runs elsewhere
    cmd = [sys.executable]
    if which == "baseline":
        # The baseline's package first: it shadows this checkout's polyreg_cnf.
        site_packages = next(p for p in site.getsitepackages() if p.endswith("site-packages"))
        env["PYTHONPATH"] = os.pathsep.join([str(baseline / "pkg"), site_packages, str(ROOT)])
        cmd.append("-S")
    cmd += ["-m", "benchmarks.step_speed", "--child", json.dumps(argv), "--steps", str(steps),
            "--child-out", str(out)]
    return subprocess.Popen(cmd, env=env, cwd=tempfile.mkdtemp(), stdout=subprocess.DEVNULL,
                            stderr=open(str(out) + ".log", "w"))


FLAGS = {"--child": dict(default=None, help=argparse.SUPPRESS),  # one run, for launch()
         "--child-out": dict(type=Path, default=None, help=argparse.SUPPRESS),
         "--steps": dict(type=int, default=400),
         "--seeds": dict(type=int, nargs="+", default=[0, 1]),
         "--workloads": dict(nargs="+", default=list(WORKLOADS), choices=WORKLOADS),
         "--baseline-rev": dict(default="b4d2198"),
         "--baseline-tree": dict(type=Path, default=Path("/tmp/polyreg-baseline")),
         "--variants": dict(nargs="+", default=["forward", "compiled"])}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Each workload, seed and variant: the baseline's run and this checkout's, side by side."""
    baseline = prepare_baseline(args.baseline_rev, args.baseline_tree)
    work = Path(tempfile.mkdtemp())
    table = work / "mixture16.npy"
    from benchmarks.tables import write_mixture_table

    write_mixture_table(table)
    results: list[dict[str, Any]] = []
    load = [os.getloadavg()[0]]
    for name in args.workloads:
        flags = [f.format(mixture16=table) for f in WORKLOADS[name]]
        for seed in args.seeds:
            for variant in args.variants:
                argv = [*flags, "--seed", str(seed)]
                ours = argv + ([] if variant == "forward" else ["--divergence", variant])
                outs = {k: work / f"{name}-{seed}-{variant}-{k}.json" for k in ("baseline", "new")}
                procs = [launch("baseline", argv, args.steps, outs["baseline"], baseline),
                         launch("new", ours, args.steps, outs["new"], None)]
                codes = [p.wait() for p in procs]
                if any(codes):
                    raise SystemExit(f"{name} seed {seed} {variant}: exit codes {codes}; see "
                                     f"{outs['baseline']}.log and {outs['new']}.log")
                pair = {k: json.loads(v.read_text()) for k, v in outs.items()}
                results.append(dict(workload=name, seed=seed, variant=variant, **pair))
                b, n = pair["baseline"], pair["new"]
                print(f"{name} seed {seed} {variant}: step {n['seconds_per_step']:.4f} s vs "
                      f"{b['seconds_per_step']:.4f} s, NFE {n['forward_nfe_per_step']:.1f} vs "
                      f"{b['forward_nfe_per_step']:.1f}", flush=True)
                load.append(os.getloadavg()[0])
    return {"command": args.command, "baseline_rev": args.baseline_rev, "steps": args.steps,
            "skip": SKIP, "machine": {"cpu": common.cpu_name(), "cpus": os.cpu_count(),
                                      "python": platform.python_version(),
                                      "load_average_seen": [min(load), max(load)]},
            "runs": results, "summary": summarise(results)}


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per workload and variant: seed-paired ratios and differences, median and range."""
    out: dict[str, Any] = {}
    for r in results:
        b, n = r["baseline"], r["new"]
        entry = out.setdefault(f"{r['workload']}/{r['variant']}",
                               {**{k: [] for k in COMPARED}, "seeds": []})
        entry["seeds"].append(r["seed"])
        for k, (figure, how, _) in COMPARED.items():
            entry[k].append(n[figure] - b[figure] if how == "diff" else n[figure] / b[figure])
    for entry in out.values():
        for k in COMPARED:
            entry[k + "_median"] = statistics.median(entry[k])
    return out


def markdown(payload: dict[str, Any]) -> str:
    """The seed-paired ratios per workload and variant, then every run's absolute figures."""
    m = payload["machine"]
    lines = [*common.header(
        "step_speed", f"Training step and test throughput: this checkout against "
        f"{payload['baseline_rev']}", payload["command"],
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, Python {m['python']}; load average seen "
        f"{m['load_average_seen'][0]:.1f}-{m['load_average_seen'][1]:.1f}. "
        f"{payload['steps']} training steps per run, the first {payload['skip']} left out of the "
        f"step times. Ratios are new / baseline per seed (median [per seed])."),
        *table(["workload", "variant", "s/step ratio", "forward NFE ratio", "test NLL diff",
                "test rows/s ratio"],
               [[*key.split("/"), *(f"{format(e[k + '_median'], f)} ["
                                    + ", ".join(format(v, f) for v in e[k]) + "]"
                                    for k, (_, _, f) in COMPARED.items())]
                for key, e in payload["summary"].items()])]
    lines += ["", "Absolute figures (s/step, baseline -> new):", ""]
    for r in payload["runs"]:
        b, n = r["baseline"], r["new"]
        lines.append(f"- {r['workload']} seed {r['seed']} {r['variant']}: "
                     f"{b['seconds_per_step'] * 1e3:.1f} -> {n['seconds_per_step'] * 1e3:.1f} ms, "
                     f"NFE {b['forward_nfe_per_step']:.1f} -> {n['forward_nfe_per_step']:.1f}, "
                     f"{r['new']['test_metric']} {b['test_nll']:.4f} -> {n['test_nll']:.4f}, "
                     f"test rows/s {b['test_rows_per_second']:.0f} -> "
                     f"{n['test_rows_per_second']:.0f}, first {payload['skip']} steps "
                     f"{b['first_steps_seconds']:.1f} -> {n['first_steps_seconds']:.1f} s")
    return "\n".join(lines) + "\n"


STUDY = common.Study("step_speed", __doc__, measure, markdown, flags=FLAGS)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.step_speed`` (``--child``: one run of :func:`launch`)."""
    if argv is None and "--child" in sys.argv:
        args = common.parser_of(STUDY).parse_args()
        child(json.loads(args.child), args.steps, args.child_out)
        return 0
    return common.main(STUDY, argv)


if __name__ == "__main__":
    sys.exit(main())
