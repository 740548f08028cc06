"""Issue-2 figure: checkerboard, paper settings, 1000 steps, seed 0, with and without TPR.

    python -m benchmarks.checkerboard_tpr [--steps 1000] [--seed 0]

How it measures: docs/benchmarks.md, `benchmarks.checkerboard_tpr`.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import torch

from benchmarks import common
from benchmarks.harness import ARMS, WORKLOADS, Arm, run_one
from polyreg_cnf.engine.penalty import sample_penalty_times, trajectory_polynomial_penalty


def penalty_seconds(batch: int, dim: int, num_samples: int = 2, order: int = 1,
                    reps: int = 300) -> float:
    """Median seconds of one block's penalty: sample times, penalty, and its backward."""
    times = []
    z = torch.randn(num_samples + 2, batch, dim, requires_grad=True)
    for _ in range(reps):
        start = time.perf_counter()
        trajectory_polynomial_penalty(sample_penalty_times(num_samples, 0.0, 1.0), z,
                                      order).backward()
        times.append(time.perf_counter() - start)
        z.grad = None
    return float(np.median(times))


FLAGS = {"--steps": dict(type=int, default=1000), "--seed": dict(type=int, default=0)}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """The three arms, then the penalty's own cost."""
    work = WORKLOADS["checkerboard"]
    arms = [ARMS["ffjord_matched"], ARMS["tpr_paper"],
            Arm("tpr_carry", "TPR, restart-free adjoint", reg="poly", adjoint_carry_step=True)]
    runs = [run_one(work, arm, args.seed, steps=args.steps) for arm in arms]
    pen = penalty_seconds(work.batch_size, 2)
    rows = [{"arm": arm.name, "label": arm.label,
             **{k: r[k] for k in ("forward_nfe_last100", "backward_nfe_last100")},
             "forward_nfe_mean": r["forward_nfe"], "backward_nfe_mean": r["backward_nfe"],
             **{k: r[k] for k in ("test_nll", "test_nfe", "seconds_per_step")},
             "penalty_share_of_step": pen / r["seconds_per_step"] if arm.reg == "poly" else None}
            for arm, r in zip(arms, runs)]
    return {"command": args.command, "machine": common.machine(), "steps": args.steps,
            "seed": args.seed, "penalty_seconds": pen, "rows": rows,
            "runs": [{k: v for k, v in r.items() if k != "nfe_per_step"} for r in runs]}


def markdown(payload: dict[str, Any]) -> str:
    """The arms side by side and the penalty's cost."""
    batch = WORKLOADS["checkerboard"].batch_size
    lines = [
        *common.suite_header("Checkerboard, paper settings, with and without TPR",
                             payload["command"], payload["machine"]),
        f"Workload: 2-D checkerboard, 3 x 64 concatsquash tanh, 1 block, batch "
        f"{batch}, Adam 1e-3, {payload['steps']} steps, seed {payload['seed']}; train tolerance "
        "1e-4, evaluation 1e-5 (exact trace); TPR K = 2, m = 1, coef = 5. NFE = right-hand-side "
        "calls (the paper's code counted 2 per call).",
        "",
        *common.table(["arm", "forward NFE/step (last 100)", "backward NFE/step (last 100)",
                "forward / backward (mean over training)", "test NLL (nats)", "test NFE",
                "s/step", "penalty share of step"],
               [[r["label"], f"{r['forward_nfe_last100']:.1f}", f"{r['backward_nfe_last100']:.1f}",
                 f"{r['forward_nfe_mean']:.1f} / {r['backward_nfe_mean']:.1f}",
                 f"{r['test_nll']:.4f}", f"{r['test_nfe']:.1f}", f"{r['seconds_per_step']:.3f}",
                 "-" if r["penalty_share_of_step"] is None
                 else f"{100 * r['penalty_share_of_step']:.2f} %"] for r in payload["rows"]]),
        "", f"Penalty cost (sampling + penalty + backward, one block, batch "
        f"{batch}): {1e6 * payload['penalty_seconds']:.0f} microseconds."]
    return "\n".join(lines) + "\n"


STUDY = common.Study("checkerboard_tpr", __doc__, measure, markdown, flags=FLAGS)
main = STUDY.main

if __name__ == "__main__":
    sys.exit(main())
