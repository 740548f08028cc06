"""Fixed-grid training with every backprop strategy and regularizer.

Step checkpoints recompute each fixed step in the backward pass from its stored start, so their
gradients are direct backprop's to rounding (float64 here), with the trajectory penalty's
interior times (cubic Hermite dense output on a fixed grid) and with RNODE's kinetic terms. The
continuous adjoint runs too (its gradients are the adjoint ODE's, close but not equal). NFE: a
fixed step costs its stages forward, and the same again when the checkpoints recompute it.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import train
from polyreg_cnf import CNF, ODENet, SolverConfig, TrajectoryRecorder, odeint
from polyreg_cnf.engine import KineticRecorder
from polyreg_cnf.engine.penalty import trajectory_polynomial_penalty
from polyreg_cnf.engine.recording import penalty_grid
from polyreg_cnf.engine.step_checkpoint import evaluations_per_step

STAGES = {"euler": 1, "midpoint": 2, "rk4": 4}
K = 2  # the penalty's interior times per solve


def _cnf() -> CNF:
    torch.manual_seed(6)
    return CNF(ODENet(2, (16, 16), "concatsquash", "tanh"), trace="hutchinson").double()


def _step(cnf, x, method, backprop, regularizer):
    """Gradients and NFE of one training step of ``cnf`` on ``x``.

    With a regularizer the loss is the regularizer alone, so that its own gradient is compared
    (the NLL's is compared without one).
    """
    cnf.solver = SolverConfig(method=method, step_size=0.25, backprop=backprop)
    cnf.zero_grad()
    cnf.nfe.reset()
    torch.manual_seed(5)  # the same Hutchinson probe for every strategy
    recorder = {"poly": TrajectoryRecorder(K, 1, generator=torch.Generator().manual_seed(0)),
                "kinetic": KineticRecorder()}.get(regularizer, contextlib.nullcontext())
    with recorder:
        z, ladj = cnf(x)
    if regularizer == "poly":
        loss = recorder.penalty()
    elif regularizer == "kinetic":
        loss = recorder.kinetic + recorder.jacobian
    else:
        loss = -(-0.5 * z.square().sum(1) + ladj).mean()
    loss.backward()
    return [p.grad.clone() for p in cnf.parameters()], cnf.nfe


@pytest.mark.parametrize("regularizer", ["none", "poly", "kinetic"])
@pytest.mark.parametrize("method", list(STAGES))
def test_step_checkpoints_give_direct_backprops_gradients_on_a_fixed_grid(method, regularizer):
    cnf = _cnf()
    x = torch.randn(32, 2, dtype=torch.float64)
    direct, nfe_direct = _step(cnf, x, method, "direct", regularizer)
    ckpt, nfe_ckpt = _step(cnf, x, method, "checkpoint", regularizer)
    assert all(float(g.abs().sum()) > 0 for g in direct)
    for g, r in zip(ckpt, direct):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    # 4 steps of 1 / 0.25; cubic dense output adds the field at a step's end per output time
    # (K interior times and the end time) when the penalty is on.
    forward = 4 * STAGES[method] + (K + 1 if regularizer == "poly" else 0)
    assert nfe_direct.forward == nfe_ckpt.forward == forward
    assert nfe_ckpt.backward == forward  # every step recomputed once, interpolation included
    assert evaluations_per_step(method) == STAGES[method]


@pytest.mark.parametrize("regularizer", ["poly", "kinetic"])
def test_the_adjoint_trains_on_a_fixed_grid_with_each_regularizer(regularizer):
    cnf = _cnf()
    x = torch.randn(32, 2, dtype=torch.float64)
    direct, _ = _step(cnf, x, "rk4", "direct", regularizer)
    adjoint, nfe = _step(cnf, x, "rk4", "adjoint", regularizer)
    assert nfe.backward > 0 and all(float(g.abs().sum()) > 0 for g in direct)
    for g, r in zip(adjoint, direct):  # the adjoint ODE's own rk4 error, not rounding
        torch.testing.assert_close(g, r, rtol=1e-2, atol=1e-3)


def test_penalty_on_a_fixed_grid_matches_the_closed_form_on_a_linear_ode():
    # z' = A z: z(t) = expm(tA) z0. On 4 rk4 steps the recorder's penalty (cubic dense output
    # at the interior times) is the closed form's at the same times to well under 1 %; linear
    # dense output, torchdiffeq's default, misses a tenth of it.
    A = torch.tensor([[-1.0, 3.0], [-3.0, -1.0]], dtype=torch.float64)
    z0 = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    recorder = TrajectoryRecorder(K, 1, generator=torch.Generator().manual_seed(1))
    with recorder:
        odeint(lambda s, z: z @ A.T, z0.clone().requires_grad_(True), t, method="rk4",
               options={"step_size": 0.25})
    times = penalty_grid(t, K, torch.Generator().manual_seed(1)).times
    exact = torch.stack([z0 @ torch.linalg.matrix_exp(s * A).T for s in times])
    truth = trajectory_polynomial_penalty(times, exact, 1)
    torch.testing.assert_close(recorder.penalty().detach(), truth, rtol=1e-2, atol=0.0)


@pytest.mark.parametrize("reg", ["poly", "kinetic"])
def test_train_runs_rk4_with_step_checkpoints(reg, tmp_path, capsys):
    code = train.main(["--data", "checkerboard", "--solver", "rk4", "--step-size", "0.25",
                       "--backprop", "checkpoint", "--reg", reg, "--max-steps", "2",
                       "--hidden-dims", "16,16", "--batch-size", "64", "--eval-batch-size",
                       "500", "--eval-atol", "1e-3", "--eval-rtol", "1e-3", "--limit-val-batches",
                       "0", "--no-test", "--no-progress", "--accelerator", "cpu", "--logger",
                       "csv", "--output-dir", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert code == 0
    assert "training solver:            rk4, step_size=0.25" in out
    # 4 rk4 steps; the penalty's cubic dense output adds K + 1 = 3 (the preset's K = 2)
    nfe = 19.0 if reg == "poly" else 16.0
    assert f"forward NFE per step:       {nfe}" in out
    assert f"backward NFE per step:      {nfe}" in out
