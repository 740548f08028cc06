r"""The penalty's interior times on a fixed grid: dense output or grid points?

On a linear ODE :math:`\dot z = A z` the trajectory is known in closed form
(:math:`z(t) = e^{tA} z_0`), so the penalty at any set of times is known exactly. For ``draws``
draws of the recorder's interior times this measures, against the closed form at the same times:

- ``linear``: the recorder's solve on a fixed rk4 grid with torchdiffeq's default dense output
  (linear interpolation between the step's ends);
- ``cubic``: the same with ``interp="cubic"`` (cubic Hermite, one more evaluation per interior
  time);
- ``grid``: the penalty over the grid points alone (no interior times), against the mean
  closed-form penalty over the random times (the quantity the sampled penalty estimates).

Run: ``python -m benchmarks.fixed_grid_penalty`` (seconds on one core); writes
``results/fixed_grid_penalty.{json,md}``.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from benchmarks import common
from polyreg_cnf import TrajectoryRecorder, odeint
from polyreg_cnf.engine.nfe import NFECounter, record_nfe
from polyreg_cnf.engine.penalty import trajectory_polynomial_penalty
from polyreg_cnf.engine.recording import penalty_grid


def measure(steps: int, draws: int, num_samples: int, order: int) -> dict[str, float]:
    """Mean relative penalty error of each choice over ``draws`` draws, and NFE per solve."""
    torch.manual_seed(0)
    A = torch.tensor([[-1.0, 3.0], [-3.0, -1.0]], dtype=torch.float64)  # a damped spiral
    z0 = torch.randn(32, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)

    def exact(times: torch.Tensor) -> torch.Tensor:
        return torch.stack([z0 @ torch.linalg.matrix_exp(s * A).T for s in times])

    field = lambda s, z: z @ A.T  # noqa: E731
    out: dict[str, float] = {}
    reference = []
    for interp in ("linear", "cubic"):
        errors, nfe = [], 0
        generator = torch.Generator().manual_seed(1)
        for _ in range(draws):
            state = generator.get_state()
            recorder = TrajectoryRecorder(num_samples, order, generator=generator)
            counter = NFECounter()
            z = z0.clone().requires_grad_(True)  # the recorder penalises training solves only
            with recorder, record_nfe(counter):
                odeint(field, z, t, method="rk4",
                       options={"step_size": 1.0 / steps, "interp": interp})
            nfe += counter.forward
            replay = torch.Generator().manual_seed(0)
            replay.set_state(state)
            times = penalty_grid(t, num_samples, replay).times
            truth = float(trajectory_polynomial_penalty(times, exact(times), order))
            if interp == "linear":
                reference.append(truth)
            errors.append(abs(float(recorder.penalty().detach()) - truth) / truth)
        out[interp] = sum(errors) / draws
        out[f"{interp}_nfe"] = nfe / draws
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    solved = odeint(field, z0, grid, method="rk4", options={"step_size": 1.0 / steps})
    expected = sum(reference) / draws
    out["grid"] = abs(float(trajectory_polynomial_penalty(grid, solved, order)) - expected) \
        / expected
    out["grid_nfe"] = 4.0 * steps
    return out


STEPS = (1, 2, 4, 8, 16)


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--samples", type=int, default=2, help="interior times K")
    parser.add_argument("--order", type=int, default=1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every grid of :data:`STEPS`, with the machine and the command."""
    if args.draws < 1 or args.samples < 1 or args.order < 0:
        raise common.UsageError(f"--draws and --samples must be >= 1 and --order >= 0, got "
                                f"{args.draws}, {args.samples}, {args.order}")
    rows = [{"steps": steps, **measure(steps, args.draws, args.samples, args.order)}
            for steps in STEPS]
    return {"meta": {"command": args.command, "machine": common.machine(), "draws": args.draws,
                     "samples": args.samples, "order": args.order}, "rows": rows}


def markdown(payload: dict[str, Any]) -> str:
    """The report: relative error and forward NFE per solve, per number of rk4 steps."""
    meta = payload["meta"]
    m = meta["machine"]
    head = ["# Penalty interior times on a fixed rk4 grid: linear dense output, cubic Hermite, "
            "grid points", "",
            f"`{meta['command']}`: {meta['draws']} draws of K = {meta['samples']} interior "
            f"times, order {meta['order']}; damped-spiral linear ODE z' = A z, "
            f"A = [[-1, 3], [-3, -1]], 32 states, on [0, 1]. {m['cpu']}, commit {m['git_commit']}, "
            f"torch {m['torch']}, "
            f"{m['date']}. Mean relative error of the penalty against the closed form (matrix "
            f"exponential) at the same times; for grid points, against the mean closed-form "
            f"penalty over the random times. NFE per solve, forward.", ""]
    rows = [[r["steps"], f"{r['linear']:.3g}", f"{r['cubic']:.3g}", f"{r['grid']:.3g}",
             f"{r['linear_nfe']:.0f} / {r['cubic_nfe']:.0f} / {r['grid_nfe']:.0f}"]
            for r in payload["rows"]]
    return "\n".join([*head, *common.table(
        ["rk4 steps", "linear rel. error", "cubic rel. error", "grid points rel. error",
         "NFE linear / cubic / grid"], rows, align="rrrrr")]) + "\n"


STUDY = common.Study("fixed_grid_penalty", __doc__, run, markdown, arguments)

if __name__ == "__main__":
    raise SystemExit(STUDY.main())
