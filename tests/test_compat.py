"""What users already have keeps working: checkpoints and run folders of release 0.1.

``tests/data/checkpoint_v0_1/`` was written by polyreg-cnf at commit b4d2198 (before the one
solve path): a 3-step ``train.py --data 8gaussians --reg poly --hidden-dims 8,8`` run, its
``config.yaml``, and the log-densities that code computed from the checkpoint.
"""

import json
import shutil
import sys
from pathlib import Path

import torch

from polyreg_cnf import Adjoint, Auto, SolverConfig
from polyreg_cnf.models import CNFVAE, CNFDensityEstimator

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "checkpoint_v0_1"
sys.path.insert(0, str(ROOT))
import train  # noqa: E402


def test_an_old_checkpoint_loads_and_scores_as_it_did():
    model = CNFDensityEstimator.load_from_checkpoint(DATA / "last.ckpt").eval()
    # the old flat solver settings become the strategy they meant
    assert model.solver.backprop == Auto(memory_share=None, adjoint=Adjoint(carry=True))
    assert model.solver.tolerances(training=False) == (1e-5, 1e-5)
    expected = json.loads((DATA / "expected.json").read_text())
    with torch.no_grad():
        log_prob = model.log_prob(torch.tensor(expected["x"]))
    torch.testing.assert_close(log_prob, torch.tensor(expected["log_prob"]), rtol=0, atol=1e-4)


def test_an_old_run_resumes_and_its_config_file_runs_again(tmp_path, capsys):
    ckpt = tmp_path / "old.ckpt"
    shutil.copy(DATA / "last.ckpt", ckpt)
    common = ["--output-dir", str(tmp_path / "runs"), "--logger", "none", "--no-test",
              "--limit-val-batches", "0"]
    assert train.main(["--config", str(DATA / "config.yaml"), *common, "--max-steps", "5",
                       "--ckpt-path", str(ckpt), "--run-name", "resumed"]) == 0
    resumed = torch.load(tmp_path / "runs" / "resumed" / "checkpoints" / "last.ckpt",
                         weights_only=False)
    assert resumed["global_step"] == 5  # 3 steps of the old run, then 2 more
    assert train.main(["--config", str(DATA / "config.yaml"), *common, "--max-steps", "1",
                       "--run-name", "again"]) == 0


def test_the_legacy_solver_keys_map_onto_the_strategies():
    old = dict(method="dopri5", atol=1e-4, rtol=1e-4, eval_atol=None, eval_rtol=None,
               backprop="auto", adjoint=False, seminorm=False, adjoint_carry_step=True,
               first_step=None, step_size=None, max_num_steps=None, max_nfe=None,
               memory_share=None, extra_options={})
    solver = SolverConfig.from_dict(old)
    assert solver.backprop.kind == "direct"  # adjoint=False meant direct backprop
    assert solver.tolerances(training=False) == (1e-4, 1e-4)  # None meant "as in training"
    old.update(adjoint=None, backprop="adjoint", seminorm=True, adjoint_carry_step=False)
    assert SolverConfig.from_dict(old).backprop == Adjoint(carry=False, seminorm=True)
    old.update(backprop="auto", memory_share=0.5)
    assert SolverConfig.from_dict(old).backprop == Auto(0.5, Adjoint(False, True))
    # and the new form round-trips
    for solver in (SolverConfig(), SolverConfig(backprop=Adjoint(seminorm=True)),
                   SolverConfig(backprop="checkpoint", eval_atol=1e-6)):
        assert SolverConfig.from_dict(solver.to_dict()) == solver


# Written at commit d3436be (the layout before the typed flow config): a 3-step 8gaussians density
# run and a 2-step digits VAE run with small nets, their config.yaml files, and what that code
# computed from them (expected.json, by make_expected.py in the same folder).
V02 = ROOT / "tests" / "data" / "checkpoint_v0_2"


def test_release_0_2_checkpoints_load_and_compute_as_they_did():
    expected = json.loads((V02 / "expected.json").read_text())
    cnf = CNFDensityEstimator.load_from_checkpoint(V02 / "cnf.ckpt").eval()
    vae = CNFVAE.load_from_checkpoint(V02 / "vae.ckpt").eval()
    with torch.no_grad():
        log_prob = cnf.log_prob(torch.tensor(expected["cnf"]["x"]))
        rec, kl = vae.elbo_terms(torch.tensor(expected["vae"]["images"]),
                                 eps=torch.tensor(expected["vae"]["eps"]))
    torch.testing.assert_close(log_prob, torch.tensor(expected["cnf"]["log_prob"]),
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(rec, torch.tensor(expected["vae"]["reconstruction"]),
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(kl, torch.tensor(expected["vae"]["kl"]), rtol=0, atol=1e-4)


def test_release_0_2_runs_resume_and_their_config_files_run_again(tmp_path):
    common = ["--output-dir", str(tmp_path / "runs"), "--logger", "none", "--no-test",
              "--limit-val-batches", "0"]
    for kind, steps in (("cnf", 3), ("vae", 2)):
        ckpt = tmp_path / f"{kind}.ckpt"
        shutil.copy(V02 / f"{kind}.ckpt", ckpt)
        config = str(V02 / f"{kind}.yaml")
        assert train.main(["--config", config, *common, "--max-steps", str(steps + 1),
                           "--ckpt-path", str(ckpt), "--run-name", f"{kind}-resumed"]) == 0
        resumed = torch.load(tmp_path / "runs" / f"{kind}-resumed" / "checkpoints" / "last.ckpt",
                             weights_only=False)
        assert resumed["global_step"] == steps + 1
        assert train.main(["--config", config, *common, "--max-steps", "1",
                           "--run-name", f"{kind}-again"]) == 0
