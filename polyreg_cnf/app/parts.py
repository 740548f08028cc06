"""The parts of a run that :func:`polyreg_cnf.app.build.build` puts together: the DataModule
and the model of a configuration, the run folder, the stored ``config.yaml``, the checkpoint to
resume from and the process settings (threads, library messages).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

from polyreg_cnf.app.config import RunConfig, data_kind, dump_config
from polyreg_cnf.models import CNFDensityEstimator
from polyreg_cnf.models.vae import CNFVAE

__all__ = ["keep_previous_log", "launcher_child", "make_datamodule", "make_model",
           "make_run_dir", "quiet_libraries", "resolve_ckpt_path", "set_threads",
           "validation_interval", "write_config"]


def make_datamodule(config: RunConfig) -> L.LightningDataModule:
    """The DataModule that ``config.data`` names (not yet prepared nor set up)."""
    from polyreg_cnf.datamodules.images import make_datamodule as make_image_datamodule
    from polyreg_cnf.datamodules.tabular import TabularDataModule
    from polyreg_cnf.datamodules.toy import ToyDataModule
    from polyreg_cnf.datamodules.user_table import UserTableDataModule

    t, source, name = config.training, config.source, config.data
    common = dict(batch_size=t.batch_size, eval_batch_size=t.eval_batch_size,
                  num_workers=config.hardware.num_workers)
    kind = data_kind(name, config.model)
    if kind == "image":
        name = name.lower()
        common["eval_batch_size"] = t.eval_batch_size or t.batch_size
        if name == "digits":  # bundled with scikit-learn: no folder, nothing to download
            return make_image_datamodule(name, None, seed=t.seed, **common)
        return make_image_datamodule(name, source.data_dir, seed=t.seed,
                                     download=source.download, **common)
    if kind == "toy":
        return ToyDataModule(name, seed=t.seed, **common)
    if kind == "tabular":
        return TabularDataModule(name.lower(), source.data_dir, download=source.download,
                                 **common)
    columns = None
    if source.columns:
        columns = [int(c) if c.strip().lstrip("-").isdigit() else c.strip()
                   for c in source.columns.split(",")]
    return UserTableDataModule(name, columns=columns, drop_nonfinite=source.drop_nonfinite,
                               seed=t.seed, **common)


def make_model(config: RunConfig, datamodule: L.LightningDataModule) -> L.LightningModule:
    """The LightningModule of ``config`` for the (set-up) ``datamodule``."""
    t = config.training
    common = dict(flow=config.flow, solver=config.solver(), lr=t.lr,
                  weight_decay=t.weight_decay, lr_schedule=t.lr_schedule)
    if config.model == "vae":
        v = config.vae
        return CNFVAE(datamodule.image_shape, datamodule.likelihood, z_dim=v.z_dim,
                      posterior=v.posterior, rank=v.rank, feature_dim=v.feature_dim,
                      architecture=v.architecture, mlp_hidden=v.mlp_hidden,
                      warmup_epochs=v.warmup_epochs, is_samples=v.is_samples,
                      val_is_samples=v.val_is_samples, is_chunk=v.is_chunk, **common)
    stats: dict[str, Any] = {}
    if data_kind(config.data) == "table":  # saved with the model, to score raw rows later
        stats = dict(data_mean=datamodule.mean.tolist(), data_std=datamodule.std.tolist())
    return CNFDensityEstimator(datamodule.dim, **common, **stats)


def set_threads(config: RunConfig) -> None:
    """Intra-op CPU threads per process: ``threads``, else one when training on the CPU.

    A CNF step is thousands of small operations. On this project's 2-core reference machine one
    thread is as fast as two for the default models, and two threads that compete with any other
    process (a second DDP rank, a data loader, a benchmark) make every parallel region wait for
    a descheduled thread: steps ran 10-100x slower (see README, "Performance notes").
    """
    hw = config.hardware
    on_cpu = hw.accelerator == "cpu" or (hw.accelerator == "auto"
                                         and not torch.cuda.is_available())
    if hw.threads is not None:
        torch.set_num_threads(hw.threads)
    elif on_cpu:
        torch.set_num_threads(1)


def quiet_libraries() -> None:
    """Keep the terminal for what matters: our summary, errors and real warnings."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (".*does not have many workers.*", ".*LeafSpec.*",
                    ".*The anonymous setting has no effect.*", ".*weights_only.*"):
        warnings.filterwarnings("ignore", message=message)


def launcher_child() -> bool:
    """Whether this process is a DDP child that the launcher (rank 0 of node 0) started."""
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


def make_run_dir(config: RunConfig, resume_last: bool) -> Path:
    """runs/<name>: a fresh folder per run unless resuming (then the latest of that name)."""
    out = config.output
    base = out.run_name or f"{config.model}-{Path(config.data).stem}-{config.reg}-" \
                           f"s{config.training.seed}"
    root = Path(out.output_dir)
    candidates = sorted(root.glob(f"{base}*"), key=lambda p: p.stat().st_mtime) \
        if root.exists() else []
    candidates = [c for c in candidates if c.name == base or c.name.startswith(base + "-")]
    if resume_last and candidates:
        return candidates[-1]
    if launcher_child():
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


def resolve_ckpt_path(value: str | os.PathLike | None, ckpt_dir: Path) -> str | None:
    """None (fresh run), "last" (latest checkpoint of this run name) or a file."""
    if value is None:
        return None
    if value == "last":
        last = ckpt_dir / "last.ckpt"
        if not last.exists():
            print(f"no checkpoint at {last}; starting a fresh run", file=sys.stderr)
            return None
        return str(last)
    if not Path(value).is_file():
        raise ValueError(f"--ckpt-path {str(value)!r} is not a file (or use --ckpt-path last to "
                         f"resume the latest run of this name)")
    return str(value)


def keep_previous_log(run_dir: Path) -> None:
    """Lightning's CSV logger deletes metrics.csv on start; keep a resumed run's earlier rows."""
    log = run_dir / "metrics.csv"
    if not log.exists() or launcher_child():
        return
    index = 1
    while (run_dir / f"metrics.part{index}.csv").exists():
        index += 1
    log.rename(run_dir / f"metrics.part{index}.csv")


def write_config(config: RunConfig, run_dir: Path) -> None:
    """Store the resolved configuration as run_dir/config.yaml (written atomically)."""
    if launcher_child():
        return
    path = run_dir / "config.yaml"
    tmp = path.with_name(f".config.yaml.{os.getpid()}.part")
    tmp.write_text(dump_config(config), encoding="utf-8")
    os.replace(tmp, path)


def validation_interval(config: RunConfig, dm: L.LightningDataModule) -> int | None:
    """``val_every``, or for the user's table without one, an interval scaled to its rows."""
    from polyreg_cnf.datamodules.user_table import validation_interval

    t = config.training
    if t.val_every is not None or data_kind(config.data, config.model) != "table" \
            or not hasattr(dm, "arrays"):
        return t.val_every
    return validation_interval(len(dm.arrays()["train"]), t.batch_size)
