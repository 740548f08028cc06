"""What one CNF evaluation costs: the arithmetic floor, today's reverse mode, forward mode.

Usage:
    python -m benchmarks.engine_speed [--workloads checkerboard power] [--repeats 15]
        [--block-seconds 0.05] [--no-compile] [--device cpu] [--out benchmarks/results/engine_speed]
    python -m benchmarks.engine_speed --render benchmarks/results/engine_speed.json

Writes benchmarks/results/engine_speed.{json,md}; how it measures: docs/benchmarks.md,
`benchmarks.engine_speed`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks import common
from benchmarks.common import table
from polyreg_cnf.engine.amortized import AmortizedODENet
from polyreg_cnf.engine.forward_divergence import (
    compiled_field_and_divergence,
    field_and_divergence,
)
from polyreg_cnf.engine.nets import ODENet
from polyreg_cnf.engine.trace import divergence_exact, divergence_hutchinson, sample_probe

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mv", "aten::dot",
              "aten::addmv", "aten::_mkl_mm")


@dataclass(frozen=True)
class Workload:
    """A net and the batch one evaluation sees."""

    name: str
    dim: int
    hidden: tuple[int, ...]
    layer_type: str
    nonlinearity: str
    trace: str  # the training trace; evaluation always uses the exact trace
    batch: int
    rank: int = 0  # > 0: AmortizedODENet of this rank
    note: str = ""

    def build(self, device: torch.device) -> tuple[nn.Module, Tensor | None]:
        """The net and, for an amortized one, a context (per-sample parameters)."""
        torch.manual_seed(0)
        if self.rank:
            net = AmortizedODENet(self.dim, self.hidden, self.rank, self.nonlinearity).to(device)
            return net, 0.1 * torch.randn(self.batch, net.context_size, device=device)
        return ODENet(self.dim, self.hidden, self.layer_type, self.nonlinearity).to(device), None


WORKLOADS = {
    "checkerboard": Workload("checkerboard", 2, (64, 64, 64), "concat", "tanh", "exact", 100,
                             note="authors' configuration (T 0.5)"),
    "mixture16": Workload("mixture16", 16, (128, 128), "concat", "softplus", "hutchinson", 256,
                          note="harness.py's 16-D table workload"),
    "vae_front_door": Workload("vae_front_door", 16, (64, 64), "concat", "softplus",
                               "hutchinson", 100, rank=4,
                               note="train.py --model vae --reg poly (digits preset)"),
    "power": Workload("power", 6, (60, 60, 60), "concat", "tanh", "hutchinson", 10000,
                      note="POWER preset, published size, random inputs"),
}


# ------------------------------------------------------------------------------ arithmetic
def matmul_shapes(w: Workload, exact: bool) -> list[tuple[int, int, int, int]]:
    """(batch, m, k, n) of every matmul of one forward-mode evaluation (batch 1: a plain mm):
    the value's, and the tangents' (D of them for the exact trace, whose first layer's tangents
    are the weight itself and whose last layer's diagonal :func:`flops` counts apart)."""
    widths = (w.dim, *w.hidden, w.dim)
    time_col = 0 if w.layer_type == "concatsquash" else 1
    K = w.dim if exact else 1
    out = []
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
        out.append((1, w.batch, n_in + time_col, n_out))
        if w.rank:
            out += [(w.batch, 1, n_in + 1, w.rank), (w.batch, 1, w.rank, n_out)]
        if exact and i in (0, len(widths) - 2):
            if w.rank and i == 0:
                out.append((w.batch, w.dim, w.rank, n_out))
            continue
        out.append((1, w.batch * K, n_in, n_out))
        if w.rank:
            out += [(w.batch, K, n_in, w.rank), (w.batch, K, w.rank, n_out)]
    return out


def flops(w: Workload, exact: bool) -> int:
    """FLOPs (2 per multiply-add) of one forward-mode evaluation's matmuls and last diagonal."""
    total = sum(2 * b * m * k * n for b, m, k, n in matmul_shapes(w, exact))
    if exact:
        n_in = (w.dim, *w.hidden)[-1]
        total += 2 * w.batch * w.dim * n_in * (2 if w.rank else 1)
    return total


def floor_calls(w: Workload, exact: bool, step: bool,
                device: torch.device) -> Callable[[], None]:
    """The matmuls alone on preallocated operands (a step adds the two of each backward)."""
    ops = []
    for b, m, k, n in matmul_shapes(w, exact):
        shapes = [(m, k, n)] + ([(m, n, k), (k, m, n)] if step else [])
        batch = () if b == 1 else (b,)
        ops += [(torch.mm if b == 1 else torch.bmm, torch.randn(*batch, p, q, device=device),
                 torch.randn(*batch, q, r, device=device)) for p, q, r in shapes]

    def run() -> None:
        for fn, a, c in ops:
            fn(a, c)
    return run


# ------------------------------------------------------------------------------ the paths
def reference_field(net: nn.Module, t: Tensor, z: Tensor, *, probe: Tensor | None,
                    context: Tensor | None) -> tuple[Tensor, Tensor]:
    """Today's CNF field: net(t, z) and reverse-mode divergence (graph kept when grad is on)."""
    keep_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        y = z if keep_graph and z.requires_grad else z.detach().requires_grad_(True)
        f = net(t, y) if context is None else net(t, y, context)
        div = (divergence_exact(f, y, create_graph=keep_graph) if probe is None
               else divergence_hutchinson(f, y, probe, create_graph=keep_graph))
    return (f, div) if keep_graph else (f.detach(), div.detach())


PATHS = {"reference": reference_field, "forward": field_and_divergence,
         "compiled": compiled_field_and_divergence,
         "compiled_static": partial(compiled_field_and_divergence, dynamic_batch=False)}


class _Field(nn.Module):
    """The forward-mode field of ``net`` as a module (what CUDA-graph capture takes)."""

    def __init__(self, net: nn.Module, context: Tensor | None) -> None:
        super().__init__()
        self.net = net
        self.context = context

    def forward(self, t: Tensor, z: Tensor, probe: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        return field_and_divergence(self.net, t, z, probe=probe, context=self.context)


def _inputs(mode: str, w: Workload, device: torch.device
            ) -> tuple[torch.Generator, Tensor, Tensor, Tensor | None]:
    """The fixed inputs of every path's call: generator, time, state and probe (None: the
    exact trace, which ``eval`` always uses)."""
    gen = torch.Generator(device=device).manual_seed(1)
    z = torch.randn(w.batch, w.dim, generator=gen, device=device)
    probe = None if mode == "eval" or w.trace == "exact" else sample_probe(z, generator=gen)
    return gen, torch.tensor(0.25, device=device), z, probe


def cuda_graph_call(mode: str, w: Workload, net: nn.Module, context: Tensor | None,
                    device: torch.device) -> Callable[[], None]:
    """The forward-mode evaluation (``eval``, captured by ``torch.cuda.CUDAGraph``) or step
    (``step``, by ``torch.cuda.make_graphed_callables``) replayed from a CUDA graph."""
    gen, t, z, probe = _inputs(mode, w, device)
    field = _Field(net, context)
    if mode == "eval":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):  # warm-up outside the capture, as CUDA graphs require
                field(t, z, probe)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            field(t, z, probe)
        return graph.replay
    z = z.requires_grad_(True)
    weight = torch.randn(w.batch, w.dim, generator=gen, device=device)
    args = (t, z) if probe is None else (t, z, probe)
    graphed = torch.cuda.make_graphed_callables(field, args)

    def step() -> None:
        f, div = graphed(*args)
        ((f * weight).sum() + div.sum()).backward()
    return step


def make_call(path: Callable[..., tuple[Tensor, Tensor]], mode: str, w: Workload,
              net: nn.Module, context: Tensor | None,
              device: torch.device) -> Callable[[], None]:
    """One evaluation (``eval``/``field``) or one training-like step (``step``) of ``path``."""
    gen, t, z, probe = _inputs(mode, w, device)
    if mode == "eval":
        def evaluate() -> None:
            with torch.no_grad():
                path(net, t, z, probe=probe, context=context)
        return evaluate
    z = z.requires_grad_(True)
    ctx = None if context is None else context.clone().requires_grad_(True)
    weight = torch.randn(w.batch, w.dim, generator=gen, device=device)
    if mode == "field":
        return lambda: path(net, t, z, probe=probe, context=ctx)

    def step() -> None:
        net.zero_grad(set_to_none=True)
        z.grad = None
        f, div = path(net, t, z, probe=probe, context=ctx)
        ((f * weight).sum() + div.sum()).backward()
    return step


# ------------------------------------------------------------------------------ measuring
def seconds_per_call(call: Callable[[], None], device: torch.device, n: int = 1) -> float:
    """Wall seconds per call over ``n`` calls in a row (the device synchronised around them)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    for _ in range(n):
        call()
    sync()
    return (time.perf_counter() - start) / n


def interleaved(calls: dict[str, Callable[[], None]], repeats: int, seconds: float,
                device: torch.device) -> dict[str, dict[str, float]]:
    """Median (and quartiles) of seconds per call, blocks of the variants interleaved; a block
    holds as many calls as fill about ``seconds`` (timed after two warm-up calls)."""
    for call in (*calls.values(), *calls.values()):
        call()
    n = {k: max(1, round(seconds / max(seconds_per_call(c, device), 1e-7)))
         for k, c in calls.items()}
    samples: dict[str, list[float]] = {k: [] for k in calls}
    names = list(calls)
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            samples[k].append(seconds_per_call(calls[k], device, n[k]))
    out = {}
    for k, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) > 1 else [s[0]] * 3
        out[k] = dict(median=statistics.median(s), q1=q[0], q3=q[2], calls_per_block=n[k])
    return out


def profile_split(call: Callable[[], None], calls: int) -> dict[str, float]:
    """Fractions of wall time by torch.profiler's self CPU times: ``matmul`` (:data:`MATMUL_OPS`),
    ``autograd`` (backward nodes, ``autograd::`` events), ``kernels`` (other ``aten::`` ops),
    ``other_ops`` and ``python_dispatch`` (outside every event); ``profiled_seconds`` per call
    includes the profiler's own overhead."""
    from torch.profiler import ProfilerActivity, profile

    call()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            call()
        wall = time.perf_counter() - start
    buckets = dict(matmul=0.0, kernels=0.0, autograd=0.0, other_ops=0.0)
    for e in prof.key_averages():
        bucket = ("matmul" if e.key in MATMUL_OPS else
                  "autograd" if "autograd" in e.key or "Backward" in e.key else
                  "kernels" if e.key.startswith("aten::") else "other_ops")
        buckets[bucket] += e.self_cpu_time_total / 1e6
    out = {k: v / wall for k, v in buckets.items()}
    out["python_dispatch"] = max(0.0, wall - sum(buckets.values())) / wall
    out["profiled_seconds"] = wall / calls
    return out


def measure_workload(w: Workload, repeats: int, seconds: float, compile_: bool,
                     device: torch.device, profile_calls: int) -> dict[str, Any]:
    """Every path and mode of one workload: times, ratios, FLOPs, profile split."""
    net, context = w.build(device)
    paths = ["reference", "forward"] + (["compiled", "compiled_static"] if compile_ else [])
    result: dict[str, Any] = dict(workload=asdict(w))
    if compile_:
        torch._dynamo.reset()
        # the first compiled call of each mode: tracing, inductor, C++ build
        result["compile_seconds"] = {
            f"{p}/{m}": seconds_per_call(make_call(PATHS[p], m, w, net, context, device), device)
            for p in ("compiled", "compiled_static") for m in ("eval", "step")}
    for mode in ("eval", "field", "step"):
        exact = mode == "eval" or w.trace == "exact"
        calls = {p: make_call(PATHS[p], mode, w, net, context, device) for p in paths}
        if device.type == "cuda" and mode != "field":
            try:
                calls["cuda_graph"] = cuda_graph_call(mode, w, net, context, device)
            except Exception as err:  # reported, not fatal: the other paths are still timed
                result.setdefault("cuda_graph_errors", {})[mode] = f"{type(err).__name__}: {err}"
        if mode != "field":
            calls["floor"] = floor_calls(w, exact, mode == "step", device)
        times = interleaved(calls, repeats, seconds, device)
        entry: dict[str, Any] = dict(trace="exact" if exact else "hutchinson", seconds=times)
        ref = times["reference"]["median"]
        entry["ratio_to_reference"] = {p: times[p]["median"] / ref for p in times}
        if mode != "field":
            entry["flops"] = flops(w, exact) * (3 if mode == "step" else 1)
            entry["gflops_at_floor"] = entry["flops"] / times["floor"]["median"] / 1e9
            if device.type == "cpu":
                entry["profile"] = {p: profile_split(calls[p], profile_calls)
                                    for p in ("reference", "forward")}
        result[mode] = entry
        print(f"{w.name:15s} {mode:5s} " + "  ".join(
            f"{p} {times[p]['median'] * 1e6:9.1f} us" for p in times), flush=True)
    return result


# ------------------------------------------------------------------------------ report
def _us(s: float) -> str:
    return f"{s * 1e6:,.0f}"


def markdown(payload: dict[str, Any]) -> str:
    """The JSON as tables: times per call, ratios to the reference, floor and profile split."""
    meta, results = payload["meta"], payload["results"]
    lines = common.header(
        "engine_speed", "Engine speed: one CNF evaluation, floor vs reverse mode vs forward mode",
        meta["command"],
        f"Machine: {meta['cpu'] or meta['platform']}, {meta['cpus']} CPUs, torch {meta['torch']}, "
        f"{meta['threads']} torch thread, device {meta['device']}"
        + (f" ({meta['gpu']})" if meta.get("gpu") else "") + ". Load average "
        f"{meta['load_average_start']:.1f} at the start and {meta['load_average_end']:.1f} at the "
        "end. Microseconds per call, median over blocks.")
    timed = ("floor", "reference", "forward", "compiled", "compiled_static")
    lines += table(["workload", "mode", "trace", "MFLOP", "floor", "reference", "forward",
                    "compiled", "compiled static", "forward/ref", "compiled/ref",
                    "compiled static/ref", "floor/ref"],
                   [[r["workload"]["name"], mode, e["trace"],
                     f"{e['flops'] / 1e6:.2f}" if "flops" in e else "-",
                     *(_us(e["seconds"][p]["median"]) if p in e["seconds"] else "-"
                       for p in timed),
                     *(f"{e['ratio_to_reference'][p]:.2f}" if p in e["ratio_to_reference"]
                       else "-" for p in (*timed[2:], "floor"))]
                    for r in results for mode in ("eval", "field", "step") if (e := r[mode])])
    graphs = [(r["workload"]["name"], mode, r[mode]) for r in results
              for mode in ("eval", "step") if "cuda_graph" in r[mode]["seconds"]]
    if graphs:
        lines += ["", "CUDA graphs:", "",
                  *table(["workload", "mode", "cuda graph (us)", "cuda graph/ref"],
                         [[name, mode, _us(e["seconds"]["cuda_graph"]["median"]),
                           f"{e['ratio_to_reference']['cuda_graph']:.2f}"]
                          for name, mode, e in graphs])]
    errors = [(r["workload"]["name"], r["cuda_graph_errors"]) for r in results
              if r.get("cuda_graph_errors")]
    if errors:
        lines += ["", "CUDA-graph capture failed: " + "; ".join(
            f"{name} {mode}: {err}" for name, errs in errors for mode, err in errs.items())]
    if any("compile_seconds" in r for r in results):
        lines += ["", "Compile time (first call, excluded from the figures above), seconds:", "",
                  *table(["workload", "compiled eval", "compiled step", "static eval",
                          "static step"],
                         [[r["workload"]["name"], *(f"{c[f'{p}/{m}']:.1f}"
                                                    for p in ("compiled", "compiled_static")
                                                    for m in ("eval", "step"))]
                          for r in results if (c := r.get("compile_seconds"))])]
    lines += ["", "Where the time goes (torch.profiler, fraction of profiled wall time):", "",
              *table(["workload", "mode", "path", "matmul", "other kernels", "autograd engine",
                      "python+dispatch", "other ops"],
                     [[r["workload"]["name"], mode, path,
                       *(f"{p[k]:.0%}" for k in ("matmul", "kernels", "autograd",
                                                  "python_dispatch", "other_ops"))]
                      for r in results for mode in ("eval", "step")
                      for path, p in r[mode].get("profile", {}).items()])]
    return "\n".join(lines) + "\n"


FLAGS = {"--workloads": dict(nargs="+", default=list(WORKLOADS), choices=WORKLOADS),
         "--repeats": dict(type=int, default=15), "--block-seconds": dict(type=float, default=0.05),
         "--profile-calls": dict(type=int, default=20),
         "--no-compile": dict(action="store_true"), "--device": dict(default="cpu")}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every workload's three modes, one torch thread."""
    torch.set_num_threads(1)
    device = torch.device(args.device)
    meta = dict(platform=platform.platform(), cpu=common.cpu_name(), cpus=os.cpu_count(),
                torch=torch.__version__, threads=torch.get_num_threads(), device=str(device),
                load_average_start=os.getloadavg()[0], command=args.command)
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    results = [measure_workload(WORKLOADS[name], args.repeats, args.block_seconds,
                                not args.no_compile, device, args.profile_calls)
               for name in args.workloads]
    meta["load_average_end"] = os.getloadavg()[0]
    return dict(meta=meta, results=results)


STUDY = common.Study("engine_speed", __doc__, measure, markdown, flags=FLAGS)
main = STUDY.main

if __name__ == "__main__":
    sys.exit(main())
