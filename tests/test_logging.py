"""Loggers, run config, progress bar and plots: a real short fit with offline W&B and no network.

The W&B run goes through the real ``wandb`` package in offline mode; what it was asked to log is
recorded by spying on ``Run.log`` / ``Run.define_metric`` (the .wandb file has no stable reader)
and cross-checked against the parallel CSV log. In-process network use is refused: any
``socket.connect`` to a non-loopback address raises and is recorded.
"""

import csv
import ipaddress
import socket
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from polyreg_cnf.callbacks import NFEMonitor, PolynomialTrajectoryRegularizer
from polyreg_cnf.callbacks.plots import TrajectoryPlotter
from polyreg_cnf.datamodules.toy import ToyDataModule

from polyreg_cnf.app import run_logging
from polyreg_cnf.app.run_logging import (
    LOGGER_KINDS,
    WANDB_SUMMARIES,
    NFEProgressBar,
    finish_loggers,
    git_commit,
    make_logger,
    run_config,
    wandb_logged_in,
    wandb_sync_hint,
)
from polyreg_cnf.engine.solver_config import SolverConfig
from polyreg_cnf.models import CNFDensityEstimator

wandb = pytest.importorskip("wandb")

FAST = SolverConfig(atol=1e-3, rtol=1e-3, eval_atol=1e-3, eval_rtol=1e-3)


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    """No credentials, offline W&B with its files in tmp, and no network from this process."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc of the developer
    (tmp_path / "home").mkdir()
    attempts = []
    real_connect = socket.socket.connect

    def guarded_connect(self, address):
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and not _loopback(host):
            attempts.append(address)
            raise OSError(f"test: network access to {address} refused")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    yield attempts
    if wandb.run is not None:  # never leak a run into the next test
        wandb.finish()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture
def wandb_calls(monkeypatch):
    """Record every Run.log and Run.define_metric call (the real methods still run)."""
    from wandb.sdk.wandb_run import Run

    calls = {"log": [], "define_metric": []}
    real_log, real_define = Run.log, Run.define_metric

    def log(self, data, *args, **kwargs):
        calls["log"].append(dict(data))
        return real_log(self, data, *args, **kwargs)

    def define_metric(self, name, *args, **kwargs):
        calls["define_metric"].append((name, kwargs))
        return real_define(self, name, *args, **kwargs)

    monkeypatch.setattr(Run, "log", log)
    monkeypatch.setattr(Run, "define_metric", define_metric)
    return calls


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_fit_with_offline_wandb_and_csv(tmp_path, offline_env, wandb_calls):
    torch.manual_seed(0)
    run_dir = tmp_path / "runs" / "toy-poly"
    args = {"data": "checkerboard", "reg": "poly", "poly_coef": 5.0, "poly_samples": 2,
            "poly_order": 1, "hidden_dims": [16, 16], "lr": 1e-3, "output_dir": tmp_path}
    loggers = make_logger("auto", run_dir, "toy-poly",
                          run_config(args, PolynomialTrajectoryRegularizer(5.0, 2, 1)))
    assert [type(lg) for lg in loggers] == [WandbLogger, CSVLogger]
    dm = ToyDataModule("checkerboard", num_train=256, num_val=64, num_test=64, batch_size=64)
    model = CNFDensityEstimator(2, hidden_dims=(16, 16), solver=FAST)
    monitor = NFEMonitor()
    plotter = TrajectoryPlotter(every_n_steps=2, num_points=50, num_times=5, grid_size=12)
    bar = NFEProgressBar()
    trainer = L.Trainer(
        max_steps=4, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=1,
        limit_test_batches=1, logger=loggers, log_every_n_steps=1, num_sanity_val_steps=0,
        callbacks=[monitor, PolynomialTrajectoryRegularizer(), plotter, bar],
        enable_checkpointing=False, enable_model_summary=False, default_root_dir=run_dir,
        accelerator="cpu", devices=1)
    trainer.fit(model, datamodule=dm)
    shown = bar.get_metrics(trainer, model)  # test() would replace the training metrics
    trainer.test(model, datamodule=dm, verbose=False)
    finish_loggers(trainer.loggers)

    # No process-local network use, offline run folder with its data file, and the hint.
    assert offline_env == []
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((run_dir / "wandb").iterdir())
    assert list(runs[0].glob("run-*.wandb"))
    assert wandb_sync_hint(trainer.loggers) == f"wandb sync {runs[0]}"

    # The CSV log holds the per-step NFE of the monitor, the penalty and the NLLs.
    rows = read_csv(run_dir / "metrics.csv")
    train = [r for r in rows if r["nfe/forward"]]
    assert [int(r["step"]) for r in train] == [0, 1, 2, 3]
    assert [(float(r["nfe/forward"]), float(r["nfe/backward"])) for r in train] == \
        [(float(f), float(b)) for f, b, _ in monitor.history]
    for name in ("nfe/total", "solver/accepted_steps", "time/step_seconds", "reg/poly",
                 "train/nll", "nfe/block_0/forward"):
        assert all(r[name] for r in train), name
    assert sum(1 for r in rows if r["val/nll"]) == 2 and any(r["test/nll"] for r in rows)
    assert any(r["val/nfe"] for r in rows) and any(r["test/nfe"] for r in rows)

    # W&B received the same per-step values, against trainer/global_step.
    logged = [c for c in wandb_calls["log"] if "nfe/forward" in c]
    assert [(c["trainer/global_step"], c["nfe/forward"], c["nfe/backward"]) for c in logged] == \
        [(int(r["step"]), float(r["nfe/forward"]), float(r["nfe/backward"])) for r in train]
    assert any("val/nll" in c for c in wandb_calls["log"])
    assert any("test/nll" in c for c in wandb_calls["log"])
    images = [c for c in wandb_calls["log"] if "plots/trajectories" in c]
    assert [c["trainer/global_step"] for c in images] == [2, 4]
    assert any("plots/density" in c for c in wandb_calls["log"])

    # The dashboard: one step axis, and the summaries asked for.
    defined = {name: kw for name, kw in wandb_calls["define_metric"]}
    assert defined["*"]["step_metric"] == "trainer/global_step"
    assert defined["val/nll"] == {"step_metric": "trainer/global_step", "summary": "min,last"}
    assert defined["nfe/*"]["summary"] == "max,mean"
    for name, summary in WANDB_SUMMARIES.items():
        assert defined[name]["summary"] == summary

    # The run config made it into W&B and the CSV hparams.
    config = loggers[0].experiment.config
    assert config["regularizer"] == {"name": "poly", "coef": 5.0, "num_samples": 2, "order": 1,
                                     "start_step": 0}
    assert config["versions"]["torch"] == torch.__version__.split("+")[0] or \
        config["versions"]["torch"] == torch.__version__
    assert "regularizer/coef" in (run_dir / "hparams.yaml").read_text()

    # Plots on disk (every 2 steps and at fit end = step 4, drawn once), progress-bar names.
    plots = sorted(p.name for p in (run_dir / "plots").glob("*.png"))
    assert plots == ["density_step000002.png", "density_step000004.png",
                     "trajectories_step000002.png", "trajectories_step000004.png"]
    assert {"fwd", "bwd", "poly", "nll", "val_nll"} <= set(shown)
    assert shown["fwd"] == monitor.history[-1][0] and isinstance(shown["fwd"], int)
    assert not any(k.startswith(("nfe/", "reg/")) or k == "v_num" for k in shown)


def test_make_logger_rejects_unknown_kind(tmp_path):
    with pytest.raises(ValueError) as info:
        make_logger("mlflow", tmp_path, "x")
    message = str(info.value)
    assert "'mlflow'" in message
    assert all(kind in message for kind in LOGGER_KINDS)


def test_file_loggers(tmp_path):
    assert make_logger("none", tmp_path / "n", "n") == []
    csv_only = make_logger("csv", tmp_path / "c", "c", {"lr": 0.1, "dims": [1, 2]})
    assert [type(lg) for lg in csv_only] == [CSVLogger]
    assert Path(csv_only[0].log_dir) == tmp_path / "c"
    assert "lr: 0.1" in (tmp_path / "c" / "hparams.yaml").read_text()
    tb = make_logger("tensorboard", tmp_path / "t", "t")
    assert [type(lg) for lg in tb] == [TensorBoardLogger, CSVLogger]


def test_wandb_mode_offline_without_credentials(tmp_path, offline_env, monkeypatch):
    assert not wandb_logged_in()
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.warns(UserWarning, match="no W&B API key"):
        assert run_logging._choose_wandb_mode() == "offline"
    assert run_logging.os.environ["WANDB_MODE"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert run_logging._choose_wandb_mode() == "disabled"


def test_wandb_logged_in_sources(tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    netrc.chmod(0o600)
    assert wandb_logged_in({"WANDB_API_KEY": "k"})
    assert wandb_logged_in({"NETRC": str(netrc)})
    assert not wandb_logged_in({"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.corp"})
    assert not wandb_logged_in({"NETRC": str(tmp_path / "missing")})


def test_no_wandb_run_on_other_ranks(tmp_path, offline_env, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("wandb.init called on rank 1")

    monkeypatch.setattr(wandb, "init", refuse)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    loggers = make_logger("wandb", tmp_path / "r", "r")
    assert type(loggers[0]) is WandbLogger
    assert wandb_sync_hint(loggers) is None
    assert not (tmp_path / "r" / "wandb").exists()
    # Local rank 0 of a second node, before the Trainer has set the ranks: no run either.
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    monkeypatch.setenv("NODE_RANK", "1")
    loggers = make_logger("wandb", tmp_path / "n1", "n1")
    assert wandb.run is None  # no run was started in this process
    assert not (tmp_path / "n1" / "wandb").exists()


def test_run_config_and_git_commit(tmp_path):
    config = run_config({"reg": "none", "data": "moons", "output_dir": tmp_path, "dims": (3, 4)})
    assert config["regularizer"] == {"name": "none"}
    assert config["output_dir"] == str(tmp_path) and config["dims"] == [3, 4]
    assert set(config["versions"]) >= {"torch", "lightning", "torchdiffeq", "polyreg-cnf"}
    assert config["git_commit"] is None or len(config["git_commit"]) == 40
    assert git_commit(tmp_path) is None  # not a repository
    with pytest.raises(TypeError, match="got list"):
        run_config([("reg", "poly")])


def test_plotter_skips_non_2d_once(tmp_path):
    model = CNFDensityEstimator(3, hidden_dims=(8,), solver=FAST)
    plotter = TrajectoryPlotter(num_points=10, num_times=3, grid_size=4)
    with pytest.warns(UserWarning, match="2-D CNFs only.*dim=3"):
        assert plotter.render(model, tmp_path) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plotter.render(model, tmp_path) == []
    assert not any(tmp_path.iterdir())


def test_plotter_restores_mode_and_counters(tmp_path):
    model = CNFDensityEstimator(2, hidden_dims=(8,), num_blocks=2, solver=FAST)
    model.train()
    for block in model.flow.blocks:
        block.nfe.forward = 7
    files = TrajectoryPlotter(num_points=20, num_times=4, grid_size=8).render(model, tmp_path, 3)
    assert [f.name for f in files] == ["density_step000003.png", "trajectories_step000003.png"]
    assert all(f.read_bytes()[:4] == b"\x89PNG" and f.stat().st_size > 5_000 for f in files)
    assert model.training
    assert [b.nfe.forward for b in model.flow.blocks] == [7, 7]


def test_plotter_rejects_bad_arguments():
    with pytest.raises(ValueError, match="every_n_steps.*got 0"):
        TrajectoryPlotter(every_n_steps=0)
    with pytest.raises(ValueError, match="num_times.*got 1"):
        TrajectoryPlotter(num_times=1)


@pytest.mark.parametrize("reg,expected", [
    ("poly", {"coef": 1.5, "num_samples": 2, "order": 1, "start_step": 0}),  # K, m: the preset
    ("kinetic", {"kinetic_coef": 0.05, "jacobian_coef": 0.01}),  # jacobian_coef: the default
])
def test_every_setting_of_the_regularizer_is_in_the_run_folder(reg, expected, tmp_path):
    import sys

    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import train

    flags = {"poly": ["--poly-coef", "1.5"], "kinetic": ["--kinetic-coef", "0.05"]}[reg]
    argv = ["--data", "8gaussians", "--reg", reg, *flags, "--hidden-dims", "8", "--max-steps",
            "2", "--batch-size", "32", "--limit-val-batches", "0", "--no-test",
            "--plot-every", "0", "--logger", "csv", "--output-dir", str(tmp_path / "runs"),
            "--run-name", "r"]
    assert train.main(argv) == 0
    logged = yaml.safe_load((tmp_path / "runs" / "r" / "hparams.yaml").read_text())
    settings = {k.split("/", 1)[1]: v for k, v in logged.items()
                if k.startswith("regularizer/") and k != "regularizer/name"}
    assert settings == expected
    assert logged["regularizer/name"] == reg
