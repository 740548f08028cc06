"""One command for the first machine with a CUDA GPU: device tests, DDP, timings, memory estimate.

    python -m benchmarks.gpu_check [--out benchmarks/results/gpu_check]

Writes ``<out>.{json,md}`` (default benchmarks/results/gpu_check) and ``<out>_engine.{json,md}``;
how it measures: docs/benchmarks.md, `benchmarks.gpu_check`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from benchmarks import common, step_cost
from benchmarks.common import ROOT, table

#: Exit status when there is no CUDA device.
EXIT_NO_CUDA = 2
#: Steps per timed POWER run and per memory-check run.
POWER_STEPS = 40
MEMORY_STEPS = 4
#: Wall-clock limit of the pytest subprocess (seconds).
TEST_TIMEOUT = 240
#: The skip reason tests/test_gpu.py gives its CUDA tests (a skipped CUDA test is a failure here).
CUDA_SKIP_REASON = "needs a CUDA device"


# ------------------------------------------------------------------------------ tests
def junit_outcomes(xml_text: str) -> list[dict[str, str]]:
    """Each test case of a pytest ``--junitxml`` report: ``name`` (``class::test``), ``outcome``
    (``passed``, ``failed`` for a failure or an error, ``skipped``) and ``message``."""
    out = []
    for case in ET.fromstring(xml_text).iter("testcase"):
        failed = next((child for child in case if child.tag in ("failure", "error")), None)
        hit = case.find("skipped") if failed is None else failed  # a failure outranks a skip
        outcome = "passed" if hit is None else "skipped" if failed is None else "failed"
        out.append(dict(name=f"{case.get('classname', '')}::{case.get('name', '')}",
                        outcome=outcome, message="" if hit is None else hit.get("message", "")))
    return out


def run_device_tests(timeout: float = TEST_TIMEOUT) -> dict[str, Any]:
    """Run tests/test_gpu.py in a subprocess; its outcomes (CUDA tests skipped count as failed)."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "report.xml"
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               str(ROOT / "tests" / "test_gpu.py"), f"--junitxml={xml}"]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            returncode, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
        except subprocess.TimeoutExpired as err:
            returncode = None
            out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else ""
            tail = f"timed out after {timeout:.0f} s\n{out[-4000:]}"
        outcomes = junit_outcomes(xml.read_text()) if xml.exists() else []
    for o in outcomes:
        if o["outcome"] == "skipped" and CUDA_SKIP_REASON in o["message"]:
            o["outcome"] = "failed"
            o["message"] = f"skipped although CUDA is available here: {o['message']}"
    counts = {k: sum(o["outcome"] == k for o in outcomes) for k in ("passed", "failed", "skipped")}
    ok = returncode == 0 and counts["failed"] == 0 and bool(outcomes)
    return dict(command=" ".join(["python", *cmd[1:-1]]), returncode=returncode,
                seconds=time.perf_counter() - start, counts=counts, outcomes=outcomes, ok=ok,
                output_tail=tail)


# ------------------------------------------------------------------------------ memory
def memory_estimate(blocks: Sequence[tuple[float, int, int]]) -> float:
    """Bytes direct backprop keeps by the estimate: sum of bytes per evaluation and row x rows x
    forward NFE over the blocks ``(bytes_per_row, rows, forward_nfe)``."""
    return float(sum(b * r * n for b, r, n in blocks))


def memory_probe(allocated: Callable[[], int] | None = None,
                 peak: Callable[[], int] | None = None,
                 reset: Callable[[], None] | None = None) -> Any:
    """A Lightning callback recording in ``.records``, per training step: ``step``, ``direct``
    (no block evaluated backwards), ``blocks`` (``(bytes_per_row, rows, forward_nfe)`` each),
    their ``estimate`` (:func:`memory_estimate`) and ``growth`` (``peak()`` over the step's start).

    Args:
        allocated: Bytes in use now (default ``torch.cuda.memory_allocated``).
        peak: Peak bytes in use since the last reset (default ``torch.cuda.max_memory_allocated``).
        reset: Start a new peak (default ``torch.cuda.reset_peak_memory_stats``).
    """
    import lightning as L

    from polyreg_cnf.engine.ode import ode_blocks

    allocated = allocated or torch.cuda.memory_allocated
    peak = peak or torch.cuda.max_memory_allocated
    reset = reset or torch.cuda.reset_peak_memory_stats

    class MemoryProbe(L.Callback):
        def __init__(self) -> None:
            self.records: list[dict[str, Any]] = []
            self._base = 0

        def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 batch: Any, batch_idx: int) -> None:
            reset()
            self._base = int(allocated())

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                               outputs: Any, batch: Any, batch_idx: int) -> None:
            growth = int(peak()) - self._base
            rows = int((batch[0] if isinstance(batch, (list, tuple)) else batch).shape[0])
            blocks = [(float(b.backprop_decision.bytes_per_row or 0.0), rows,
                       int(b.nfe.forward)) for b in ode_blocks(pl_module)]
            direct = all(b.nfe.backward == 0 for b in ode_blocks(pl_module))
            self.records.append(dict(step=len(self.records), direct=direct, blocks=blocks,
                                     estimate=memory_estimate(blocks), growth=growth))

    return MemoryProbe()


def memory_check(preset: str, data_root: Path, steps: int = MEMORY_STEPS) -> dict[str, Any]:
    """Train ``preset`` for ``steps`` steps on CUDA with a :func:`memory_probe`; compare."""
    probe = memory_probe()
    step_cost.run_preset(preset, "none", 0, steps, data_root, callbacks=[probe],
                         accelerator="gpu", devices="1")
    direct = [r for r in probe.records if r["direct"]]
    ratios = [r["growth"] / r["estimate"] for r in direct if r["estimate"] > 0]
    return dict(preset=preset, records=probe.records,
                measured_over_estimate=ratios,
                max_ratio=max(ratios) if ratios else None,
                within_headroom=bool(ratios) and max(ratios) <= 2.0)


# ------------------------------------------------------------------------------ report
def markdown(results: dict[str, Any]) -> str:
    """The results page: machine, tests, timings, memory, errors (only what was measured)."""
    meta = results["meta"]
    lines = common.header(
        "gpu_check", "GPU check (issue 14, item 6)", meta["command"],
        f"Machine: {meta['gpus']}; {meta['cpu']}. Python {meta['python']}, torch {meta['torch']} "
        f"(CUDA {meta['cuda']}), code at commit {meta['git_commit']}. Wall time: "
        f"{meta['wall_seconds']:.0f} s. Exit status: {meta['exit_status']}.")
    tests = results.get("tests")
    lines += ["## Device tests (tests/test_gpu.py)", ""]
    if tests is None:
        lines.append("Not run.")
    else:
        c = tests["counts"]
        lines += [f"`{tests['command']}`: {c['passed']} passed, {c['failed']} failed, "
                  f"{c['skipped']} skipped in {tests['seconds']:.0f} s (exit "
                  f"{tests['returncode']}).", "",
                  *table(["test", "outcome", "message"],
                         [[o["name"], o["outcome"], o["message"][:200]]
                          for o in tests["outcomes"]])]
        ddp = [o for o in tests["outcomes"] if "ddp" in o["name"].lower()]
        lines += ["", "2-process DDP (NCCL): " + ("; ".join(
            f"{o['name'].split('::')[-1]} {o['outcome']}" + (f" ({o['message']})"
                                                            if o["message"] else "")
            for o in ddp) if ddp else "no DDP test found.")]
    lines += ["", "## Seconds per training step, none vs poly (same seed)", ""]
    timing = results.get("timing")
    if not timing or not timing.get("summary"):
        lines.append("Not measured.")
    else:
        lines += step_cost.summary_table(timing["summary"])  # the columns of step_cost.md
    lines += ["", "## backprop=auto memory estimate vs CUDA allocations", ""]
    memory = results.get("memory")
    if not memory:
        lines.append("Not measured.")
    else:
        lines += table(["preset", "step", "direct", "blocks", "estimate MB",
                        "measured growth MB", "measured / estimate"],
                       [[m["preset"], r["step"], r["direct"], len(r["blocks"]),
                         f"{r['estimate'] / 2**20:.1f}", f"{r['growth'] / 2**20:.1f}",
                         f"{r['growth'] / r['estimate']:.2f}" if r["estimate"] else "-"]
                        for m in memory for r in m["records"]])
    errors = results.get("errors") or []
    if errors:
        lines += ["", "## Errors", ""] + [f"- {e['part']}: {e['error']}" for e in errors]
    return "\n".join(lines) + "\n"


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every part in turn; a part that fails is reported and the others still run.

    Raises:
        SystemExit: No CUDA device (status :data:`EXIT_NO_CUDA`; nothing measured or written).
    """
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        built = torch.version.cuda or "none (a CPU-only build)"
        print(f"benchmarks.gpu_check: no CUDA device: torch.cuda.is_available() is False (torch "
              f"{torch.__version__}, built with CUDA {built}; CUDA_VISIBLE_DEVICES="
              f"{'unset' if visible is None else repr(visible)}). "
              f"Nothing was measured and no results were written. Run it on a machine with an "
              f"NVIDIA GPU and a CUDA build of torch (this project's Makefile installs the CPU "
              f"wheel).", file=sys.stderr)
        raise SystemExit(EXIT_NO_CUDA)
    start = time.perf_counter()
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    gpus = (f"{len(names)} x {names[0]} ({gib:.0f} GiB)" if len(set(names)) == 1 else
            f"{len(names)} GPUs: {', '.join(names)}")
    results: dict[str, Any] = dict(meta=dict(
        command=args.command, gpus=gpus, cpu=step_cost.machine(), **common.versions(),
        cuda=torch.version.cuda), errors=[])

    def save(status: int) -> None:
        results["meta"].update(wall_seconds=time.perf_counter() - start, exit_status=status)
        common.write_report(args.out, results, markdown)

    def attempt(part: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as err:  # report it and carry on with the other parts
            results["errors"].append(dict(part=part, error=f"{type(err).__name__}: {err}",
                                          traceback=traceback.format_exc()[-4000:]))
            print(f"gpu_check: {part} failed: {err}", file=sys.stderr)
            return None

    results["tests"] = attempt("device tests", run_device_tests)
    save(1)
    with tempfile.TemporaryDirectory() as data_root:
        root = Path(data_root)
        attempt("stand-in data", lambda: step_cost.write_standin_data(root))
        parts = {**{f"front door --reg {reg}": partial(step_cost.run_front_door, reg)
                    for reg in ("none", "poly")},
                 **{f"power --reg {reg}": partial(step_cost.run_preset, "power", reg, 0,
                                                  POWER_STEPS, root, accelerator="gpu",
                                                  devices="1") for reg in ("poly", "none")}}
        runs = [r for part, run in parts.items() if (r := attempt(part, run))]
        results["timing"] = dict(runs=runs, summary=step_cost.summarise(runs))
        save(1)
        memory = [attempt(f"memory {p}", lambda p=p: memory_check(p, root))
                  for p in ("power", "vae")]
        results["memory"] = [m for m in memory if m]
    save(1)
    engine = attempt("engine speed on CUDA", lambda: subprocess.run(
        [sys.executable, "-m", "benchmarks.engine_speed", "--device", "cuda", "--repeats", "7",
         "--out", str(args.out) + "_engine"], cwd=ROOT, check=True, timeout=1200))
    results["engine_speed"] = None if engine is None else str(args.out) + "_engine.md"
    tests_ok = bool(results["tests"] and results["tests"]["ok"])
    save(0 if tests_ok and not results["errors"] else 1)
    return results


STUDY = common.Study("gpu_check", __doc__, measure, markdown)
main = STUDY.main

if __name__ == "__main__":
    sys.exit(main())
