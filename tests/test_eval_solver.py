"""The evaluation solver apart from the training one, ``val/solver_gap`` and few-step sampling.

Closed forms: for linear dynamics dz/dt = A z one step h of a Runge-Kutta method is z -> R(hA) z
with R its stability polynomial (rk4: I + X + X^2/2 + X^3/6 + X^4/24, euler: I + X), so k equal
steps over [0, T] give exactly R(TA/k)^k z(0); the log-density change T tr(A) is integrated
exactly by every method (its integrand is constant).
"""

import dataclasses
import math

import lightning as L
import pytest
import torch
from polyreg_cnf.callbacks.plots import sample_trajectories
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from polyreg_cnf import CNF, SolverConfig
from polyreg_cnf.app.config import ConfigError, make_parser, parse_command_line, resolve
from polyreg_cnf.app.report import SOLVER_GAP_WARNING, solver_lines
from polyreg_cnf.engine.ode import training_solves
from polyreg_cnf.engine.solver_config import UniformGrid
from polyreg_cnf.models import CNFDensityEstimator

A = torch.tensor([[0.3, 1.1], [-0.7, -0.4]], dtype=torch.float64)
T = 1.5


class Linear(nn.Module):
    """dz/dt = A z."""

    dim = 2  # what the trajectory plot reads

    def __init__(self) -> None:
        super().__init__()
        self.A = nn.Parameter(A.clone())

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return z @ self.A.T


def stepped(method: str, steps: int, span: float) -> torch.Tensor:
    """R(span A / steps)^steps: the exact result of ``steps`` steps of ``method``."""
    x = span * A / steps
    eye = torch.eye(2, dtype=torch.float64)
    one = {"euler": eye + x,
           "rk4": eye + x + x @ x / 2 + x @ x @ x / 6 + x @ x @ x @ x / 24}[method]
    return torch.linalg.matrix_power(one, steps)


def linear_cnf(**solver: object) -> CNF:
    return CNF(Linear(), T=T, trace="exact", eval_trace="exact",
               solver=SolverConfig(backprop="direct", **solver))


Z0 = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------ SolverConfig
def test_the_evaluation_solver_defaults_to_dopri5_whatever_trains():
    solver = SolverConfig(method="rk4", step_size=0.5)
    assert solver.method_for(True) == "rk4" and solver.method_for(False) == "dopri5"
    assert solver.options(False) == {} and solver.options(True) == {"step_size": 0.5}
    assert solver.evaluation_differs and not SolverConfig().evaluation_differs
    fixed = SolverConfig(eval_method="rk4", eval_steps=3)
    assert fixed.options(False) == {"grid_constructor": UniformGrid(3)}
    assert SolverConfig.from_dict(fixed.to_dict()) == fixed


@pytest.mark.parametrize("kwargs,match", [
    (dict(eval_method="rk4"), "needs eval_steps, got None"),
    (dict(eval_steps=4), "fixed-grid eval_method only, got eval_steps=4"),
    (dict(eval_method="rk5"), "unknown eval_method 'rk5'"),
    (dict(eval_method="rk4", eval_steps=0), "eval_steps must be a positive int, got 0"),
])
def test_bad_evaluation_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SolverConfig(**kwargs)


def test_an_old_solver_dict_without_evaluation_fields_loads():
    # what checkpoints written before the evaluation solver hold
    old = {k: v for k, v in SolverConfig(method="rk4", step_size=0.25).to_dict().items()
           if k not in ("eval_method", "eval_steps")}
    solver = SolverConfig.from_dict(old)
    assert solver.method == "rk4" and solver.method_for(False) == "dopri5"
    old_adaptive = {k: v for k, v in SolverConfig().to_dict().items()
                    if k not in ("eval_method", "eval_steps")}
    assert SolverConfig.from_dict(old_adaptive) == SolverConfig()
    model = CNFDensityEstimator(2, hidden_dims=(8,), solver=old).eval()
    reference = CNFDensityEstimator(2, hidden_dims=(8,), solver=SolverConfig()).eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(16, 2)
    with torch.no_grad():
        torch.testing.assert_close(model.log_prob(x), reference.log_prob(x))


# ------------------------------------------------------------------ the solves
def test_eval_mode_solves_with_the_evaluation_method_train_mode_with_the_training_one():
    cnf = linear_cnf(method="rk4", step_size=T / 2, eval_atol=1e-10, eval_rtol=1e-10)
    exact = Z0 @ torch.linalg.matrix_exp(T * A).T
    with torch.no_grad():
        z_train, _ = cnf.train()(Z0)
        z_eval, ladj = cnf.eval()(Z0)
    torch.testing.assert_close(z_train, Z0 @ stepped("rk4", 2, T).T)
    assert (z_train - exact).abs().max() > 1e-3  # two rk4 steps are visibly off
    torch.testing.assert_close(z_eval, exact, atol=1e-8, rtol=0)
    torch.testing.assert_close(ladj, torch.full((5,), T * float(A.trace()), dtype=torch.float64))


@pytest.mark.parametrize("method,steps", [("rk4", 1), ("rk4", 3), ("euler", 4)])
def test_k_evaluation_steps_give_the_method_s_closed_form(method, steps):
    cnf = linear_cnf(eval_method=method, eval_steps=steps).eval()
    with torch.no_grad():
        z, ladj = cnf(Z0)
        back, _ = cnf(Z0, reverse=True)
    torch.testing.assert_close(z, Z0 @ stepped(method, steps, T).T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(back, Z0 @ stepped(method, steps, -T).T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ladj, torch.full((5,), T * float(A.trace()), dtype=torch.float64))
    stages = {"rk4": 4, "euler": 1}[method]
    assert cnf.nfe.forward == 2 * stages * steps  # two solves, no sliver of an extra step


def test_training_solves_switches_to_the_training_solver_without_counting():
    cnf = linear_cnf(method="euler", step_size=T / 4).eval()
    with torch.no_grad():
        before = cnf(Z0)[0]
        count = cnf.nfe.forward
        with training_solves(cnf):
            z, _ = cnf(Z0)
        after = cnf(Z0)[0]
    torch.testing.assert_close(z, Z0 @ stepped("euler", 4, T).T)
    assert cnf.nfe.forward == 2 * count  # the training solve left the counter alone
    torch.testing.assert_close(before, after)


def test_the_trajectory_plot_uses_the_evaluation_solver():
    cnf = linear_cnf(method="rk4", step_size=T / 8, eval_method="euler", eval_steps=2)
    _, paths = sample_trajectories([cnf], num_points=3, num_times=2,
                                   generator=torch.Generator().manual_seed(1))
    z = paths[0].to(torch.float64)
    torch.testing.assert_close(paths[-1].to(torch.float64), z @ stepped("euler", 2, -T).T)


# ------------------------------------------------------------------ the density model
def linear_density(solver_gap_rows: int = 1000, **solver: object) -> CNFDensityEstimator:
    """A density model whose one block's field is dz/dt = A z (float64)."""
    model = CNFDensityEstimator(2, hidden_dims=(4,), T=T, divergence="reverse",
                                solver=SolverConfig(backprop="direct", **solver),
                                solver_gap_rows=solver_gap_rows).double()
    model.flow.blocks[0].net = Linear()
    return model


def test_sample_with_steps_is_k_fixed_steps_back_from_t():
    model = linear_density(eval_atol=1e-10, eval_rtol=1e-10).train()
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for steps, method in ((2, "rk4"), (5, "euler")):
        x = model.sample(6, generator=torch.Generator().manual_seed(3), steps=steps,
                         method=method)
        torch.testing.assert_close(x, z @ stepped(method, steps, -T).T)
    assert model.training and model.flow.blocks[0].training  # the mode came back
    assert model.flow.blocks[0].solver == model.solver  # and the solver
    exact = model.eval().sample(6, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(exact, z @ torch.linalg.matrix_exp(-T * A).T, atol=1e-8, rtol=0)
    with pytest.raises(ValueError, match="fixed-grid method, got 'dopri5'"):
        model.sample(2, steps=2, method="dopri5")
    with pytest.raises(ValueError, match="steps must be a positive int, got 0"):
        model.sample(2, steps=0)


def validate(model: CNFDensityEstimator, x: torch.Tensor) -> dict[str, float]:
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, accelerator="cpu")
    loader = DataLoader(TensorDataset(x), batch_size=7)
    return {k: float(v) for k, v in trainer.validate(model, loader, verbose=False)[0].items()}


def test_val_solver_gap_is_the_mean_gap_over_the_first_rows_only():
    model = linear_density(method="euler", step_size=T / 2, solver_gap_rows=10)
    # A row's log p error under euler depends on the row: the gap is over rows 0-9 only.
    x = torch.randn(20, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    first = validate(model, x)
    second = validate(model, x)
    model.eval()
    with torch.no_grad():
        exact = model.log_prob(x)
        with training_solves(model.flow):
            coarse = model.log_prob(x)
    gap = (coarse - exact).abs()
    assert first["val/solver_gap"] == pytest.approx(float(gap[:10].mean()), rel=1e-5)
    assert first["val/solver_gap"] != pytest.approx(float(gap.mean()), rel=1e-3)
    assert second["val/solver_gap"] == first["val/solver_gap"]
    assert first["val/nll"] == pytest.approx(float(-exact.mean()), rel=1e-6)
    assert first["val/solver_gap"] > SOLVER_GAP_WARNING  # two Euler steps: a warned model
    assert model.last_solver_gap == pytest.approx(first["val/solver_gap"])  # for the summary


def test_no_solver_gap_when_training_and_evaluation_solve_alike():
    model = linear_density()
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert "val/solver_gap" not in validate(model, x)


# ------------------------------------------------------------------ command line and summary
def parse_config(argv: list[str]):
    return resolve(parse_command_line(make_parser(), argv)[0])


def test_the_command_line_sets_the_evaluation_solver():
    config = parse_config(["--data", "checkerboard", "--solver", "rk4", "--step-size", "0.25",
                           "--eval-solver", "rk4", "--eval-steps", "4"])
    solver = config.solver()
    assert (solver.method, solver.step_size, solver.eval_method, solver.eval_steps) == \
        ("rk4", 0.25, "rk4", 4)
    plain = parse_config(["--data", "checkerboard", "--solver", "rk4", "--step-size", "0.25"])
    assert plain.solver().eval_method == "dopri5" and plain.solver().eval_steps is None
    for argv in (["--eval-solver", "rk4"], ["--eval-steps", "4"]):
        with pytest.raises(ConfigError, match="a fixed-grid --eval-solver needs --eval-steps"):
            parse_config(["--data", "checkerboard", *argv])


def test_a_fixed_grid_run_prints_both_solvers_and_its_gap(tmp_path, capsys, euler_run_summary):
    import train

    assert train.main(["--data", "checkerboard", "--hidden-dims", "8,8", "--max-steps", "2",
                       "--batch-size", "64", "--solver", "euler", "--step-size", "1.0",
                       "--output-dir", str(tmp_path), "--logger", "none", "--no-progress",
                       "--val-every", "2", "--limit-val-batches", "1"]) == 0
    gap = euler_run_summary(capsys.readouterr().out)
    assert gap > 0


def test_the_summary_names_both_solvers_and_warns_above_the_threshold():
    solver = SolverConfig(method="rk4", step_size=0.5)
    lines = solver_lines(solver.describe(True), solver.describe(False), None)
    assert lines[0].endswith("rk4, step_size=0.5")
    assert lines[1].split(":", 1)[1].strip().startswith("dopri5, atol=1e-05, rtol=1e-05")
    assert len(lines) == 2
    below = solver_lines("a", "b", SOLVER_GAP_WARNING * 0.9)
    above = solver_lines("a", "b", SOLVER_GAP_WARNING * 1.1)
    assert len(below) == 3 and not any("WARNING" in line for line in below)
    assert above[-1].startswith("WARNING") and f"{SOLVER_GAP_WARNING:g}" in above[-1]
    assert solver_lines("a", "b", math.nan) == solver_lines("a", "b", None)


def test_uniform_grid_spans_any_interval_exactly():
    t = torch.tensor([0.3, 0.7, 1.9])
    grid = UniformGrid(3)(None, None, t)
    assert grid[0] == t[0] and grid[-1] == t[-1] and len(grid) == 4
    torch.testing.assert_close(grid[1:] - grid[:-1], torch.full((3,), 1.6 / 3))
    assert dataclasses.is_dataclass(UniformGrid)


def test_a_fixed_grid_run_s_printed_test_nll_is_its_checkpoint_s_reference(tmp_path, capsys):
    """Issue 28's done-when: trained on one rk4 step per block, scored by the default dopri5;
    the printed test NLL is within 0.01 nats of the reference (dopri5 at 1e-8, float64) on the
    run's own test rows, while the training grid's own reading is not."""
    import train
    from benchmarks.accuracy import Setting, measure
    from polyreg_cnf.app.parts import make_datamodule

    argv = ["--data", "checkerboard", "--hidden-dims", "8,8", "--reg", "none", "--max-steps",
            "30", "--lr", "0.02", "--batch-size", "256", "--solver", "rk4", "--step-size",
            "1.0", "--test-ckpt", "last", "--val-every", "30", "--limit-val-batches", "1",
            "--output-dir", str(tmp_path), "--logger", "none", "--no-progress"]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    printed = float(out.split("test NLL (nats):")[1].split()[0])
    model = CNFDensityEstimator.load_from_checkpoint(out.split("checkpoint:")[1].split()[0],
                                                     map_location="cpu")
    data = make_datamodule(parse_config(argv))
    data.setup("test")
    x = torch.cat([batch[0] for batch in data.test_dataloader()])
    result = measure(model, x, settings=[Setting("rk4", steps=1)], check_rows=1, sample_rows=0)
    reference = result["reference"]["converged_nll"]
    assert abs(printed - reference) < 0.01
    assert abs(result["settings"][0]["nll_read"] - reference) > 0.01  # the grid's own number
