"""The CNF engine against closed forms: linear ODEs, Gaussians, gradients, NFE accounting."""

import numpy as np
import pytest
import torch
from scipy.linalg import expm, logm
from scipy.stats import multivariate_normal
from torch import nn

from polyreg_cnf import (
    CNF,
    CNFStack,
    KineticRecorder,
    NFELimitError,
    ODEBlock,
    ODENet,
    SolverConfig,
    TrajectoryRecorder,
    collect_nfe,
    divergence_exact,
    divergence_hutchinson,
    reset_nfe,
    standard_normal_logprob,
)
from polyreg_cnf.engine.nets import LAYER_TYPES, NONLINEARITIES
from polyreg_cnf.engine.strategies import Adjoint

TIGHT = dict(atol=1e-10, rtol=1e-10)


class Linear(nn.Module):
    """dz/dt = A z (+ b): the closed-form test system."""

    def __init__(self, A, b=None):
        super().__init__()
        self.A = nn.Parameter(torch.as_tensor(A, dtype=torch.float64).clone())
        self.b = None if b is None else nn.Parameter(torch.as_tensor(b, dtype=torch.float64))

    def forward(self, t, z):
        out = z @ self.A.T
        return out if self.b is None else out + self.b


def random_A(d, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(d, d)) * 0.5


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
@pytest.mark.parametrize("adjoint", [False, True])
def test_linear_ode_matches_expm_and_trace(trace, adjoint):
    A, T = random_A(3, 0), 1.3
    backprop = "adjoint" if adjoint else "direct"
    cnf = CNF(Linear(A), T=T, trace=trace, solver=SolverConfig(backprop=backprop, **TIGHT))
    z0 = torch.randn(5, 3, dtype=torch.float64)
    zT, ladj = cnf(z0)
    np.testing.assert_allclose(zT.detach().numpy(), z0.numpy() @ expm(T * A).T, atol=1e-8)
    # the Jacobian of a linear field is A everywhere, so even Hutchinson is exact here in
    # expectation; for Rademacher probes it is exact up to the off-diagonal terms
    if trace == "exact":
        np.testing.assert_allclose(ladj.detach().numpy(), T * np.trace(A), atol=1e-8)
        # log-density change of the map is -T tr(A)
        logp_change = -ladj
        np.testing.assert_allclose(logp_change.detach().numpy(), -T * np.trace(A), atol=1e-8)


def test_reverse_inverts_the_forward_map():
    cnf = CNF(ODENet(2, (16, 16)), T=0.7, solver=SolverConfig(backprop="direct", **TIGHT),
              trace="exact").double()
    x = torch.randn(6, 2, dtype=torch.float64)
    z, ladj = cnf(x)
    x_back, ladj_back = cnf(z, reverse=True)
    np.testing.assert_allclose(x_back.detach().numpy(), x.numpy(), atol=1e-7)
    np.testing.assert_allclose((ladj + ladj_back).detach().numpy(), 0.0, atol=1e-7)


def test_gaussian_to_gaussian_flow_gives_the_exact_log_likelihood():
    # x ~ N(mu, S) with S = M M^T; dz/dt = A z + b with expm(T A) = M^{-1} maps x to N(0, I)
    rng = np.random.default_rng(3)
    B = rng.normal(size=(3, 3))
    M = expm(0.3 * (B + B.T))  # symmetric positive definite, real logarithm
    mu = rng.normal(size=3)
    T = 1.0
    A = np.real(logm(np.linalg.inv(M))) / T
    # z(T) = e^{TA} x + A^{-1}(e^{TA} - I) b; choose b so that z(T) = e^{TA}(x - mu)
    E = expm(T * A)
    b = A @ np.linalg.solve(E - np.eye(3), -E @ mu)
    cnf = CNF(Linear(A, b), T=T, trace="exact", solver=SolverConfig(backprop="direct", **TIGHT))
    x = torch.from_numpy(rng.multivariate_normal(mu, M @ M.T, size=50))
    z, ladj = cnf(x)
    logp = standard_normal_logprob(z) + ladj
    ref = multivariate_normal(mu, M @ M.T).logpdf(x.numpy())
    np.testing.assert_allclose(logp.detach().numpy(), ref, atol=1e-7)


def test_hutchinson_averages_to_the_exact_trace():
    torch.manual_seed(0)
    net = ODENet(4, (32,), nonlinearity="softplus").double()
    z = torch.randn(1, 4, dtype=torch.float64).repeat(20000, 1).requires_grad_(True)
    f = net(torch.tensor(0.3), z)
    exact = divergence_exact(f, z, create_graph=False)[0].item()
    for kind in ("rademacher", "gaussian"):
        from polyreg_cnf.engine.trace import sample_probe
        est = divergence_hutchinson(f, z, sample_probe(z, kind), create_graph=False)
        se = est.std().item() / len(est) ** 0.5
        assert abs(est.mean().item() - exact) < 5 * se + 1e-12, (kind, est.mean().item(), exact)


def test_gradcheck_through_a_fixed_step_solve():
    torch.manual_seed(1)
    net = ODENet(2, (5,), nonlinearity="tanh").double()
    cnf = CNF(net, T=0.5, trace="exact",
              solver=SolverConfig(method="rk4", step_size=0.125, backprop="direct"))
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    w = net.layers[0].linear.weight

    def fn(x_, w_):
        with torch.no_grad():
            w.copy_(w_)
        z, ladj = cnf(x_)
        return z, ladj

    assert torch.autograd.gradcheck(lambda x_: cnf(x_), (x,))
    # parameters: compare autograd against central differences
    z, ladj = cnf(x)
    (standard_normal_logprob(z) + ladj).sum().backward()
    grad = w.grad.clone()
    num = torch.zeros_like(w)
    with torch.no_grad():
        for i in range(w.shape[0]):
            for j in range(w.shape[1]):
                base = w[i, j].item()
                vals = []
                for h in (1e-6, -1e-6):
                    w[i, j] = base + h
                    zz, ll = cnf(x)
                    vals.append((standard_normal_logprob(zz) + ll).sum().item())
                w[i, j] = base
                num[i, j] = (vals[0] - vals[1]) / 2e-6
    np.testing.assert_allclose(grad.numpy(), num.numpy(), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("seminorm", [False, True])
@pytest.mark.parametrize("train_T", [False, True])
def test_adjoint_gradients_equal_direct_backprop(seminorm, train_T):
    def grads(adjoint):
        torch.manual_seed(5)
        net = ODENet(2, (8, 8), layer_type="concatsquash", nonlinearity="softplus").double()
        cnf = CNF(net, T=0.8, train_T=train_T, trace="exact",
                  solver=SolverConfig(backprop=Adjoint(seminorm=seminorm) if adjoint else "direct",
                                      **TIGHT))
        x = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
        with TrajectoryRecorder(3, 1) as recorder:
            z, ladj = cnf(x)
        loss = -(standard_normal_logprob(z) + ladj).mean() + 5 * recorder.penalty()
        loss.backward()
        return [x.grad] + [p.grad for p in cnf.parameters()]

    for a, b in zip(grads(False), grads(True)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_penalty_times_cost_no_extra_forward_steps(trace):
    """Dense output: asking for K interior times leaves the forward steps unchanged."""
    torch.manual_seed(2)
    cnf = CNF(ODENet(2, (32, 32)), trace=trace, solver=SolverConfig(atol=1e-5, rtol=1e-5))
    x = torch.randn(64, 2)
    torch.manual_seed(9)
    cnf(x)
    plain = collect_nfe(cnf)
    reset_nfe(cnf)
    torch.manual_seed(9)
    with TrajectoryRecorder(num_samples=5, order=2) as recorder:
        cnf(x)
    penalty = recorder.penalty()
    assert penalty is not None and penalty.item() > 0  # a curved trajectory is penalised
    regularized = collect_nfe(cnf)
    assert regularized["forward"] == plain["forward"] > 8
    assert regularized["accepted"] == plain["accepted"]
    assert regularized["rejected"] == plain["rejected"]


def test_nfe_counts_forward_and_backward_apart():
    torch.manual_seed(0)
    cnf = CNF(ODENet(2, (16,)), solver=SolverConfig(backprop="adjoint", atol=1e-4, rtol=1e-4))
    z, ladj = cnf(torch.randn(10, 2))
    nfe = cnf.nfe
    # dopri5: 2 evaluations to pick the first step, then 6 per step (first same as last)
    assert nfe.forward == 2 + 6 * (nfe.accepted + nfe.rejected)
    assert nfe.backward == 0
    (z.sum() + ladj.sum()).backward()
    assert nfe.backward > 0
    # one interval [0, T]: the restart-free adjoint (polyreg_cnf.engine.adjoint, the default) starts
    # with the forward solve's last step instead of selecting one, so it pays 1 to start, not 2
    # (torchdiffeq's stock adjoint, adjoint_carry_step=False, pays 2)
    assert nfe.backward == 1 + 6 * (nfe.accepted_backward
                                   + nfe.rejected_backward)
    stats = collect_nfe(cnf)
    assert stats["total"] == nfe.forward + nfe.backward


def test_direct_backprop_has_no_backward_evaluations():
    cnf = CNF(ODENet(2, (16,)), solver=SolverConfig(backprop="direct"))
    z, ladj = cnf(torch.randn(10, 2))
    (z.sum() + ladj.sum()).backward()
    assert cnf.nfe.backward == 0 and cnf.nfe.forward > 0


def test_probe_is_fixed_within_a_solve_and_redrawn_between_solves():
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, t, z):
            return torch.tanh(self.lin(z))

    cnf = CNF(Spy(), trace="hutchinson", solver=SolverConfig(backprop="direct"))
    original = torch.autograd.grad

    def spy_grad(outputs, inputs, grad_outputs=None, **kw):
        if grad_outputs is not None:
            seen.append(grad_outputs.clone() if torch.is_tensor(grad_outputs) else None)
        return original(outputs, inputs, grad_outputs, **kw)

    torch.autograd.grad = spy_grad
    try:
        x = torch.randn(8, 2)
        cnf(x)
        first = list(seen)
        seen.clear()
        cnf(x)
        second = list(seen)
    finally:
        torch.autograd.grad = original
    assert len(first) > 6 and all(torch.equal(first[0], e) for e in first)
    assert not torch.equal(first[0], second[0])


def test_penalty_recorded_only_when_training_with_grad():
    cnf = CNF(ODENet(2, (8,)), solver=SolverConfig(backprop="direct"))
    x = torch.randn(4, 2)
    with TrajectoryRecorder(2, 1) as recorder:
        cnf.eval()
        cnf(x)
        assert recorder.penalty() is None
        cnf.train()
        with torch.no_grad():
            cnf(x)
        assert recorder.penalty() is None
        cnf(x)
        cnf(x)
        assert recorder.penalty() is not None and len(recorder.penalties) == 2
    cnf(x)
    assert len(recorder.penalties) == 2


def test_evaluation_uses_evaluation_tolerances():
    torch.manual_seed(0)
    cnf = CNF(ODENet(2, (32, 32)),
              solver=SolverConfig(atol=1e-3, rtol=1e-3, eval_atol=1e-8, eval_rtol=1e-8))
    x = torch.randn(32, 2)
    cnf.train()
    with torch.no_grad():
        cnf(x)
    loose = cnf.nfe.forward
    reset_nfe(cnf)
    cnf.eval()
    with torch.no_grad():
        cnf(x)
    assert cnf.nfe.forward > 2 * loose


def test_inference_mode_does_not_break_the_trace():
    cnf = CNF(ODENet(2, (8,)), trace="exact", eval_trace="exact").eval()
    x = torch.randn(5, 2)
    with torch.no_grad():
        ref = cnf(x)
    with torch.inference_mode():
        got = cnf(x)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])


def test_max_nfe_fails_fast():
    cnf = CNF(ODENet(2, (8,)), solver=SolverConfig(atol=1e-12, rtol=1e-12, max_nfe=30))
    with pytest.raises(NFELimitError, match="max_nfe=30"):
        cnf(torch.randn(4, 2))


def test_plain_ode_block_and_stack():
    block = ODEBlock(Linear(random_A(2, 1)), T=1.0, solver=SolverConfig(backprop="direct", **TIGHT))
    y0 = torch.randn(3, 2, dtype=torch.float64)
    np.testing.assert_allclose(block(y0).detach().numpy(),
                               y0.numpy() @ expm(random_A(2, 1)).T, atol=1e-8)
    A1, A2 = random_A(2, 4), random_A(2, 5)
    stack = CNFStack([CNF(Linear(A1), trace="exact", solver=SolverConfig(**TIGHT)),
                      CNF(Linear(A2), T=0.5, trace="exact", solver=SolverConfig(**TIGHT))])
    z, ladj = stack(y0)
    np.testing.assert_allclose(z.detach().numpy(),
                               y0.numpy() @ expm(A1).T @ expm(0.5 * A2).T, atol=1e-8)
    np.testing.assert_allclose(ladj.detach().numpy(), np.trace(A1) + 0.5 * np.trace(A2),
                               atol=1e-8)
    assert len(collect_nfe(stack)["blocks"]) == 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="rk45"), "unknown solver method 'rk45'; valid: dopri5"),
    (dict(atol=0.0), "atol must be a finite number > 0, got 0.0"),
    (dict(rtol=-1e-3), "rtol must be"),
    (dict(eval_atol=float("nan")), "eval_atol"),
    (dict(method="rk4"), "needs step_size"),
    (dict(max_nfe=0), "max_nfe must be a positive int"),
    (dict(backprop="sideways"), "backprop must be one of auto, direct, adjoint, checkpoint"),
    (dict(method="fixed_adams", step_size=0.1, backprop="checkpoint"),
     "cannot be recomputed step by step"),
])
def test_solver_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SolverConfig(**kwargs)


@pytest.mark.parametrize("build,match", [
    (lambda: CNF(ODENet(2), trace="exakt"), "unknown trace 'exakt'"),
    (lambda: CNF(ODENet(2), noise="uniform"), "unknown noise 'uniform'"),
    (lambda: CNF(ODENet(2), T=0), "T must be a finite number > 0, got 0"),
    (lambda: ODENet(2, layer_type="squash"), "unknown layer_type 'squash'"),
    (lambda: ODENet(2, nonlinearity="gelu"), "unknown nonlinearity 'gelu'"),
    (lambda: ODENet(0), "dim must be a positive int, got 0"),
    (lambda: CNFStack([]), "non-empty"),
])
def test_constructors_reject_bad_values(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_cnf_rejects_wrong_input_shape():
    with pytest.raises(ValueError, match="shape \\(B, D\\), got \\(2, 3, 4\\)"):
        CNF(ODENet(4))(torch.zeros(2, 3, 4))


def test_kinetic_terms_match_closed_forms_for_linear_dynamics():
    # dz/dt = A z: kinetic energy = int_0^T 0.5 |A expm(tA) z0|^2 dt (quadrature), and the
    # Hutchinson Frobenius term averages to T ||A||_F^2.
    A, T = random_A(2, 7), 0.9
    cnf = CNF(Linear(A), T=T, trace="hutchinson", noise="gaussian",
              solver=SolverConfig(backprop="direct", **TIGHT))
    torch.manual_seed(0)
    z0 = torch.randn(1, 2, dtype=torch.float64).repeat(4000, 1)
    with KineticRecorder() as recorder:
        z, ladj = cnf(z0)
    kinetic, jacobian = recorder.kinetic, recorder.jacobian
    ts = np.linspace(0, T, 2001)
    vals = [0.5 * np.sum((A @ expm(t * A) @ z0[0].numpy()) ** 2) for t in ts]
    np.testing.assert_allclose(kinetic.item(), np.trapezoid(vals, ts), rtol=1e-5)
    assert jacobian.item() == pytest.approx(T * np.sum(A ** 2), rel=0.05)
    # the flow itself is unchanged by the extra states
    np.testing.assert_allclose(z.detach().numpy(), z0.numpy() @ expm(T * A).T, atol=1e-8)
    cnf(z0)
    assert recorder.solves == 1


# Every layer x activation x trace under direct backprop; under the adjoint (13-23 s a case with
# relu, whose kinks make the adjoint solve take many steps) the default activation runs by
# default and the rest with the slow tests.
FORWARD_CASES = [
    pytest.param(layer, act, trace, backprop,
                 marks=[pytest.mark.slow] if backprop == "adjoint" and act != "tanh" else [])
    for backprop in ("direct", "adjoint") for trace in ("exact", "hutchinson")
    for layer in LAYER_TYPES for act in NONLINEARITIES]


@pytest.mark.parametrize(("layer", "act", "trace", "backprop"), FORWARD_CASES)
def test_forward_mode_cnf_equals_the_reverse_mode_one(layer, act, trace, backprop):
    """The default (forward-mode) CNF and the reverse-mode CNF: same solve, same gradients."""
    results = []
    for divergence in ("reverse", "auto"):
        torch.manual_seed(3)
        net = ODENet(2, (12, 12), layer, act).double()
        cnf = CNF(net, T=0.7, trace=trace, divergence=divergence,
                  solver=SolverConfig(backprop=backprop, atol=1e-8, rtol=1e-8))
        x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        torch.manual_seed(5)  # the same Hutchinson probe for both
        z, ladj = cnf(x)
        loss = (z.square().sum(1) / 2 - ladj).mean()
        grads = torch.autograd.grad(loss, list(cnf.parameters()))
        with torch.no_grad():
            evaluated = cnf.eval()(x)[1]
        results.append((z, ladj, grads, evaluated, cnf.nfe.forward))
    (z0, l0, g0, e0, n0), (z1, l1, g1, e1, n1) = results
    assert n0 == n1  # the same steps
    # float64 round-off of two ways to the same numbers, carried through an adaptive solve at
    # 1e-8 (a wrong derivative would be off by percents)
    torch.testing.assert_close(z1, z0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(l1, l0, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(e1, e0, rtol=1e-8, atol=1e-9)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_divergence_mode_is_checked_and_auto_falls_back_for_other_fields():
    with pytest.raises(ValueError, match="unknown divergence 'sideways'"):
        CNF(ODENet(2, (8,)), divergence="sideways")
    with pytest.raises(ValueError, match="needs one of the project's nets"):
        CNF(Linear(random_A(2, 0)), divergence="forward")
    # auto on a user's field: the reverse mode, the same numbers as asking for it
    A = random_A(2, 1)
    out = [CNF(Linear(A), trace="exact", divergence=d, solver=SolverConfig(**TIGHT))(
        torch.ones(3, 2, dtype=torch.float64))[1] for d in ("auto", "reverse")]
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    # auto on the project's own net is the forward mode: no double backward in a step
    cnf = CNF(ODENet(2, (8,)), solver=SolverConfig(backprop="direct"))
    seen = []
    original = torch.autograd.grad

    def spy(*args, **kwargs):
        seen.append(kwargs.get("create_graph"))
        return original(*args, **kwargs)

    torch.autograd.grad = spy
    try:
        cnf(torch.randn(4, 2))
    finally:
        torch.autograd.grad = original
    assert seen == []
