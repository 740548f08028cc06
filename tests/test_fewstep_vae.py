"""The VAE front door of the few-step study: the arms' train.py flags, the parsing of a run's
summary and metrics.csv, the report section, and the study's --workloads vae."""

import json
from pathlib import Path

import pytest

from benchmarks import common, fewstep, fewstep_vae
from benchmarks.fewstep_vae import argv_of, parse_metrics, parse_summary, section, summarise
from polyreg_cnf.app.config_io import make_parser, parse_command_line
from polyreg_cnf.app.schema import resolve

#: A real train.py run's output (--model vae --reg poly --solver rk4 --step-size 0.125
#: --max-epochs 2 --seed 6 --logger csv): its printed summary and its metrics.csv.
CAPTURED = Path(__file__).parent / "data" / "fewstep_vae"
ARMS = fewstep.verdict_arms(4, 5.0)


def resolved(arm_name: str):
    options, _ = parse_command_line(make_parser(), argv_of(arm_name, 7, 30, Path("runs")))
    return resolve(options)


@pytest.mark.parametrize("arm_name", ARMS)
def test_each_arm_becomes_the_train_py_flags_of_its_regularizer_and_grid(arm_name):
    c = resolved(arm_name)
    assert (c.model, c.data, c.training.seed, c.training.max_epochs) == ("vae", "digits", 7, 30)
    assert c.hardware.threads == 1
    reg = arm_name.split("_")[0]
    assert c.reg == {"none": "none", "rnode": "kinetic"}.get(reg, "poly")
    if reg.startswith("tpr"):
        assert c.poly.poly_coef == float(reg[3:])
    solver = c.solver()
    assert solver.eval_method == "dopri5"  # scored by the default evaluation solver
    if arm_name.endswith("_rk4x4"):
        # 4 equal steps over each block's [0, T] (the VAE's T is 0.5)
        assert solver.method == "rk4" and solver.step_size * 4 == c.flow.T == 0.5
    else:
        assert solver.method == "dopri5" and solver.step_size is None


def test_tpr5_on_the_grid_passes_rk4_four_steps_coef_5_and_poly():
    argv = argv_of("tpr5_rk4x4", 6, 30, Path("runs"))
    flags = dict(zip(argv[::2], argv[1::2]))
    assert flags["--reg"] == "poly" and flags["--poly-coef"] == "5"
    assert flags["--solver"] == "rk4" and float(flags["--step-size"]) == 0.125
    with pytest.raises(ValueError, match="must end in _adaptive"):
        argv_of("tpr5_dopri", 6, 30, Path("runs"))


def test_the_parser_reads_a_captured_run():
    summary = parse_summary((CAPTURED / "summary.txt").read_text())
    assert summary["test_neg_elbo"] == 30.7281 and summary["test_is_nll"] == 29.1901
    assert summary["training_solver"] == "rk4, step_size=0.125"
    assert summary["evaluation_solver"].startswith("dopri5, atol=1e-05")
    assert summary["test_nfe"] == 40.0 and summary["train_wall"] == 4.3
    m = parse_metrics(CAPTURED / "metrics.csv")
    assert m["steps"] == 28  # 2 epochs of 14 batches
    assert m["forward_nfe_first10pct"] == m["forward_nfe_last10pct"] == 19.0
    assert m["last_solver_gap"] == pytest.approx(3.261566e-06)  # the second validation's
    assert m["last_val_nll"] == m["best_val_nll"] == pytest.approx(30.76254)


def test_the_parser_refuses_a_summary_without_its_figures_or_scored_by_the_grid():
    text = (CAPTURED / "summary.txt").read_text()
    with pytest.raises(ValueError, match="test IS-NLL"):
        parse_summary(text.replace("test IS-NLL", "test NLL"))
    with pytest.raises(ValueError, match="must be the default dopri5, got 'rk4"):
        parse_summary(text.replace("evaluation solver:          dopri5",
                                   "evaluation solver:          rk4"))


def test_the_cpu_clock_is_read_between_samples():
    timeline = [(10.0, 1.0), (11.0, 1.5), (12.0, 2.5)]
    assert fewstep_vae._cpu_at(timeline, 11.5) == 2.0
    assert fewstep_vae._cpu_at(timeline, 9.0) == 1.0 and fewstep_vae._cpu_at(timeline, 13) == 2.5


def vae_run(arm_name: str, seed: int, is_nll: float, cpu: float, nfe: float) -> dict:
    return {"workload": "vae", "arm": arm_name, "seed": seed, "epochs": 30, "steps": 420,
            "training_solver": "dopri5, atol=0.0001, rtol=0.0001" if "adaptive" in arm_name
            else "rk4, step_size=0.125", "test_neg_elbo": is_nll + 1.5, "test_is_nll": is_nll,
            "last_solver_gap": None if "adaptive" in arm_name else 2e-3,
            "forward_nfe_first10pct": nfe - 2, "forward_nfe_last10pct": nfe + 2,
            "forward_nfe_mean": nfe, "fit_cpu": cpu, "process_cpu": cpu + 40.0}


# Baseline: IS NLL 30.0 / 30.2 / 30.1 at 100 / 120 / 110 CPU s and 14 NFE per step; the grid
# TPR arm: 30.1 / 30.0 / 30.3 at 60 / 90 / 77 CPU s (ratios 0.60, 0.75, 0.70) and 19 NFE.
VAE_RUNS = [vae_run("none_adaptive", 6, 30.0, 100.0, 14.0),
            vae_run("none_adaptive", 7, 30.2, 120.0, 14.0),
            vae_run("none_adaptive", 8, 30.1, 110.0, 15.0),
            vae_run("tpr5_rk4x4", 6, 30.1, 60.0, 19.0),
            vae_run("tpr5_rk4x4", 7, 30.0, 90.0, 19.0),
            vae_run("tpr5_rk4x4", 8, 30.3, 77.0, 19.0)]


def test_per_arm_medians_and_seed_paired_ratios():
    base, grid = summarise(VAE_RUNS)
    assert base["cpu_ratio"] == {"median": 1.0, "min": 1.0, "max": 1.0}
    assert grid["cpu_ratio"]["median"] == pytest.approx(0.70)
    assert (grid["cpu_ratio"]["min"], grid["cpu_ratio"]["max"]) == pytest.approx((0.60, 0.75))
    assert grid["is_nll_diff"]["median"] == pytest.approx(0.1)
    assert (grid["is_nll_diff"]["min"], grid["is_nll_diff"]["max"]) == pytest.approx((-0.2, 0.2))
    # a seed without its baseline is not paired
    assert summarise(VAE_RUNS[1:])[1]["paired"] == 2


def test_the_section_renders_from_a_hand_made_payload():
    vae = {"data": "digits", "epochs": 30, "arms": ["none_adaptive", "tpr5_rk4x4"],
           "seeds": [6, 7, 8], "baseline": "none_adaptive", "runs": VAE_RUNS}
    text = "\n".join(section(json.loads(json.dumps(vae))))
    assert text.startswith("## The VAE front door (reported, not scored)")
    assert "| tpr5_rk4x4 | 6 | 420 | rk4, step_size=0.125 | 31.6000 | 30.1000 | 2.0e-03 | " \
           "17.0 / 21.0 | 60 | 100 |" in text
    assert "| tpr5_rk4x4 | 3 | 31.6000 (31.5000 to 31.8000) | 30.1000 (30.0000 to 30.3000) | " \
           "77 (60 to 90) | 19.0 (19.0 to 19.0) | 0.70 (0.60 to 0.75) | " \
           "+0.1000 (-0.2000 to +0.2000) |" in text
    assert "The adaptive baseline (none_adaptive) takes a median 14.0 forward evaluations per " \
           "training step (16.0 over the last tenth; 3 seeds); the fixed-grid arms take " \
           "19.0-19.0 (their regularizers' evaluations included), more than the baseline: the " \
           "grid has no solver work to save here." in text
    # seed 8: 30.1 against 30.3
    assert "the arms' test IS NLLs lie within 0.2000 nats of each other (the widest of " \
           "3 seeds)" in text
    assert "the arm with the least fit CPU is tpr5_rk4x4 at 0.70 (0.60 to 0.75) times the " \
           "baseline's over 3 seeds, its test IS NLL +0.1000 (-0.2000 to +0.2000) nats from " \
           "the baseline's." in text
    assert section({**vae, "runs": []})[-1] == "(none finished)"


def test_the_vae_section_is_rendered_only_from_a_payload_that_has_one():
    committed = json.loads((common.RESULTS / "fewstep.json").read_text())
    assert fewstep.markdown(committed) == (common.RESULTS / "fewstep.md").read_text()
    # reports written before the VAE front door have no "vae": they render without it
    before = fewstep.markdown({k: v for k, v in committed.items() if k != "vae"})
    assert "## The VAE front door" not in before
    vae = {"data": "digits", "epochs": 30, "arms": ARMS, "seeds": [6, 7, 8],
           "baseline": "none_adaptive", "runs": VAE_RUNS}
    after = fewstep.markdown({**committed, "vae": vae})
    assert after.startswith(before) and "## The VAE front door" in after[len(before):]


def test_the_study_takes_vae_as_a_workload(tmp_path, monkeypatch):
    monkeypatch.setattr(fewstep, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(fewstep_vae, "CACHE", tmp_path / "cache")
    # the selection's cached run (checkerboard, seed 0) and the front door's
    select = {"workload": "checkerboard", "arm": "tpr5_rk4x4", "seed": 0, "steps": 3000,
              "train_cpu": 50.0, "curve": [[3000, 50.0, 3.7, 1e-3]],
              "forward_nfe_first10pct": 19.0, "forward_nfe_last10pct": 19.0,
              "accuracy": {"reference": {"converged_nll": 3.7}, "settings": [
                  {"setting": "rk4x4", "nfe": 16, "mean_abs_d": 1e-3, "mean_d": 0.0,
                   "converged_nll": 3.7, "nll_read": 3.7, "sample_nfe": 16,
                   "sample_rms": 0.01}]}}
    common.write_json(tmp_path / "cache" / "checkerboard-3000-tpr5_rk4x4-0.json", select)
    for r in VAE_RUNS:
        common.write_json(fewstep_vae.cell_path(r["arm"], r["seed"], 30), r)
    out = tmp_path / "f"
    assert fewstep.STUDY.main(["--workloads", "vae", "--cached-only", "--out", str(out)]) == 0
    payload = json.loads(out.with_suffix(".json").read_text())
    assert payload["vae"]["arms"] == ARMS and len(payload["vae"]["runs"]) == 6
    assert "## The VAE front door" in out.with_suffix(".md").read_text()
    fewstep.STUDY.main(["--workloads", "checkerboard", "--cached-only", "--out", str(out)])
    assert "vae" not in json.loads(out.with_suffix(".json").read_text())
    with pytest.raises(SystemExit):
        fewstep.STUDY.main(["--workloads", "vea", "--cached-only", "--out", str(out)])


@pytest.mark.slow
def test_a_tiny_front_door_run_is_parsed_into_its_record():
    # one epoch (14 steps) on the grid, 2 importance samples for the test
    r = fewstep_vae.run_cell("tpr5_rk4x4", 6, epochs=1, extra_argv=["--is-samples", "2"])
    assert r["steps"] == 14 and r["training_solver"] == "rk4, step_size=0.125"
    assert r["evaluation_solver"].startswith("dopri5")
    assert r["forward_nfe_mean"] >= 16  # 4 rk4 steps of 4 evaluations, and the penalty's
    assert r["last_solver_gap"] is not None and r["test_is_nll"] < r["test_neg_elbo"]
    assert 0 < r["fit_cpu"] < r["process_cpu"]


def test_the_runner_takes_the_committed_selection_and_resumes_from_the_cache(tmp_path,
                                                                               monkeypatch):
    monkeypatch.setattr(fewstep_vae, "CACHE", tmp_path)
    calls = []

    def fake(arm_name, seed, epochs):
        calls.append((arm_name, seed))
        return vae_run(arm_name, seed, 30.0, 1.0, 14.0)

    monkeypatch.setattr(fewstep_vae, "run_cell", fake)
    chosen = json.loads((common.RESULTS / "fewstep.json").read_text())["selection"]["chosen"]
    arms = fewstep.verdict_arms(chosen["steps"], chosen["coef"])
    assert fewstep_vae.main(["--seeds", "6", "7", "--epochs", "3"]) == 0
    assert sorted(calls) == sorted((a, s) for a in arms for s in (6, 7))
    assert (tmp_path / f"vae-3-{arms[-1]}-7.json").exists()
    calls.clear()
    assert fewstep_vae.main(["--seeds", "6", "8", "--epochs", "3"]) == 0
    assert sorted(calls) == sorted((a, 8) for a in arms)  # seed 6 is cached
    with pytest.raises(SystemExit):
        fewstep_vae.main(["--arms", "tpr5_rk4"])
