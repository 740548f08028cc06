r"""The CNF-VAE at the paper's sizes: step time, NFE, memory, checkpoint, evaluation cost.

Per published configuration (``--model vae`` presets: MNIST 1024-1024 rank 64 x 2 blocks,
Omniglot 512-512 rank 20 x 5, Caltech 2048 rank 20 x 1 tanh, Frey 512-512 rank 20 x 2; z 64,
T 0.5, batch 100, feature 256) the images are generated in their standard file formats (IDX,
MATLAB .mat, the Frey pickle) and read by the project's own DataModules; throughput does not
depend on content. One process per measurement, one core each (``torch.set_num_threads(1)``),
so the peak RSS is that measurement's. Reported per size:

- seconds per training step, wall and CPU (CPU time is the fairer figure on a shared machine),
  forward and backward NFE, and the floor: the step's matmul time alone (the profiler's self
  time of ``mm``/``bmm``/``addmm``/``baddbmm``);
- peak RSS, the Adamax state, and the size of a checkpoint holding what ``last.ckpt`` holds
  (weights and optimizer state);
- the importance-sampled test NLL (exact trace, evaluation tolerances) measured on a few
  images and samples and projected to the full test split at 1000 samples, and the validation
  bound (negative ELBO, one sample) per epoch.

Before/after: ``--before PATH`` names a checkout of the baseline with its own ``.venv``; each
pair of workers (baseline and this checkout) runs at the same time, one core each.

Usage (from the repository root)::

    python -m benchmarks.vae_size --before /work/wt/vaesize_before
    python -m benchmarks.vae_size --sizes mnist --steps 3 --strategies

Writes ``benchmarks/results/vae_size.json`` and ``benchmarks/results/vae_size.md``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
RESULTS = ROOT / "benchmarks" / "results"

#: Data set -> (preset name, DataModule name, full test split size).
SIZES: dict[str, tuple[str, str, int]] = {
    "mnist": ("mnist", "mnist", 10000),
    "omniglot": ("omniglot", "omniglot", 8070),
    "caltech": ("caltech", "caltech", 2307),
    "freyfaces": ("freyfaces", "freyfaces", 200),
}
STRATEGIES = ("direct", "checkpoint", "adjoint", "auto")
#: Published validation split sizes (the generated files hold fewer rows where the split is
#: stored in the file, as Caltech's is).
VAL_IMAGES = {"mnist": 10000, "omniglot": 1345, "caltech": 2264, "freyfaces": 200}
IS_SAMPLES = 1000  # the paper's sample count


# ---------------------------------------------------------------------------- files
def _write_files(name: str, root: Path, rng: np.random.Generator, n_train: int,
                 n_eval: int) -> None:
    """Random images in the data set's standard format, as its DataModule reads them."""
    if name == "mnist":
        raw = root / "MNIST" / "raw"
        raw.mkdir(parents=True)
        # The DataModule holds out the last 10000 training images for validation.
        for fname, count in (("train-images-idx3-ubyte.gz", n_train + 10000),
                             ("t10k-images-idx3-ubyte.gz", n_eval)):
            pixels = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
            with gzip.open(raw / fname, "wb") as handle:
                handle.write(struct.pack(">IIII", 2051, count, 28, 28) + pixels.tobytes())
    elif name == "omniglot":
        import scipy.io

        (root / "OMNIGLOT").mkdir(parents=True)
        scipy.io.savemat(root / "OMNIGLOT" / "chardata.mat",
                         {"data": rng.random((784, n_train + 1345)),
                          "testdata": rng.random((784, n_eval))})
    elif name == "caltech":
        import scipy.io

        (root / "Caltech101Silhouettes").mkdir(parents=True)
        scipy.io.savemat(root / "Caltech101Silhouettes" / "caltech101_silhouettes_28_split1.mat",
                         {key: (rng.random((n, 784)) > 0.5).astype(np.uint8)
                          for key, n in (("train_data", n_train), ("val_data", n_eval),
                                         ("test_data", n_eval))})
    elif name == "freyfaces":
        (root / "Freyfaces").mkdir(parents=True)
        with open(root / "Freyfaces" / "freyfaces.pkl", "wb") as handle:
            pickle.dump([rng.integers(0, 256, size=(1965, 560)).astype(np.float64)], handle,
                        protocol=2)
    else:
        raise ValueError(f"unknown size {name!r}; valid: {', '.join(SIZES)}")


# ---------------------------------------------------------------------------- worker
def _matmul_share(prof: Any) -> float:
    """The matmuls' share of the ops' self time (the profiler times ops by the clock, so on a
    shared machine only the share is meaningful; times the step's CPU seconds, the floor)."""
    keys = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm"}
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in keys) / max(total, 1)


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from polyreg_cnf.datamodules.images import make_datamodule

    from polyreg_cnf.app.build import make_model
    from polyreg_cnf.app.config import resolve

    preset_name, dm_name, full_test = SIZES[args.size]
    out: dict[str, Any] = {"size": args.size, "backprop": args.backprop,
                           "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="vae_size_") as tmp:
        root = Path(tmp)
        _write_files(dm_name, root, np.random.default_rng(0),
                     n_train=100 * (args.warmup + args.steps + 2), n_eval=max(100, args.is_images))
        dm = make_datamodule(dm_name, root, batch_size=100)
        dm.prepare_data()
        dm.setup("fit")
        config = resolve({"model": "vae", "data": preset_name, "backprop": args.backprop})
        torch.manual_seed(0)
        model = make_model(config, dm)
        out["parameters"] = sum(p.numel() for p in model.parameters())
        out["context_per_sample"] = sum(h.out_features for h in model.flow.heads)
        opt = torch.optim.Adamax(model.parameters(), lr=model.lr)
        blocks = list(model.flow.blocks)
        steps = []
        batches = iter(dm.train_dataloader())
        for i in range(args.warmup + args.steps + 1):
            x = next(batches)[0]
            for b in blocks:
                b.nfe.reset()
            profile = i == args.warmup + args.steps  # the last step, profiled for the floor
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) \
                if profile else None
            wall, cpu = time.perf_counter(), time.process_time()
            if prof is not None:
                prof.__enter__()
            log_px, kl = model.elbo_terms(x)
            loss = (kl - log_px).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if prof is not None:
                prof.__exit__(None, None, None)
                out["profiled_step_cpu_s"] = time.process_time() - cpu
                out["matmul_share"] = _matmul_share(prof)
                out["floor_matmul_s"] = out["matmul_share"] * out["profiled_step_cpu_s"]
                continue
            row = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                   "nfe_forward": sum(b.nfe.forward for b in blocks),
                   "nfe_backward": sum(b.nfe.backward for b in blocks),
                   "loss": loss.item()}
            if i >= args.warmup:
                steps.append(row)
            print(f"[{args.size} {args.backprop}] step {i}: {row}", file=sys.stderr, flush=True)
        out["steps"] = steps
        if args.flops:
            # Counted apart from the timed steps (the counting mode slows every operation).
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                log_px, kl = model.elbo_terms(next(batches)[0])
                (kl - log_px).mean().backward()
            out["train_step_flops"] = counter.get_total_flops()
            opt.zero_grad(set_to_none=True)
        out["optimizer_state_bytes"] = sum(v.numel() * v.element_size()
                                           for s in opt.state.values() for v in s.values()
                                           if torch.is_tensor(v))
        if args.checkpoint:
            path = root / "last.ckpt"
            torch.save({"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()]},
                       path)
            out["checkpoint_bytes"] = path.stat().st_size
            path.unlink()
        out["peak_rss_train_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if args.is_images:
            model.eval()
            dm.setup("test")
            x = next(iter(dm.test_dataloader()))[0][:args.is_images]
            val = next(iter(dm.val_dataloader()))[0]
            with torch.no_grad():
                wall, cpu = time.perf_counter(), time.process_time()
                model._evaluate(val, 0)  # the validation bound: one-sample negative ELBO
                out["val_bound_batch"] = {"images": len(val), "wall_s": time.perf_counter() - wall,
                                          "cpu_s": time.process_time() - cpu,
                                          "val_images": len(dm.val_dataloader().dataset)}
                for b in blocks:
                    b.nfe.reset()
                wall, cpu = time.perf_counter(), time.process_time()
                model.importance_nll(x, args.is_samples, chunk=args.is_samples)
                rows = len(x) * args.is_samples
                cpu_s = time.process_time() - cpu
                out["is_nll"] = {"images": len(x), "samples": args.is_samples,
                                 "wall_s": time.perf_counter() - wall, "cpu_s": cpu_s,
                                 "nfe_forward": sum(b.nfe.forward for b in blocks),
                                 "cpu_s_per_image_sample": cpu_s / rows,
                                 "full_test_images": full_test,
                                 "projected_full_cpu_s": cpu_s / rows * full_test * IS_SAMPLES}
                if args.flops:
                    from torch.utils.flop_counter import FlopCounterMode

                    with FlopCounterMode(display=False) as counter:
                        model.importance_nll(x, args.is_samples, chunk=args.is_samples)
                    out["is_nll"]["flops_per_image_sample"] = counter.get_total_flops() / rows
        out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


# ---------------------------------------------------------------------------- driver
def _launch(python: str, repo: Path, args: list[str]) -> subprocess.Popen:
    # The worker is this file run as a script from the checkout under test: its own venv
    # imports that checkout's polyreg_cnf.
    return subprocess.Popen([python, str(HERE), "--worker", *args], cwd=repo,
                            stdout=subprocess.PIPE, text=True)


def _run_pair(jobs: list[tuple[str, Path, list[str]]]) -> list[dict[str, Any]]:
    procs = [_launch(python, repo, args) for python, repo, args in jobs]
    results = []
    for proc in procs:
        stdout, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"worker failed with exit code {proc.returncode}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    steps = r["steps"]
    return {"cpu_s": _median([s["cpu_s"] for s in steps]),
            "wall_s": _median([s["wall_s"] for s in steps]),
            "nfe": sorted({(s["nfe_forward"], s["nfe_backward"]) for s in steps})}


def _nfe(summary: dict[str, Any]) -> str:
    return ", ".join(f"{f}/{b}" for f, b in summary["nfe"])


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _markdown(data: dict[str, Any]) -> str:
    # Imported here: the worker runs this file as a script, where the package is not importable.
    from benchmarks.common import table

    lines = ["# The CNF-VAE at the paper's sizes (benchmarks/vae_size.py)", "",
             f"{data['conditions']}.", "", "Commands: " + "; ".join(
                 f"`{c}`" for c in data["commands"]) + ".", "",
             "## Training step (median of the timed steps; CPU seconds on one core)", ""]
    rows = []
    for row in data["runs"]:
        s = _summary(row)
        rows.append([row["size"], row["code"], f"{row['parameters'] / 1e6:.1f} M",
                     f"{s['cpu_s']:.2f}", f"{s['wall_s']:.2f}", _nfe(s),
                     f"{row.get('floor_matmul_s', float('nan')):.2f}",
                     _gb(row["peak_rss_train_bytes"]), _gb(row["optimizer_state_bytes"]),
                     _gb(row.get("checkpoint_bytes"))])
    lines += table(["size", "code", "params", "s/step CPU", "s/step wall", "NFE fwd/bwd",
                    "matmul floor s", "peak RSS GB", "Adamax state GB", "checkpoint GB"], rows)
    if data.get("ratios"):
        lines += ["", "## After / before (CPU s/step)", "", *table(
            ["size", "ratio", "same NFE"],
            [[size, f"{r['cpu_ratio']:.3f}", r["same_nfe"]] for size, r in data["ratios"].items()])]
    lines += ["", "## Evaluation (measured on a subset, projected; exact trace, eval "
              "tolerances)", ""]
    rows = []
    for row in data["runs"]:
        if "is_nll" not in row:
            continue
        isn, val = row["is_nll"], row["val_bound_batch"]
        per_epoch = val["cpu_s"] / val["images"] * VAL_IMAGES[row["size"]]
        rows.append([row["size"], row["code"], f"{isn['images']} x {isn['samples']}",
                     f"{isn['cpu_s']:.1f}", isn["nfe_forward"],
                     f"{isn['projected_full_cpu_s'] / 3600:.0f}",
                     f"{val['cpu_s'] / val['images'] * 100:.2f}", f"{per_epoch:.0f}"])
    lines += table(["size", "code", "IS subset (images x samples)", "CPU s", "NFE",
                    f"projected full test split at {IS_SAMPLES} samples, CPU hours",
                    "validation bound: CPU s per 100 images",
                    "per epoch (published validation split), CPU s"], rows)
    flops = dict(data.get("flops", {}))
    for row in data["runs"]:
        if row["code"] == "after" and "train_step_flops" in row:
            flops.setdefault(row["size"], {
                "train_step_flops": row["train_step_flops"],
                "is_flops_per_image_sample": row["is_nll"]["flops_per_image_sample"]})
    if flops:
        rows = [[size, f"{f['train_step_flops'] / 1e9:.0f}",
                 f"{f['is_flops_per_image_sample'] / 1e9:.2f}",
                 f"{f['is_flops_per_image_sample'] * SIZES[size][2] * IS_SAMPLES / 1e15:.1f}"]
                for size, f in flops.items()]
        lines += ["", "## FLOPs (torch.utils.flop_counter: matmuls and convolutions)", "",
                  *table(["size", "training step GFLOP", "IS-NLL GFLOP per image and sample",
                          "full test split at 1000 samples, PFLOP"], rows)]
    if data.get("strategies"):
        rows = []
        for row in data["strategies"]:
            s = _summary(row)
            rows.append([row["backprop"], f"{s['cpu_s']:.2f}", f"{s['wall_s']:.2f}", _nfe(s),
                         _gb(row["peak_rss_train_bytes"])])
        lines += ["", "## Backprop strategies at MNIST (this code)", "",
                  *table(["strategy", "s/step CPU", "s/step wall", "NFE fwd/bwd",
                          "peak RSS GB"], rows)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Command line: the driver, or (``--worker``) one measurement printed as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=list(SIZES), default="mnist", help=argparse.SUPPRESS)
    parser.add_argument("--backprop", choices=STRATEGIES, default="direct")
    parser.add_argument("--sizes", nargs="*", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warmup")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--is-images", type=int, default=2,
                        help="test images of the IS-NLL measurement (0: skip)")
    parser.add_argument("--is-samples", type=int, default=50,
                        help="importance samples per image in the measurement")
    parser.add_argument("--checkpoint", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--flops", action=argparse.BooleanOptionalAction, default=True,
                        help="count the FLOPs of a training step and of an IS-NLL row")
    parser.add_argument("--before", type=Path, default=None,
                        help="checkout of the baseline (with its own .venv), run side by side")
    parser.add_argument("--strategies", nargs="*", choices=STRATEGIES, default=None,
                        help="also time these backprop strategies at MNIST (this code; no "
                             "names: all four)")
    parser.add_argument("--strategy-steps", type=int, default=1)
    parser.add_argument("--count-flops", nargs="*", choices=list(SIZES), default=[],
                        help="count the FLOPs of these sizes only (no timing)")
    parser.add_argument("--out", type=Path, default=RESULTS / "vae_size.json")
    parser.add_argument("--merge", action="store_true",
                        help="add to the results file (a size measured again replaces its rows)")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup),
              "--is-images", str(args.is_images), "--is-samples", str(args.is_samples),
              "--flops" if args.flops else "--no-flops"]
    here_python = sys.executable
    data: dict[str, Any] = {"runs": [], "ratios": {}, "strategies": [], "commands": []}
    if args.merge and args.out.exists():
        data = json.loads(args.out.read_text())
    data["commands"].append("python -m benchmarks.vae_size " + " ".join(sys.argv[1:]))
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    data["conditions"] = (f"{os.cpu_count()} CPUs shared with other jobs (load average about "
                          f"{os.getloadavg()[0]:.0f} at the start); each worker one thread "
                          f"(torch.set_num_threads(1)); before and after workers of a size run "
                          f"at the same time; last run {stamp}")

    def save() -> None:
        # After every measurement: a long run that is stopped keeps what it measured.
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(_markdown(data))

    for size in args.sizes:
        jobs = [(here_python, ROOT, ["--size", size, *common])]
        if args.before is not None:
            jobs.append((str(args.before / ".venv" / "bin" / "python"), args.before,
                         ["--size", size, *common]))
        results = _run_pair(jobs)
        data["runs"] = [r for r in data["runs"] if r["size"] != size]
        for code, r in zip(("after", "before"), results):
            r["code"] = code
            data["runs"].append(r)
        if len(results) == 2:
            after, before = (_summary(r) for r in results)
            data["ratios"][size] = {"cpu_ratio": after["cpu_s"] / before["cpu_s"],
                                    "wall_ratio": after["wall_s"] / before["wall_s"],
                                    "same_nfe": after["nfe"] == before["nfe"]}
        save()
    for size in args.count_flops:
        # FLOPs only (no timed step): for a size measured without --flops.
        (r,) = _run_pair([(here_python, ROOT, [
            "--size", size, "--steps", "0", "--warmup", "0", "--is-images", "1",
            "--is-samples", "2", "--no-checkpoint", "--flops"])])
        data.setdefault("flops", {})[size] = {
            "train_step_flops": r["train_step_flops"],
            "is_flops_per_image_sample": r["is_nll"]["flops_per_image_sample"],
            "is_nfe_forward": r["is_nll"]["nfe_forward"]}
        save()
    if args.strategies is not None:
        kinds = args.strategies or list(STRATEGIES)
        data["strategies"] = [r for r in data.get("strategies", []) if r["backprop"] not in kinds]
        for kind in kinds:
            data["strategies"] += _run_pair([(here_python, ROOT, [
                "--size", "mnist", "--backprop", kind,
                # auto's first solve (the one it measures on) is part of its cost: timed too
                "--steps", str(args.strategy_steps + (kind == "auto")),
                "--warmup", "0" if kind == "auto" else "1", "--is-images", "0",
                "--no-checkpoint", "--no-flops"])])
            save()
    save()
    print(_markdown(data))


#: What ``benchmarks.report`` asks of a study: its reports (vae_size, vae_size_flops) rendered
#: from their JSON.
STUDY = SimpleNamespace(render=_markdown)


if __name__ == "__main__":
    main()
