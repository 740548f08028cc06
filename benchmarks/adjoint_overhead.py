"""Backward cost of the trajectory penalty's extra output times: stock vs restart-free adjoint.

    python -m benchmarks.adjoint_overhead [--seeds 3] [--tol 1e-5] [--train-steps 300]

Writes benchmarks/results/adjoint_overhead.{json,md}; how it measures: docs/benchmarks.md,
`benchmarks.adjoint_overhead`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
from polyreg_cnf.datamodules.toy import sample_toy

from benchmarks import common
from polyreg_cnf import CNF, Adjoint, ODENet, SolverConfig, standard_normal_logprob
from polyreg_cnf.engine import TrajectoryRecorder

__all__ = ["STUDY", "main", "measure_step", "train_toy"]

VARIANTS: dict[str, dict[str, Any]] = {
    "plain_stock": dict(K=0, backprop="adjoint", carry=False),
    "plain_carry": dict(K=0, backprop="adjoint", carry=True),
    "tpr_stock": dict(K=2, backprop="adjoint", carry=False),
    "tpr_carry_intervals": dict(K=2, backprop="adjoint", carry=True),
    "tpr_direct": dict(K=2, backprop="direct", carry=False),
    "plain_checkpoint": dict(K=0, backprop="checkpoint", carry=False),
    "tpr_checkpoint": dict(K=2, backprop="checkpoint", carry=False),
}


def train_toy(steps: int, tol: float, batch: int, seed: int = 0) -> CNF:
    """A 2-D CNF trained by plain Adam on checkerboard samples (no penalty)."""
    torch.manual_seed(seed)
    cnf = CNF(ODENet(2, (64, 64, 64), "concatsquash", "tanh"),
              solver=SolverConfig(atol=tol, rtol=tol))
    opt = torch.optim.Adam(cnf.parameters(), lr=1e-3)
    data = torch.from_numpy(sample_toy("checkerboard", steps * batch, seed))
    for step in range(steps):
        x = data[step * batch:(step + 1) * batch]
        z, ladj = cnf(x)
        loss = -(standard_normal_logprob(z) + ladj).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return cnf


def measure_step(cnf: CNF, x: torch.Tensor, variant: dict[str, Any], seminorm: bool, tol: float,
            seed: int) -> dict[str, float]:
    """NFE and seconds of one training step of ``cnf`` on ``x`` under ``variant``."""
    backprop = (Adjoint(carry=variant["carry"], seminorm=seminorm)
                if variant["backprop"] == "adjoint" else variant["backprop"])
    cnf.solver = SolverConfig(atol=tol, rtol=tol, backprop=backprop)
    cnf.nfe.reset()
    cnf.zero_grad(set_to_none=True)
    # the same probe and the same penalty times for every variant
    recorder = TrajectoryRecorder(variant["K"], 1, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    with recorder if variant["K"] else contextlib.nullcontext():
        z, ladj = cnf(x)
    loss = -(standard_normal_logprob(z) + ladj).mean()
    if variant["K"]:
        loss = loss + 5 * recorder.penalty()
    middle, cpu_middle = time.perf_counter(), time.process_time()
    loss.backward()
    end, cpu_end = time.perf_counter(), time.process_time()
    n = cnf.nfe
    return dict(forward_nfe=n.forward, backward_nfe=n.backward,
                backward_steps=n.accepted_backward + n.rejected_backward,
                forward_s=middle - start, backward_s=end - middle,
                # CPU time of this process: what the step cost, whatever else ran meanwhile
                forward_cpu_s=cpu_middle - cpu_start, backward_cpu_s=cpu_end - cpu_middle)


def run_case(name: str, description: str, models: list[CNF], inputs: list[torch.Tensor],
             tol: float) -> dict[str, Any]:
    """Case ``name``: all variants, with and without seminorm, over the (model, input) seeds;
    medians."""
    rows: dict[str, Any] = {}
    # warm-up, untimed
    measure_step(models[0], inputs[0], VARIANTS["tpr_carry_intervals"], False, tol, seed=0)
    for variant_name, variant in VARIANTS.items():
        for seminorm in ((False,) if variant["backprop"] != "adjoint" else (False, True)):
            key = variant_name + ("+seminorm" if seminorm else "")
            runs = [measure_step(m, x, variant, seminorm, tol, seed=1000 + i)
                    for i, (m, x) in enumerate(zip(models, inputs))]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            rows[key] = dict(runs=runs, median=med)
            print(f"{name:>6} {key:<30} fwd {med['forward_nfe']:>6.0f}  bwd "
                  f"{med['backward_nfe']:>6.0f}  bwd {med['backward_s']:.3f}s", flush=True)
    return dict(description=description, rows=rows)


def to_markdown(result: dict[str, Any]) -> str:
    """The medians as one table per case, plus the run's context."""
    lines = common.header(
        "adjoint_overhead", "Backward cost of TPR's extra output times: stock adjoint, "
        "restart-free adjoint, step checkpoints", result["command"],
        f"nproc: {result['nproc']}; torch {result['torch']}, torchdiffeq {result['torchdiffeq']}, "
        f"Python {result['python']}; {result['seeds']} seeds, medians; tolerance atol = rtol = "
        f"{result['tol']}.")
    for case, info in result["cases"].items():
        rows = info["rows"]
        cells = []
        for key, row in rows.items():
            med = row["median"]
            base = rows["plain_stock+seminorm" if "seminorm" in key
                        else "plain_stock"]["median"]["backward_nfe"]
            cells.append([key, f"{med['forward_nfe']:.0f}", f"{med['backward_nfe']:.0f}",
                          f"{med['backward_nfe'] / base if base else float('nan'):.2f}",
                          f"{med['backward_steps']:.0f}", f"{med['backward_s']:.3f}",
                          f"{med['backward_cpu_s']:.3f}"])
        lines += [f"## {case}: {info['description']}", "", *common.table(
            ["variant", "forward NFE", "backward NFE", "ratio to plain_stock", "backward steps",
             "backward s", "backward CPU s"], cells, "lrrrrrr"), ""]
    return "\n".join(lines)


FLAGS = {"--seeds": dict(type=int, default=3), "--tol": dict(type=float, default=1e-5),
         "--train-steps": dict(type=int, default=300),
         "--train-tol": dict(type=float, default=1e-4), "--batch": dict(type=int, default=256)}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """The three cases, every variant over the seeds."""
    if args.seeds < 1 or args.train_steps < 0 or args.batch < 1:
        raise common.UsageError(f"need seeds >= 1, train_steps >= 0, batch >= 1, got "
                                f"{args.seeds}, {args.train_steps}, {args.batch}")
    torch.set_num_threads(1)  # one thread per process, as train.py (see the README)
    start = time.perf_counter()
    toy = train_toy(args.train_steps, args.train_tol, args.batch)
    train_s = time.perf_counter() - start
    print(f"trained the 2-D CNF for {args.train_steps} steps in {train_s:.0f}s", flush=True)
    toy_inputs = [torch.from_numpy(sample_toy("checkerboard", args.batch, 100 + s))
                  for s in range(args.seeds)]
    cases = {"toy-2d": run_case(
        "toy-2d", f"ODENet(2, (64, 64, 64), concatsquash, tanh) after {args.train_steps} Adam "
        f"steps (lr 1e-3, batch {args.batch}, tol {args.train_tol}) on the checkerboard; seeds "
        "vary the batch, the probe and the penalty times", [toy] * args.seeds, toy_inputs,
        args.tol)}

    at_random_init = {  # name -> dim, hidden, nonlinearity, batch, CNF options, description
        "cnf-30d": (30, (64, 64, 64), "tanh", args.batch, {},
                    "ODENet(30, (64, 64, 64), concatsquash, tanh) at random init, standard "
                    "normal inputs; seeds vary the model, the batch, the probe and the times"),
        "short-16d": (16, (64, 64), "softplus", 100, dict(T=0.5),
                      "ODENet(16, (64, 64), concatsquash, softplus), T = 0.5, at random init, "
                      "batch 100 (the digits VAE posterior's size): a one- or two-step solve; "
                      "seeds vary the model, the batch, the probe and the times")}
    for name, (dim, hidden, nonlinearity, batch, options, description) in at_random_init.items():
        models = []
        for s in range(args.seeds):
            torch.manual_seed(s)
            models.append(CNF(ODENet(dim, hidden, "concatsquash", nonlinearity), **options))
        inputs = [torch.randn(batch, dim, generator=torch.Generator().manual_seed(s))
                  for s in range(args.seeds)]
        cases[name] = run_case(name, description, models, inputs, args.tol)
    return dict(
        command=args.command, nproc=os.cpu_count(), **common.versions(), numpy=np.__version__,
        seeds=args.seeds, tol=args.tol, train_steps=args.train_steps, train_seconds=train_s,
        cases=cases)


STUDY = common.Study("adjoint_overhead", __doc__, measure, to_markdown, flags=FLAGS)
main = STUDY.main

if __name__ == "__main__":
    sys.exit(main())
