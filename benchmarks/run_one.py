"""Train quick-suite runs with whatever polyreg_cnf this interpreter imports; print JSON figures.

    python benchmarks/run_one.py BENCHMARKS_DIR OUT.json ARM:SEED [ARM:SEED ...]

Used to check that a refactor changes no result: run it once with this checkout and once with
an earlier revision's package (``python -S`` with ``PYTHONPATH=<revision's polyreg_cnf folder,
callbacks and datamodules inside>:<site-packages>``, as ``benchmarks/step_speed.py`` prepares
it), then compare the per-step NFE, test NLL and test NFE
(``benchmarks/results/refactor_identity.md``). ``STEPS`` (environment) sets the length
(default 200, the quick suite's).
"""

import dataclasses
import json
import os
import sys

sys.path.insert(0, sys.argv[1])  # the benchmarks folder whose harness trains the runs
from harness import ARMS, WORKLOADS, run_one  # noqa: E402

out = {}
steps = int(os.environ.get("STEPS", 200))
for spec in sys.argv[3:]:
    arm, seed = spec.split(":")
    work = dataclasses.replace(WORKLOADS["checkerboard"], steps=steps)
    run = run_one(work, ARMS[arm], int(seed), steps=steps)
    out[spec] = {k: run[k] for k in ("forward_nfe", "backward_nfe", "total_nfe", "test_nll",
                                     "test_nfe", "test_nll_at_train_tol", "nfe_per_step")}
    with open(sys.argv[2], "w") as handle:
        json.dump(out, handle)
    print(spec, out[spec]["total_nfe"], out[spec]["test_nll"], flush=True)
