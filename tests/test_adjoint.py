"""The restart-free adjoint: gradients against closed forms, direct backprop and torchdiffeq's
adjoint; backward NFE of the trajectory penalty's extra output times; input checks."""

import numpy as np
import pytest
import torch
from scipy.linalg import expm
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

import polyreg_cnf.engine.adjoint as adjoint_module
from polyreg_cnf import (
    CNF,
    ODEBlock,
    ODENet,
    SolverConfig,
    TrajectoryRecorder,
    standard_normal_logprob,
)
from polyreg_cnf.engine.adjoint import odeint_adjoint_carry
from polyreg_cnf.engine.strategies import Adjoint

TIGHT = dict(rtol=1e-10, atol=1e-10, method="dopri5")
VARIANTS = [dict(), dict(seed_first_step=False)]


def _times(K, T, seed):
    """0, K sorted interior times, T (T may be a tensor that requires grad)."""
    u = torch.sort(torch.rand(K, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(seed))).values
    return torch.cat([torch.zeros(1, dtype=torch.float64), u * T, T.reshape(1)])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seminorm", [False, True])
@pytest.mark.parametrize("K", [0, 2, 5])
def test_linear_ode_values_and_gradients_match_the_closed_form(K, seminorm, variant):
    # dy/dt = A y: y(t) = expm(t A) y0; L = sum_i w_i . y(t_i) gives dL/dy0 = sum expm(t_i A)^T w_i,
    # dL/dT = w_N . A y(T)
    rng = np.random.default_rng(K)
    A_np = rng.normal(size=(3, 3)) * 0.5
    A = torch.tensor(A_np, requires_grad=True)
    y0 = torch.tensor(rng.normal(size=(2, 3)), requires_grad=True)
    T = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    t = _times(K, T, seed=K)
    w = torch.tensor(rng.normal(size=(K + 2, 2, 3)))
    options = {"norm": "seminorm"} if seminorm else None
    y = odeint_adjoint_carry(lambda s, y: y @ A.T, y0, t, options=None, adjoint_params=(A,),
                             adjoint_options=options, **TIGHT, **variant)
    tt = t.detach().numpy()
    expected = np.stack([y0.detach().numpy() @ expm(ti * A_np).T for ti in tt])
    np.testing.assert_allclose(y.detach().numpy(), expected, atol=1e-8)
    g_y0, g_A, g_T = torch.autograd.grad((w * y).sum(), (y0, A, T))
    ref_y0 = sum(w[i].numpy() @ expm(ti * A_np) for i, ti in enumerate(tt))
    np.testing.assert_allclose(g_y0.numpy(), ref_y0, atol=1e-8)
    yT = expected[-1]
    # T moves the last output time and (scaled by t_i / T) every interior one
    ref_T = sum((ti / tt[-1]) * (w[i].numpy() * (expected[i] @ A_np.T)).sum()
                for i, ti in enumerate(tt))
    np.testing.assert_allclose(g_T.item(), ref_T, rtol=1e-7)
    assert yT.shape == (2, 3) and g_A.shape == (3, 3)


def _grads_all_ways(K, seminorm, variant):
    """Gradients of a nonlinear tuple system by direct backprop, stock adjoint and ours."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    ctx = torch.randn(5, 1, dtype=torch.float64, requires_grad=True)
    params = tuple(net.parameters()) + (ctx,)

    def field(s, state):
        z = state[0]
        dz = net(torch.cat([z, ctx * torch.cos(s)], dim=1))
        return dz, (dz * z).sum(dim=1)

    results = {}
    for way in ("direct", "stock", "carry"):
        y0 = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        y0.requires_grad_(True)
        T = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
        t = _times(K, T, seed=3)
        state = (y0, torch.zeros(5, dtype=torch.float64))
        opts = {"norm": "seminorm"} if seminorm else {}
        if way == "direct":
            traj = odeint(field, state, t, **TIGHT)
        elif way == "stock":
            traj = odeint_adjoint(field, state, t, adjoint_params=params, adjoint_options=opts,
                                  **TIGHT)
        else:
            traj = odeint_adjoint_carry(field, state, t, options=None, adjoint_params=params,
                                        adjoint_options=opts, **TIGHT, **variant)
        loss = traj[0].square().sum() + traj[1][-1].sum() + traj[0][-1, :, 0].sum()
        results[way] = torch.autograd.grad(loss, (y0, T) + params)
    return results


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seminorm", [False, True])
@pytest.mark.parametrize("K", [0, 2, 5])
def test_gradients_equal_direct_backprop_and_the_stock_adjoint(K, seminorm, variant):
    results = _grads_all_ways(K, seminorm, variant)
    for ours, direct, stock in zip(results["carry"], results["direct"], results["stock"]):
        np.testing.assert_allclose(ours.numpy(), direct.numpy(), rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(ours.numpy(), stock.numpy(), rtol=1e-6, atol=1e-8)


class ContextNet(nn.Module):
    """A small vector field with per-sample context (an amortized conditioning)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = ODENet(3, (8, 8), layer_type="concatsquash", nonlinearity="softplus")

    def forward(self, t, z, context):
        return self.net(t, torch.cat([z, context], dim=1))[:, :2]


@pytest.mark.parametrize("K", [0, 2, 5])
def test_cnf_gradients_with_context_and_trainable_end_time(K):
    """y0, parameters, the context and T = s**2, with the penalty on: our adjoint = backprop."""

    def grads(adjoint, carry):
        torch.manual_seed(5)
        net = ContextNet().double()
        cnf = CNF(net, T=0.8, train_T=True, trace="exact",
                  solver=SolverConfig(backprop=Adjoint(carry=carry) if adjoint else "direct",
                                      atol=1e-10, rtol=1e-10))
        x = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
        context = torch.randn(6, 1, dtype=torch.float64, requires_grad=True)
        with TrajectoryRecorder(K, 1) as recorder:
            z, ladj = cnf(x, context=context)
        loss = -(standard_normal_logprob(z) + ladj).mean()
        if K:
            loss = loss + 5 * recorder.penalty()
        loss.backward()
        return [x.grad, context.grad] + [p.grad for p in cnf.parameters()]

    direct, stock, ours = grads(False, False), grads(True, False), grads(True, True)
    for a, b, c in zip(ours, direct, stock):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(a.numpy(), c.numpy(), rtol=1e-6, atol=1e-8)


def _backward_nfe(seed, carry, K, seminorm=False, tol=1e-5):
    """(forward, backward, accepted_backward, rejected_backward) of one CNF training step."""
    torch.manual_seed(seed)
    cnf = CNF(ODENet(2, (32, 32), layer_type="concatsquash", nonlinearity="tanh"),
              solver=SolverConfig(atol=tol, rtol=tol,
                                  backprop=Adjoint(carry=carry, seminorm=seminorm)))
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(100 + seed)) * 1.5
    torch.manual_seed(7)  # same probe for every variant; the recorder's own times
    with TrajectoryRecorder(K, 1) as recorder:
        z, ladj = cnf(x)
    loss = -(standard_normal_logprob(z) + ladj).mean()
    if K:
        loss = loss + 5 * recorder.penalty()
    loss.backward()
    n = cnf.nfe
    return n.forward, n.backward, n.accepted_backward, n.rejected_backward


@pytest.mark.parametrize("seminorm", [False, True])
def test_penalty_times_no_longer_inflate_the_backward_pass(seminorm):
    """TPR (K = 2) with the carry adjoint: backward NFE within 10 % of the plain [0, T] solve
    (stock adjoint, what an unregularized run pays), summed over several models and inputs;
    torchdiffeq's adjoint is clearly above it; the forward solve is unchanged."""
    seeds, tol = range(3), 1e-6
    plain = [_backward_nfe(s, False, 0, seminorm, tol) for s in seeds]
    stock = [_backward_nfe(s, False, 2, seminorm, tol) for s in seeds]
    ours = [_backward_nfe(s, True, 2, seminorm, tol) for s in seeds]
    plain_carry = [_backward_nfe(s, True, 0, seminorm, tol) for s in seeds]
    assert [r[0] for r in ours] == [r[0] for r in stock] == [r[0] for r in plain]
    b_plain, b_stock, b_ours = (sum(r[1] for r in rs) for rs in (plain, stock, ours))
    assert b_ours <= 1.10 * b_plain, (b_ours, b_plain)
    assert b_stock >= 1.3 * b_plain, (b_stock, b_plain)
    # Against the plain solve with the same (carry) adjoint, what is left is the price of
    # stopping at each interior time: one evaluation, and the step that straddled it split in two.
    b_plain_carry = sum(r[1] for r in plain_carry)
    print(f"backward NFE over {len(seeds)} models: [0, T] stock {b_plain}, [0, T] carry "
          f"{b_plain_carry}, TPR stock {b_stock}, TPR carry {b_ours}")
    assert b_ours <= b_plain_carry + len(seeds) * 2 * (1 + 6), (b_ours, b_plain_carry)


@pytest.mark.parametrize("K", [0, 2])
def test_backward_nfe_formula_and_step_callbacks(K):
    """dopri5, first step seeded by the forward solve: 1 to start, 1 per interior time,
    6 per accepted or rejected backward step (counted through the *_adjoint callbacks)."""
    for seed in range(2):
        forward, backward, accepted, rejected = _backward_nfe(seed, True, K)
        assert accepted > 0
        assert backward == 1 + K + 6 * (accepted + rejected)


def test_each_interval_costs_one_evaluation_to_start():
    torch.manual_seed(0)
    A = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    counts = {"nfe": 0, "acc": 0, "rej": 0}

    class Field:
        def __call__(self, t, y):
            counts["nfe"] += 1
            return (torch.tanh(y[0] @ A.T),)

        def callback_accept_step_adjoint(self, t0, y0, dt):
            counts["acc"] += 1

        def callback_reject_step_adjoint(self, t0, y0, dt):
            counts["rej"] += 1

    y0 = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([0.0, 0.2, 0.5, 0.7, 1.0], dtype=torch.float64)
    traj = odeint_adjoint_carry(Field(), (y0,), t, rtol=1e-7, atol=1e-7, method="dopri5",
                                options=None, adjoint_params=(A,))
    counts["nfe"] = 0
    traj[0].square().sum().backward()
    # 4 intervals, each started with one evaluation; no first-step selection anywhere
    assert counts["nfe"] == 4 + 6 * (counts["acc"] + counts["rej"])


def test_reverse_time_block_and_plain_tensor_state():
    """Decreasing t (sampling direction) and a single-tensor state."""
    torch.manual_seed(3)
    A = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1.0, 0.6, 0.1, 0.0], dtype=torch.float64)

    def f(s, y):
        return torch.sin(y @ A.T)

    out = odeint_adjoint_carry(f, y0, t, options=None, adjoint_params=(A,), **TIGHT)
    ref = odeint(f, y0, t, **TIGHT)
    assert isinstance(out, torch.Tensor)
    ours = torch.autograd.grad(out.square().sum(), (y0, A))
    direct = torch.autograd.grad(ref.square().sum(), (y0, A))
    for a, b in zip(ours, direct):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-8)


class TimeLinear(nn.Linear):
    def forward(self, t, z):
        return super().forward(z)


def test_ode_block_dispatch_uses_the_stock_adjoint_when_asked(monkeypatch):
    calls = []
    original = adjoint_module.odeint_adjoint_carry

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    import polyreg_cnf.engine.strategies as strategies  # the Adjoint strategy runs the solve
    monkeypatch.setattr(strategies, "odeint_adjoint_carry", spy)
    block = ODEBlock(TimeLinear(2, 2), solver=SolverConfig())
    block(torch.randn(3, 2)).sum().backward()
    assert calls == [1]
    ODEBlock(TimeLinear(2, 2), solver=SolverConfig(backprop=Adjoint(carry=False)))(
        torch.randn(3, 2)).sum().backward()
    ODEBlock(TimeLinear(2, 2), solver=SolverConfig(method="rk4", step_size=0.25))(
        torch.randn(3, 2)).sum().backward()
    with torch.no_grad():
        ODEBlock(TimeLinear(2, 2))(torch.randn(3, 2))
    assert calls == [1]


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(method="rk4"), ValueError, "needs an adaptive method, got 'rk4'; valid: dopri5"),
    (dict(adjoint_options={"step_t": torch.zeros(2, 2)}), ValueError,
     "adjoint_options\\['step_t'\\] must be a 1-D tensor of finite times"),
    (dict(options={"jump_t": [float("nan")]}), ValueError,
     "options\\['jump_t'\\] must be a 1-D tensor of finite times, got \\[nan\\]"),
    (dict(options={"jump_t": "0.5"}), TypeError, "options\\['jump_t'\\] must be a 1-D tensor or"),
    (dict(adjoint_options={"norm": "l2"}), ValueError, "'seminorm' or a callable, got 'l2'"),
    (dict(y0=[torch.zeros(2)]), TypeError, "y0 must be a tensor or a non-empty tuple"),
    (dict(y0=(torch.zeros(2), torch.zeros(2, dtype=torch.float64))), ValueError, "one dtype"),
    (dict(t=torch.tensor([0.0])), ValueError, "at least 2 times, got \\(1,\\)"),
    (dict(adjoint_params=(1.0,)), TypeError, "adjoint_params must be tensors, got \\['float'\\]"),
])
def test_rejects_bad_input(kwargs, error, match):
    args = dict(func=lambda t, y: y, y0=(torch.zeros(2),), t=torch.tensor([0.0, 1.0]),
                rtol=1e-5, atol=1e-5, method="dopri5", options=None, adjoint_params=())
    args.update(kwargs)
    with pytest.raises(error, match=match):
        odeint_adjoint_carry(**args)


def _contracting_field(W):
    """y' = -5 (y - sin t)(1 + 0.5 tanh(W y)): the dynamics contract onto sin t."""

    def f(t, y):
        return -5 * (y - torch.sin(t)) * (1 + 0.5 * torch.tanh(y @ W.T))

    return f


def _relative_errors(ours, reference):
    return [float((a - b).norm() / b.norm()) for a, b in zip(ours, reference)]


def test_contracting_dynamics_with_interior_output_times():
    """Regression (issue 12): the removed single-solve backward pass integrated y backwards
    through contracting dynamics without resetting it to the stored forward values, and its
    gradients were off by a relative 40 (y0) and 2e3 (W) here. The per-interval pass matches
    direct backprop at a tight tolerance to about its own tolerance."""
    torch.manual_seed(0)
    W = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 3, 7, dtype=torch.float64)
    w = torch.randn(7, 4, 3, dtype=torch.float64)
    f = _contracting_field(W)
    direct = odeint(f, y0, t, rtol=1e-12, atol=1e-12)
    expected = torch.autograd.grad((w * direct).sum(), (y0, W))
    y = odeint_adjoint_carry(f, y0, t, rtol=1e-6, atol=1e-6, method="dopri5", options=None,
                             adjoint_params=(W,))
    ours = torch.autograd.grad((w * y).sum(), (y0, W))
    assert max(_relative_errors(ours, expected)) < 1e-4, _relative_errors(ours, expected)
    assert "single_solve" not in odeint_adjoint_carry.__code__.co_varnames


class _SwitchedField:
    """Contracting dynamics whose rate and target jump at given times; logs evaluation times."""

    def __init__(self, W, jumps):
        self.W, self.jumps, self.times = W, jumps, []

    def __call__(self, t, y):
        self.times.append(float(t.detach()))
        k = 1.0 + sum(3.0 * (t >= tj).to(y.dtype) for tj in self.jumps)
        target = torch.sin(t) + sum((t >= tj).to(y.dtype) for tj in self.jumps)
        return -k * (y - target) * (1 + 0.5 * torch.tanh(y @ self.W.T))


@pytest.mark.parametrize("decreasing", [False, True])
def test_forward_jump_and_step_times_hold_for_the_backward_pass(decreasing):
    """options={"jump_t", "step_t"} (no adjoint_options): accepted, and the gradients equal
    direct backprop through torchdiffeq.odeint with the same options. One jump time is strictly
    inside an output interval, one is an output time; one step time is inside an interval."""
    torch.manual_seed(1)
    W = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    jumps, steps = [0.7, 1.5], [0.3, 1.9]
    t = torch.tensor([0.0, 0.5, 1.5, 2.0], dtype=torch.float64)
    if decreasing:
        t = t.flip(0)
    w = torch.randn(len(t), 4, 3, dtype=torch.float64)
    options = {"jump_t": torch.tensor(jumps, dtype=torch.float64), "step_t": steps}
    field = _SwitchedField(W, jumps)
    direct = odeint(field, y0, t, rtol=1e-11, atol=1e-11, method="dopri5",
                    options={"jump_t": options["jump_t"], "step_t": torch.tensor(steps)})
    expected = torch.autograd.grad((w * direct).sum(), (y0, W))
    y = odeint_adjoint_carry(field, y0, t, rtol=1e-9, atol=1e-9, method="dopri5",
                             options=options, adjoint_params=(W,))
    np.testing.assert_allclose(y.detach().numpy(), direct.detach().numpy(), atol=1e-7)
    field.times = []
    ours = torch.autograd.grad((w * y).sum(), (y0, W))
    assert max(_relative_errors(ours, expected)) < 1e-6, _relative_errors(ours, expected)
    backward = set(field.times)
    # The right-hand side jumps at 0.7 and 1.5: no backward evaluation sits on a jump (a stage
    # there would be on the wrong side of it), and the solve stopped at each and evaluated
    # again one ulp on the far side (the side it integrates into).
    towards = -np.inf if not decreasing else np.inf
    for tj in jumps:
        assert tj not in backward
        assert np.nextafter(tj, towards) in backward, (tj, sorted(backward))
    # Step times: a step lands on them (its last stage is evaluated one ulp before them).
    for ts in steps:
        assert np.nextafter(ts, -towards) in backward, (ts, sorted(backward))


def test_adjoint_options_barriers_are_added_to_the_forward_ones():
    """adjoint_options may set step_t/jump_t too: they are honoured (the backward solve lands
    there) together with the forward options' ones, and the gradients do not change."""
    torch.manual_seed(2)
    W = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    field = _SwitchedField(W, [0.4])
    grads = []
    extra = {"step_t": torch.tensor([0.25, 1.3], dtype=torch.float64), "jump_t": [0.4]}
    for adjoint_options in (None, extra):
        y = odeint_adjoint_carry(field, y0, t, rtol=1e-10, atol=1e-10, method="dopri5",
                                 options={"jump_t": [0.4]}, adjoint_options=adjoint_options,
                                 adjoint_params=(W,))
        field.times = []
        grads.append(torch.autograd.grad(y.square().sum(), (y0, W)))
        if adjoint_options is not None:
            for ts in (0.25, 1.3):
                assert np.nextafter(ts, np.inf) in set(field.times), ts
    for a, b in zip(*grads):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-7, atol=1e-10)


def test_solver_config_with_jump_times_trains_through_the_carry_adjoint():
    """The user-facing case of issue 12: SolverConfig(extra_options={"jump_t": ...}) used to
    raise "adjoint_options may not set 'jump_t'"; the gradients now equal direct backprop."""

    def grads(adjoint):
        torch.manual_seed(4)
        cnf = CNF(ODENet(2, (8,), layer_type="concatsquash", nonlinearity="tanh").double(),
                  trace="exact",
                  solver=SolverConfig(backprop="adjoint" if adjoint else "direct", atol=1e-10,
                                      rtol=1e-10,
                                      extra_options={"jump_t": torch.tensor([0.3]),
                                                     "step_t": torch.tensor([0.6])}))
        x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        z, ladj = cnf(x)
        (-(standard_normal_logprob(z) + ladj).mean()).backward()
        return [p.grad for p in cnf.parameters()]

    for a, b in zip(grads(True), grads(False), strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-9)
