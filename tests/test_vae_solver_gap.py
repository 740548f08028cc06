"""The CNF-VAE's evaluation solver and its ``val/solver_gap`` (issue 28, item 2 for the VAE).

A tiny VAE on random binary 8 x 8 images; the training solver is one Euler step over the block
(step_size = T), far from the dopri5 evaluation solve, so the gap is visible.
"""

import lightning as L
import pytest
import torch
from polyreg_cnf.callbacks import NFEMonitor
from torch.utils.data import DataLoader, TensorDataset

from polyreg_cnf import SolverConfig
from polyreg_cnf.app.report import SOLVER_GAP_WARNING
from polyreg_cnf.engine.ode import training_solves
from polyreg_cnf.models.vae import CNFVAE
from polyreg_cnf.models.vae_solver_gap import NOISE_SEED

TINY = dict(z_dim=4, hidden_dims=[16], rank=2, feature_dim=16, mlp_hidden=32, num_blocks=1)
T = 0.5
EVAL = dict(eval_atol=1e-5, eval_rtol=1e-5)
EULER = SolverConfig(method="euler", step_size=T, **EVAL)  # one step per block
ADAPTIVE = SolverConfig(atol=1e-4, rtol=1e-4, **EVAL)
X = torch.rand(20, 64, generator=torch.Generator().manual_seed(0)).round()


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(solver: SolverConfig, posterior: str = "amortized", **kw) -> CNFVAE:
    torch.manual_seed(0)  # the same weights for every solver
    return CNFVAE((1, 8, 8), "bernoulli", posterior=posterior, solver=solver, T=T,
                  **{**TINY, **kw})


def run(model: CNFVAE, stage: str, batch_size: int = 7, seed: int = 1) -> dict[str, float]:
    """``trainer.validate`` or ``trainer.test`` on X, from the global seed ``seed``."""
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, accelerator="cpu", callbacks=[NFEMonitor()])
    loader = DataLoader(TensorDataset(X), batch_size=batch_size)
    torch.manual_seed(seed)
    results = getattr(trainer, stage)(model, loader, verbose=False)[0]
    return {k: float(v) for k, v in results.items()}


def test_validation_and_test_solve_with_the_evaluation_solver_whatever_trains():
    # From the same seed (same posterior noise), an Euler-trained and a dopri5-trained model
    # with the same weights read the same validation and test numbers, val/nfe and test/nfe
    # included (the gap's solves are not counted): both come from the evaluation solver. One
    # scored by Euler itself reads otherwise, so the check can tell.
    kw = dict(is_samples=3, val_is_samples=0)
    euler, adaptive = tiny(EULER, **kw), tiny(ADAPTIVE, **kw)
    scored_by_euler = tiny(SolverConfig(method="euler", step_size=T, eval_method="euler",
                                        eval_steps=1), **kw)
    for stage in ("validate", "test"):
        a, b, c = run(euler, stage), run(adaptive, stage), run(scored_by_euler, stage)
        assert {"validate": "val/nfe", "test": "test/nfe"}[stage] in b
        for key in b:
            assert a[key] == pytest.approx(b[key], rel=1e-6), (stage, key)
            assert abs(a[key] - c[key]) > 1e-3, (stage, key)
    assert "val/solver_gap" in run(euler, "validate")  # measured, and left the rest alone


def hand_gap(model: CNFVAE, rows: int, batch_size: int) -> torch.Tensor:
    """Per-image |w(training solver) - w(evaluation solver)| of the first ``rows`` images with
    the gap's fixed noise, in validation's batches (an adaptive solve's steps depend on its
    batch), computed here from the model's own pieces."""
    eps = torch.randn(rows, TINY["z_dim"], dtype=torch.float64,
                      generator=torch.Generator().manual_seed(NOISE_SEED)).float()
    model.eval()
    gaps = []
    with torch.no_grad():
        for x, e in zip(X[:rows].split(batch_size), eps.split(batch_size)):
            log_px, kl = model.elbo_terms(x, e)
            with training_solves(model.flow):
                coarse_px, coarse_kl = model.elbo_terms(x, e)
            gaps.append(((coarse_px - coarse_kl) - (log_px - kl)).abs())
    return torch.cat(gaps)


def test_val_solver_gap_is_the_mean_elbo_gap_over_the_same_first_images_every_time():
    model = tiny(EULER, solver_gap_rows=10, val_is_samples=0)
    first = run(model, "validate", seed=1)
    again = run(model, "validate", seed=2)  # other posterior noise for val/neg_elbo
    other_batches = run(model, "validate", batch_size=4)
    assert first["val/solver_gap"] == pytest.approx(float(hand_gap(model, 10, 7).mean()),
                                                    rel=1e-6)
    assert first["val/solver_gap"] > 1e-3  # one Euler step is visibly off
    # The same images and the same noise each time, whatever the batches.
    assert again["val/solver_gap"] == first["val/solver_gap"]
    # (up to the adaptive evaluation solve's own error, whose steps depend on the batch)
    assert other_batches["val/solver_gap"] == pytest.approx(first["val/solver_gap"], abs=1e-4)
    assert again["val/neg_elbo"] != first["val/neg_elbo"]  # while the validation's noise moves
    assert model.last_solver_gap == other_batches["val/solver_gap"]  # the last, for the summary
    # Over all 20 images the mean would differ: only the first 10 count.
    assert first["val/solver_gap"] != pytest.approx(float(hand_gap(model, 20, 7).mean()), abs=1e-3)


@pytest.mark.parametrize("solver,posterior", [(ADAPTIVE, "amortized"), (EULER, "gaussian")])
def test_no_solver_gap_when_the_solves_agree_or_there_is_no_flow(solver, posterior):
    model = tiny(solver, posterior)
    assert "val/solver_gap" not in run(model, "validate")
    assert model.last_solver_gap is None


@pytest.mark.parametrize("solver", [EULER, ADAPTIVE])
def test_bad_solver_gap_rows_are_refused(solver):
    with pytest.raises(ValueError, match="solver_gap_rows must be a non-negative int, got -1"):
        tiny(solver, solver_gap_rows=-1)


def test_a_fixed_grid_vae_run_prints_its_gap_and_warns(tmp_path, capsys, euler_run_summary):
    import train

    assert train.main(["--model", "vae", "--data", "digits", "--z-dim", "4", "--rank", "2",
                       "--hidden-dims", "16", "--feature-dim", "16", "--mlp-hidden", "32",
                       "--num-blocks", "1", "--T", "1.0", "--max-steps", "2", "--batch-size",
                       "32", "--is-samples", "2", "--solver", "euler", "--step-size", "1.0",
                       "--output-dir", str(tmp_path), "--logger", "none", "--no-progress",
                       "--val-every", "2", "--limit-val-batches", "1"]) == 0
    out = capsys.readouterr().out
    gap = euler_run_summary(out)
    assert gap > SOLVER_GAP_WARNING  # one Euler step over T = 1: a warned model
    assert f"WARNING: the training solver's log-densities are {gap:.3f} nats" in out
