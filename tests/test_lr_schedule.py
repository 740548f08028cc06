"""--lr-schedule: the cosine rate at every step against its closed form, exact resume, bad input."""

import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from polyreg_cnf.callbacks.guard import RunGuard
from polyreg_cnf.datamodules.toy import ToyDataModule

from polyreg_cnf.models import CNFDensityEstimator
from polyreg_cnf.models.schedule import cosine_lr

ROOT = Path(__file__).resolve().parents[1]
LR, STEPS = 2e-3, 20


class RecordLR(L.Callback):
    """The rate each optimizer step uses (read before the step)."""

    def __init__(self):
        self.rates = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


class StopAt(L.Callback):
    """Saves a checkpoint and stops after ``step`` steps of a longer run (an interruption)."""

    def __init__(self, step, path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def fit(tmp_path, schedule, extra=(), ckpt_path=None, **trainer_kwargs):
    L.seed_everything(0)
    model = CNFDensityEstimator(2, hidden_dims=[8, 8], lr=LR, lr_schedule=schedule,
                                solver={"atol": 1e-3, "rtol": 1e-3})
    dm = ToyDataModule("8gaussians", num_train=192, num_val=32, num_test=32, batch_size=32)
    record = RecordLR()
    guard = RunGuard(tmp_path / "last.ckpt", tmp_path / "good.ckpt")  # restores the RNG
    kwargs = dict(max_steps=STEPS, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                  accelerator="cpu")
    kwargs.update(trainer_kwargs)
    trainer = L.Trainer(callbacks=[record, guard, *extra], **kwargs)
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return model, record.rates


def test_cosine_rate_at_every_step_is_the_closed_form(tmp_path):
    _, rates = fit(tmp_path, "cosine")
    expected = [0.5 * LR * (1 + math.cos(math.pi * k / STEPS)) for k in range(STEPS)]
    assert len(rates) == STEPS
    assert rates == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert rates == pytest.approx([cosine_lr(LR, k, STEPS) for k in range(STEPS)], rel=1e-9)
    assert rates[0] == LR and rates[-1] < 0.01 * LR


def test_constant_is_the_default_and_keeps_the_rate(tmp_path):
    assert CNFDensityEstimator(2, hidden_dims=[8]).lr_schedule == "constant"
    _, rates = fit(tmp_path, "constant")
    assert rates == [LR] * STEPS


def test_interrupted_cosine_run_resumes_on_the_same_curve(tmp_path):
    straight, rates = fit(tmp_path / "a", "cosine")
    ckpt = tmp_path / "stop.ckpt"
    _, first = fit(tmp_path / "b", "cosine", extra=[StopAt(8, ckpt)])
    resumed, second = fit(tmp_path / "b", "cosine", ckpt_path=ckpt)
    assert first + second == pytest.approx(rates, rel=1e-12)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_bad_schedule_names_the_allowed_ones():
    with pytest.raises(ValueError, match="lr_schedule must be one of constant, cosine, got 'step'"):
        CNFDensityEstimator(2, hidden_dims=[8], lr_schedule="step")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--lr-schedule", "step"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "invalid choice: 'step' (choose from 'constant', 'cosine')" in proc.stderr


def test_cosine_needs_a_finite_run(tmp_path):
    with pytest.raises(ValueError, match="needs a finite number of training steps"):
        fit(tmp_path, "cosine", max_steps=-1, max_epochs=-1)
