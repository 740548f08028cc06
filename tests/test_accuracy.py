"""The accuracy frontier: its rule on hand-built curves, its measurement on a closed form, its CLI.

The closed form: a CNF whose field is dz/dt = A z maps x to e^{TA} x with log-determinant
T tr(A), so log p(x) = log N(e^{TA} x; 0, I) + T tr(A); k equal steps of a Runge-Kutta method
give R(TA/k)^k x with R its stability polynomial and the same (exactly integrated) determinant.
"""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import accuracy
from benchmarks.accuracy import Record, Setting, compare, compare_seeds, cost_at, measure
from polyreg_cnf import SolverConfig
from polyreg_cnf.engine.cnf import standard_normal_logprob
from polyreg_cnf.models import CNFDensityEstimator


def curve(nll: float, points: list[tuple[str, float, float, float]]) -> list[Record]:
    """(setting, NFE, mean |d|, mean d) points of a model whose converged NLL is ``nll``."""
    return [Record(name, nfe, abs_d, d, nll) for name, nfe, abs_d, d in points]


BASE = curve(3.700, [("dopri5@1e-03", 50, 0.020, 0.010), ("dopri5@1e-04", 80, 0.004, 0.001),
                     ("dopri5@1e-05", 120, 0.001, 0.000)])


# ------------------------------------------------------------------------------ the rule
def test_the_cost_is_the_cheapest_setting_within_the_accuracy():
    assert cost_at(BASE, 0.01).setting == "dopri5@1e-04"
    assert cost_at(BASE, 0.02).setting == "dopri5@1e-03"  # the bound is inclusive
    assert cost_at(BASE, 0.003).setting == "dopri5@1e-05"
    assert cost_at(BASE, 0.0005) is None


def test_a_loose_point_reading_below_the_converged_nll_does_not_win():
    # rk4x2 reads NLL 3.700 - 0.05 = 3.65: below both models' converged NLL and below every
    # reading of the baseline, at 8 NFE. It is 0.05 nats per row off its own model, so at
    # e = 0.01 the other model's cost is its dopri5 point: 100 NFE against the baseline's 80.
    other = curve(3.700, [("rk4x2", 8, 0.050, 0.050), ("dopri5@1e-04", 100, 0.002, 0.000)])
    out = compare(BASE, other, 0.01)
    assert out["verdict"] == "loses"
    assert out["other_cost"] == {"setting": "dopri5@1e-04", "nfe": 100}
    assert out["ratio"] == pytest.approx(100 / 80)
    # with e loose enough for the rk4 point it is a fair win
    assert compare(BASE, other, 0.05)["verdict"] == "wins"


def test_a_model_that_never_meets_the_accuracy():
    rough = curve(3.695, [("rk4x1", 4, 0.3, -0.3), ("rk4x2", 8, 0.08, 0.02)])
    assert compare(BASE, rough, 0.01)["verdict"] == "loses"
    assert compare(BASE, rough, 0.01)["reason"] == "no setting meets 0.01 nats"
    assert compare(rough, BASE, 0.01)["verdict"] == "wins"
    assert compare(rough, rough, 0.01)["verdict"] == "neither"
    assert compare(BASE, rough, 0.01)["ratio"] is None


def test_ties_and_quality():
    same_cost = curve(3.705, [("midpointx8", 80, 0.009, 0.0)])
    assert compare(BASE, same_cost, 0.01)["verdict"] == "ties"
    cheap_but_worse = curve(3.720, [("rk4x2", 8, 0.001, 0.0)])
    out = compare(BASE, cheap_but_worse, 0.01)
    assert out["verdict"] == "loses" and out["nll_diff"] == pytest.approx(0.02)
    assert "converged NLL worse" in out["reason"]
    # equal NFE inside one model: the more accurate setting is its cost
    assert cost_at(curve(1.0, [("a", 8, 0.005, 0), ("b", 8, 0.001, 0)]), 0.01).setting == "b"


def test_seed_by_seed_counts():
    other = {0: curve(3.70, [("rk4x4", 16, 0.003, 0.0)]),
             1: curve(3.70, [("rk4x4", 16, 0.03, 0.0)]),
             2: curve(3.70, [("x", 80, 0.003, 0.0)])}
    out = compare_seeds({0: BASE, 1: BASE, 2: BASE}, other, 0.01)
    assert (out["wins"], out["losses"], out["ties"], out["neither"]) == (1, 1, 1, 0)
    with pytest.raises(ValueError, match="same seeds"):
        compare_seeds({0: BASE}, {1: BASE}, 0.01)


def test_records_are_checked():
    with pytest.raises(ValueError, match="share its converged NLL"):
        cost_at([Record("a", 1, 0.1, 0, 3.0), Record("b", 1, 0.1, 0, 3.1)], 0.01)
    with pytest.raises(ValueError, match="accuracy must be a number > 0"):
        cost_at(BASE, 0)
    with pytest.raises(ValueError, match="mean_abs_d must be a finite number"):
        Record("a", 1, float("nan"), 0, 3.0)
    with pytest.raises(ValueError, match="fixed-grid 'rk4' takes steps"):
        Setting("rk4", tol=1e-3)


# ------------------------------------------------------------------------------ measurement
A = torch.tensor([[0.3, 1.1], [-0.7, -0.4]], dtype=torch.float64)
T = 1.2


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.A = nn.Parameter(A.float())

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return z @ self.A.T


def stability(method: str, x: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(2, dtype=torch.float64)
    return {"euler": eye + x, "midpoint": eye + x + x @ x / 2,
            "rk4": eye + x + x @ x / 2 + x @ x @ x / 6 + x @ x @ x @ x / 24}[method]


def test_measure_matches_the_linear_closed_form():
    model = CNFDensityEstimator(2, hidden_dims=(4,), T=T, divergence="reverse",
                                solver=SolverConfig(backprop="direct"))
    model.flow.blocks[0].net = Linear()
    x = torch.randn(60, 2, generator=torch.Generator().manual_seed(0))
    settings = [Setting("rk4", steps=2), Setting("euler", steps=4), Setting("midpoint", steps=1),
                Setting("dopri5", tol=1e-3)]
    out = measure(model, x, settings, batch_size=30, check_rows=10, sample_rows=20, seed=3)
    x64 = x.double()
    exact_log_p = (standard_normal_logprob(x64 @ torch.linalg.matrix_exp(T * A).T)
                   + T * float(A.trace()))
    ref = out["reference"]
    assert ref["converged_nll"] == pytest.approx(float(-exact_log_p.mean()), abs=1e-7)
    assert ref["check"]["max_abs"] < 1e-7 and ref["rows"] == 60
    z = torch.randn(20, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact_x = z @ torch.linalg.matrix_exp(-T * A).T
    rows = {r["setting"]: r for r in out["settings"]}
    for setting in settings[:3]:
        k, method = setting.steps, setting.method
        step = torch.linalg.matrix_power(stability(method, T * A / k), k)
        d = standard_normal_logprob(x64 @ step.T) + T * float(A.trace()) - exact_log_p
        row = rows[setting.name]
        assert row["mean_abs_d"] == pytest.approx(float(d.abs().mean()), rel=1e-4, abs=1e-6)
        assert row["mean_d"] == pytest.approx(float(d.mean()), rel=1e-4, abs=1e-6)
        assert row["nll_read"] == pytest.approx(ref["converged_nll"] - row["mean_d"], abs=1e-5)
        stages = {"rk4": 4, "euler": 1, "midpoint": 2}[method]
        assert row["nfe"] == stages * k and row["sample_nfe"] == stages * k
        back = torch.linalg.matrix_power(stability(method, -T * A / k), k)
        rms = float((z @ back.T - exact_x).square().mean().sqrt())
        assert row["sample_rms"] == pytest.approx(rms, rel=1e-4, abs=1e-6)
        assert row["mean_abs_d"] > 1e-4  # each is visibly inexact: the test can tell
    assert rows["dopri5@1e-03"]["mean_abs_d"] < rows["euler" + "x4"]["mean_abs_d"]
    assert model.flow.blocks[0].net.A.dtype == torch.float32  # the model was left alone
    page = "\n".join(accuracy.model_table(out))
    assert "| rk4x2 | 8.0 |" in page and "cost at 0.01 nats per row" in page


def test_the_command_line_on_a_tiny_trained_checkpoint(tmp_path):
    import train

    assert train.main(["--data", "checkerboard", "--hidden-dims", "8,8", "--max-steps", "2",
                       "--batch-size", "64", "--output-dir", str(tmp_path / "runs"),
                       "--logger", "none", "--no-test", "--limit-val-batches", "0",
                       "--run-name", "tiny"]) == 0
    ckpt = tmp_path / "runs" / "tiny" / "checkpoints" / "last.ckpt"
    out = tmp_path / "acc"
    assert accuracy.main(["--ckpt", str(ckpt), str(ckpt), "--names", "a", "b", "--rows", "200",
                          "--batch-size", "100", "--check-rows", "20", "--sample-rows", "30",
                          "--settings", "rk4x1", "rk4x4", "dopri5@1e-03",
                          "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    first = result["models"][0]
    assert [r["setting"] for r in first["settings"]] == ["rk4x1", "rk4x4", "dopri5@1e-03"]
    assert first["settings"][0]["nfe"] == 4 and result["setup"]["rows"] == 200
    assert first["settings"][1]["mean_abs_d"] <= first["settings"][0]["mean_abs_d"]
    # the same model twice: every comparison is a tie or neither, never a win
    assert {c["verdict"] for c in result["comparisons"]} <= {"ties", "neither"}
    assert len(result["comparisons"]) == len(accuracy.ACCURACIES)
    page = out.with_suffix(".md").read_text()
    assert "| rk4x4 | 16.0 |" in page and "## Against the first model" in page
    with pytest.raises(SystemExit, match="unknown settings"):
        accuracy.main(["--ckpt", str(ckpt), "--settings", "rk5x1"])


@pytest.mark.parametrize("name", ["accuracy_pilot", "accuracy_pilot_rk4x4"])
def test_the_committed_pilot_pages_render_from_their_json(name):
    results = Path(accuracy.__file__).resolve().parent / "results"
    payload = json.loads((results / f"{name}.json").read_text())
    assert accuracy.STUDY.render(payload) == (results / f"{name}.md").read_text()
    assert payload["note"].startswith("PILOT")
