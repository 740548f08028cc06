"""Run a named benchmark suite: several arms x workloads x seeds; write JSON, markdown and a PNG.

    python benchmarks/run.py --suite quick      # smoke run, minutes
    python benchmarks/run.py --suite full       # the comparison of the README (about 2 hours)

Arms and workloads are defined in benchmarks/harness.py. Results go to
benchmarks/results/<suite>.json, <suite>.md and <suite>_nfe.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    ARMS,
    WORKLOADS,
    fmt,
    machine,
    plot_nfe,
    run_one,
    summarise,
    write_json,
)

RESULTS = Path(__file__).resolve().parent / "results"

SUITES = {
    "quick": dict(workloads={"checkerboard": 200}, seeds=(0, 1, 2),
                  arms=("ffjord", "tpr_paper", "ffjord_matched", "rnode", "tpr_fast")),
    # A longer look at the matched-tolerance question only (one seed: a probe, not a verdict).
    "matched": dict(workloads={"checkerboard": 3000}, seeds=(0,),
                    arms=("ffjord_matched", "tpr_fast")),
    "full": dict(workloads={"checkerboard": 3000, "8gaussians": 3000, "breast_cancer": 2000},
                 seeds=(0, 1, 2),
                 arms=("ffjord", "tpr_paper", "ffjord_matched", "rnode", "tpr_fast")),
}


def markdown(suite: str, payload: dict) -> str:
    m = payload["machine"]
    lines = [f"# Benchmark suite `{suite}`", "",
             f"Command: `{payload['command']}`  ",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch thread(s); "
             f"torch {m['torch']}, lightning {m['lightning']}, torchdiffeq {m['torchdiffeq']}; "
             f"commit {m['git_commit']}; {m['date']}; {payload['seconds']:.0f} s in all.  ",
             "Figures: median [min, max] over seeds "
             f"{list(payload['seeds'])}. NFE = right-hand-side calls per training step, averaged "
             "over training (the paper's code counted 2 per call). Test NLL at the evaluation "
             "tolerance 1e-5 (exact trace); gap = NLL at the training tolerance minus NLL at "
             "1e-5. Time to target = training seconds until the validation NLL first reaches the "
             "named arm's final validation NLL (same seed).", ""]
    for wname, arms in payload["summary"].items():
        lines += [f"## {wname}", "",
                  "| arm | fwd NFE | bwd NFE | total NFE | s/step | test NLL | test NFE | gap | "
                  "s to (1) final val | s to (3) final val |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for aname, e in arms.items():
            lines.append(
                f"| {ARMS[aname].label} | {fmt(e['forward_nfe'])} | {fmt(e['backward_nfe'])} | "
                f"{fmt(e['total_nfe'])} | {fmt(e['seconds_per_step'], 3)} | "
                f"{fmt(e['test_nll'], 4)} | {fmt(e['test_nfe'])} | "
                f"{fmt(e['tolerance_gap'], 4)} | "
                f"{fmt(e.get('seconds_to_ffjord_final_val'), 0)} | "
                f"{fmt(e.get('seconds_to_ffjord_matched_final_val'), 0)} |")
        lines.append("")
    lines.append(f"![NFE per step]({suite}_nfe.png)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--arms", default=None, help="comma-separated subset of the arms")
    args = parser.parse_args()
    suite = SUITES[args.suite]
    arms = args.arms.split(",") if args.arms else list(suite["arms"])
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; valid: {', '.join(ARMS)}")
    start = time.perf_counter()
    runs = []
    for wname, steps in suite["workloads"].items():
        work = dataclasses.replace(WORKLOADS[wname], steps=steps,
                                   eval_every=max(1, min(WORKLOADS[wname].eval_every, steps // 4)))
        for seed in suite["seeds"]:
            for aname in arms:
                print(f"[{time.perf_counter() - start:6.0f} s] {wname} {aname} seed {seed}",
                      flush=True)
                runs.append(run_one(work, ARMS[aname], seed))
    command = ("python benchmarks/run.py " + " ".join(sys.argv[1:])).strip()
    payload = {"suite": args.suite, "command": command, "machine": machine(),
               "seeds": list(suite["seeds"]), "seconds": time.perf_counter() - start,
               "summary": summarise(runs),
               "runs": [{k: v for k, v in r.items() if k != "nfe_per_step"} for r in runs]}
    write_json(RESULTS / f"{args.suite}.json", payload)
    plot_nfe(runs, RESULTS / f"{args.suite}_nfe.png")
    text = markdown(args.suite, payload)
    (RESULTS / f"{args.suite}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
