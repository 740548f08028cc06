"""Experiment loggers (Weights & Biases, CSV, TensorBoard), the run config and the progress bar.

Everything here works without network access: W&B runs online only when an API key is
configured, and otherwise offline (``WANDB_MODE=offline``), so that nothing ever prompts for a
login or waits on a server. A CSV log is written next to every other logger because the report
(:mod:`polyreg_cnf.app.report`) reads it.

Example:
    >>> import tempfile
    >>> from polyreg_cnf.callbacks import PolynomialTrajectoryRegularizer
    >>> config = run_config({"reg": "poly", "lr": 1e-3}, PolynomialTrajectoryRegularizer(1.0))
    >>> config["regularizer"]
    {'name': 'poly', 'coef': 1.0, 'num_samples': 2, 'order': 1, 'start_step': 0}
    >>> loggers = make_logger("csv", tempfile.mkdtemp(), "demo", config)
    >>> [type(logger).__name__ for logger in loggers]
    ['CSVLogger']
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import netrc
import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from typing_extensions import override

__all__ = [
    "LOGGER_KINDS",
    "PROGRESS_NAMES",
    "WANDB_PROJECT",
    "WANDB_SUMMARIES",
    "NFEProgressBar",
    "define_wandb_metrics",
    "finish_loggers",
    "git_commit",
    "library_versions",
    "make_logger",
    "run_config",
    "wandb_available",
    "wandb_logged_in",
    "wandb_sync_hint",
]

#: Valid ``kind`` values of :func:`make_logger`.
LOGGER_KINDS = ("auto", "wandb", "csv", "tensorboard", "none")

#: W&B project every run goes to.
WANDB_PROJECT = "polyreg-cnf"

#: The step axis of every chart (Lightning's WandbLogger logs it with each row).
STEP_METRIC = "trainer/global_step"

#: Summary aggregations per metric (glob suffixes allowed), given to ``wandb.define_metric``.
#: The run table then shows, e.g., the best validation NLL and the peak and mean NFE.
WANDB_SUMMARIES: dict[str, str] = {
    "train/nll*": "min,last",
    "train/loss": "min,last",
    "val/nll": "min,last",
    "test/nll": "last",
    "nfe/*": "max,mean",
    "val/nfe": "max,mean,last",
    "test/nfe": "last",
    "solver/*": "max,mean",
    "reg/poly*": "mean,last",
    "time/step_seconds": "mean,max",
}

#: Progress-bar names: metric logged with ``prog_bar=True`` -> short name shown in the bar.
PROGRESS_NAMES: dict[str, str] = {
    "nfe/forward": "fwd",
    "nfe/backward": "bwd",
    "reg/poly_step": "poly",
    "reg/poly": "poly",
    "train/nll_step": "nll",
    "train/nll": "nll",
    "val/nll": "val_nll",
}

_OFFLINE_MODES = ("offline", "dryrun", "disabled")
_GIT_TIMEOUT_S = 5.0


# ---------------------------------------------------------------------------------- run config
def git_commit(path: str | Path | None = None, timeout: float = _GIT_TIMEOUT_S) -> str | None:
    """The commit checked out at ``path`` (default: this package's folder), or None.

    None when git is missing, the folder is not a repository, or git takes longer than
    ``timeout`` seconds (a hung network file system must not stall training).
    """
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None


def library_versions() -> dict[str, str | None]:
    """Versions of Python and the libraries a result depends on (None when not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("torch", "lightning", "torchdiffeq", "torchmetrics", "wandb", "polyreg-cnf"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of ``value`` (paths to str, tuples to lists, objects to repr)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return _plain(to_dict())
    return repr(value)


def run_config(args: Mapping[str, Any], regularizer: Any = None) -> dict[str, Any]:
    """The config stored with a run: every hyperparameter plus what makes it reproducible.

    Args:
        args: The parsed options, e.g. ``vars(argparse_namespace)`` after presets were filled.
        regularizer: The regularizer callback the run trains with (None: none); its
            ``settings()`` are logged as the values in force (a preset's included).

    Returns:
        A JSON-friendly dict: every entry of ``args``; ``regularizer`` (``reg``'s name and the
        callback's settings); ``versions`` (see
        :func:`library_versions`); ``git_commit`` (None outside a git checkout).

    Raises:
        TypeError: ``args`` is not a mapping.
    """
    if not isinstance(args, Mapping):
        raise TypeError(f"args must be a mapping such as vars(namespace), got "
                        f"{type(args).__name__}")
    config = {str(k): _plain(v) for k, v in args.items()}
    config["regularizer"] = {"name": config.get("reg"),
                             **({} if regularizer is None else regularizer.settings())}
    config["versions"] = library_versions()
    config["git_commit"] = git_commit()
    return config


# ---------------------------------------------------------------------------------- W&B
def wandb_available() -> bool:
    """Whether the ``wandb`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("wandb") is not None


def wandb_logged_in(env: Mapping[str, str] | None = None) -> bool:
    """Whether a W&B API key is configured, so an online run would not prompt.

    True when ``WANDB_API_KEY`` is set, or the netrc file (``NETRC`` or ``~/.netrc``) has an
    entry for the W&B host (``WANDB_BASE_URL``, default ``https://api.wandb.ai``) - that is
    where ``wandb login`` stores the key. Reads files only; never touches the network.
    """
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY", "").strip():
        return True
    host = urlparse(env.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(env["NETRC"]) if env.get("NETRC") else Path.home() / ".netrc"
    if not path.is_file():
        return False
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def _choose_wandb_mode() -> str:
    """Set ``WANDB_MODE`` so that wandb.init can neither prompt nor block; return the mode.

    A mode the user chose (offline, dryrun, disabled) is kept. Online needs an API key; without
    one the run goes offline, even if ``WANDB_MODE=online`` was asked for, because W&B would
    otherwise prompt for a login (or fail) on a machine without credentials.
    """
    requested = os.environ.get("WANDB_MODE", "").strip().lower()
    if requested in _OFFLINE_MODES:
        return requested
    if wandb_logged_in():
        return "online"
    if requested == "online":
        rank_zero_warn("WANDB_MODE=online but no W&B API key is configured (WANDB_API_KEY or "
                       "`wandb login`); logging offline instead.")
    os.environ["WANDB_MODE"] = "offline"
    return "offline"


def _wandb_logger(run_dir: Path, run_name: str, config: Mapping[str, Any]) -> Logger:
    import wandb

    mode = _choose_wandb_mode()
    offline = mode != "online"
    # No console capture (keeps tqdm intact), no git/system probes; a short init timeout so a
    # wedged service fails fast instead of hanging the run.
    settings = wandb.Settings(mode=mode, console="off", quiet=True, init_timeout=60.0,
                              x_disable_stats=offline, x_disable_machine_info=offline)
    logger = WandbLogger(save_dir=str(run_dir), project=WANDB_PROJECT, name=run_name,
                         config=dict(config), settings=settings, offline=False)
    if _launch_rank_zero():
        # Start the run now (rank 0 only; other ranks get Lightning's dummy experiment) so the
        # dashboard layout is declared before the first metric arrives.
        define_wandb_metrics(logger.experiment)
    return logger


def _launch_rank_zero() -> bool:
    """Whether this process is global rank 0, also before the Trainer has assigned ranks.

    Until the Trainer sets up its strategy, Lightning's rank comes from ``RANK`` /
    ``LOCAL_RANK``, so local rank 0 of every other node would also read 0; the node rank
    variables tell them apart.
    """
    if rank_zero_only.rank != 0:
        return False
    return all(os.environ.get(name, "0") in ("", "0") for name in ("NODE_RANK", "GROUP_RANK"))


@rank_zero_only
def define_wandb_metrics(run: Any, summaries: Mapping[str, str] | None = None) -> None:
    """Declare the dashboard of a W&B run: one step axis and the summary of each metric.

    Every metric is plotted against ``trainer/global_step``; the run table shows e.g. the
    minimum ``val/nll`` and the maximum and mean of every ``nfe/*`` series. Runs on rank 0 only.

    Args:
        run: A ``wandb`` run (``WandbLogger.experiment``).
        summaries: Metric name (glob suffix ``*`` allowed) -> comma-separated aggregations
            (``min``, ``max``, ``mean``, ``last``, ``first``, ``none``); default
            :data:`WANDB_SUMMARIES`.
    """
    define = getattr(run, "define_metric", None)
    if define is None:  # Lightning's DummyExperiment or a disabled run
        return
    define(STEP_METRIC)
    define("*", step_metric=STEP_METRIC, step_sync=True)
    for name, summary in (WANDB_SUMMARIES if summaries is None else summaries).items():
        define(name, step_metric=STEP_METRIC, summary=summary)


def _started_run(logger: WandbLogger) -> Any:
    """The W&B run of ``logger`` if this process started one (see :func:`make_logger`), else
    None.

    Only the launch's global rank 0 starts a run, when the logger is made; reading
    ``logger.experiment`` anywhere else would start one, so it is not read there.
    """
    return logger.experiment if _launch_rank_zero() else None


def _offline_run_dir(logger: WandbLogger) -> Path | None:
    """The ``offline-run-*`` folder of an offline WandbLogger whose run started, else None."""
    settings = getattr(_started_run(logger), "settings", None)
    if settings is None or getattr(settings, "mode", None) not in ("offline", "dryrun"):
        return None
    sync_dir = getattr(settings, "sync_dir", None)
    return Path(sync_dir) if sync_dir else None


def wandb_sync_hint(loggers: Sequence[Logger] | Logger | None) -> str | None:
    """The command that uploads an offline W&B run later, or None if there is nothing to sync.

    For an offline run it reads e.g. ``'wandb sync
    runs/demo/wandb/offline-run-20260101_120000-abc123'``.

    Example:
        >>> import tempfile
        >>> print(wandb_sync_hint(make_logger("csv", tempfile.mkdtemp(), "demo")))
        None
    """
    if loggers is None:
        return None
    if isinstance(loggers, Logger):
        loggers = [loggers]
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        folder = _offline_run_dir(logger)
        if folder is not None:
            return f"wandb sync {folder}"
    return None


# ---------------------------------------------------------------------------------- loggers
def _csv_logger(run_dir: Path) -> CSVLogger:
    # name="" and version="" put metrics.csv and hparams.yaml straight into run_dir.
    return CSVLogger(save_dir=str(run_dir), name="", version="")


def make_logger(kind: str, run_dir: str | Path, run_name: str,
                config: Mapping[str, Any] | None = None) -> list[Logger]:
    """The Lightning loggers of a run, ready for ``Trainer(logger=...)``.

    Every kind except ``"none"`` includes a CSVLogger writing ``run_dir/metrics.csv`` (what
    :mod:`polyreg_cnf.app.report` reads), after the main logger.

    * ``"auto"``: W&B when the ``wandb`` package is installed, plus CSV.
    * ``"wandb"``: W&B (error if not installed), plus CSV.
    * ``"tensorboard"``: TensorBoard event files in ``run_dir``, plus CSV.
    * ``"csv"``: CSV only.
    * ``"none"``: no logger at all (an empty list).

    W&B runs online only when an API key is configured (:func:`wandb_logged_in`); otherwise it
    sets ``WANDB_MODE=offline`` before ``wandb.init``, so a run never prompts nor waits on the
    network; upload it later with the command from :func:`wandb_sync_hint`. The W&B files go to
    ``run_dir/wandb/``, the run is named ``run_name`` in project ``polyreg-cnf``, and its
    dashboard is declared with :func:`define_wandb_metrics`.

    Args:
        kind: One of :data:`LOGGER_KINDS`.
        run_dir: The run's folder (created if missing).
        run_name: Display name of the run.
        config: Run config (see :func:`run_config`), stored as W&B config and CSV/TensorBoard
            hyperparameters.

    Returns:
        The loggers, main one first.

    Raises:
        ValueError: Unknown ``kind``.
        ModuleNotFoundError: ``kind="wandb"`` without the ``wandb`` package.
    """
    if kind not in LOGGER_KINDS:
        raise ValueError(f"unknown logger kind {kind!r}; valid: {', '.join(LOGGER_KINDS)}")
    if not isinstance(run_name, str) or not run_name:
        raise ValueError(f"run_name must be a non-empty string, got {run_name!r}")
    if kind == "none":
        return []
    if kind == "wandb" and not wandb_available():
        raise ModuleNotFoundError("logger kind 'wandb' needs the wandb package (pip install "
                                  "wandb); use 'auto' to fall back to CSV without it")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {} if config is None else dict(config)
    # The file loggers store the config as hparams.yaml, flattened so that the YAML stays
    # readable and TensorBoard accepts it (W&B gets the nested config at init).
    flat = _flatten(config)
    # The CSV logger starts first: it warns about a non-empty folder (and deletes an existing
    # metrics.csv) when it starts after W&B has made run_dir/wandb.
    csv = _csv_logger(run_dir)
    csv.log_hyperparams(flat)
    main: Logger | None = None
    if kind in ("wandb", "auto") and wandb_available():
        main = _wandb_logger(run_dir, run_name, config)
    elif kind == "tensorboard":
        main = TensorBoardLogger(save_dir=str(run_dir), name="", version="")
        main.log_hyperparams(flat)
    return [csv] if main is None else [main, csv]


def finish_loggers(loggers: Sequence[Logger] | Logger | None, status: str = "success") -> None:
    """Flush every logger and close the W&B run (rank 0), so the offline files are complete.

    Lightning finalizes its loggers after ``fit`` but leaves the W&B run open until the
    process exits; call this once after the last ``trainer.fit``/``trainer.test``.

    Args:
        loggers: ``trainer.loggers`` or the list from :func:`make_logger`.
        status: ``"success"`` or ``"failed"`` (passed to ``Logger.finalize``).
    """
    if loggers is None:
        return
    if isinstance(loggers, Logger):
        loggers = [loggers]
    for logger in loggers:
        logger.finalize(status)
        if isinstance(logger, WandbLogger):
            _finish_wandb_run(logger, status)


@rank_zero_only
def _finish_wandb_run(logger: WandbLogger, status: str) -> None:
    finish = getattr(_started_run(logger), "finish", None)
    if callable(finish):
        finish(exit_code=0 if status == "success" else 1)


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``; lists become JSON strings (TensorBoard wants
    scalars)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}/"))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(_plain(value))
        else:
            flat[name] = value
    return flat


# ---------------------------------------------------------------------------------- progress
class NFEProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with short names for the live NFE, penalty and NLL.

    The callbacks already log ``nfe/forward``, ``nfe/backward`` and ``reg/poly`` with
    ``prog_bar=True``; this bar shows them as ``fwd``, ``bwd`` and ``poly`` (see
    :data:`PROGRESS_NAMES`), drops the W&B version ``v_num``, and keeps every other metric
    under its own name. NFE counts are shown as integers.

    Args:
        refresh_rate: Update the bar every N batches.
        names: Metric -> short name; default :data:`PROGRESS_NAMES`.
    """

    def __init__(self, refresh_rate: int = 1, names: Mapping[str, str] | None = None) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.names = dict(PROGRESS_NAMES if names is None else names)

    @override
    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, int | str | float | dict]:
        """Rename the metrics shown after the bar (epoch-level ``*_epoch`` copies hidden)."""
        metrics = super().get_metrics(trainer, pl_module)
        shown: dict[str, int | str | float | dict] = {}
        for name, value in metrics.items():
            if name == "v_num" or (name.endswith("_epoch") and name[:-6] + "_step" in metrics):
                continue
            if isinstance(value, float) and value.is_integer() and name.startswith("nfe/"):
                value = int(value)  # counts: "fwd=26", not "fwd=26.00"
            shown[self.names.get(name, name)] = value
        return shown
