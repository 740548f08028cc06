"""Model selection: best.ckpt beside one last.ckpt, the tested weights, early stopping, the
overfitting warning and the summary that says all of it."""

import re
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping
from polyreg_cnf.callbacks.selection import LearningRateDrops, ValidationRecord, overfit_margin
from polyreg_cnf.datamodules.user_table import UserTableDataModule
from test_resume import SIGTERM_STEPS, callback_state, last_checkpoint, launch

from benchmarks.selection import write_manifold
from benchmarks.tables import write_mixture_table
from polyreg_cnf.app.build import build
from polyreg_cnf.app.config import ConfigError, resolve
from polyreg_cnf.models import CNFDensityEstimator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402


def overfitting_table(path, rows=300, seed=0):
    """A few hundred rows on a noisy 2-D manifold in 6 columns: a flow overfits them fast."""
    return write_manifold(path, rows, seed)


FAST = ["--hidden-dims", "32,32", "--atol", "1e-3", "--rtol", "1e-3", "--eval-atol", "1e-4",
        "--eval-rtol", "1e-4", "--accelerator", "cpu", "--logger", "csv", "--plot-every", "0",
        "--reg", "none"]


def printed(out, label):
    return float(re.search(rf"{re.escape(label)}\s+(-?[\d.]+|nan)", out).group(1))


def test_a_run_keeps_one_last_and_one_best_checkpoint(tmp_path, capsys):
    # 8 steps with a save every 3 and a validation every 4: before, the guard's final save and
    # the periodic ModelCheckpoint's left last.ckpt and last-v1.ckpt at the same step.
    table = overfitting_table(tmp_path / "t.npy")
    code = train.main(["--data", str(table), *FAST, "--max-steps", "8", "--ckpt-every", "3",
                       "--val-every", "4", "--output-dir", str(tmp_path / "runs")])
    assert code == 0
    folder = tmp_path / "runs" / "cnf-t-none-s0" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8
    # The record in last.ckpt holds both validations, and best.ckpt is the lower one's weights.
    history = last["callbacks"]["ValidationRecord"]["history"]
    assert [h[0] for h in history] == [4, 8]
    best = torch.load(folder / "best.ckpt", weights_only=True)
    assert best["global_step"] == min(history, key=lambda h: h[1])[0]
    out = capsys.readouterr().out
    assert f"best validation checkpoint, step {best['global_step']} ({folder / 'best.ckpt'})" \
        in out


def test_test_ckpt_best_and_last_test_those_weights(tmp_path, capsys):
    table = overfitting_table(tmp_path / "t.npy")
    nll = {}
    for which in ("best", "last"):
        out_dir = tmp_path / which
        code = train.main(["--data", str(table), *FAST, "--max-steps", "30", "--val-every", "5",
                           "--lr", "1e-2", "--early-stop-patience", "0", "--test-ckpt", which,
                           "--output-dir", str(out_dir)])
        assert code == 0
        out = capsys.readouterr().out
        nll[which] = printed(out, "test NLL (nats):")
        folder = out_dir / "cnf-t-none-s0" / "checkpoints"
        model = CNFDensityEstimator.load_from_checkpoint(folder / f"{which}.ckpt")
        dm = UserTableDataModule(table, batch_size=512)
        expected = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False).test(model, dm, verbose=False)
        assert nll[which] == pytest.approx(expected[0]["test/nll"], abs=1e-4)
        step = torch.load(folder / f"{which}.ckpt", weights_only=True)["global_step"]
        assert (f"best validation checkpoint, step {step}" if which == "best"
                else "last weights, step 30 (--test-ckpt last)") in out
    assert "validation NLL (nats):      best" in out


def test_no_test_says_skipped(tmp_path, capsys):
    table = overfitting_table(tmp_path / "t.npy")
    assert train.main(["--data", str(table), *FAST, "--max-steps", "2", "--no-test",
                       "--output-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "test NLL (nats):            skipped (--no-test)" in out and "nan" not in out


def test_early_stop_tests_the_best_and_says_why(tmp_path, capsys):
    table = overfitting_table(tmp_path / "t.npy")
    code = train.main(["--data", str(table), *FAST, "--max-steps", "2000", "--val-every", "5",
                       "--lr", "3e-2", "--early-stop-patience", "3",
                       "--output-dir", str(tmp_path / "runs")])
    assert code == 0
    captured = capsys.readouterr()
    record = torch.load(tmp_path / "runs" / "cnf-t-none-s0" / "checkpoints" / "last.ckpt",
                        weights_only=True)["callbacks"]["ValidationRecord"]["history"]
    steps = [s for s, _ in record]
    best_step = min(record, key=lambda h: h[1])[0]
    # Three validations without a lower NLL after the best one, then the stop.
    assert steps[-1] == best_step + 15 < 2000
    assert (f"stopped:                    early, at step {steps[-1]}: no lower validation NLL "
            f"in the last 3 validations (best at step {best_step})") in captured.out
    assert f"best validation checkpoint, step {best_step}" in captured.out
    assert not np.isnan(printed(captured.out, "test NLL (nats):"))


def test_overfit_warning_fires_past_the_documented_margin():
    record = ValidationRecord()
    record.load_state_dict({"history": [[10, 4.0], [20, 3.0], [30, 3.5]]})
    assert overfit_margin(3.0) == 0.5 and record.overfit() is None  # 0.5 is not more than 0.5
    record.history.append((40, 3.6))
    assert "exceeds the best (3.0000 at step 20) by 0.6000 nats" in record.overfit()
    record.load_state_dict({"history": [[10, -40.0], [20, -38.5]]})  # 5 % of 40 is 2 nats
    assert record.overfit() is None
    record.history.append((30, float("nan")))
    assert record.overfit() is not None


class ScriptedValidation(L.LightningModule):
    """One weight trained by SGD; validation ``k`` logs ``val/nll = curve[k]``."""

    def __init__(self, curve, lr=1.0):
        super().__init__()
        self.curve, self.lr, self.k = list(curve), lr, 0
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w - 1.0).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/nll", float(self.curve[self.k]))

    def on_validation_epoch_end(self):
        self.k += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(1000, 1), batch_size=1)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(1, 1), batch_size=1)


class LearningRates(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


def fit_scripted(curve, patience, factor, steps, ckpt_path=None, root="."):
    drops, rates = LearningRateDrops(patience, factor), LearningRates()
    callbacks = [drops, rates, EarlyStopping("val/nll", patience=patience,
                                             check_on_train_epoch_end=False)]
    trainer = L.Trainer(max_steps=steps, val_check_interval=1, check_val_every_n_epoch=None,
                        num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, default_root_dir=root)
    model = ScriptedValidation(curve)
    trainer.fit(model, ckpt_path=ckpt_path)
    return drops, rates.seen, trainer


def test_learning_rate_drops_at_a_third_and_two_thirds_of_the_patience():
    # Patience 6: drops after 2 and 4 validations without a lower NLL, stop after 6. Validation
    # k follows step k + 1. The NLL goes lower at validations 0, 1 and 5; equal is not lower.
    curve = [5.0, 4.0, 4.0, 4.5, 4.1, 3.0, 3.5, 3.2, 3.0, 3.1, 3.9, 3.3, 3.3, 9.0]
    drops, rates, trainer = fit_scripted(curve, patience=6, factor=0.1, steps=100)
    # The first drop after validations 2 and 3 (step 4), then a lower NLL at validation 5 does
    # not undo it; the second after validations 6-9 (step 10); the stop after 6-11 (step 12).
    assert drops.drops == [(4, 2), (10, 4)]
    assert trainer.global_step == 12 and drops.wait == 6 and drops.best == 3.0
    assert rates == pytest.approx([1.0] * 4 + [0.1] * 6 + [0.01] * 2)


def test_learning_rate_drops_resume_where_they_stopped(tmp_path):
    curve = [5.0, 4.0, 4.0, 4.5, 4.1, 3.0, 3.5, 3.2, 3.0, 3.1, 3.9, 3.3, 3.3, 9.0]
    whole, rates, _ = fit_scripted(curve, patience=6, factor=0.5, steps=100)
    # Stopped after step 7 (one drop made, three validations since the best), then resumed.
    first, _, trainer = fit_scripted(curve, patience=6, factor=0.5, steps=7, root=tmp_path)
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    assert first.drops == [(4, 2)] and first.wait == 1
    saved = torch.load(path, weights_only=True)
    assert saved["callbacks"]["LearningRateDrops"] == {"best": 3.0, "wait": 1,
                                                       "drops": [[4, 2]]}
    resumed_model = ScriptedValidation(curve)
    resumed_model.k = 7  # the validations it had run
    resumed, rates_after = LearningRateDrops(6, 0.5), LearningRates()
    trainer = L.Trainer(max_steps=100, val_check_interval=1, check_val_every_n_epoch=None,
                        num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[resumed, rates_after,
                                   EarlyStopping("val/nll", patience=6,
                                                 check_on_train_epoch_end=False)])
    trainer.fit(resumed_model, ckpt_path=path)
    assert resumed.drops == whole.drops == [(4, 2), (10, 4)]
    assert rates[7:] == rates_after.seen  # the rate restored from the optimizer state, then dropped


# train.py on 8 Gaussians (tests/test_resume.py's launcher) with a validation every 2 steps and a
# high learning rate: the validation NLL stalls twice at step 22 and the rate halves there
# (patience 6: drops after 2 and 4 validations without a lower NLL, no stop within 30 steps).
DROP_FLAGS = ["--val-every", "2", "--limit-val-batches", "3", "--early-stop-patience", "6",
              "--lr-drop", "0.5", "--lr", "0.1"]


@pytest.fixture(scope="module")
def uninterrupted_drops(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("drops")
    full = launch(tmp, tmp / "full", SIGTERM_STEPS, DROP_FLAGS)
    assert full.returncode == 0, full.stderr[-2000:]
    return last_checkpoint(tmp / "full")


# SIGTERM mid-step 21 (stopped at 22, where the validation that drops the rate is due and
# skipped) and mid-step 25 (after the drop): the resumed run ends as the uninterrupted one.
@pytest.mark.slow  # five short train.py runs
@pytest.mark.parametrize("at", [21, 25])
def test_resume_keeps_the_learning_rate_drops(tmp_path, uninterrupted_drops, at):
    full = uninterrupted_drops
    assert callback_state(full, "LearningRateDrops")["drops"] == [[22, 2]]
    out = tmp_path / "killed"
    proc = launch(tmp_path, out, SIGTERM_STEPS, DROP_FLAGS, signal_at=("step", at, "SIGTERM"))
    assert proc.returncode == 143, proc.stderr[-2000:]
    resumed = launch(tmp_path, out, SIGTERM_STEPS, [*DROP_FLAGS, "--ckpt-path", "last"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    last = last_checkpoint(out)
    assert callback_state(last, "LearningRateDrops") == callback_state(full, "LearningRateDrops")
    lrs = [c["optimizer_states"][0]["param_groups"][0]["lr"] for c in (full, last)]
    assert lrs == [0.05, 0.05]
    for key in full["state_dict"]:
        torch.testing.assert_close(full["state_dict"][key], last["state_dict"][key], rtol=1e-5,
                                   atol=1e-6, msg=key)


def test_the_presets_drop_the_learning_rate_and_the_flag_checks_its_value(tmp_path):
    assert resolve({"data": "power"}).training.lr_drop == 0.1
    assert resolve({"data": "checkerboard"}).training.lr_drop == 1.0  # no patience: off
    with pytest.raises(ConfigError, match=r"--lr-drop must be in \(0, 1\] \(1: off\), got 2.0"):
        resolve({"lr_drop": 2.0})
    table = overfitting_table(tmp_path / "t.npy")
    for extra, points in (({}, [(6, 13)]), ({"lr_drop": 1.0}, []),
                          ({"early_stop_patience": 0}, [])):
        run = build(resolve({"data": str(table), "output_dir": str(tmp_path), "logger": "none",
                             **extra}))
        drops = [c for c in run.trainer.callbacks if isinstance(c, LearningRateDrops)]
        assert [(d.points, d.factor) for d in drops] == [(p, 0.1) for p in points]


def test_learning_rate_drops_refuse_bad_settings():
    with pytest.raises(ValueError, match=r"factor must be a number in \(0, 1\], got 2"):
        LearningRateDrops(30, 2)
    with pytest.raises(ValueError, match="patience must be a positive int, got 0"):
        LearningRateDrops(0)


class SaveEveryValidation(L.Callback):
    """Keeps the weights of every validation, for the oracle below."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            torch.save(pl_module.state_dict(), self.folder / f"{trainer.global_step}.pt")


# The check: on a few-hundred-row table that overfits, the printed test NLL of a run with
# the table's defaults (its preset's network, learning rate, patience, learning-rate drops and
# validation cadence, and the split's validation and test shares) is within 0.1 nats of the
# lowest test NLL among the weights of all its validations, and the summary names what it tested.
# Only the solver tolerances are looser. The table: 300 rows of a 6-D Gaussian mixture
# (benchmarks.tables), three mixtures (seeds of the generator); 180 / 60 / 60 rows.
# Measured (seeds 0, 1, 2): the best validation checkpoint tests 0.041, 0.052 and 0.054 nats above
# the lowest test NLL; the validation NLL rose after its minimum (by 0.07 to 0.28 nats; mild
# overfitting), and the runs stopped early at steps 400, 830 and 490. The drops keep the last
# weights near the best here (0.038, 0.033 and 0.006 nats above the lowest), so forcing
# --test-ckpt last does not fail this test; testing the worst validation instead of the best
# does (checked by hand: ModelCheckpoint mode "max").
# On the thin 2-D manifold of write_manifold (300 rows, 6 columns) the target is not met: the
# validation NLL kept falling while the test NLL rose to 10 nats above its lowest, carried by a
# few test rows off what the flow learnt (gaps 10.30, 0.47, 0.79 with the same defaults).
@pytest.mark.slow  # one to two minutes of CPU per table
@pytest.mark.parametrize("table_seed", [0, 1, 2])
def test_the_printed_test_nll_is_the_best_validation_models(tmp_path, capsys, table_seed):
    table = tmp_path / "t.npy"
    write_mixture_table(table, rows=300, dim=6, seed=table_seed)
    code = train.main(["--data", str(table), "--atol", "1e-3", "--rtol", "1e-3",
                       "--eval-atol", "1e-4", "--eval-rtol", "1e-4", "--accelerator", "cpu",
                       "--logger", "none", "--reg", "none",
                       "--output-dir", str(tmp_path / "runs")],
                      callbacks=[SaveEveryValidation(tmp_path / "every")])
    assert code == 0
    captured = capsys.readouterr()
    printed_nll = printed(captured.out, "test NLL (nats):")
    folder = tmp_path / "runs" / "cnf-t-none-s0" / "checkpoints"
    model = CNFDensityEstimator.load_from_checkpoint(folder / "best.ckpt")
    dm = UserTableDataModule(table, batch_size=512)
    tester = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                       enable_model_summary=False)
    oracle = {}
    for path in (tmp_path / "every").iterdir():
        model.load_state_dict(torch.load(path, weights_only=True))
        oracle[int(path.stem)] = tester.test(model, dm, verbose=False)[0]["test/nll"]
    steps = sorted(oracle)
    curve = {s: round(oracle[s], 3) for s in steps}
    assert len(steps) >= 5 and steps[1] - steps[0] == 10, curve  # 180 train rows: every 10
    # The run stopped because the validation NLL no longer went lower.
    best_val, last_val = re.search(r"validation NLL \(nats\):\s+best (-?[\d.]+) at step \d+, "
                                   r"last (-?[\d.]+)", captured.out).groups()
    assert float(last_val) > float(best_val), captured.out
    assert printed_nll <= min(oracle.values()) + 0.1, (printed_nll, curve)
    best_step = int(re.search(r"best validation checkpoint, step (\d+)", captured.out).group(1))
    assert printed_nll == pytest.approx(oracle[best_step], abs=1e-4)
    assert "stopped:                    early" in captured.out
