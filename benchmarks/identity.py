"""Train the quick suite's runs with two trees and compare them bit for bit, step by step.

    python -m benchmarks.identity --base-tree OLD --base-python OLD/.venv/bin/python \\
        [--head-tree . --head-python .venv/bin/python] [--steps 200] [--seeds 0 1 2] \\
        [--arms ...] [--out benchmarks/results/refactor_identity]

Writes benchmarks/results/refactor_identity.{json,md}; exit status 1 when any field of any run
differs. What it compares: docs/benchmarks.md, `benchmarks.identity`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import UsageError, table
from benchmarks.run import SUITES

__all__ = ["FIELDS", "PER_STEP", "RUNNER", "STUDY", "compare", "main", "record"]

#: What is compared, per run: the per-step arrays, the validation NLLs (one per validation),
#: then the figures of the finished run.
PER_STEP = ("loss", "forward_nfe", "backward_nfe")
FIELDS = (*PER_STEP, "val_nll", "test_nll", "test_nfe", "test_nll_at_train_tol",
          "weights_sha256")

#: Run by each tree's interpreter with ``python -c`` in the tree (argv: OUT STEPS ARM:SEED...).
#: It uses only what benchmarks/harness.py has offered since before benchmarks was a package
#: (ARMS, WORKLOADS, run_one, build), so a tree older than this module (4156f03) runs it too.
RUNNER = r'''
import dataclasses, hashlib, json, os, sys, tempfile
tree = os.getcwd()
import polyreg_cnf, polyreg_cnf.callbacks, polyreg_cnf.datamodules, torch
from benchmarks import harness  # at 4156f03 a namespace package; checkerboard needs no sibling
for module in (polyreg_cnf, polyreg_cnf.callbacks, polyreg_cnf.datamodules, harness):
    if not os.path.realpath(module.__file__).startswith(os.path.realpath(tree) + os.sep):
        sys.exit(f"{sys.executable} imports {module.__name__} from {module.__file__}, not {tree}")

class Losses(harness.L.Callback):
    def __init__(self):
        self.values = []
    def on_before_backward(self, trainer, module, loss):  # what is backpropagated, terms included
        self.values.append(float(loss))

build, out, steps = harness.build, {}, int(sys.argv[2])
work = harness.WORKLOADS["checkerboard"]  # with the quick suite's validation interval
work = dataclasses.replace(work, steps=steps, eval_every=max(1, min(work.eval_every, steps // 4)))
for spec in sys.argv[3:]:
    arm, seed = spec.split(":")
    losses = Losses()
    harness.build = lambda config, callbacks=(), **kw: build(
        config, callbacks=[*callbacks, losses], **kw)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.pt")
        run = harness.run_one(work, harness.ARMS[arm], int(seed), steps=steps, model_path=path)
        weights = torch.load(path)["state_dict"]
    digest = hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights)))
    out[spec] = {"loss": losses.values, "forward_nfe": run["nfe_per_step"]["forward"],
                 "backward_nfe": run["nfe_per_step"]["backward"],
                 "val_nll": [c[2] for c in run["val_curve"]], "test_nll": run["test_nll"],
                 "test_nfe": run["test_nfe"], "test_nll_at_train_tol": run["test_nll_at_train_tol"],
                 "weights_sha256": digest.hexdigest(), "seconds": run["run_wall_seconds"]}
    with open(sys.argv[1], "w") as handle:
        json.dump(out, handle)
    print(tree, spec, run["total_nfe"], run["test_nll"], flush=True)
'''


def _tree(tree: Path, python: Path) -> dict[str, Any]:
    """Where a tree is, its interpreter, its commit and whether it has uncommitted changes."""
    if not (tree / "benchmarks" / "harness.py").is_file():
        raise UsageError(f"{tree} has no benchmarks/harness.py: not a polyreg-cnf tree")
    if not os.access(python, os.X_OK):
        raise UsageError(f"{python} is not an executable interpreter")
    dirty = common.git(tree, "status", "--porcelain", "--untracked-files=no", default="")
    return {"tree": str(tree), "python": str(python), "commit": common.git(tree, "rev-parse",
            "--short", "HEAD"), "uncommitted_changes": bool(dirty)}


def record(trees: dict[str, dict[str, Any]], specs: list[str], steps: int
           ) -> dict[str, dict[str, Any]]:
    """Train ``specs`` (``ARM:SEED``) for ``steps`` in each tree at once; each tree's runs."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # each tree imports its own
    with tempfile.TemporaryDirectory() as tmp:
        procs = {side: subprocess.Popen([t["python"], "-c", RUNNER, f"{tmp}/{side}.json",
                                         str(steps), *specs], cwd=t["tree"], env=env)
                 for side, t in trees.items()}
        try:
            for side, proc in procs.items():
                if proc.wait():
                    raise RuntimeError(f"the {side} tree ({trees[side]['tree']}) exited "
                                       f"{proc.returncode}")
        finally:  # one tree failed: the other's runs would be compared with nothing
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
        return {side: json.loads(Path(f"{tmp}/{side}.json").read_text()) for side in trees}


def _same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a)
                      and math.isnan(b))


def compare(base: dict[str, Any], head: dict[str, Any]) -> dict[str, Any]:
    """Field by field, what differs between two runs: ``{}`` when they are bit-identical.

    A differing array maps to its first differing index (a step, or a validation for
    ``val_nll``) and both values there (the index is the length of the shorter one when one
    array only extends the other); a figure, to both values.

    Example:
        >>> compare({"loss": [1.0, 2.0], "test_nfe": 26}, {"loss": [1.0, 2.5], "test_nfe": 26})
        {'loss': {'index': 1, 'base': 2.0, 'head': 2.5}}
    """
    out = {}
    for field in FIELDS:
        a, b = base.get(field), head.get(field)
        if isinstance(a, list) and isinstance(b, list):
            i = next((i for i, (x, y) in enumerate(zip(a, b)) if not _same(x, y)),
                     None if len(a) == len(b) else min(len(a), len(b)))
            if i is not None:
                out[field] = {"index": i, "base": a[i] if i < len(a) else None,
                              "head": b[i] if i < len(b) else None}
        elif not _same(a, b):
            out[field] = {"base": a, "head": b}
    return out


QUICK = SUITES["quick"]
FLAGS = {"--base-tree": dict(type=Path, help="the earlier tree (required)"),
         "--base-python": dict(type=Path, help="its interpreter (required)"),
         "--head-tree": dict(type=Path, default=common.ROOT),
         "--head-python": dict(type=Path, default=Path(sys.executable)),
         "--steps": dict(type=int, default=QUICK["workloads"]["checkerboard"]),
         "--seeds": dict(type=int, nargs="+", default=list(QUICK["seeds"])),
         "--arms": dict(nargs="+", default=list(QUICK["arms"])),
         "--note": dict(default="", help="what explains the result (in the report)")}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Both trees' runs, and the exit status (1 when any run differs)."""
    from benchmarks.harness import ARMS

    if unknown := sorted(set(args.arms) - set(ARMS)):
        raise UsageError(f"unknown arms {unknown}; allowed: {', '.join(ARMS)}")
    if args.base_tree is None or args.base_python is None:
        raise UsageError("--base-tree and --base-python are required")
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    trees = {"base": _tree(args.base_tree.resolve(), args.base_python.absolute()),
             "head": _tree(args.head_tree.resolve(), args.head_python.absolute())}
    specs = [f"{arm}:{seed}" for arm in args.arms for seed in args.seeds]
    runs = record(trees, specs, args.steps)
    differ = any(compare(runs["base"][s], runs["head"][s]) for s in specs)
    return {"meta": {"command": args.command, "machine": common.machine(), "steps": args.steps,
                     **trees, "note": args.note, "exit_status": int(differ)},
            "runs": [{"run": s, "base": runs["base"][s], "head": runs["head"][s]}
                     for s in specs]}


def render(payload: dict[str, Any]) -> str:
    """The verdict per run, with the first difference and the summary figures of both trees."""
    meta, runs = payload["meta"], payload["runs"]
    diffs = [compare(r["base"], r["head"]) for r in runs]
    name = {side: f"`{meta[side]['commit']}`"
            + (" with uncommitted changes" if meta[side]["uncommitted_changes"] else "")
            for side in ("base", "head")}
    rows = []
    for r, diff in zip(runs, diffs):
        first = next(iter(diff), None)
        where = "" if first is None else f"{first}" + (
            "" if "index" not in diff[first] else
            f" at {'step' if first in PER_STEP else 'validation'} {diff[first]['index']}")
        b, h = r["base"], r["head"]
        rows.append([r["run"], "no" if diff else "yes", where,
                     f"{sum(b['forward_nfe']) + sum(b['backward_nfe'])} / "
                     f"{sum(h['forward_nfe']) + sum(h['backward_nfe'])}",
                     f"{b['test_nll']:.10f} / {h['test_nll']:.10f}"])
    same = sum(not d for d in diffs)
    return "\n".join([
        *common.header(
            "identity", f"{'Identical' if same == len(runs) else 'Not identical'}: "
            f"{same} of {len(runs)} quick-suite runs, two trees", meta["command"],
            f"Base {name['base']} ({meta['base']['tree']}), head {name['head']} "
            f"({meta['head']['tree']}); checkerboard, {meta['steps']} steps; "
            f"{meta['machine']['cpu']}, {meta['machine']['date']}.",
            *([meta["note"]] if meta["note"] else [])),
        *table(["run", "identical", "first difference", "NFE of all steps (base / head)",
                "test NLL (base / head)"], rows, align="lllrr"),
        ""])


STUDY = common.Study("identity", __doc__, measure, render, flags=FLAGS,
                     report=lambda args: common.RESULTS / "refactor_identity", indent=None)
main = STUDY.main

if __name__ == "__main__":
    sys.exit(main())
