"""Attaching the regularizer to existing torchdiffeq models: drop-in odeint and zero-change mode.

Two small models of common public designs stand in for a user's project:
- a latent-ODE VAE whose decoder calls ``odeint_adjoint(self.net, (z, t), torch.tensor([0., 1.]))``
  (a tuple state; time rescaled so s = 1 reaches each sample's observation time t);
- a trajectory model whose forward calls ``odeint(self.func, x0, t)`` on a 5-point observation
  grid, with a loss on every time point.
Each runs unchanged ("torchdiffeq", or "module" for ``torchdiffeq.odeint(...)`` calls) with
``intercept_torchdiffeq=True``, and with the one-line import change ("dropin").
"""

import os
import signal
import sys

import lightning as L
import pytest
import torch
import torchdiffeq
from polyreg_cnf.callbacks import NFEMonitor, PolynomialTrajectoryRegularizer
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

from polyreg_cnf import ODEBlock, SolverConfig, sample_penalty_times, trajectory_polynomial_penalty
from polyreg_cnf import odeint as pr_odeint
from polyreg_cnf import odeint_adjoint as pr_odeint_adjoint
from polyreg_cnf.engine import NFECounter, TrajectoryRecorder, record_nfe

GRID = torch.linspace(0.0, 1.0, 5)
A = torch.tensor([[-0.1, 1.0], [-1.0, -0.1]])


def real():
    """torchdiffeq itself (the test module's own names are rebound while intercepting)."""
    return sys.modules["torchdiffeq"]


# --------------------------------------------------------------------------------- user models
class LatentDynamics(nn.Module):
    """dz/ds = t f(z), dt/ds = 0: s in [0, 1] reaches each sample's own time t."""

    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
        self.nfe = 0  # users keep their own counter on the function object

    def forward(self, s, state):
        z, t = state
        self.nfe += 1
        return t * self.f(z), torch.zeros_like(t)


class LatentODEVAE(L.LightningModule):
    def __init__(self, how="torchdiffeq", fail_at=None):
        super().__init__()
        self.encoder = nn.Linear(3, 4)
        self.net = LatentDynamics()
        self.readout = nn.Linear(2, 2)
        self.how = how
        self.fail_at = fail_at
        self.solutions, self.raw_losses, self.val_checks = [], [], []

    def decode(self, z, t):
        if self.how == "dropin":
            sol = pr_odeint_adjoint(self.net, (z, t), torch.tensor([0.0, 1.0]))
        else:
            sol = odeint_adjoint(self.net, (z, t), torch.tensor([0.0, 1.0]))
        return sol

    def loss(self, batch):
        x0, t, x1 = batch
        mean, logvar = self.encoder(torch.cat([x0, t], 1)).chunk(2, 1)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()  # the global RNG
        sol = self.decode(z, t)
        recon = (self.readout(sol[0][-1]) - x1).square().sum(1).mean()
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).sum(1).mean()
        return recon + kl, sol

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise self.fail_at_error
        loss, sol = self.loss(batch)
        self.solutions.append(tuple(s.detach().clone() for s in sol))
        self.raw_losses.append(loss.detach().clone())
        return loss

    def validation_step(self, batch, batch_idx):
        x0, t, x1 = batch
        z = self.encoder(torch.cat([x0, t], 1)).chunk(2, 1)[0]
        sol = self.decode(z, t)
        with torch.no_grad():
            ref = real().odeint_adjoint(self.net, (z, t), torch.tensor([0.0, 1.0]))
        self.val_checks.append(all(torch.equal(a, b) for a, b in zip(sol, ref)))
        self.log("val/loss", (self.readout(sol[0][-1]) - x1).square().mean())

    test_step = validation_step

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
        self.nfe = 0

    def forward(self, t, x):
        self.nfe += 1
        return self.mlp(x)


class TrajectoryModel(L.LightningModule):
    def __init__(self, how="torchdiffeq", grid=GRID, noise=0.0, fail_at=None):
        super().__init__()
        self.func = Field()
        self.net = self.func  # the NFE bookkeeping below reads model.net.nfe for both designs
        self.how = how
        self.grid = grid
        self.noise = noise
        self.fail_at = fail_at
        self.solutions, self.raw_losses, self.val_checks = [], [], []

    def forward(self, x0):
        if self.how == "dropin":
            return pr_odeint(self.func, x0, self.grid)
        if self.how == "module":
            return torchdiffeq.odeint(self.func, x0, self.grid)
        return odeint(self.func, x0, self.grid)

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise self.fail_at_error
        x0, ys = batch
        if self.noise:
            x0 = x0 + self.noise * torch.randn_like(x0)  # the global RNG
        pred = self(x0)
        loss = (pred - ys.transpose(0, 1)).square().mean()  # every observation time
        self.solutions.append((pred.detach().clone(),))
        self.raw_losses.append(loss.detach().clone())
        return loss

    def validation_step(self, batch, batch_idx):
        x0, ys = batch
        pred = self(x0)
        with torch.no_grad():
            ref = real().odeint(self.func, x0, self.grid)
        self.val_checks.append(torch.equal(pred, ref))
        self.log("val/loss", (pred - ys.transpose(0, 1)).square().mean())

    test_step = validation_step

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


MODELS = {"latent": LatentODEVAE, "trajectory": TrajectoryModel}


def data(design, n=16, batch_size=8):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, 2, generator=g)
    if design == "latent":
        t = 0.5 + torch.rand(n, 1, generator=g)
        x1 = torch.stack([torch.linalg.matrix_exp(ti * A) @ xi for ti, xi in zip(t[:, 0], x0)])
        ds = torch.utils.data.TensorDataset(x0, t, x1)
    else:
        ys = torch.stack([x0 @ torch.linalg.matrix_exp(s * A).T for s in GRID], dim=1)
        ds = torch.utils.data.TensorDataset(x0, ys)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size)


def make(design, how, **kw):
    L.seed_everything(0)
    return MODELS[design](how=how, **kw)


def trainer(callbacks, max_steps=2, **kw):
    kw.setdefault("limit_val_batches", 0)
    return L.Trainer(callbacks=callbacks, max_steps=max_steps, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu", **kw)


class Spy(L.Callback):
    """The loss Lightning backpropagates, the raw penalty then, and the first step's gradients."""

    def __init__(self, reg=None):
        self.reg = reg
        self.losses, self.penalties, self.grads, self.val_penalties = [], [], [], []

    def on_before_backward(self, trainer, pl_module, loss):
        self.losses.append(loss.detach().clone())
        raw = None if self.reg is None else self.reg.raw_penalty(pl_module)
        self.penalties.append(None if raw is None else raw.detach().clone())

    def on_after_backward(self, trainer, pl_module):
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters()})

    def on_validation_batch_end(self, trainer, pl_module, *args):
        if self.reg is not None:
            self.val_penalties.append(self.reg.raw_penalty(pl_module))

    on_test_batch_end = on_validation_batch_end


def torchdiffeq_names_intact():
    g = globals()
    return (g["odeint"] is real().odeint and g["odeint_adjoint"] is real().odeint_adjoint
            and g["torchdiffeq"] is real())


_REFERENCE = {}


def reference(design):
    """A run of the unmodified model without the callback: step-1 solution, gradients, losses."""
    if design not in _REFERENCE:
        model = make(design, "torchdiffeq")
        spy = Spy()
        trainer([spy], max_steps=3).fit(model, data(design))
        _REFERENCE[design] = (model.solutions, spy.grads, spy.losses)
    return _REFERENCE[design]


# ------------------------------------------------------------------ the two designs, both modes
CASES = [("latent", "torchdiffeq"), ("latent", "dropin"), ("trajectory", "torchdiffeq"),
         ("trajectory", "module"), ("trajectory", "dropin")]


@pytest.mark.parametrize("design,how", CASES)
def test_with_coef_zero_outputs_and_gradients_are_torchdiffeqs(design, how):
    solutions, grads, losses = reference(design)
    model = make(design, how)
    reg = PolynomialTrajectoryRegularizer(coef=0.0, intercept_torchdiffeq=how != "dropin")
    spy = Spy(reg)
    trainer([reg, spy], max_steps=3).fit(model, data(design))
    assert all(p is not None and p.item() > 0 for p in spy.penalties)  # it did record
    # step 1: same weights, same batch: the values at the requested times are torchdiffeq's
    for ours, theirs in zip(model.solutions[0], solutions[0]):
        assert torch.equal(ours, theirs)
    assert torch.equal(spy.losses[0], losses[0])
    if design == "trajectory":  # odeint: backprop through the solver, bit for bit
        for name in grads[0]:
            assert torch.equal(spy.grads[0][name], grads[0][name]), name
        assert all(torch.equal(a, b) for a, b in zip(spy.losses, losses))  # the loss curve
    else:  # odeint_adjoint: the restart-free adjoint, within the solver tolerance
        for name in grads[0]:
            torch.testing.assert_close(spy.grads[0][name], grads[0][name], rtol=1e-4,
                                       atol=1e-5, msg=name)
    assert torchdiffeq_names_intact()


@pytest.mark.parametrize("design,how", CASES)
def test_attached_run_adds_the_penalty_counts_nfe_and_leaves_evaluation_alone(design, how,
                                                                               tmp_path):
    model = make(design, how)
    reg = PolynomialTrajectoryRegularizer(coef=2.0, num_samples=3,
                                          intercept_torchdiffeq=how != "dropin")
    spy, monitor = Spy(reg), NFEMonitor()
    t = trainer([reg, spy, monitor], max_steps=2, limit_val_batches=1, val_check_interval=1)
    t.fit(model, data(design), data(design))
    assert t.callback_metrics["reg/poly"].item() > 0
    assert len(spy.losses) == 2
    for loss, raw, pen in zip(spy.losses, model.raw_losses, spy.penalties):
        assert pen.item() > 0
        torch.testing.assert_close(loss, raw + 2.0 * pen, rtol=0, atol=0)
    # NFE: the monitor saw every evaluation the user's own counter saw
    forward = sum(h[0] for h in monitor.history)
    backward = sum(h[1] for h in monitor.history)
    assert forward >= 2 * 8 and t.callback_metrics["nfe/odeint/forward"].item() >= 8
    assert (backward > 0) == (design == "latent")  # the adjoint's evaluations only
    validation = len(model.val_checks)
    assert validation == 2 and t.callback_metrics["val/nfe"].item() >= 8
    # validation went through torchdiffeq alone: no penalty, values identical
    assert all(model.val_checks) and all(p is None for p in spy.val_penalties)
    t.test(model, data(design), verbose=False)
    assert len(model.val_checks) == validation + 2 and all(model.val_checks)
    # everything restored; the checkpoint loads into the unmodified module
    assert torchdiffeq_names_intact() and "training_step" not in model.__dict__
    path = tmp_path / "run.ckpt"
    t.save_checkpoint(path)
    plain = MODELS[design]()
    state = torch.load(path, weights_only=False)["state_dict"]
    assert state.keys() == plain.state_dict().keys()
    plain.load_state_dict(state, strict=True)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("design", ["latent", "trajectory"])
def test_nfe_counts_equal_the_users_own_counter(design):
    model = make(design, "dropin")
    monitor = NFEMonitor()
    attributes = set(vars(model.net))
    trainer([PolynomialTrajectoryRegularizer(), monitor], max_steps=2).fit(model, data(design))
    counted = sum(h[0] + h[1] for h in monitor.history)
    assert counted == model.net.nfe > 0
    assert set(vars(model.net)) == attributes  # the counting never touched the user's object


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_names_are_restored_after_an_exception_in_training_step(error):
    model = make("trajectory", "module", fail_at=1)
    model.fail_at_error = error
    reg = PolynomialTrajectoryRegularizer(intercept_torchdiffeq=True)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit if isinstance(error, KeyboardInterrupt) else RuntimeError):
            trainer([reg], max_steps=3).fit(model, data("trajectory"))
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after an interrupt
    assert len(model.raw_losses) == 1  # step 0 ran through the drop-in, step 1 raised
    assert ("test_attach", "torchdiffeq") in reg.redirected
    assert torchdiffeq_names_intact() and "training_step" not in model.__dict__
    assert pr_odeint(model.func, torch.ones(1, 2), GRID).shape == (5, 1, 2)  # nothing recording


def test_unchanged_code_without_interception_fails_naming_both_options():
    model = make("trajectory", "torchdiffeq")
    with pytest.raises(ValueError, match=r"found no ODE solve to regularize in the first "
                                         r"training step of TrajectoryModel.*"
                                         r"from polyreg_cnf import odeint.*"
                                         r"intercept_torchdiffeq=True"):
        trainer([PolynomialTrajectoryRegularizer()]).fit(model, data("trajectory"))
    assert torchdiffeq_names_intact() and "training_step" not in model.__dict__


@pytest.mark.parametrize("how", ["dropin", "torchdiffeq"])
def test_coef_zero_loss_curve_is_bit_identical_with_global_rng_in_use(how):
    def curve(callbacks):
        model = make("trajectory", how, noise=0.1)
        trainer(callbacks, max_steps=3).fit(model, data("trajectory"))
        return model.raw_losses

    plain = curve([])
    regularized = curve([PolynomialTrajectoryRegularizer(
        coef=0.0, intercept_torchdiffeq=how == "torchdiffeq")])
    assert len(plain) == 3 and all(torch.equal(a, b) for a, b in zip(plain, regularized))


def test_generator_state_is_checkpointed_and_restored(tmp_path):
    def run(steps, reg, ckpt=None):
        t = trainer([reg], max_steps=steps)
        t.fit(make("trajectory", "dropin"), data("trajectory"), ckpt_path=ckpt)
        return t

    full = PolynomialTrajectoryRegularizer(seed=7)
    run(3, full)
    first = PolynomialTrajectoryRegularizer(seed=7)
    t = run(2, first)
    t.save_checkpoint(tmp_path / "a.ckpt")
    saved = torch.load(tmp_path / "a.ckpt", weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if "PolynomialTrajectoryRegularizer" in k]
    assert torch.equal(state["generator"], first.generator.get_state())
    assert not torch.equal(state["generator"], full.generator.get_state())  # one step behind
    resumed = PolynomialTrajectoryRegularizer(seed=123)  # a different seed: the checkpoint wins
    run(3, resumed, ckpt=tmp_path / "a.ckpt")
    assert torch.equal(resumed.generator.get_state(), full.generator.get_state())


def test_seed_defaults_to_the_run_seed():
    def times(seed):
        L.seed_everything(seed)
        reg = PolynomialTrajectoryRegularizer()
        trainer([reg], max_steps=1).fit(TrajectoryModel("dropin"), data("trajectory"))
        return reg.generator.get_state()

    a, b, c = times(1), times(1), times(2)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------ the drop-in, engine level
def linear_field(t, y):
    return y @ A.T


class TupleField(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, t, state):
        x, v = state
        return self.lin(x) + v, -x


GRIDS = {"from 0": torch.linspace(0.0, 1.0, 5), "t0 = 0.5": torch.tensor([0.5, 0.8, 1.3, 2.0]),
         "decreasing": torch.tensor([1.0, 0.6, 0.1, -0.4]), "two times": torch.tensor([0.2, 1.0])}


def expected_penalty(func, y0, t, generator, order, index=0):
    """torchdiffeq on the merged grid, drawn as documented, and the penalty on it."""
    u = sample_penalty_times(3, 0.0, 1.0, generator=generator, dtype=torch.float64)[1:-1]
    inner = t[0] + u.to(t.dtype) * (t[-1] - t[0])
    merged = torch.sort(torch.cat([t, inner]), descending=bool(t[-1] < t[0])).values
    sol = real().odeint(func, y0, merged)
    z = sol if isinstance(sol, torch.Tensor) else sol[index]
    if t[-1] < t[0]:
        merged, z = merged.flip(0), z.flip(0)
    return trajectory_polynomial_penalty(merged, z, order)


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("state", ["tensor", "tuple"])
def test_dropin_returns_torchdiffeqs_values_and_records_the_penalty(grid, batch, state):
    t = GRIDS[grid]
    torch.manual_seed(0)
    func = TupleField() if state == "tuple" else linear_field
    y0 = ((torch.randn(batch, 2), torch.randn(batch, 2)) if state == "tuple"
          else torch.randn(batch, 2))
    index = 1 if state == "tuple" else 0
    recorder = TrajectoryRecorder(3, 2, state_index=index,
                                  generator=torch.Generator().manual_seed(5))
    with recorder:
        ours = pr_odeint(func, y0, t)
    theirs = real().odeint(func, y0, t)
    if state == "tuple":
        assert isinstance(ours, tuple) and len(ours) == 2
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    else:
        assert torch.equal(ours, theirs)
    expected = expected_penalty(func, y0, t, torch.Generator().manual_seed(5), 2, index)
    assert len(recorder.penalties) == 1 and recorder.penalty().item() > 0
    torch.testing.assert_close(recorder.penalty(), expected, rtol=1e-5, atol=1e-9)


def test_dropin_without_a_recorder_is_torchdiffeq_bit_for_bit():
    torch.manual_seed(0)
    func = TupleField()
    y0 = (torch.randn(3, 2, requires_grad=True), torch.randn(3, 2))
    for solve, stock in ((pr_odeint, real().odeint), (pr_odeint_adjoint, real().odeint_adjoint)):
        results = []
        for f in (solve, stock):
            sol = f(func, y0, GRIDS["decreasing"])
            grads = torch.autograd.grad(sum(s.square().sum() for s in sol),
                                        [y0[0], *func.parameters()])
            results.append((sol, grads))
        (a, ga), (b, gb) = results
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert all(torch.equal(x, y) for x, y in zip(ga, gb))
    # counting only (the NFE monitor in validation) changes nothing either
    counter = NFECounter()
    with record_nfe(counter):
        counted = pr_odeint(func, y0, GRIDS["decreasing"])
    assert all(torch.equal(x, y) for x, y in zip(counted, real().odeint(func, y0,
                                                                        GRIDS["decreasing"])))
    assert counter.forward > 0 and counter.solves == 1


def test_forward_nfe_is_the_same_with_and_without_the_penalty():
    field = Field()
    x0 = torch.randn(4, 2)
    plain, penalised = NFECounter(), NFECounter()
    with record_nfe(plain):
        pr_odeint(field, x0, GRID)
    with record_nfe(penalised), TrajectoryRecorder(5, 2):
        pr_odeint(field, x0, GRID)
    assert plain.forward == penalised.forward > 0
    assert plain.accepted == penalised.accepted and plain.rejected == penalised.rejected


def test_adjoint_penalty_gradient_matches_direct_backprop():
    torch.manual_seed(0)
    field = Field().double()
    x0 = torch.randn(3, 2, dtype=torch.float64)
    t = GRIDS["t0 = 0.5"].double()
    grads = []
    for solve in (pr_odeint, pr_odeint_adjoint):
        recorder = TrajectoryRecorder(3, 1, generator=torch.Generator().manual_seed(1))
        with recorder:
            sol = solve(field, x0, t, rtol=1e-9, atol=1e-11)
        loss = sol.square().sum() + 10 * recorder.penalty()
        grads.append(torch.autograd.grad(loss, list(field.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_adjoint_backward_nfe_counted_and_stock_adjoint_kept_where_carry_cannot_follow(
        monkeypatch):
    import polyreg_cnf.engine.strategies as strategies

    carried = []
    carry = strategies.odeint_adjoint_carry
    monkeypatch.setattr(strategies, "odeint_adjoint_carry",
                        lambda *a, **k: carried.append(1) or carry(*a, **k))
    field = Field()
    x0 = torch.randn(3, 2)
    for kwargs, uses_carry in (
            ({}, True), ({"method": "bosh3", "adjoint_options": {"norm": "seminorm"}}, True),
            ({"method": "rk4", "options": {"step_size": 0.1}}, False),
            ({"adjoint_method": "bosh3", "adjoint_options": {}}, False),
            ({"rtol": torch.tensor(1e-6)}, False)):
        carried.clear()
        counter = NFECounter()
        with record_nfe(counter), TrajectoryRecorder(2, 1) as recorder:
            sol = pr_odeint_adjoint(field, x0, GRID, **kwargs)
        assert torch.equal(sol, real().odeint_adjoint(field, x0, GRID, **kwargs))
        sol.sum().backward()
        assert counter.backward > 0 and recorder.penalty() is not None
        assert bool(carried) == uses_carry, kwargs


def test_event_fn_and_grid_stepping_methods_pass_through_with_one_warning():
    field = Field()
    x0 = torch.ones(2, 2)
    recorder = TrajectoryRecorder(2, 1)

    def event(t, y):
        return t - 0.5

    with recorder, pytest.warns(UserWarning, match="event_fn are not penalised") as caught:
        for _ in range(2):
            ours = pr_odeint(field, x0, torch.tensor([0.0, 1.0]), event_fn=event)
    assert len([w for w in caught if "event_fn" in str(w.message)]) == 1
    theirs = real().odeint(field, x0, torch.tensor([0.0, 1.0]), event_fn=event)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    with recorder, pytest.warns(UserWarning, match="steps on the output times"):
        ours = pr_odeint(field, x0, GRID, method="rk4")
    assert torch.equal(ours, real().odeint(field, x0, GRID, method="rk4"))
    assert recorder.penalty() is None and recorder.solves == 3
    with recorder:  # with a step size the grid no longer depends on the output times
        ours = pr_odeint(field, x0, GRID, method="rk4", options={"step_size": 0.1})
    assert torch.equal(ours, real().odeint(field, x0, GRID, method="rk4",
                                           options={"step_size": 0.1}))
    assert recorder.penalty() is not None


def test_dropin_follows_torchdiffeqs_argument_rules():
    with TrajectoryRecorder(2, 1), pytest.raises(ValueError, match="func must be an instance "
                                                                   "of nn.Module"):
        pr_odeint_adjoint(linear_field, torch.ones(1, 2), GRID)
    with TrajectoryRecorder(2, 1) as recorder:  # accepted by torchdiffeq, accepted here
        pr_odeint_adjoint(linear_field, torch.ones(1, 2), GRID, adjoint_params=())
    assert recorder.penalty() is not None
    field = Field()
    before = dict(vars(field))
    with record_nfe(NFECounter()), TrajectoryRecorder(2, 1):
        pr_odeint_adjoint(field, torch.ones(1, 2), GRID).sum().backward()
    assert vars(field).keys() == before.keys()  # nothing set on the user's function object
    with TrajectoryRecorder(2, 1, state_index=2), pytest.raises(ValueError, match="state_index"):
        pr_odeint(TupleField(), (torch.ones(1, 2), torch.ones(1, 2)), GRID)


# ------------------------------------------------------------------ ODEBlock
@pytest.mark.parametrize("grid", ["t0 = 0.5", "decreasing"])
@pytest.mark.parametrize("adjoint", [False, True])
def test_odeblock_grid_output_equals_torchdiffeq(grid, adjoint):
    t = GRIDS[grid]
    torch.manual_seed(0)
    field = Field()
    block = ODEBlock(field, solver=SolverConfig(backprop="adjoint" if adjoint else "direct",
                                                atol=1e-6, rtol=1e-6))
    x0 = torch.randn(3, 2)
    ours = block(x0, t=t)
    theirs = real().odeint(field, x0, t, rtol=1e-6, atol=1e-6)
    assert ours.shape == (len(t), 3, 2)
    assert torch.equal(ours, theirs)
    with TrajectoryRecorder(3, 1, generator=torch.Generator().manual_seed(2)) as recorder:
        recorded = block(x0, t=t)
    assert torch.equal(recorded, theirs)  # the interior times change nothing it returns
    expected = expected_penalty(lambda s, y: field(s, y), x0, t,
                                torch.Generator().manual_seed(2), 1)
    torch.testing.assert_close(recorder.penalty(), expected, rtol=1e-3, atol=1e-7)


def test_reversed_odeblock_solve_is_penalised_like_its_trajectory():
    torch.manual_seed(0)
    field = Field()
    block = ODEBlock(field, T=1.5, solver=SolverConfig(backprop="direct", atol=1e-7, rtol=1e-7))
    y1 = torch.randn(4, 2)
    with TrajectoryRecorder(3, 1, generator=torch.Generator().manual_seed(3)) as recorder:
        (y0,) = block.solve(lambda s, st: (field(s, st[0]),), (y1,), reverse=True)
    t = torch.tensor([1.5, 0.0])
    assert torch.equal(y0, real().odeint(field, y1, t, rtol=1e-7, atol=1e-7)[-1])
    expected = expected_penalty(field, y1, t, torch.Generator().manual_seed(3), 1)
    assert recorder.penalty().item() > 0
    torch.testing.assert_close(recorder.penalty(), expected, rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match="give a decreasing grid"):
        block.solve(lambda s, st: st, (y1,), reverse=True, t=t)


def test_odeblock_refuses_a_field_whose_gradient_the_adjoint_would_drop():
    torch.manual_seed(0)
    net = Field()
    scale = torch.tensor(0.7, requires_grad=True)
    x0 = torch.randn(3, 2)

    def field(s, state):  # closes over `scale`, which the adjoint cannot see
        return (scale * net(s, state[0]),)

    block = ODEBlock(net, solver=SolverConfig(backprop="adjoint", atol=1e-7, rtol=1e-7))
    calls = net.nfe
    with pytest.raises(ValueError, match=r"depends on 1 tensor\(s\) requiring gradients that "
                                         r"the adjoint or the step checkpoints cannot see "
                                         r"\(shapes \(\)\).*extra_params"):
        block.solve(field, (x0,))
    assert block.nfe.forward == 0 and net.nfe == calls + 1  # one uncounted check evaluation
    # passed in extra_params it is fine, and its gradient is direct backprop's
    (y,) = block.solve(field, (x0,), extra_params=(scale,))
    (g_adjoint,) = torch.autograd.grad(y.sum(), scale)
    direct = ODEBlock(net, solver=SolverConfig(backprop="direct", atol=1e-7, rtol=1e-7))
    (g_direct,) = torch.autograd.grad(direct.solve(field, (x0,))[0].sum(), scale)
    torch.testing.assert_close(g_adjoint, g_direct, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # without gradients nothing can be dropped: no check, no error
        ODEBlock(net, solver=SolverConfig(backprop="adjoint")).solve(field, (x0,))


def test_odeblock_grid_is_validated():
    block = ODEBlock(Field(), solver=SolverConfig(backprop="direct"))
    for t, match in ((torch.tensor([0.0, 1.0, 0.5]), "strictly increasing or strictly "
                                                     "decreasing, got \\[0.0, 1.0, 0.5\\]"),
                     (torch.tensor([1.0]), "at least 2 times"),
                     (torch.tensor([0, 1]), "floating-point")):
        with pytest.raises(ValueError, match=match):
            block(torch.ones(1, 2), t=t)


# ------------------------------------------------------------------ DDP
class SaveState(L.Callback):
    def __init__(self, out, reg):
        self.out, self.reg = str(out), reg

    def on_fit_end(self, trainer, pl_module):
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        state["__generator__"] = self.reg.generator.get_state()
        state["__penalised__"] = torch.tensor(self.reg.steps)
        torch.save(state, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


def test_ddp_two_processes_keep_identical_weights_and_times(tmp_path):
    model = make("trajectory", "module")
    init = {k: v.clone() for k, v in model.state_dict().items()}
    reg = PolynomialTrajectoryRegularizer(coef=5.0, intercept_torchdiffeq=True)
    t = L.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, max_steps=3,
                  callbacks=[reg, SaveState(tmp_path, reg)], logger=False,
                  enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    t.fit(model, data("trajectory", n=48))
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert w0.keys() == w1.keys()
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key
    assert w0["__penalised__"].item() == 3  # every step carried a penalty
    assert any(not torch.equal(w0[k], init[k]) for k in init)
    assert torchdiffeq_names_intact()
