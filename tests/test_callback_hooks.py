"""The callbacks as Lightning's own are written: documented hooks only, abstract methods
enforced, hooks marked @override, per-step metrics in one logger row per step."""

import importlib
import inspect

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins import MixedPrecision
from polyreg_cnf.callbacks import NFEMonitor, PolynomialTrajectoryRegularizer
from polyreg_cnf.callbacks.loss_term import LossTermCallback
from polyreg_cnf.datamodules.toy import ToyDataModule
from torch import nn

from polyreg_cnf import ODEBlock, SolverConfig
from polyreg_cnf.models import CNFDensityEstimator


# ------------------------------------------------------------------------------ abstract base
def test_loss_term_callback_cannot_be_built_without_its_abstract_methods():
    with pytest.raises(TypeError, match="abstract"):
        LossTermCallback(1.0)

    class Partial(LossTermCallback):
        def make_observer(self, pl_module):
            return None

    with pytest.raises(TypeError, match="terms"):
        Partial(1.0)


# ------------------------------------------------------------------------------ @override
HOOK_MODULES = ["polyreg_cnf.callbacks.backprop", "polyreg_cnf.callbacks.guard",
                "polyreg_cnf.callbacks.kinetic", "polyreg_cnf.callbacks.loss_term",
                "polyreg_cnf.callbacks.nfe_monitor", "polyreg_cnf.callbacks.polynomial",
                "polyreg_cnf.models.system", "polyreg_cnf.models.density",
                "polyreg_cnf.models.vae", "polyreg_cnf.app.run_logging"]
LIGHTNING_BASES = (L.Callback, L.LightningModule, TQDMProgressBar)


def test_every_lightning_hook_the_project_implements_is_marked_override():
    unmarked, checked = [], 0
    for name in HOOK_MODULES:
        module = importlib.import_module(name)
        for cls in vars(module).values():
            if not (inspect.isclass(cls) and cls.__module__ == name
                    and issubclass(cls, LIGHTNING_BASES)):
                continue
            bases = [b for b in cls.__mro__[1:] if b.__module__.startswith("lightning")]
            for attr, value in vars(cls).items():
                if (callable(value) and not attr.startswith("_")
                        and any(attr in vars(b) for b in bases)):
                    checked += 1
                    if not getattr(value, "__override__", False):
                        unmarked.append(f"{name}.{cls.__name__}.{attr}")
    assert checked > 30
    assert unmarked == []


# ------------------------------------------------------------------------------ the loss term
class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, t, y):
        return self.mlp(y)


class Regressor(L.LightningModule):
    """A user's neural ODE; with ``by_hand`` its training_step adds the penalty itself."""

    def __init__(self, reg=None, by_hand=False):
        super().__init__()
        self.ode = ODEBlock(Field(), solver=SolverConfig(atol=1e-4, rtol=1e-4, backprop="direct"))
        self.head = nn.Linear(2, 1)
        self.reg, self.by_hand = reg, by_hand

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.head(self.ode(x)).squeeze(-1), y)
        return loss + self.reg.penalty(self) if self.by_hand else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def regression_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g)
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, torch.sin(x[:, 0]) * x[:, 1]), batch_size=16)


class Grads(L.Callback):
    def __init__(self):
        self.grads, self.replaced = [], []

    def on_after_backward(self, trainer, pl_module):
        self.grads.append([p.grad.clone() for p in pl_module.parameters()])
        self.replaced.append("training_step" in vars(pl_module))


@pytest.mark.parametrize("accumulate,amp", [(1, False), (2, False), (2, True)])
def test_penalty_gradient_is_bit_for_bit_that_of_adding_it_in_training_step(accumulate, amp):
    """With gradient accumulation, and under float16 AMP with a loss scaler (on the CPU)."""
    def run(by_hand):
        L.seed_everything(0)
        reg = PolynomialTrajectoryRegularizer(coef=5.0, num_samples=2, seed=3)
        spy = Grads()
        model = Regressor(reg, by_hand)
        plugins = [MixedPrecision("16-mixed", "cpu",
                                  scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))] \
            if amp else []
        L.Trainer(callbacks=[reg, spy], max_steps=2, accumulate_grad_batches=accumulate,
                  plugins=plugins, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False,
                  accelerator="cpu").fit(model, regression_data())
        return spy, reg

    hook, reg = run(by_hand=False)
    hand, _ = run(by_hand=True)
    assert len(hook.grads) == len(hand.grads) == 2 * accumulate and reg.steps == 2 * accumulate
    for ours, theirs in zip(hook.grads, hand.grads):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert not any(hook.replaced)  # the user's training_step was never replaced


# ------------------------------------------------------------------------------ step metrics
class Rows(Logger):
    """Records every log_metrics call."""

    def __init__(self):
        super().__init__()
        self.rows = []

    name, version = "rows", 0

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def fit_density(monkeypatch, **trainer_kw):
    calls = []
    real_log = L.LightningModule.log

    def counting_log(self, name, *args, **kwargs):
        if self.trainer.training:
            calls.append(name)
        return real_log(self, name, *args, **kwargs)

    monkeypatch.setattr(L.LightningModule, "log", counting_log)
    L.seed_everything(0)
    logger, monitor = Rows(), NFEMonitor()
    model = CNFDensityEstimator(2, hidden_dims=[16], solver=SolverConfig(atol=1e-3, rtol=1e-3))
    trainer_kw.setdefault("max_steps", 4)
    t = L.Trainer(callbacks=[monitor, PolynomialTrajectoryRegularizer()], logger=logger,
                  enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, accelerator="cpu", **trainer_kw)
    t.fit(model, ToyDataModule("8gaussians", num_train=256, num_val=64, num_test=64,
                               batch_size=32))
    return t, logger.rows, calls, monitor


def test_per_step_metrics_reach_each_logger_in_one_row_per_step(monkeypatch):
    t, rows, calls, monitor = fit_density(monkeypatch, log_every_n_steps=1,
                                          limit_val_batches=0)
    assert calls == []  # no LightningModule.log call in a training batch
    assert [step for step, _ in rows] == [0, 1, 2, 3]
    names = {"train/nll", "train/loss", "reg/poly", "nfe/forward", "nfe/backward", "nfe/total",
             "nfe/block_0/forward", "solver/accepted_steps", "time/step_seconds", "epoch"}
    assert all(names <= set(row) for _, row in rows)
    assert [row["nfe/forward"] for _, row in rows] == [float(h[0]) for h in monitor.history]
    last = rows[-1][1]
    assert t.callback_metrics["reg/poly"].item() == pytest.approx(last["reg/poly"])
    assert t.progress_bar_metrics["nfe/forward"] == last["nfe/forward"]


def test_step_rows_follow_lightnings_cadence_and_accumulation(monkeypatch):
    _, rows, _, _ = fit_density(monkeypatch, log_every_n_steps=2, limit_val_batches=0)
    assert [step for step, _ in rows] == [1, 3]
    _, rows, _, _ = fit_density(monkeypatch, max_steps=2, accumulate_grad_batches=2,
                                log_every_n_steps=1, limit_val_batches=0)
    assert [step for step, _ in rows] == [0, 1]  # one row per optimizer step


def test_wall_seconds_per_step_leave_evaluations_out(monkeypatch):
    _, _, _, monitor = fit_density(monkeypatch, val_check_interval=2, limit_val_batches=1)
    # batch starts 0, 1 | validation | 2, 3: the interval holding the validation is left out
    assert len(monitor.intervals) == 2
    summary = monitor.summary()
    assert summary["wall_seconds_mean"] >= summary["seconds_mean"] * 0.5 > 0
