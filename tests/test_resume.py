"""Resuming loses nothing: a stopped and resumed run ends with the uninterrupted weights."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import numpy as np
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


# A launcher around train.py (through build's extension points) with a small training set, so
# that an epoch is 5 steps, and one extra callback that sends the process a real OS signal at a
# chosen hook and step: the handlers run exactly as they do for a signal from a scheduler, with no
# race between the signal and the end of the run (signalling from outside once a checkpoint file
# appeared lost that race on a loaded machine).
SIGNAL_LAUNCHER = textwrap.dedent("""
    import os, signal, sys, time
    import lightning as L
    sys.path.insert(0, {root!r})
    import train
    from polyreg_cnf.datamodules.toy import ToyDataModule

    HOOK, STEP, NAME = os.environ.get("SIGNAL_AT", "none:0:SIGTERM").split(":")

    class SignalAt(L.Callback):
        def _maybe(self, trainer, hook):
            if hook == HOOK and trainer.global_step == int(STEP):
                print(f"SIGNAL_SENT {{time.time()}}", flush=True)
                os.kill(os.getpid(), getattr(signal, NAME))

        def on_before_backward(self, trainer, pl_module, loss):  # mid-step, after the solve
            self._maybe(trainer, "step")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._maybe(trainer, "batch_end")  # after the guard's own check of this batch

        def on_train_epoch_end(self, trainer, pl_module):
            self._maybe(trainer, "epoch_end")  # after the guard's epoch-end check

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, *args):
            if batch_idx == 0:
                print(f"VALIDATION_START {{trainer.global_step}}", flush=True)
                self._maybe(trainer, "validation")
            # A validation slower than a scheduler's grace period (SLOW_VALIDATION seconds).
            time.sleep(float(os.environ.get("SLOW_VALIDATION", "0")))

    dm = ToyDataModule("8gaussians", num_train=160, num_val=96, num_test=32, batch_size=32)
    sys.exit(train.main(sys.argv[1:], callbacks=[SignalAt()], datamodule=dm))
""")


def launch(tmp_path, out, steps, extra=(), signal_at=None, env=None):
    """Run train.py through the launcher; ``signal_at`` is ``(hook, step, signal name)``."""
    script = tmp_path / "launch.py"
    script.write_text(SIGNAL_LAUNCHER.format(root=str(ROOT)))
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    if signal_at is not None:
        env["SIGNAL_AT"] = ":".join(map(str, signal_at))
    return subprocess.run([sys.executable, str(script), *run_train(out, steps, extra)[2:]],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)


def last_checkpoint(out):
    return torch.load(out / "cnf-8gaussians-poly-s0" / "checkpoints" / "last.ckpt",
                      weights_only=True)


def stopped_step(stdout, signame):
    return int(stdout.split(f"interrupted by {signame} at step")[1].split(";")[0])


# (hook, step the signal is sent at, step the run stops and saves at). "step": mid-step, the step
# in flight is finished; "batch_end": after the guard's check of the epoch's last batch (step
# 10), caught at the epoch's end; "epoch_end": after the guard's epoch-end check, caught at the
# next batch's end; "validation": in the first of 3 validation batches after step 10
# (--val-every 10), stopped at that batch's end. (With Lightning's handler the last three ended
# the run with exit code 0 and no checkpoint.)
# About 20 s each: the step and validation hooks run by default, the others with the slow tests.
SIGTERM_CASES = [pytest.param("step", 17, 18, id="step"),
                 pytest.param("batch_end", 10, 10, id="batch_end", marks=pytest.mark.slow),
                 pytest.param("epoch_end", 10, 11, id="epoch_end", marks=pytest.mark.slow),
                 pytest.param("validation", 10, 10, id="validation", marks=pytest.mark.slow)]


SIGTERM_STEPS, SIGTERM_FLAGS = 30, ["--val-every", "10", "--limit-val-batches", "3"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The last checkpoint of the run the interrupted ones must end up matching."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    full = launch(tmp, tmp / "full", SIGTERM_STEPS, SIGTERM_FLAGS)
    assert full.returncode == 0, full.stderr[-2000:]
    return last_checkpoint(tmp / "full")


@pytest.mark.parametrize("hook, at, stops", SIGTERM_CASES)
def test_sigterm_saves_and_resume_ends_with_the_uninterrupted_weights(tmp_path, uninterrupted,
                                                                      hook, at, stops):
    steps, flags = SIGTERM_STEPS, SIGTERM_FLAGS
    out = tmp_path / "killed"
    proc = launch(tmp_path, out, steps, flags, signal_at=(hook, at, "SIGTERM"))
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert stopped_step(proc.stdout, "SIGTERM") == stops
    assert last_checkpoint(out)["global_step"] == stops

    resumed = launch(tmp_path, out, steps, [*flags, "--ckpt-path", "last"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = uninterrupted, last_checkpoint(out)
    assert a["global_step"] == b["global_step"] == steps
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=1e-5,
                                   atol=1e-6, msg=key)


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_stop_runs_no_validation_and_no_test(tmp_path, name, code):
    # The signal comes mid-step 10, where a validation is due (--val-every 10), and every
    # validation batch takes 120 s: far beyond the allowed exit time of one step plus 60 s.
    # Lightning validates once more when should_stop is set; the guard turns that off.
    out = tmp_path / "runs"
    proc = launch(tmp_path, out, 30, ["--val-every", "10", "--limit-val-batches", "3"],
                  signal_at=("step", 9, name), env={"SLOW_VALIDATION": "120"})
    ended = time.time()
    assert proc.returncode == code, proc.stderr[-2000:]
    sent = float(proc.stdout.split("SIGNAL_SENT ")[1].split()[0])
    assert ended - sent < 60, f"exit took {ended - sent:.0f} s after the signal"
    assert "VALIDATION_START" not in proc.stdout and "test NLL" not in proc.stdout
    assert stopped_step(proc.stdout, name) == 10
    assert last_checkpoint(out)["global_step"] == 10


def callback_state(checkpoint, name):
    (key,) = [k for k in checkpoint["callbacks"] if k.split("{")[0] == name]
    return checkpoint["callbacks"][key]


# Validation every 5 steps and early stopping on (a patience it never exhausts): the record of
# every validation, best.ckpt and the early-stopping counter must come out of a stopped and
# resumed run exactly as out of the uninterrupted one.
RECORD_FLAGS = ["--val-every", "5", "--limit-val-batches", "3", "--early-stop-patience", "50"]


@pytest.fixture(scope="module")
def uninterrupted_record(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("record")
    full = launch(tmp, tmp / "full", SIGTERM_STEPS, RECORD_FLAGS)
    assert full.returncode == 0, full.stderr[-2000:]
    folder = tmp / "full" / "cnf-8gaussians-poly-s0" / "checkpoints"
    return (torch.load(folder / "last.ckpt", weights_only=True),
            torch.load(folder / "best.ckpt", weights_only=True))


# Mid-step 17, stopped at 18 (no validation due); mid-step 9, stopped at 10, where a validation
# is due and skipped; inside the validation of step 10, stopped at its first batch's end. The
# resumed run runs the skipped or cut validation in full before it trains on.
@pytest.mark.slow  # seven short train.py runs
@pytest.mark.parametrize("hook, at", [("step", 17), ("step", 9), ("validation", 10)],
                         ids=["mid-step", "validation-due", "mid-validation"])
def test_resume_keeps_the_best_so_far_record_exactly(tmp_path, uninterrupted_record, hook, at):
    out = tmp_path / "killed"
    proc = launch(tmp_path, out, SIGTERM_STEPS, RECORD_FLAGS, signal_at=(hook, at, "SIGTERM"))
    assert proc.returncode == 143, proc.stderr[-2000:]
    resumed = launch(tmp_path, out, SIGTERM_STEPS, [*RECORD_FLAGS, "--ckpt-path", "last"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    folder = out / "cnf-8gaussians-poly-s0" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]
    (full_last, full_best) = uninterrupted_record
    last = torch.load(folder / "last.ckpt", weights_only=True)
    best = torch.load(folder / "best.ckpt", weights_only=True)
    a = callback_state(full_last, "ValidationRecord")["history"]
    b = callback_state(last, "ValidationRecord")["history"]
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(5, SIGTERM_STEPS + 1, 5))
    np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=1e-5)
    for name, keys in (("ModelCheckpoint", ("best_model_score",)),
                       ("EarlyStopping", ("wait_count", "best_score"))):
        for key in keys:
            torch.testing.assert_close(torch.as_tensor(callback_state(full_last, name)[key]),
                                       torch.as_tensor(callback_state(last, name)[key]),
                                       rtol=1e-5, atol=0, msg=f"{name}.{key}")
    assert best["global_step"] == full_best["global_step"]
    for key in full_best["state_dict"]:
        torch.testing.assert_close(full_best["state_dict"][key], best["state_dict"][key],
                                   rtol=1e-5, atol=1e-6, msg=key)


def test_sigint_saves_a_checkpoint_and_exits_130(tmp_path):
    out = tmp_path / "runs"
    proc = launch(tmp_path, out, 30, signal_at=("step", 12, "SIGINT"))
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert stopped_step(proc.stdout, "SIGINT") == 13
    assert last_checkpoint(out)["global_step"] == 13


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
    assert model.hparams["flow"]["hidden_dims"] == [8, 8] and model.solver.atol == 1e-3
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
