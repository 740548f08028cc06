"""CNF-VAE on the embedded 8 x 8 digits: trajectory polynomial regularizer vs none.

    python -m benchmarks.vae_digits [--seeds 0 1 2] [--epochs N] [--is-samples S] [--quick]

How it measures: docs/benchmarks.md, `benchmarks.vae_digits`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any

import torch
from polyreg_cnf.datamodules.images import DigitsDataModule

from benchmarks import common
from benchmarks.common import median_range, spread, table
from polyreg_cnf.app.build import build
from polyreg_cnf.app.config import resolve
from polyreg_cnf.app.presets import VAE_PRESETS

SETTINGS = ("none", "poly")
#: The report's columns: header, measurement, format.
COLUMNS = (("test -ELBO", "test_neg_elbo", ".2f"), ("test IS-NLL", "test_is_nll", ".2f"),
           ("fwd NFE/step", "forward_nfe", ".1f"), ("bwd NFE/step", "backward_nfe", ".1f"),
           ("s/epoch", "seconds_per_epoch", ".2f"), ("s/step", "seconds_per_step", ".3f"),
           ("initial -ELBO", "init_neg_elbo", ".2f"))
#: The measurements summarised over seeds: the columns' and the test NFE per batch.
METRICS = (*(m for _, m, _ in COLUMNS), "test_nfe_per_batch")
#: The meta fields that describe the machine (the report's Machine line).
MACHINE = ("nproc", "platform", "torch_threads", "load_start", "load_end", "python", "torch",
           "lightning", "torchdiffeq")


def run_one(seed: int, setting: str, epochs: int, is_samples: int,
            threads: int | None = None) -> dict[str, float]:
    """Train the digits preset with (``poly``) or without (``none``) the regularizer; test it."""
    with tempfile.TemporaryDirectory() as tmp:
        config = resolve(dict(
            model="vae", data="digits", reg=setting, is_samples=is_samples, max_epochs=epochs,
            max_steps=None, limit_val_batches=0, seed=seed, threads=threads,
            accelerator="cpu", devices="1", logger="none", plot_every=0, ckpt_every=0,
            progress=False, output_dir=tmp))
        # The data split is fixed (seed 0) for every seed.
        dm = DigitsDataModule(batch_size=config.training.batch_size)
        run = build(config, datamodule=dm)
        model, trainer = run.model, run.trainer

        model.is_samples = 0  # the initial -ELBO (one sample per image), for "did it learn"
        init = trainer.test(model, datamodule=dm, verbose=False)[0]["test/neg_elbo"]
        model.is_samples = is_samples

        start = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        seconds = time.perf_counter() - start
        summary = run.monitor.summary()
        out = trainer.test(model, datamodule=dm, verbose=False)[0]
    row = dict(seed=seed, setting=setting, init_neg_elbo=float(init),
               test_neg_elbo=float(out["test/neg_elbo"]), test_is_nll=float(out["test/is_nll"]),
               forward_nfe=summary["forward_mean"], backward_nfe=summary["backward_mean"],
               seconds_per_step=summary["seconds_mean"], seconds_per_epoch=seconds / epochs,
               test_nfe_per_batch=float(out["test/nfe"]), steps=summary["steps"])
    print(json.dumps(row), flush=True)
    return row


def summarise(rows: list[dict[str, float]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per setting that ran: each measurement's median, min and max over seeds."""
    return {setting: {m: spread([r[m] for r in rows if r["setting"] == setting]) for m in METRICS}
            for setting in SETTINGS if any(r["setting"] == setting for r in rows)}


def markdown(payload: dict[str, Any]) -> str:
    """The report: the settings' medians (min-max) over seeds, then every run."""
    meta, rows, summary = payload["meta"], payload["runs"], payload["summary"]

    lines = [
        *common.suite_header("CNF-VAE on the embedded digits: polynomial regularizer vs none",
                             meta["command"], {k: meta[k] for k in MACHINE}),
        f"Setting: `digits` preset {meta['preset']}; {meta['epochs']} epochs, "
        f"{meta['is_samples']} importance samples per test image; seeds {meta['seeds']}; "
        f"both settings at the same tolerances (train 1e-4, evaluation 1e-5).  ",
        f"Code: commit {meta.get('git_commit', '?')} (plus uncommitted edits of others in the "
        f"tree); solver {meta.get('solver', '?')}.  ",
        f"Wall time of the whole benchmark: {meta['wall_seconds']:.0f} s.",
        "",
        "Median (min-max) across seeds. NFE: one call of the ODE right-hand side, per training "
        "step, mean over all steps; backward = adjoint solves. -ELBO and NLL in nats per image "
        "(test split, 200 images).",
        "",
        *table(["setting", *(head for head, _, _ in COLUMNS)],
               [[setting, *(median_range(summary[setting][m], f) for _, m, f in COLUMNS)]
                for setting in summary]),
        "", "Per run:", "",
        *table(["seed", "setting", *(head for head, _, _ in COLUMNS)],
               [[r["seed"], r["setting"], *(format(r[m], f) for _, m, f in COLUMNS)]
                for r in rows]),
    ]
    return "\n".join(lines) + "\n"


FLAGS = {"--seeds": dict(type=int, nargs="+", default=[0, 1, 2]),
         "--epochs": dict(type=int, default=VAE_PRESETS["digits"]["max_epochs"]),
         "--is-samples": dict(type=int, default=VAE_PRESETS["digits"]["is_samples"]),
         "--quick": dict(action="store_true",
                         help="smoke run: 1 seed, 1 epoch, 10 IS samples, writes *_quick.*"),
         "--threads": dict(type=int, default=1)}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Both settings for every seed."""
    if args.quick:
        args.seeds, args.epochs, args.is_samples = [0], 1, 10
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    start = time.perf_counter()
    rows = [run_one(seed, setting, args.epochs, args.is_samples, args.threads)
            for seed in args.seeds for setting in SETTINGS]
    meta = dict(
        command=args.command, nproc=os.cpu_count(), platform=platform.platform(),
        **common.versions(), torch_threads=args.threads,
        load_start=[round(x, 2) for x in load_start],
        load_end=[round(x, 2) for x in os.getloadavg()],
        preset=dict(VAE_PRESETS["digits"]), epochs=args.epochs,
        is_samples=args.is_samples, seeds=args.seeds,
        wall_seconds=time.perf_counter() - start,
        solver=resolve({"model": "vae", "data": "digits"}).solver().to_dict())
    return dict(meta=meta, summary=summarise(rows), runs=rows)


STUDY = common.Study("vae_digits", __doc__, measure, markdown, flags=FLAGS, report=lambda args:
                     common.RESULTS / ("vae_digits_quick" if args.quick else "vae_digits"))
main = STUDY.main

if __name__ == "__main__":
    sys.exit(main())
