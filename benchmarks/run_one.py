"""Train quick-suite runs with whatever polyreg_cnf this interpreter imports; print JSON figures.

    python -m benchmarks.run_one OUT.json ARM:SEED [ARM:SEED ...]

Used to check that a refactor changes no result: run it once with this checkout and once with
an earlier revision's package (``python -S`` with ``PYTHONPATH=<revision's polyreg_cnf folder,
callbacks and datamodules inside>:<site-packages>:<this checkout>``, as
``python -m benchmarks.step_speed`` prepares it), then compare the per-step NFE, test NLL and
test NFE (``benchmarks/results/refactor_identity.md``). ``STEPS`` (environment) sets the length
(default 200, the quick suite's).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence

from benchmarks.harness import ARMS, WORKLOADS, run_one

#: The figures kept of each run.
KEPT = ("forward_nfe", "backward_nfe", "total_nfe", "test_nll", "test_nfe",
        "test_nll_at_train_tol", "nfe_per_step")


def main(argv: Sequence[str] | None = None) -> int:
    """Train each ``ARM:SEED`` on the checkerboard; write the figures after every run."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or any(spec.count(":") != 1 or spec.split(":")[0] not in ARMS
                            for spec in args[1:]):
        raise SystemExit(f"usage: python -m benchmarks.run_one OUT.json ARM:SEED [...] with "
                         f"ARM one of {', '.join(ARMS)}; got {args}")
    steps = int(os.environ.get("STEPS", 200))
    out: dict[str, dict] = {}
    for spec in args[1:]:
        arm, seed = spec.split(":")
        work = dataclasses.replace(WORKLOADS["checkerboard"], steps=steps)
        run = run_one(work, ARMS[arm], int(seed), steps=steps)
        out[spec] = {k: run[k] for k in KEPT}
        with open(args[0], "w") as handle:
            json.dump(out, handle)
        print(spec, out[spec]["total_nfe"], out[spec]["test_nll"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
