"""What the drop-in ``polyreg_cnf.odeint`` costs next to torchdiffeq's, with and without TPR.

    python -m benchmarks.dropin_overhead [--repeats 200] [--seeds 7] [--train-steps 200]

Writes benchmarks/results/dropin_overhead.{json,md}; how it measures: docs/benchmarks.md,
`benchmarks.dropin_overhead`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Any

import torch
import torchdiffeq
from torch import nn

import polyreg_cnf
from benchmarks import common
from polyreg_cnf.engine import NFECounter, TrajectoryRecorder, record_nfe
from polyreg_cnf.engine.recording import penalty_grid

__all__ = ["STUDY", "main"]

GRID = torch.linspace(0.0, 1.0, 5)
A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])


class Field(nn.Module):
    """A user's vector field: an MLP of the state, counting its calls."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width),
                                 nn.Tanh(), nn.Linear(width, 2))
        self.calls = 0

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.mlp(x)

    def nfe(self, loss: torch.Tensor) -> tuple[int, int]:
        """The forward NFE since the count was last read, and the backward NFE of
        ``loss.backward()``; the count starts again from zero."""
        forward = self.calls
        loss.backward()
        backward, self.calls = self.calls - forward, 0
        return forward, backward


def spiral(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial points and their exact linear-spiral trajectories at GRID, shape (5, B, 2)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 2, generator=g)
    ys = torch.stack([x0 @ torch.linalg.matrix_exp(s * A).T for s in GRID])
    return x0, ys


def train(steps: int, tol: float, seed: int = 0) -> Field:
    """The trajectory model fitted by plain Adam (no penalty), as a user would have it."""
    torch.manual_seed(seed)
    field = Field()
    opt = torch.optim.Adam(field.parameters(), lr=3e-3)
    for step in range(steps):
        x0, ys = spiral(128, 10_000 + step)
        pred = torchdiffeq.odeint(field, x0, GRID, rtol=tol, atol=tol)
        loss = (pred - ys).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return field


def time_solves(field: Field, repeats: int, tol: float) -> dict[str, Any]:
    """1. No regularizer: seconds per solve of each arm, interleaved, after 3 warm-ups."""
    x0, ys = spiral(256, 1)
    pairs = {"odeint": (torchdiffeq.odeint, polyreg_cnf.odeint),
             "odeint_adjoint": (torchdiffeq.odeint_adjoint, polyreg_cnf.odeint_adjoint)}
    rows = {}
    for name, (stock, dropin) in pairs.items():
        arms = {"torchdiffeq": (stock, False), "drop-in": (dropin, False),
                "drop-in, NFE counted": (dropin, True)}
        seconds: dict[str, list[float]] = {arm: [] for arm in arms}
        for r in range(repeats + 3):
            for arm, (solve, count) in list(arms.items())[::(-1) ** r]:  # order flips each time
                field.zero_grad(set_to_none=True)
                start = time.perf_counter()
                with record_nfe(NFECounter()) if count else contextlib.nullcontext():
                    pred = solve(field, x0, GRID, rtol=tol, atol=tol)
                (pred - ys).square().mean().backward()
                if r >= 3:  # warm-up
                    seconds[arm].append(time.perf_counter() - start)
        base = statistics.median(seconds["torchdiffeq"])
        rows[name] = {arm: {"median_s": statistics.median(s), "ratio": statistics.median(s) / base,
                            "repeats": len(s)} for arm, s in seconds.items()}
    return rows


def tpr_nfe(field: Field, seeds: int, tol: float, num_samples: int, coef: float
            ) -> dict[str, Any]:
    """2. TPR: forward and backward NFE of each arm over the seeds; medians."""
    arms: dict[str, list[tuple[int, int]]] = {"stock, no TPR": [], "stock, TPR": [],
                                              "drop-in, TPR": []}
    field.calls = 0
    for seed in range(seeds):
        x0, ys = spiral(256, 100 + seed)
        # the drop-in, inside a recorder (what a training step with the callback runs)
        recorder = TrajectoryRecorder(num_samples, 1, generator=torch.Generator().manual_seed(seed))
        with recorder:
            pred = polyreg_cnf.odeint_adjoint(field, x0, GRID, rtol=tol, atol=tol)
        loss = (pred - ys).square().mean() + coef * recorder.penalty()
        arms["drop-in, TPR"].append(field.nfe(loss))
        # torchdiffeq's adjoint on the same merged grid (the same interior times), the same loss
        grid = penalty_grid(GRID, num_samples, torch.Generator().manual_seed(seed))
        traj = torchdiffeq.odeint_adjoint(field, x0, grid.times, rtol=tol, atol=tol)
        loss = (grid.select(traj) - ys).square().mean() + coef * grid.penalty(traj, 1)
        arms["stock, TPR"].append(field.nfe(loss))
        pred = torchdiffeq.odeint_adjoint(field, x0, GRID, rtol=tol, atol=tol)
        arms["stock, no TPR"].append(field.nfe((pred - ys).square().mean()))
    field.zero_grad(set_to_none=True)
    base = statistics.median(b for _, b in arms["stock, no TPR"])
    return {arm: {"forward_nfe": statistics.median(f for f, _ in rows),
                  "backward_nfe": statistics.median(b for _, b in rows),
                  "backward_ratio": statistics.median(b for _, b in rows) / base,
                  "backward_per_seed": [b for _, b in rows]}
            for arm, rows in arms.items()}


def to_markdown(result: dict[str, Any]) -> str:
    """The timing table and the NFE table, after the run's machine and model."""
    return "\n".join([
        *common.header(
            "dropin_overhead",
            "Drop-in odeint: overhead without the regularizer, backward NFE with TPR",
            result["command"],
            f"Machine: {result['cpu']}, nproc {result['nproc']}, 1 torch thread; torch "
            f"{result['torch']}, torchdiffeq {result['torchdiffeq']}, Python {result['python']}.",
            f"Model: MLP 2-64-64-2 fitted for {result['train_steps']} Adam steps to a linear "
            f"spiral observed at t = {GRID.tolist()}; dopri5, rtol = atol = {result['tol']}."),
        "## 1. No regularizer: seconds per solve (forward + backward), median of "
        f"{result['repeats']} interleaved repeats", "",
        *common.table(["call", "arm", "median s", "ratio to torchdiffeq"],
               [[call, arm, f"{row['median_s']:.4f}", f"{row['ratio']:.3f}"]
                for call, arms in result["timing"].items() for arm, row in arms.items()], "llrr"),
        "", f"## 2. TPR on the 5-point grid (K = {result['num_samples']} interior times, m = 1, "
        f"coef {result['coef']}): NFE, median of {result['seeds']} seeds", "",
        *common.table(["arm", "forward NFE", "backward NFE", "backward / stock without TPR",
                "backward NFE per seed"],
               [[arm, f"{row['forward_nfe']:g}", f"{row['backward_nfe']:g}",
                 f"{row['backward_ratio']:.2f}", row["backward_per_seed"]]
                for arm, row in result["tpr"].items()], "lrrrl")]) + "\n"


FLAGS = {"--repeats": dict(type=int, default=200), "--seeds": dict(type=int, default=7),
         "--train-steps": dict(type=int, default=200), "--tol": dict(type=float, default=1e-5),
         "--num-samples": dict(type=int, default=2), "--coef": dict(type=float, default=5.0)}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Train the trajectory model, then time the solves and count TPR's backward NFE."""
    torch.set_num_threads(1)
    field = train(args.train_steps, args.tol)
    return dict(
        command=args.command, cpu=common.cpu_name(), nproc=os.cpu_count(), **common.versions(),
        train_steps=args.train_steps, tol=args.tol,
        repeats=args.repeats, seeds=args.seeds, num_samples=args.num_samples, coef=args.coef,
        timing=time_solves(field, args.repeats, args.tol),
        tpr=tpr_nfe(field, args.seeds, args.tol, args.num_samples, args.coef))


STUDY = common.Study("dropin_overhead", __doc__, measure, to_markdown, flags=FLAGS)
main = STUDY.main

if __name__ == "__main__":
    sys.exit(main())
