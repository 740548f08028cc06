"""backprop="checkpoint": recomputed accepted steps give direct backprop's gradients, exactly.

The reference for exactness is direct backprop through torchdiffeq itself with the step-size
controller made non-differentiable (patched to return detached step sizes): that is the
derivative of the forward computation with the steps held fixed, which is what the step
checkpoints claim to compute. Closed forms (linear ODEs) check the gradients converge to the
true ones, and NFE counts check that the penalty's interior output times cost nothing.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torchdiffeq
from torch import nn
from torchdiffeq._impl import rk_common

from polyreg_cnf import (
    CNF,
    ODEBlock,
    ODENet,
    SolverConfig,
    TrajectoryRecorder,
    standard_normal_logprob,
)
from polyreg_cnf.engine.memory import saved_tensor_bytes
from polyreg_cnf.engine.step_checkpoint import CHECKPOINT_METHODS, checkpointed_solve
from polyreg_cnf.engine.strategies import make_backprop


class Field(nn.Module):
    """A small time-dependent MLP field on a (state, running integral) pair."""

    def __init__(self, dim: int = 3, hidden: int = 16) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim + 1, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.calls = 0

    def forward(self, t, state):
        self.calls += 1
        y, _ = state
        h = torch.tanh(self.lin1(torch.cat([y, t.to(y).expand(y.shape[0], 1)], 1)))
        dy = self.lin2(h) - 0.5 * y
        return dy, (dy ** 2).sum(1, keepdim=True)


def _loss(out):
    y, integral = out
    # every output time enters, the interior ones with their own weights
    weights = torch.linspace(0.5, 1.5, len(y), dtype=y.dtype).view(-1, 1, 1)
    return (weights * y.sin()).sum() + integral[-1].sum()


@pytest.fixture
def frozen_steps(monkeypatch):
    """Direct backprop through torchdiffeq with the step sizes held fixed."""
    optimal, initial = rk_common._optimal_step_size, rk_common._select_initial_step
    monkeypatch.setattr(rk_common, "_optimal_step_size",
                        lambda *a, **k: optimal(*a, **k).detach())
    monkeypatch.setattr(rk_common, "_select_initial_step",
                        lambda *a, **k: initial(*a, **k).detach())


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    field = Field().double()
    y0 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    return field, (y0, torch.zeros(5, 1, dtype=torch.float64))


GRIDS = {
    "increasing with interior times": [0.0, 0.13, 0.5, 0.52, 1.0],
    "decreasing from a nonzero start": [1.5, 0.9, 0.2, -0.4],
    "two times": [0.0, 2.0],
}


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "dopri8"])
@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_gradients_equal_direct_backprop_through_the_same_steps(frozen_steps, grid, method):
    field, y0 = _problem()
    t = torch.tensor(GRIDS[grid], dtype=torch.float64)
    params = list(field.parameters())
    kwargs = dict(rtol=1e-5, atol=1e-5, method=method)

    out_direct = torchdiffeq.odeint(field, y0, t, **kwargs)
    ref = torch.autograd.grad(_loss(out_direct), [y0[0], *params])
    out = checkpointed_solve(field, y0, t, params=params, **kwargs)
    # the forward solve is torchdiffeq's, to the bit (same steps, same error norm)
    assert all(torch.equal(a, b) for a, b in zip(out, out_direct))
    got = torch.autograd.grad(_loss(out), [y0[0], *params])
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_without_the_frozen_steps_direct_backprop_differs_by_the_controller_term():
    # Direct backprop through torchdiffeq also differentiates the step-size controller; at a
    # loose tolerance that term is visible, at a tight one it vanishes with the error.
    field, y0 = _problem(1)
    t = torch.tensor(GRIDS["increasing with interior times"], dtype=torch.float64)
    params = list(field.parameters())
    errors = []
    for tol in (1e-3, 1e-9):
        ref = torch.autograd.grad(_loss(torchdiffeq.odeint(field, y0, t, rtol=tol, atol=tol)),
                                  params)
        got = torch.autograd.grad(
            _loss(checkpointed_solve(field, y0, t, params=params, rtol=tol, atol=tol)), params)
        errors.append(max(float((g - r).norm() / r.norm()) for g, r in zip(got, ref)))
    assert errors[0] > 1e-7  # the controller term is there at 1e-3...
    assert errors[1] < 1e-8 and errors[1] < errors[0] / 100  # ...and shrinks with the tolerance


def test_linear_ode_gradient_matches_the_matrix_exponential():
    # y' = A y: y(t) = expm(A t) y0, differentiated by torch through matrix_exp.
    torch.manual_seed(2)
    A = (0.5 * torch.randn(4, 4, dtype=torch.float64)).requires_grad_()
    y0 = torch.randn(4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 0.8, 1.2], dtype=torch.float64)
    c = torch.randn(len(t), 4, dtype=torch.float64)

    def field(s, state):
        return (state[0] @ A.T,)

    (y,) = checkpointed_solve(field, (y0[None],), t, params=[A], rtol=1e-11, atol=1e-11)
    got = torch.autograd.grad((c * y[:, 0]).sum(), [A, y0])
    exact_y = torch.stack([torch.linalg.matrix_exp(A * ti) @ y0 for ti in t])
    ref = torch.autograd.grad((c * exact_y).sum(), [A, y0])
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


def test_backward_costs_seven_evaluations_per_accepted_step_whatever_the_output_times():
    field, y0 = _problem(3)
    params = list(field.parameters())
    costs = {}
    for name, times in (("ends only", [0.0, 1.0]), ("four interior times",
                                                    [0.0, 0.1, 0.4, 0.45, 0.9, 1.0])):
        class Counted:
            def __init__(self):
                self.accepted = []

            def __call__(self, t, state):
                return field(t, state)

            def callback_accept_step(self, t0, y, dt):
                self.accepted.append(float(dt))

        t = torch.tensor(times, dtype=torch.float64)
        counted = Counted()
        out = checkpointed_solve(counted, y0, t, params=params, rtol=1e-6, atol=1e-6)
        field.calls = 0
        _loss(out).backward()
        costs[name] = (field.calls, len(counted.accepted))
    # dense output: the same accepted steps either way, 7 dopri5 evaluations each on the way back
    assert costs["ends only"] == costs["four interior times"]
    calls, steps = costs["ends only"]
    assert steps >= 2 and calls == 7 * steps


def test_memory_is_one_state_per_step_not_the_solve_graph():
    # A plain neural ODE (a CNF's trace builds and drops a small graph inside every evaluation,
    # which the byte counter would also see): direct backprop keeps every evaluation's
    # activations, the step checkpoints keep none (the parameters are not counted: resident).
    torch.manual_seed(4)
    block = ODEBlock(ODENet(8, (64, 64), "concatsquash", "tanh"),
                     solver=SolverConfig(backprop="direct", atol=1e-6, rtol=1e-6))
    x = torch.randn(256, 8)
    _, direct = saved_tensor_bytes(lambda s: block(s), x)
    nfe = block.nfe.forward
    block.solver = SolverConfig(backprop="checkpoint", atol=1e-6, rtol=1e-6)
    block(x)  # the first solve checks once that the field reads no unlisted tensor (one graph)
    block.nfe.reset()
    y, checkpoint = saved_tensor_bytes(lambda s: block(s), x)
    assert nfe >= 14 and direct > nfe * x.numel() * 4  # at least one activation per evaluation
    assert block.nfe.forward == nfe and checkpoint == 0
    y.sum().backward()  # and the gradients still arrive
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())


def _block_grads(block, x, backprop, recording):
    block.solver = SolverConfig(backprop=backprop, atol=1e-7, rtol=1e-7)
    block.zero_grad()
    block.nfe.reset()
    torch.manual_seed(5)
    recorder = TrajectoryRecorder(2, 1, generator=torch.Generator().manual_seed(0))
    with recorder if recording else contextlib.nullcontext():
        z, ladj = block(x)
    loss = -(standard_normal_logprob(z) + ladj).mean()
    if recording:
        loss = loss + 5 * recorder.penalty()
    loss.backward()
    return [p.grad.clone() for p in block.parameters()], block.nfe


@pytest.mark.parametrize("recording", [False, True], ids=["plain", "penalised"])
def test_cnf_block_matches_direct_backprop(recording):
    torch.manual_seed(6)
    cnf = CNF(ODENet(2, (32, 32), "concatsquash", "tanh"), trace="hutchinson")
    x = torch.randn(64, 2)
    direct, nfe_direct = _block_grads(cnf, x, "direct", recording)
    ckpt, nfe_ckpt = _block_grads(cnf, x, "checkpoint", recording)
    assert nfe_ckpt.forward == nfe_direct.forward  # the same solve
    assert nfe_ckpt.backward == 7 * nfe_ckpt.accepted
    for g, r in zip(ckpt, direct):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)


def test_context_passed_as_extra_params_gets_its_gradient():
    torch.manual_seed(7)
    net = ODENet(3, (16,), "concatsquash", "tanh")
    scale = torch.tensor(0.8, requires_grad=True)

    def field(s, state):
        return (scale * net(s, state[0]),)

    x0 = torch.randn(4, 3)
    grads = {}
    for backprop in ("direct", "checkpoint"):
        block = ODEBlock(net, solver=SolverConfig(backprop=backprop, atol=1e-8, rtol=1e-8))
        (y,) = block.solve(field, (x0,), extra_params=(scale,))
        grads[backprop] = torch.autograd.grad(y.square().sum(), scale)[0]
    torch.testing.assert_close(grads["checkpoint"], grads["direct"], rtol=1e-5, atol=1e-7)


def test_bad_requests_are_refused_with_what_was_given():
    field, y0 = _problem()
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    params = list(field.parameters())
    with pytest.raises(ValueError, match=r"one-step fixed-grid method .*got 'implicit_adams'"):
        checkpointed_solve(field, y0, t, params=params, rtol=1e-5, atol=1e-5,
                           method="implicit_adams")
    with pytest.raises(ValueError, match=r"cannot differentiate the output times"):
        checkpointed_solve(field, y0, t.clone().requires_grad_(), params=params, rtol=1e-5,
                          atol=1e-5)
    with pytest.raises(ValueError, match=r"\['jump_t'\]"):
        checkpointed_solve(field, y0, t, params=params, rtol=1e-5, atol=1e-5,
                          options=dict(jump_t=torch.tensor([0.5])))
    with pytest.raises(ValueError, match=r"strictly increasing or strictly decreasing"):
        checkpointed_solve(field, y0, torch.tensor([0.0, 1.0, 0.5]), params=params, rtol=1e-5,
                          atol=1e-5)
    with pytest.raises(ValueError, match=r"'fixed_adams' cannot be recomputed step by step"):
        SolverConfig(method="fixed_adams", step_size=0.1, backprop="checkpoint")
    with pytest.raises(ValueError, match=r"StepCheckpoint takes no settings \['seminorm'\]"):
        SolverConfig(backprop=make_backprop("checkpoint", seminorm=True))
    with pytest.raises(ValueError, match=r"StepCheckpoint cannot learn the end time"):
        ODEBlock(nn.Linear(2, 2), train_T=True, solver=SolverConfig(backprop="checkpoint"))
    assert set(CHECKPOINT_METHODS) >= {"dopri5", "dopri8", "bosh3", "fehlberg2",
                                       "adaptive_heun", "euler", "midpoint", "rk4"}


# ------------------------------------------------------------------------------ the drop-in
def test_dropin_penalises_a_users_own_solve_and_keeps_its_gradients():
    from polyreg_cnf import TrajectoryRecorder, odeint, odeint_checkpoint, record_nfe
    from polyreg_cnf.engine.nfe import NFECounter

    torch.manual_seed(8)
    func = ODENet(2, (16,), "concatsquash", "tanh")
    y0 = torch.randn(6, 2)
    t = torch.tensor([0.0, 0.5, 1.0])
    results = {}
    for name, solve in (("direct", odeint), ("checkpoint", odeint_checkpoint)):
        func.zero_grad()
        counter = NFECounter()
        with TrajectoryRecorder(2, 1, generator=torch.Generator().manual_seed(0)) as rec, \
                record_nfe(counter):
            y = solve(func, y0, t, rtol=1e-7, atol=1e-7)
            (y.square().sum() + 5 * rec.penalty()).backward()
        results[name] = (y.detach(), rec.penalty().detach(), counter,
                         [p.grad.clone() for p in func.parameters()])
    (yd, pd, nd, gd), (yc, pc, nc, gc) = results["direct"], results["checkpoint"]
    assert yc.shape == (3, 6, 2) and torch.equal(yc, yd) and torch.equal(pc, pd)
    assert nc.forward == nd.forward and nc.accepted == nd.accepted
    assert nc.backward == 7 * nc.accepted and nd.backward == 0
    for g, r in zip(gc, gd):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-6)


def test_dropin_takes_tuples_closures_with_params_and_a_tensor_norm():
    from polyreg_cnf import odeint_checkpoint

    w = torch.tensor(0.3, requires_grad=True)
    y0 = torch.ones(4, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError,
                       match=r"func must be an instance of nn.Module.*got a function.*params="):
        odeint_checkpoint(lambda s, y: -w * y, y0, t)
    seen = []

    def norm(x):
        seen.append(type(x))
        return x.abs().max()

    y = odeint_checkpoint(lambda s, y: -w * y, y0, t, params=[w], rtol=1e-10, atol=1e-10,
                          options=dict(norm=norm))
    assert seen and all(k is torch.Tensor for k in seen)
    (g,) = torch.autograd.grad(y[-1].sum(), w)  # d/dw 4 exp(-w) = -4 exp(-w)
    torch.testing.assert_close(g, -4 * torch.exp(-w.detach()), rtol=1e-6, atol=0)
    a, b = odeint_checkpoint(lambda s, st: (-w * st[0], st[0]), (y0, y0 * 0), t, params=[w],
                             rtol=1e-10, atol=1e-10)
    # b' = a = exp(-w s): b(1) = (1 - exp(-w)) / w
    torch.testing.assert_close(b[-1], ((1 - torch.exp(-w.detach())) / w.detach()).double()
                               .expand(4), rtol=1e-6, atol=1e-8)
