"""The regularizer callback on our model and on a plain user LightningModule."""

import importlib

import lightning as L
import numpy as np
import pytest
import torch
from polyreg_cnf.callbacks import NFEMonitor, PolynomialTrajectoryRegularizer
from polyreg_cnf.datamodules.toy import ToyDataModule
from torch import nn

from polyreg_cnf import ODEBlock, SolverConfig, TrajectoryRecorder, collect_nfe
from polyreg_cnf.engine.observers import active
from polyreg_cnf.engine.ode import ode_blocks
from polyreg_cnf.models import CNFDensityEstimator


def small_model(**kw):
    solver = SolverConfig(atol=1e-3, rtol=1e-3, eval_atol=1e-4, eval_rtol=1e-4,
                          backprop="adjoint" if kw.pop("adjoint", True) else "direct")
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


def polyfit_penalty(t, z, order):
    """Reference: numpy.polyfit residuals summed over samples and dims, divided by n * B."""
    n, batch = z.shape[:2]
    flat = z.reshape(n, -1)
    residuals = [np.polyval(np.polyfit(t, flat[:, j], order), t) - flat[:, j]
                 for j in range(flat.shape[1])]
    return float(np.square(residuals).sum()) / (n * batch)


class PenaltySpy:
    """Records every (t, z, order) the engine hands to the penalty, wherever it computes it."""

    MODULES = ("polyreg_cnf.engine.recording",)

    def __init__(self, monkeypatch):
        from polyreg_cnf.engine.penalty import trajectory_polynomial_penalty

        self.records = []

        def spy(t, z, order=1):
            self.records.append((t.detach().double().numpy(), z.detach().double().numpy(), order))
            return trajectory_polynomial_penalty(t, z, order)

        for name in self.MODULES:
            monkeypatch.setattr(importlib.import_module(name), "trajectory_polynomial_penalty",
                                spy)

    def take(self):
        """Sum of the numpy reference penalties recorded since the last call, and their count."""
        records, self.records = self.records, []
        return sum(polyfit_penalty(*r) for r in records), len(records)


class NLLSpy(CNFDensityEstimator):
    """Our model, remembering the NLL its own training_step returned."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.seen = getattr(self, "seen", []) + [loss.detach().clone()]
        return loss


@pytest.mark.parametrize("accumulate", [1, 2])
def test_loss_changes_by_exactly_coef_times_penalty_with_one_backward(accumulate, monkeypatch):
    """loss = (nll + coef * penalty) / accumulate, the penalty recomputed here with
    numpy.polyfit from the trajectory the block recorded (not through the code under test)."""
    L.seed_everything(0)
    recorder = PenaltySpy(monkeypatch)
    reg = PolynomialTrajectoryRegularizer(coef=3.0, num_samples=2, order=1)

    class PolyfitSpy(LossSpy):
        def on_before_backward(self, trainer, pl_module, loss):
            super().on_before_backward(trainer, pl_module, loss)
            self.penalties[-1] = recorder.take()

    spy = PolyfitSpy(reg)
    model = NLLSpy(2, hidden_dims=[16, 16], solver=SolverConfig(atol=1e-3, rtol=1e-3))
    trainer([reg, spy], max_steps=2, accumulate_grad_batches=accumulate).fit(model, small_data())
    batches = 2 * accumulate
    # exactly one backward per batch
    assert len(spy.losses) == len(model.seen) == len(spy.penalties) == batches
    for loss, nll, (pen, recorded) in zip(spy.losses, model.seen, spy.penalties):
        assert recorded == len(ode_blocks(model)) >= 1 and pen > 0
        expected = (nll.double() + 3.0 * pen) / accumulate  # Lightning scales for accumulation
        np.testing.assert_allclose(loss.item(), expected.item(), rtol=1e-5)
        assert 3.0 * pen / accumulate > 20 * 1e-5 * abs(loss.item())  # 20x the tolerance
    assert reg.steps == batches


def test_without_callback_the_loss_is_the_nll():
    L.seed_everything(0)
    spy = LossSpy(None)
    model = NLLSpy(2, hidden_dims=[16, 16], solver=SolverConfig(atol=1e-3, rtol=1e-3))
    trainer([spy], max_steps=2).fit(model, small_data())
    assert len(spy.losses) == len(model.seen) == 2
    for loss, nll in zip(spy.losses, model.seen):
        torch.testing.assert_close(loss, nll)


def test_penalty_logged_and_never_active_outside_training_steps():
    L.seed_everything(0)

    class Probe(L.Callback):
        active = []

        def _check(self, pl_module):
            self.active.append(active(TrajectoryRecorder) is not None)

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
    generator = saved.pop("generator")  # the interior times' stream (tests/test_attach.py)
    assert torch.equal(generator, reg.generator.get_state())
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

    # the drop-in odeint may still be called in training_step: the first step decides
    with pytest.raises(ValueError, match="found no ODE solve to regularize in the first training "
                                         "step of Plain.*from polyreg_cnf import odeint.*"
                                         "intercept_torchdiffeq=True"):
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
    assert len(spy.losses) == len(spy.returned) == len(spy.penalties) == 4
    for loss, returned, pen in zip(spy.losses, spy.returned, spy.penalties):
        assert pen.item() > 0
        # outputs["loss"] is the module's own loss (Lightning copies it before the
        # on_before_backward hook); the backpropagated loss carries the penalty, exactly
        assert torch.equal(loss, returned + 5.0 * pen)
    assert t.callback_metrics["nfe/forward"].item() >= 8
    # backprop="auto" (the default) measured on the first step and chose direct backprop
    assert t.callback_metrics["nfe/backward"].item() == 0
    assert model.ode.backprop_decision.choice == "direct"


def test_regularizer_straightens_the_user_trajectories():
    """Trained with a heavy penalty, trajectories end up straighter than without it."""
    def curvature(coef):
        L.seed_everything(1)
        model = NeuralODERegressor()
        cbs = [PolynomialTrajectoryRegularizer(coef=coef)] if coef else []
        trainer(cbs, max_steps=25).fit(model, regression_data())
        x = next(iter(regression_data()))[0]
        torch.manual_seed(3)
        with TrajectoryRecorder(4, 1) as recorder:
            model.ode(x)
        return recorder.penalty().item()

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
    assert reg.steps == 2 and len(spy.penalties) == 2
    assert all(p.item() > 0 for p in spy.penalties)


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

    class TermSpy(LossSpy):
        """The solves' unweighted (kinetic, Jacobian) integrals, read from the recorder."""

        def on_before_backward(self, trainer, pl_module, loss):
            super().on_before_backward(trainer, pl_module, loss)
            self.penalties[-1] = [(k.item(), j.item()) for k, j in reg.observer.terms]

    spy = TermSpy(reg)
    model = NLLSpy(2, hidden_dims=[16, 16], solver=SolverConfig(atol=1e-3, rtol=1e-3))
    trainer([reg, spy], max_steps=2).fit(model, small_data())
    assert len(spy.losses) == len(model.seen) == len(spy.penalties) == 2
    for loss, nll, terms in zip(spy.losses, model.seen, spy.penalties):
        assert terms and all(t is not None for t in terms)
        kinetic = sum(t[0] for t in terms)
        jacobian = sum(t[1] for t in terms)
        assert kinetic > 0 and jacobian > 0
        # the weights are applied here, by hand: kinetic_coef * K + jacobian_coef * J
        expected = float(nll) + 0.5 * kinetic + 0.25 * jacobian
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
        # and swapped weights would be told apart
        assert abs(0.25 * kinetic + 0.5 * jacobian - (0.5 * kinetic + 0.25 * jacobian)) > \
            1e-4 * abs(expected)
    with pytest.raises(ValueError, match="kinetic_coef must be a finite number >= 0"):
        KineticRegularizer(kinetic_coef=-1)


def test_start_step_leaves_the_loss_alone_before_it_and_adds_the_penalty_from_it():
    from polyreg_cnf.engine.observers import active

    class Steps(L.Callback):
        def __init__(self):
            self.rows = []

        def on_before_backward(self, trainer, pl_module, loss):
            self.rows.append((trainer.global_step, loss.item(), pl_module.seen[-1].item(),
                              active(TrajectoryRecorder) is not None))

    L.seed_everything(0)
    reg = PolynomialTrajectoryRegularizer(coef=5.0, start_step=2)
    spy = Steps()
    model = NLLSpy(2, hidden_dims=[16, 16], solver=SolverConfig(atol=1e-3, rtol=1e-3))
    trainer([reg, spy], max_steps=4).fit(model, small_data())
    assert [r[0] for r in spy.rows] == [0, 1, 2, 3]
    for step, loss, nll, recording in spy.rows:
        assert recording == (step >= 2)
        if step < 2:
            assert loss == nll  # exactly the model's own loss: nothing drawn, nothing added
        else:
            assert loss > nll
    assert reg.steps == 2 and reg.settings()["start_step"] == 2
    with pytest.raises(ValueError, match="start_step must be a non-negative int"):
        PolynomialTrajectoryRegularizer(start_step=-1)
