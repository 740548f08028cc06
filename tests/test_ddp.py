"""Multi-process training on CPU (gloo): weights stay in sync with the regularizer + adjoint."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from polyreg_cnf.callbacks import NFEMonitor, PolynomialTrajectoryRegularizer
from polyreg_cnf.datamodules.toy import ToyDataModule

from polyreg_cnf import SolverConfig
from polyreg_cnf.models import CNFDensityEstimator

ROOT = Path(__file__).resolve().parents[1]


class SaveWeights(L.Callback):
    """Each process writes its final weights, so the test can compare them."""

    def __init__(self, out):
        self.out = str(out)

    def on_fit_end(self, trainer, pl_module):
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


def test_ddp_spawn_two_processes_keep_identical_weights(tmp_path):
    L.seed_everything(0)
    model = CNFDensityEstimator(2, hidden_dims=[16, 16],
                                solver=SolverConfig(atol=1e-3, rtol=1e-3, backprop="adjoint"))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    dm = ToyDataModule("8gaussians", num_train=512, num_val=64, num_test=64, batch_size=64)
    trainer = L.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, max_steps=3,
                        callbacks=[PolynomialTrajectoryRegularizer(), NFEMonitor(),
                                   SaveWeights(tmp_path)],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(model, dm)
    w0 = torch.load(tmp_path / "rank0.pt")
    w1 = torch.load(tmp_path / "rank1.pt")
    assert w0.keys() == w1.keys()
    for key in w0:
        torch.testing.assert_close(w0[key], w1[key], rtol=0, atol=0, msg=key)
    moved = [k for k in w0 if "flow" in k and not torch.equal(w0[k], init[k])]
    assert moved, "training did not change the flow's weights"


def test_train_py_runs_under_the_plain_ddp_launcher(tmp_path):
    flags = ["--model", "cnf", "--reg", "poly", "--data", "8gaussians", "--hidden-dims", "16,16",
             "--batch-size", "64", "--eval-batch-size", "1000", "--max-steps", "3",
             "--atol", "1e-3", "--rtol", "1e-3", "--eval-atol", "1e-3", "--eval-rtol", "1e-3",
             "--limit-val-batches", "0", "--accelerator", "cpu", "--strategy", "ddp",
             "--output-dir", str(tmp_path / "runs"), "--logger", "csv"]
    cmd = [sys.executable, str(ROOT / "train.py"), *flags, "--devices", "2"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test NLL (nats):" in proc.stdout
    assert proc.stdout.count("== polyreg-cnf") == 1  # summary from rank 0 only
    ckpt = tmp_path / "runs" / "cnf-8gaussians-poly-s0" / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    # The printed test NLL is the mean over every test row of both processes: the trained
    # checkpoint evaluated in one process on the same test set gives the same number.
    printed = float(proc.stdout.split("test NLL (nats):")[1].split()[0])
    from polyreg_cnf.app.build import make_datamodule
    from polyreg_cnf.app.config import make_parser, parse_command_line, resolve

    config = resolve(parse_command_line(make_parser(), flags)[0])
    model = CNFDensityEstimator.load_from_checkpoint(ckpt)
    single = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                       enable_model_summary=False).test(model, make_datamodule(config),
                                                        verbose=False)
    assert single[0]["test/nll"] == pytest.approx(printed, abs=1e-4)
