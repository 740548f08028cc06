#!/usr/bin/env python
"""Train a CNF density model (or a VAE with a CNF posterior), with or without the trajectory
polynomial regularizer.

    python train.py --model cnf --data checkerboard --reg poly
    python train.py --model cnf --data power --data-dir ~/maf-data --reg poly
    python train.py --model cnf --data my_table.csv --reg none
    python train.py --model vae --reg poly
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

# Fail fast on bad flags before the heavy imports (torch, lightning) are paid for.
MODELS = ("cnf", "vae")
LOGGERS = ("auto", "wandb", "csv", "tensorboard", "none")  # = run_logging.LOGGER_KINDS
REGULARIZER_NAMES = ("none", "poly", "kinetic")


def _number_type(cast: type, minimum: float, strict: bool, what: str) -> Any:
    """An argparse type: ``cast(text)`` that must be finite and >= (or >) ``minimum``."""

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _number_type(int, 1, False, "a positive integer")
_nonneg_int = _number_type(int, 0, False, "an integer >= 0")
_positive_float = _number_type(float, 0.0, True, "a finite number > 0")
_nonneg_float = _number_type(float, 0.0, False, "a finite number >= 0")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace("-", ",").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated widths like 64,64,64, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive widths like 64,64,64, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (defaults of None are filled from the data set's preset)."""
    p = argparse.ArgumentParser(
        prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--model", choices=MODELS, default="cnf")
    g.add_argument("--reg", choices=REGULARIZER_NAMES, default="poly",
                   help="trajectory regularizer (default: poly)")
    g.add_argument("--data", default=None,
                   help="a toy density (checkerboard, 8gaussians, ...), a tabular set (power, gas, "
                        "hepmass, miniboone, bsds300), an image set for --model vae, or a path to "
                        "your own table (.npy, .npz, .csv, .h5)")
    g.add_argument("--data-dir", default="data", help="root folder of the standard data files")
    g.add_argument("--download", action="store_true",
                   help="download missing standard files (checksum-verified)")
    g.add_argument("--columns", default=None,
                   help="your table: comma-separated column names or indices to use")
    g.add_argument("--drop-nonfinite", action="store_true",
                   help="your table: drop rows with NaN/inf instead of refusing them")

    g = p.add_argument_group("network")
    g.add_argument("--hidden-dims", type=_int_list, default=None, help="e.g. 64,64,64")
    g.add_argument("--hdim-factor", type=_positive_int, default=None,
                   help="hidden width = factor x data dimension (tabular presets)")
    g.add_argument("--nhidden", type=_positive_int, default=None)
    g.add_argument("--layer-type", choices=("concat", "concatsquash"), default=None)
    g.add_argument("--nonlinearity", choices=("tanh", "softplus", "elu", "swish", "relu"),
                   default=None)
    g.add_argument("--num-blocks", type=_positive_int, default=None)
    g.add_argument("--T", type=_positive_float, default=None, help="end time of each block")
    g.add_argument("--train-T", action="store_true", help="learn the end time")

    g = p.add_argument_group("VAE (--model vae)")
    g.add_argument("--posterior", choices=("amortized", "cnf", "gaussian"), default=None,
                   help="amortized low-rank CNF (FFJORD), plain CNF, or no flow (plain VAE)")
    g.add_argument("--z-dim", type=_positive_int, default=None)
    g.add_argument("--rank", type=_positive_int, default=None,
                   help="rank of the amortized weight updates")
    g.add_argument("--warmup-epochs", type=_nonneg_int, default=None,
                   help="KL warm-up: beta goes from 0 to 1 over this many epochs")
    g.add_argument("--is-samples", type=_nonneg_int, default=None,
                   help="importance samples for the test NLL (0: skip)")
    g.add_argument("--is-chunk", type=_positive_int, default=None,
                   help="importance samples evaluated at once (bounds memory)")

    g = p.add_argument_group("solver (paper: dopri5, train 1e-4, evaluation 1e-5)")
    g.add_argument("--solver", default="dopri5",
                   choices=("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "euler",
                            "midpoint", "rk4"))
    g.add_argument("--step-size", type=_positive_float, default=None,
                   help="fixed-grid solvers only")
    g.add_argument("--atol", type=_positive_float, default=1e-4)
    g.add_argument("--rtol", type=_positive_float, default=1e-4)
    g.add_argument("--eval-atol", type=_positive_float, default=1e-5)
    g.add_argument("--eval-rtol", type=_positive_float, default=1e-5)
    g.add_argument("--no-adjoint", dest="adjoint", action="store_false",
                   help="backpropagate through the solver instead of the adjoint")
    g.add_argument("--seminorm", action="store_true", help="seminorm adjoint (fewer backward NFE)")
    g.add_argument("--max-nfe", type=_positive_int, default=None,
                   help="fail a forward solve that needs more evaluations than this")
    g.add_argument("--trace", choices=("hutchinson", "exact"), default=None)
    g.add_argument("--eval-trace", choices=("hutchinson", "exact"), default=None)
    g.add_argument("--noise", choices=("rademacher", "gaussian"), default="rademacher")

    g = p.add_argument_group("trajectory polynomial regularizer (--reg poly)")
    g.add_argument("--poly-coef", type=_nonneg_float, default=5.0)
    g.add_argument("--poly-samples", type=_nonneg_int, default=2,
                   help="interior time points K per solve")
    g.add_argument("--poly-order", type=_nonneg_int, default=1, help="polynomial degree m")

    g = p.add_argument_group("RNODE kinetic regularizer (--reg kinetic)")
    g.add_argument("--kinetic-coef", type=_nonneg_float, default=0.01,
                   help="weight of the kinetic energy")
    g.add_argument("--jacobian-coef", type=_nonneg_float, default=0.01,
                   help="weight of the Jacobian Frobenius norm")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=_positive_float, default=None)
    g.add_argument("--weight-decay", type=_nonneg_float, default=0.0)
    g.add_argument("--batch-size", type=_positive_int, default=None)
    g.add_argument("--eval-batch-size", type=_positive_int, default=None)
    g.add_argument("--max-steps", type=int, default=None)
    g.add_argument("--max-epochs", type=_positive_int, default=None)
    g.add_argument("--val-every", type=_positive_int, default=None,
                   help="validate every N training steps (default: once per epoch)")
    g.add_argument("--limit-val-batches", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-test", dest="test", action="store_false",
                   help="skip the final test evaluation")

    g = p.add_argument_group("hardware")
    g.add_argument("--accelerator", default="auto", help="cpu, gpu, auto, ...")
    g.add_argument("--devices", default="1", help="number of devices, or 'auto'")
    g.add_argument("--strategy", default="auto", help="auto, ddp, ddp_spawn, ...")
    g.add_argument("--num-nodes", type=_positive_int, default=1)
    g.add_argument("--num-workers", type=_nonneg_int, default=0)
    g.add_argument("--threads", type=_positive_int, default=None,
                   help="intra-op CPU threads per process (default on CPU: 1, fastest for small "
                        "CNFs and safe next to other processes)")

    g = p.add_argument_group("outputs")
    g.add_argument("--logger", choices=LOGGERS, default="auto",
                   help="auto: W&B (offline unless logged in) when installed; every kind but "
                        "none also writes run_dir/metrics.csv")
    g.add_argument("--plot-every", type=_nonneg_int, default=500,
                   help="2-D data: density and trajectory PNGs every N steps and at the end "
                        "(0: off)")
    g.add_argument("--output-dir", default="runs")
    g.add_argument("--run-name", default=None)
    g.add_argument("--ckpt-path", default=None, help="checkpoint to resume from")
    g.add_argument("--ckpt-every", type=_positive_int, default=500,
                   help="save a checkpoint every N training steps")
    g.add_argument("--verbose", action="store_true",
                   help="show Lightning's informational messages and library warnings")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar with live NFE and penalty (default: on in a terminal)")
    return p


class UsageError(ValueError):
    """A flag combination that cannot work."""


def data_kind(name: str) -> str:
    """Which family --data names: "toy", "tabular" or "table" (the user's own file)."""
    from polyreg_cnf.datamodules.tabular import TABULAR_SETS
    from polyreg_cnf.datamodules.toy import TOY_DENSITIES
    from polyreg_cnf.datamodules.user_table import TABLE_FORMATS

    if name in TOY_DENSITIES:
        return "toy"
    if name.lower() in TABULAR_SETS:
        return "tabular"
    if Path(name).suffix.lower() in TABLE_FORMATS:
        return "table"
    raise UsageError(
        f"--data {name!r} is not a known data set or a table file; valid: toy densities "
        f"{sorted(TOY_DENSITIES)}, tabular sets {list(TABULAR_SETS)}, or a path ending in "
        f"{', '.join(TABLE_FORMATS)}")


def build_datamodule(args: argparse.Namespace, kind: str) -> Any:
    """The DataModule named by --data, with the (preset-filled) batch sizes."""
    from polyreg_cnf.datamodules.tabular import TabularDataModule
    from polyreg_cnf.datamodules.toy import ToyDataModule
    from polyreg_cnf.datamodules.user_table import UserTableDataModule

    common = dict(batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
                  num_workers=args.num_workers)
    if kind == "toy":
        return ToyDataModule(args.data, seed=args.seed, **common)
    if kind == "tabular":
        return TabularDataModule(args.data.lower(), args.data_dir, download=args.download,
                                 **common)
    columns = None
    if args.columns:
        columns = [int(c) if c.strip().lstrip("-").isdigit() else c.strip()
                   for c in args.columns.split(",")]
    return UserTableDataModule(args.data, columns=columns, drop_nonfinite=args.drop_nonfinite,
                               seed=args.seed, **common)


def fill_from_preset(args: argparse.Namespace, preset: dict[str, Any]) -> None:
    """Set every option the user left unset (None) from the preset."""
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def make_regularizer(args: argparse.Namespace) -> Any:
    """The regularizer callback named by --reg (the registry of the command line), or None."""
    from polyreg_cnf.callbacks import KineticRegularizer, PolynomialTrajectoryRegularizer

    registry = {
        "none": lambda: None,
        "poly": lambda: PolynomialTrajectoryRegularizer(
            coef=args.poly_coef, num_samples=args.poly_samples, order=args.poly_order),
        "kinetic": lambda: KineticRegularizer(kinetic_coef=args.kinetic_coef,
                                              jacobian_coef=args.jacobian_coef),
    }
    return registry[args.reg]()


def set_threads(args: argparse.Namespace) -> None:
    """Intra-op CPU threads per process: --threads, else one when training on the CPU.

    A CNF step is thousands of small operations. On this project's 2-core reference machine one
    thread is as fast as two for the default models, and two threads that compete with any other
    process (a second DDP rank, a data loader, a benchmark) make every parallel region wait for
    a descheduled thread: steps ran 10-100x slower (see README, "Performance notes").
    """
    import torch

    on_cpu = args.accelerator == "cpu" or (args.accelerator == "auto"
                                           and not torch.cuda.is_available())
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif on_cpu:
        torch.set_num_threads(1)


def quiet_libraries() -> None:
    """Keep the terminal for what matters: our summary, errors and real warnings."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (".*does not have many workers.*", ".*LeafSpec.*",
                    ".*The anonymous setting has no effect.*", ".*weights_only.*"):
        warnings.filterwarnings("ignore", message=message)


def resolve_ckpt_path(value: str | None, ckpt_dir: Path) -> str | None:
    """--ckpt-path: None (fresh run), "last" (latest checkpoint of this run name) or a file."""
    if value is None:
        return None
    if value == "last":
        last = ckpt_dir / "last.ckpt"
        if not last.exists():
            print(f"train.py: no checkpoint at {last}; starting a fresh run", file=sys.stderr)
            return None
        return str(last)
    if not Path(value).is_file():
        raise UsageError(f"--ckpt-path {value!r} is not a file (or use --ckpt-path last to "
                         f"resume the latest run of this name)")
    return value


def keep_previous_log(run_dir: Path) -> None:
    """Lightning's CSV logger deletes metrics.csv on start; keep a resumed run's earlier rows."""
    log = run_dir / "metrics.csv"
    if not log.exists() or os.environ.get("LOCAL_RANK", "0") != "0" \
            or os.environ.get("NODE_RANK", "0") != "0":
        return
    index = 1
    while (run_dir / f"metrics.part{index}.csv").exists():
        index += 1
    log.rename(run_dir / f"metrics.part{index}.csv")


def make_run_dir(args: argparse.Namespace) -> Path:
    """runs/<name>: a fresh folder per run unless resuming (then the latest of that name)."""
    base = args.run_name or f"{args.model}-{Path(str(args.data)).stem}-{args.reg}-s{args.seed}"
    root = Path(args.output_dir)
    candidates = sorted(root.glob(f"{base}*"), key=lambda p: p.stat().st_mtime) \
        if root.exists() else []
    candidates = [c for c in candidates if c.name == base or c.name.startswith(base + "-")]
    if args.ckpt_path == "last" and candidates:
        return candidates[-1]
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        # DDP children must use the folder rank 0 made; rank 0 made it before they started.
        return Path(os.environ.get("POLYREG_RUN_DIR", root / base))
    run = root / base
    index = 1
    while run.exists():
        index += 1
        run = root / f"{base}-{index}"
    run.mkdir(parents=True)
    os.environ["POLYREG_RUN_DIR"] = str(run)
    return run


def summary_metrics(model: str, metrics: dict[str, float]) -> list[str]:
    """The test-quality lines of the end-of-run summary."""
    nan = float("nan")
    if model == "cnf":
        return [f"test NLL (nats):            {metrics.get('test/nll', nan):.4f}"]
    lines = [f"test -ELBO (nats):          {metrics.get('test/neg_elbo', nan):.4f}",
             f"test IS-NLL (nats):         {metrics.get('test/is_nll', nan):.4f}"]
    if "test/bits_per_dim" in metrics:
        lines.append(f"test IS-NLL (bits/dim):     {metrics['test/bits_per_dim']:.4f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Parse flags, train, test, print a summary. Returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as err:
        parser.error(str(err))
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    return 0


def solver_options(args: argparse.Namespace) -> dict[str, Any]:
    """The solver flags as SolverConfig keyword arguments."""
    return dict(method=args.solver, atol=args.atol, rtol=args.rtol, eval_atol=args.eval_atol,
                eval_rtol=args.eval_rtol, adjoint=args.adjoint, seminorm=args.seminorm,
                step_size=args.step_size, max_nfe=args.max_nfe)


def build_cnf(args: argparse.Namespace) -> tuple[Any, Any, int]:
    """Density estimation: (CNFDensityEstimator, DataModule, data dimension)."""
    from polyreg_cnf.app.presets import preset_for
    from polyreg_cnf.engine.solver import SolverConfig
    from polyreg_cnf.models import CNFDensityEstimator

    kind = data_kind(args.data)
    fill_from_preset(args, preset_for(args.data.lower(), kind))
    dm = build_datamodule(args, kind)
    dm.prepare_data()
    dm.setup("fit")
    dim = dm.dim
    hidden = args.hidden_dims or [args.hdim_factor * dim] * args.nhidden
    stats: dict[str, Any] = {}
    if kind == "table":
        stats = dict(data_mean=dm.mean.tolist(), data_std=dm.std.tolist())
    model = CNFDensityEstimator(
        dim, hidden_dims=list(hidden), layer_type=args.layer_type, nonlinearity=args.nonlinearity,
        num_blocks=args.num_blocks, T=args.T, train_T=args.train_T,
        solver=SolverConfig(**solver_options(args)), trace=args.trace,
        eval_trace=args.eval_trace, noise=args.noise, lr=args.lr,
        weight_decay=args.weight_decay, **stats)
    return model, dm, dim


#: Options of polyreg_cnf.models.vae.build_vae that train.py flags (or presets) provide.
VAE_OPTIONS = ("z_dim", "posterior", "hidden_dims", "rank", "nonlinearity", "num_blocks", "T",
               "train_T", "trace", "eval_trace", "noise", "feature_dim", "architecture",
               "mlp_hidden", "lr", "weight_decay", "warmup_epochs", "is_samples",
               "val_is_samples", "is_chunk")


def build_vae(args: argparse.Namespace) -> tuple[Any, Any, int]:
    """VAE with a CNF posterior: (CNFVAE, image DataModule, latent dimension)."""
    from polyreg_cnf.datamodules.images import IMAGE_DATASETS, make_datamodule

    from polyreg_cnf.models.vae import VAE_PRESETS
    from polyreg_cnf.models.vae import build_vae as make_vae

    name = args.data.lower()
    if name not in IMAGE_DATASETS:
        raise UsageError(f"--model vae needs an image data set; got --data {args.data!r}, "
                         f"valid: {', '.join(IMAGE_DATASETS)}")
    fill_from_preset(args, VAE_PRESETS.get(name, VAE_PRESETS["mnist"]))
    if args.reg != "none" and args.posterior == "gaussian":
        raise UsageError(f"--reg {args.reg} acts on the CNF posterior, but --posterior gaussian "
                         f"has no flow; use --reg none or another --posterior")
    data_dir = None if name == "digits" else args.data_dir
    extra = {} if name == "digits" else {"download": args.download}
    dm = make_datamodule(name, data_dir, seed=args.seed, batch_size=args.batch_size,
                         eval_batch_size=args.eval_batch_size or args.batch_size,
                         num_workers=args.num_workers, **extra)
    dm.prepare_data()
    dm.setup("fit")
    options = {key: getattr(args, key) for key in VAE_OPTIONS
               if getattr(args, key, None) is not None}
    model = make_vae(dm.image_shape, dm.likelihood, **options, **solver_options(args))
    return model, dm, int(args.z_dim)


def run(args: argparse.Namespace) -> int:
    """Everything after flag parsing."""
    if args.data is None:
        args.data = "digits" if args.model == "vae" else "checkerboard"
    if args.reg == "poly" and args.poly_samples < args.poly_order:
        raise UsageError(f"--poly-samples must be >= --poly-order, got {args.poly_samples} < "
                         f"{args.poly_order}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps must be a positive integer, got {args.max_steps}")
    if args.solver in ("euler", "midpoint", "rk4") and args.step_size is None:
        raise UsageError(f"--solver {args.solver} is fixed-grid and needs --step-size")

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from polyreg_cnf.callbacks import NFEMonitor
    from polyreg_cnf.callbacks.guard import NumericalFaultError, RunGuard, describe_solver_failure
    from polyreg_cnf.callbacks.plots import TrajectoryPlotter

    from polyreg_cnf.app.run_logging import (
        NFEProgressBar,
        finish_loggers,
        make_logger,
        run_config,
        wandb_sync_hint,
    )
    from polyreg_cnf.models.checkpoint import AtomicCheckpointIO

    set_threads(args)
    if not args.verbose:
        quiet_libraries()
    L.seed_everything(args.seed, workers=True, verbose=False)
    model, dm, dim = build_vae(args) if args.model == "vae" else build_cnf(args)
    if args.max_steps is None and args.max_epochs is None:
        args.max_steps = 1000

    run_dir = make_run_dir(args)
    ckpt_dir = run_dir / "checkpoints"
    ckpt_path = resolve_ckpt_path(args.ckpt_path, ckpt_dir)
    if ckpt_path is not None:
        keep_previous_log(run_dir)
    monitor = NFEMonitor()
    guard = RunGuard(ckpt_dir / "last.ckpt", ckpt_dir / "last-good.ckpt")
    callbacks: list[L.Callback] = [monitor, guard]
    regularizer = make_regularizer(args)
    if regularizer is not None:
        callbacks.append(regularizer)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                 every_n_train_steps=args.ckpt_every)
    callbacks.append(checkpoint)
    if args.model == "cnf" and dim == 2 and args.plot_every > 0:
        callbacks.append(TrajectoryPlotter(every_n_steps=args.plot_every))
    if args.progress is None:
        args.progress = sys.stdout.isatty()
    if args.progress:
        callbacks.append(NFEProgressBar())
    loggers = make_logger(args.logger, run_dir, run_dir.name, run_config(vars(args)))

    devices: Any = args.devices if args.devices == "auto" else int(args.devices)
    val_kwargs: dict[str, Any] = {}
    if args.val_every is not None:
        val_kwargs = dict(val_check_interval=args.val_every, check_val_every_n_epoch=None)
    trainer = L.Trainer(
        max_steps=args.max_steps if args.max_steps is not None else -1,
        max_epochs=args.max_epochs, accelerator=args.accelerator, devices=devices,
        strategy=args.strategy, num_nodes=args.num_nodes, callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(run_dir), limit_val_batches=args.limit_val_batches,
        num_sanity_val_steps=0, enable_progress_bar=args.progress, enable_model_summary=False,
        log_every_n_steps=1, plugins=[AtomicCheckpointIO()], **val_kwargs)

    start = time.perf_counter()
    status = "failed"
    test_metrics: dict[str, float] = {}
    try:
        try:
            trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        except SystemExit:
            if guard.interrupted is None:  # not ours: let it through
                raise
        except NumericalFaultError as err:
            print(f"train.py: numerical fault: {err}", file=sys.stderr)
            return 3
        except (AssertionError, RuntimeError) as err:
            described = describe_solver_failure(err, trainer.global_step)
            if described is None:
                raise
            saved = (f" The weights of the last good step were saved to {guard.last_good_path}."
                     if guard.fault_step is not None else "")
            print(f"train.py: numerical fault: {described}{saved}", file=sys.stderr)
            return 3
        wall = time.perf_counter() - start
        if guard.interrupted is not None:
            if trainer.is_global_zero:
                print(f"\ninterrupted by {guard.interrupted} at step {trainer.global_step}; "
                      f"checkpoint saved to {guard.last_path}. Resume with the same flags plus "
                      f"--ckpt-path last (or --ckpt-path {guard.last_path}).")
            status = "killed"
            return 143 if guard.interrupted == "SIGTERM" else 130
        if args.test:
            results = trainer.test(model, datamodule=dm, verbose=False)
            test_metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
        status = "success"
    finally:
        finish_loggers(loggers, status)
    sync_hint = wandb_sync_hint(loggers)

    if trainer.is_global_zero:
        summary = monitor.summary()
        lines = [
            "",
            f"== polyreg-cnf: {args.model} on {args.data}, reg={args.reg}, seed={args.seed} ==",
            *summary_metrics(args.model, test_metrics),
            f"test NFE per batch:         {test_metrics.get('test/nfe', float('nan')):.1f}",
            f"forward NFE per step:       {summary.get('forward_mean', float('nan')):.1f} "
            f"(last {monitor.window}: {summary.get('forward_last', float('nan')):.1f})",
            f"backward NFE per step:      {summary.get('backward_mean', float('nan')):.1f} "
            f"(last {monitor.window}: {summary.get('backward_last', float('nan')):.1f})",
            f"seconds per step:           {summary.get('seconds_mean', float('nan')):.3f}",
            f"training wall time (s):     {wall:.1f}",
            f"checkpoint:                 {guard.last_path}",
            f"logs:                       {run_dir}",
            f"compare runs:               python -m polyreg_cnf.app.report {run_dir} [...] "
            f"--out report.png",
        ]
        if sync_hint:
            lines.append(f"W&B run is offline; upload: {sync_hint}")
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
