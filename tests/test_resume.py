"""Resuming loses nothing: a stopped and resumed run ends with the uninterrupted weights."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from polyreg_cnf.callbacks import NFEMonitor, PolynomialTrajectoryRegularizer
from polyreg_cnf.callbacks.guard import RunGuard
from polyreg_cnf.datamodules.toy import ToyDataModule

from polyreg_cnf import SolverConfig
from polyreg_cnf.models import CNFDensityEstimator
from polyreg_cnf.models.checkpoint import AtomicCheckpointIO, CheckpointKindError

ROOT = Path(__file__).resolve().parents[1]


def build():
    L.seed_everything(0)
    model = CNFDensityEstimator(2, hidden_dims=[16, 16],
                                solver=SolverConfig(atol=1e-3, rtol=1e-3))
    # 4 batches per epoch, so the runs below cross epoch boundaries and stop mid-epoch
    dm = ToyDataModule("8gaussians", num_train=256, num_val=64, num_test=64, batch_size=64)
    return model, dm


def fit(tmp, max_steps, ckpt_path=None):
    model, dm = build()
    guard = RunGuard(tmp / "last.ckpt", tmp / "good.ckpt")
    trainer = L.Trainer(max_steps=max_steps, callbacks=[PolynomialTrajectoryRegularizer(),
                                                        NFEMonitor(), guard],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        accelerator="cpu", plugins=[AtomicCheckpointIO()])
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return model, trainer


def test_resume_mid_epoch_matches_the_uninterrupted_run(tmp_path):
    full, _ = fit(tmp_path / "a", 10)
    fit(tmp_path / "b", 6)  # stops mid-epoch 2 and saves last.ckpt at its end
    resumed, trainer = fit(tmp_path / "c", 10, ckpt_path=tmp_path / "b" / "last.ckpt")
    assert trainer.global_step == 10
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_same_seed_gives_the_same_loss_curve(tmp_path):
    def curve():
        model, dm = build()
        mon = NFEMonitor()
        losses = []

        class Rec(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                losses.append(float(outputs["loss"]))

        L.Trainer(max_steps=6, callbacks=[PolynomialTrajectoryRegularizer(), mon, Rec()],
                  logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=0,
                  accelerator="cpu").fit(model, dm)
        return losses, [h[:2] for h in mon.history]

    assert curve() == curve()


def test_checkpoint_of_another_model_kind_is_refused(tmp_path):
    fit(tmp_path, 2)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    ckpt["polyreg_cnf"]["model"] = "vae"
    torch.save(ckpt, tmp_path / "vae.ckpt")
    with pytest.raises(CheckpointKindError, match="holds a 'vae' model"):
        CNFDensityEstimator.load_from_checkpoint(tmp_path / "vae.ckpt")
    other = CNFDensityEstimator(3, hidden_dims=[16, 16])
    with pytest.raises(CheckpointKindError, match="dim=2, but the run builds dim=3"):
        other.on_load_checkpoint(torch.load(tmp_path / "last.ckpt", weights_only=True))
    del ckpt["polyreg_cnf"]
    with pytest.raises(CheckpointKindError, match="not written by polyreg-cnf"):
        other.on_load_checkpoint(ckpt)


def test_atomic_save_leaves_the_old_checkpoint_intact_on_failure(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "x.ckpt"
    io.save_checkpoint({"a": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"a": Boom()}, path)
    assert torch.equal(torch.load(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.ckpt"]


def test_nan_gradient_stops_with_step_and_advice_after_saving_last_good(tmp_path):
    model, dm = build()

    class Poison(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step == 2:
                next(pl_module.parameters()).grad.fill_(float("nan"))

    guard = RunGuard(tmp_path / "last.ckpt", tmp_path / "good.ckpt")
    trainer = L.Trainer(max_steps=5, callbacks=[guard, Poison()], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    from polyreg_cnf.callbacks.guard import NumericalFaultError

    with pytest.raises(NumericalFaultError, match="non-finite gradient at step 2.*smaller --lr"):
        trainer.fit(model, dm)
    good = torch.load(tmp_path / "good.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in good["state_dict"].values())
    assert good["global_step"] == 2


def run_train(out, steps, extra=()):
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", "8gaussians", "--hidden-dims",
           "16,16", "--batch-size", "32", "--max-steps", str(steps), "--ckpt-every", "5",
           "--atol", "1e-3", "--rtol", "1e-3", "--limit-val-batches", "0", "--no-test",
           "--logger", "csv", "--accelerator", "cpu", "--output-dir", str(out), *extra]
    return cmd


def interrupt_after_first_checkpoint(out, steps, signum, cwd):
    """Start train.py, send ``signum`` once its first checkpoint exists, wait for the exit."""
    proc = subprocess.Popen(run_train(out, steps), cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    first = out / "cnf-8gaussians-poly-s0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    return proc, stdout, stderr


def final_weights(out):
    ckpt = out / "cnf-8gaussians-poly-s0" / "checkpoints" / "last.ckpt"
    return torch.load(ckpt, weights_only=True)["state_dict"]


def test_sigterm_saves_and_resume_ends_with_the_uninterrupted_weights(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Long enough that the signal, sent once the step-5 checkpoint exists, arrives before the
    # run ends even on a loaded machine (150 steps lost that race under a load of 4 on 2 cores).
    steps = 400
    full = subprocess.run(run_train(tmp_path / "full", steps), env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]

    out = tmp_path / "killed"
    proc, stdout, stderr = interrupt_after_first_checkpoint(out, steps, signal.SIGTERM, tmp_path)
    assert proc.returncode == 143, stderr[-2000:]
    assert "interrupted by SIGTERM at step" in stdout
    stopped_at = int(stdout.split("interrupted by SIGTERM at step")[1].split(";")[0])
    assert 5 <= stopped_at < steps

    resumed = subprocess.run(run_train(out, steps, ["--ckpt-path", "last"]), env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = final_weights(tmp_path / "full"), final_weights(out)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_sigint_saves_a_checkpoint_and_exits_130(tmp_path):
    out = tmp_path / "runs"
    proc, stdout, stderr = interrupt_after_first_checkpoint(out, 400, signal.SIGINT, tmp_path)
    assert proc.returncode == 130, stderr[-2000:]
    first = out / "cnf-8gaussians-poly-s0" / "checkpoints" / "last.ckpt"
    step = int(stdout.split("interrupted by SIGINT at step")[1].split(";")[0])
    assert torch.load(first, weights_only=True)["global_step"] == step


def test_max_nfe_stops_the_run_with_advice_and_the_last_good_weights(tmp_path):
    proc = subprocess.run(run_train(tmp_path / "runs", 5, ["--max-nfe", "10"]), cwd=tmp_path,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3
    assert "numerical fault" in proc.stderr and "max_nfe=10" in proc.stderr
    assert "Traceback" not in proc.stderr
    good = tmp_path / "runs" / "cnf-8gaussians-poly-s0" / "checkpoints" / "last-good.ckpt"
    assert good.exists() and "last-good.ckpt" in proc.stderr


# A checkpoint written before the layout change (commit 02c38e8, the old package and train.py):
#   PYTHONPATH=<02c38e8 checkout> python train.py --data 8gaussians --reg poly --hidden-dims 8,8
#       --batch-size 32 --max-steps 2 --ckpt-every 1 --atol 1e-3 --rtol 1e-3 --eval-atol 1e-3
#       --eval-rtol 1e-3 --limit-val-batches 0 --no-test --logger none --accelerator cpu
#       --plot-every 0
OLD_CKPT = ROOT / "tests" / "data" / "cnf_8gaussians_02c38e8.ckpt"
OLD_FLAGS = ["--data", "8gaussians", "--reg", "poly", "--hidden-dims", "8,8", "--batch-size",
             "32", "--ckpt-every", "1", "--atol", "1e-3", "--rtol", "1e-3", "--eval-atol", "1e-3",
             "--eval-rtol", "1e-3", "--limit-val-batches", "0", "--no-test", "--logger", "none",
             "--accelerator", "cpu", "--plot-every", "0"]


def test_checkpoint_from_before_the_layout_change_loads():
    old = torch.load(OLD_CKPT, weights_only=True)  # plain values only: no old module paths
    assert old["global_step"] == 2 and old["polyreg_cnf"]["model"] == "cnf"
    model = CNFDensityEstimator.load_from_checkpoint(OLD_CKPT)
    assert model.hparams["hidden_dims"] == [8, 8] and model.solver.atol == 1e-3
    for key, value in old["state_dict"].items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    logp = model.eval().log_prob(torch.zeros(3, 2))
    assert torch.isfinite(logp).all()


def test_train_py_resumes_a_checkpoint_from_before_the_layout_change(tmp_path):
    sys.path.insert(0, str(ROOT))
    import train

    out = tmp_path / "runs"
    code = train.main([*OLD_FLAGS, "--max-steps", "4", "--ckpt-path", str(OLD_CKPT),
                       "--output-dir", str(out)])
    assert code == 0
    new = torch.load(out / "cnf-8gaussians-poly-s0" / "checkpoints" / "last.ckpt",
                     weights_only=True)
    old = torch.load(OLD_CKPT, weights_only=True)
    # Resumed, not restarted: two more steps, and the NFE history goes on from the old one.
    assert new["global_step"] == 4
    history = new["callbacks"]["NFEMonitor"]["history"]
    assert len(history) == 4 and history[:2] == old["callbacks"]["NFEMonitor"]["history"]
    assert new["callbacks"]["PolynomialTrajectoryRegularizer"]["steps"] == 4


def test_atomic_save_is_one_write_renamed_within_the_folder(tmp_path, monkeypatch):
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    def refuse(*args, **kwargs):
        raise AssertionError("Lightning's own save was called")

    renames = []
    real_replace = os.replace

    def spy(src, dst):
        renames.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", refuse)
    monkeypatch.setattr(os, "replace", spy)
    path = tmp_path / "sub" / "x.ckpt"
    AtomicCheckpointIO().save_checkpoint({"a": torch.arange(3)}, path)
    assert len(renames) == 1 and renames[0][1] == path
    assert renames[0][0].parent == path.parent and renames[0][0] != path  # same file system
    assert torch.equal(torch.load(path)["a"], torch.arange(3))
    assert [p.name for p in path.parent.iterdir()] == ["x.ckpt"]
    with pytest.raises(TypeError, match="storage_options"):
        AtomicCheckpointIO().save_checkpoint({}, path, storage_options={"x": 1})
