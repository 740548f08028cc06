"""The regularizer callback on our model and on a plain user LightningModule."""

import lightning as L
import pytest
import torch
from polyreg_cnf.callbacks import NFEMonitor, PolynomialTrajectoryRegularizer
from polyreg_cnf.datamodules.toy import ToyDataModule
from torch import nn

from polyreg_cnf import ODEBlock, SolverConfig, collect_nfe
from polyreg_cnf.models import CNFDensityEstimator


def small_model(**kw):
    solver = SolverConfig(atol=1e-3, rtol=1e-3, eval_atol=1e-4, eval_rtol=1e-4,
                          adjoint=kw.pop("adjoint", True))
    return CNFDensityEstimator(2, hidden_dims=[16, 16], solver=solver, **kw)


def small_data():
    return ToyDataModule("8gaussians", num_train=256, num_val=64, num_test=64, batch_size=64)


def trainer(callbacks, **kw):
    kw.setdefault("max_steps", 3)
    return L.Trainer(callbacks=callbacks, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, accelerator="cpu", **kw)


class LossSpy(L.Callback):
    """Records the loss Lightning backpropagates and the raw penalty at that moment."""

    def __init__(self, reg):
        self.reg = reg
        self.losses, self.penalties, self.returned = [], [], []

    def on_before_backward(self, trainer, pl_module, loss):
        self.losses.append(loss.detach().clone())
        raw = self.reg.raw_penalty(pl_module) if self.reg else None
        self.penalties.append(None if raw is None else raw.detach().clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if outputs and "loss" in outputs:
            self.returned.append(outputs["loss"].detach().clone())


class NLLSpy(CNFDensityEstimator):
    """Our model, remembering the NLL its own training_step returned."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.seen = getattr(self, "seen", []) + [loss.detach().clone()]
        return loss


@pytest.mark.parametrize("accumulate", [1, 2])
def test_loss_changes_by_exactly_coef_times_penalty_with_one_backward(accumulate):
    L.seed_everything(0)
    reg = PolynomialTrajectoryRegularizer(coef=3.0, num_samples=2, order=1)
    spy = LossSpy(reg)
    model = NLLSpy(2, hidden_dims=[16, 16], solver=SolverConfig(atol=1e-3, rtol=1e-3))
    trainer([reg, spy], max_steps=2, accumulate_grad_batches=accumulate).fit(model, small_data())
    batches = 2 * accumulate
    assert len(spy.losses) == batches  # exactly one backward per batch
    assert len(model.seen) == batches
    for loss, nll, pen in zip(spy.losses, model.seen, spy.penalties):
        assert pen is not None and pen.item() > 0
        expected = (nll + 3.0 * pen) / accumulate  # Lightning scales for accumulation
        torch.testing.assert_close(loss, expected)
    assert reg.steps == batches


def test_without_callback_the_loss_is_the_nll():
    L.seed_everything(0)
    spy = LossSpy(None)
    model = NLLSpy(2, hidden_dims=[16, 16], solver=SolverConfig(atol=1e-3, rtol=1e-3))
    trainer([spy], max_steps=2).fit(model, small_data())
    for loss, nll in zip(spy.losses, model.seen):
        torch.testing.assert_close(loss, nll)


def test_penalty_logged_and_never_active_outside_training_steps():
    L.seed_everything(0)

    class Probe(L.Callback):
        active = []

        def _check(self, pl_module):
            self.active.append(any(b._poly is not None for b in
                                   pl_module.flow.blocks))

        def on_validation_batch_start(self, trainer, pl_module, *args):
            self._check(pl_module)

        def on_test_batch_start(self, trainer, pl_module, *args):
            self._check(pl_module)

    reg = PolynomialTrajectoryRegularizer()
    model = small_model()
    t = trainer([reg, Probe()], max_steps=4, val_check_interval=2)
    t.fit(model, small_data())
    assert "reg/poly" in t.callback_metrics
    assert t.callback_metrics["reg/poly"].item() > 0
    t.test(model, small_data(), verbose=False)
    assert Probe.active and not any(Probe.active)
    # the training_step wrapper is gone once fit ends
    assert "training_step" not in model.__dict__


def test_validation_loss_is_unchanged_by_the_callback():
    def val_nll(callbacks):
        L.seed_everything(0)
        model = small_model()
        dm = small_data()
        t = trainer(callbacks, max_steps=1)
        return t.validate(model, dm, verbose=False)[0]["val/nll"]

    assert val_nll([PolynomialTrajectoryRegularizer()]) == val_nll([])


def test_state_is_saved_in_checkpoints_and_restored(tmp_path):
    L.seed_everything(0)
    reg = PolynomialTrajectoryRegularizer(coef=2.0, num_samples=3, order=2)
    model = small_model()
    t = trainer([reg], max_steps=2)
    t.fit(model, small_data())
    path = tmp_path / "a.ckpt"
    t.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["callbacks"]
    (saved,) = [v for k, v in state.items() if "PolynomialTrajectoryRegularizer" in k]
    assert saved == {"coef": 2.0, "steps": 2, "num_samples": 3, "order": 2}
    reg2 = PolynomialTrajectoryRegularizer(coef=2.0, num_samples=3, order=2)
    trainer([reg2], max_steps=3).fit(small_model(), small_data(), ckpt_path=path)
    assert reg2.steps == 3


@pytest.mark.parametrize("kwargs,match", [
    (dict(coef=-1.0), "coef must be a finite number >= 0, got -1.0"),
    (dict(coef=float("nan")), "coef must be"),
    (dict(num_samples=1, order=2), "num_samples must be >= order"),
    (dict(order=-1), "order must be a non-negative int, got -1"),
    (dict(num_samples=2.5), "num_samples must be a non-negative int"),
])
def test_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolynomialTrajectoryRegularizer(**kwargs)


def test_module_without_ode_blocks_is_rejected_clearly():
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.lin(batch[0]).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="found no ODE block in Plain"):
        trainer([PolynomialTrajectoryRegularizer()]).fit(Plain(), small_data())


# ---------------------------------------------------------------------------------------------
# A user's own Lightning project: a neural-ODE regressor. The only change needed for the
# callback is that the ODE is solved by polyreg_cnf.ODEBlock instead of a bare odeint call.
class Dynamics(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2))

    def forward(self, t, y):
        return self.mlp(y)


class NeuralODERegressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        # was: self.func = Dynamics(); ... odeint(self.func, x, torch.tensor([0., 1.]))[-1]
        self.ode = ODEBlock(Dynamics(), T=1.0, solver=SolverConfig(atol=1e-3, rtol=1e-3))
        self.head = nn.Linear(2, 1)

    def forward(self, x):
        return self.head(self.ode(x)).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train/mse", loss)
        return {"loss": loss, "mse": loss.detach()}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def regression_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 2, generator=g)
    y = torch.sin(x[:, 0]) * x[:, 1]
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)


def test_callback_works_on_a_plain_user_module_returning_a_dict():
    L.seed_everything(0)
    reg = PolynomialTrajectoryRegularizer(coef=5.0)
    spy = LossSpy(reg)
    model = NeuralODERegressor()
    t = trainer([reg, spy, NFEMonitor()], max_steps=4)
    t.fit(model, regression_data())
    for loss, returned, pen in zip(spy.losses, spy.returned, spy.penalties):
        assert pen.item() > 0
        torch.testing.assert_close(loss, returned)
    assert t.callback_metrics["nfe/forward"].item() >= 8
    assert t.callback_metrics["nfe/backward"].item() > 0


def test_regularizer_straightens_the_user_trajectories():
    """Trained with a heavy penalty, trajectories end up straighter than without it."""
    def curvature(coef):
        L.seed_everything(1)
        model = NeuralODERegressor()
        cbs = [PolynomialTrajectoryRegularizer(coef=coef)] if coef else []
        trainer(cbs, max_steps=25).fit(model, regression_data())
        model.ode.start_trajectory_penalty(4, 1)
        x = next(iter(regression_data()))[0]
        torch.manual_seed(3)
        model.ode(x)
        return model.ode.trajectory_penalty().item()

    assert curvature(50.0) < 0.5 * curvature(0.0)


class ManualRegressor(NeuralODERegressor):
    def __init__(self, reg=None):
        super().__init__()
        self.automatic_optimization = False
        self.reg = reg

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        if self.reg is not None:
            loss = loss + self.reg.penalty(self)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def test_manual_optimization_uses_the_public_penalty_method():
    L.seed_everything(0)
    reg = PolynomialTrajectoryRegularizer()
    spy = LossSpy(reg)
    trainer([reg, spy], max_steps=2).fit(ManualRegressor(reg), regression_data())
    assert reg.steps == 2 and all(p.item() > 0 for p in spy.penalties)


def test_manual_optimization_warns_when_the_penalty_is_never_added():
    L.seed_everything(0)
    reg = PolynomialTrajectoryRegularizer()
    with pytest.warns(UserWarning, match="never added to the loss"):
        trainer([reg], max_steps=1).fit(ManualRegressor(None), regression_data())


def test_nfe_monitor_logs_training_and_evaluation_counts():
    L.seed_everything(0)
    mon = NFEMonitor()
    model = small_model()
    t = trainer([mon], max_steps=2, val_check_interval=2)
    t.fit(model, small_data())
    m = t.callback_metrics
    for key in ("nfe/forward", "nfe/backward", "nfe/total", "nfe/block_0/forward",
                "solver/accepted_steps", "solver/rejected_steps", "time/step_seconds", "val/nfe"):
        assert key in m, key
    assert m["nfe/total"].item() == m["nfe/forward"].item() + m["nfe/backward"].item()
    assert m["val/nfe"].item() >= 8
    s = mon.summary()
    assert s["steps"] == 2 and s["forward_mean"] >= 8 and s["backward_mean"] > 0
    assert collect_nfe(model)["forward"] > 0


def test_kinetic_regularizer_adds_its_weighted_terms():
    from polyreg_cnf.callbacks import KineticRegularizer

    L.seed_everything(0)
    reg = KineticRegularizer(kinetic_coef=0.5, jacobian_coef=0.25)
    spy = LossSpy(reg)
    model = NLLSpy(2, hidden_dims=[16, 16], solver=SolverConfig(atol=1e-3, rtol=1e-3))
    trainer([reg, spy], max_steps=2).fit(model, small_data())
    for loss, nll, pen in zip(spy.losses, model.seen, spy.penalties):
        assert pen.item() > 0
        torch.testing.assert_close(loss, nll + pen)
    with pytest.raises(ValueError, match="kinetic_coef must be a finite number >= 0"):
        KineticRegularizer(kinetic_coef=-1)
