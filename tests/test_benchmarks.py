"""The benchmark harness: runs end to end on tiny budgets, caches runs, summarises honestly."""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import json
import math
import pkgutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from benchmarks import harness, report
from benchmarks import run as bench_run
from polyreg_cnf import CNF, SolverConfig


# The VAE arm's smoke run takes 80-90 s on one core (the baseline trains and tests at the authors'
# VAE tolerance 1e-5): slow, like the other benchmark smoke runs of that size.
@pytest.mark.parametrize("workload,arm", [
    ("checkerboard", "tpr_fast"),
    pytest.param("vae_digits", "ffjord", marks=pytest.mark.slow)])
def test_run_one_tiny(workload: str, arm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    w = dataclasses.replace(harness.WORKLOADS[workload], steps=3, eval_every=3, num_val=200,
                            num_test=200)
    gap_tols = []
    set_tol = harness._set_eval_tolerance

    def spy(model, atol, rtol):  # noqa: ANN001, ANN202
        gap_tols.append([atol, rtol])
        set_tol(model, atol, rtol)

    monkeypatch.setattr(harness, "_set_eval_tolerance", spy)
    r = harness.run_one(w, harness.ARMS[arm], seed=0)
    # The tolerance gap is measured at the tolerance the run trained at (for the VAE baseline
    # that is 1e-5, not the arm's nominal 1e-4).
    assert gap_tols == [r["train_tol"]]
    assert r["steps"] == 3 and len(r["val_curve"]) == 1
    assert r["forward_nfe"] >= 8  # at least one dopri5 step per solve
    if harness.ARMS[arm].adjoint:
        assert r["backward_nfe"] > 0
    else:
        assert r["backward_nfe"] == 0
    if arm == "ffjord":  # the VAE baseline trains at the authors' VAE tolerance
        assert r["train_tol"] == list(harness.WORKLOADS[workload].baseline_tol)
    assert r["test_nfe"] >= 8 and r["test_nll"] == r["test_metrics"]["test/nll"]


def _fake(arm: str, seed: int, curve: list[tuple[float, int, float]]) -> dict:
    return {"workload": "w", "arm": arm, "seed": seed, "forward_nfe": 10.0,
            "backward_nfe": 5.0, "total_nfe": 15.0, "forward_nfe_last100": 10.0,
            "forward_nfe_last10pct": 10.0,
            "backward_nfe_last100": 5.0, "seconds_per_step": 0.1, "train_seconds": 1.0,
            "test_nll": 1.0, "test_nfe": 16.0, "tolerance_gap": 0.0, "val_curve": curve}


def test_speedup_is_time_to_the_baselines_final_value() -> None:
    runs = []
    for seed in range(3):  # the same race in every seed, at a seed-dependent pace
        k = 1.0 + seed
        runs += [_fake("ffjord_matched", seed, [(10.0 * k, 1, 3.0), (30.0 * k, 2, 2.0)]),
                 _fake("tpr_fast", seed, [(5.0 * k, 1, 2.5), (15.0 * k, 2, 1.9)]),
                 _fake("rnode", seed, [(10.0 * k, 1, 3.0), (30.0 * k, 2, 2.1)])]
    for r in runs:
        r["workload"] = "checkerboard"
    summary = bench_run.summarise(runs)
    s = summary["checkerboard"]
    sp = s["tpr_fast"]["speedup_to_ffjord_matched_final_val"]
    assert sp["median"] == pytest.approx(2.0) and sp["per_seed"] == pytest.approx([2.0] * 3)
    assert s["rnode"]["speedup_to_ffjord_matched_final_val"]["median"] is None
    g = bench_run.goals(summary)["checkerboard"]
    assert g["matched_tpr_fast"]["met"] and not g["matched_rnode"]["met"]
    assert g["test_nfe_tpr_fast"]["times_floor"] == pytest.approx(2.0)


def _three_seeds(arm_values: dict[str, dict[str, list[float]]], workload: str = "w") -> list:
    """Fake runs of seeds 0-2: per arm, per measurement, the three seeds' values."""
    runs = []
    for aname, values in arm_values.items():
        for seed in range(3):
            r = _fake(aname, seed, [(10.0, 1, 2.0)])
            r.update({k: v[seed] for k, v in values.items()}, workload=workload)
            runs.append(r)
    return runs


def test_paired_compares_each_seed_with_its_own_baseline() -> None:
    # Seed 2's baseline is the worst, seed 2's TPR run the best: medians of each arm taken
    # apart say TPR is 0.015 nats worse; seed by seed it is +0.06, +0.066, -0.085 (median
    # +0.06, which fails the 0.05 goal).
    runs = _three_seeds({"ffjord_direct": {"test_nll": [1.00, 1.10, 1.20]},
                         "tpr_fast": {"test_nll": [1.06, 1.166, 1.115]}})
    p = harness.paired([r for r in runs if r["arm"] == "tpr_fast"],
                       [r for r in runs if r["arm"] == "ffjord_direct"][::-1])  # any order
    assert p["seeds"] == [0, 1, 2]
    assert p["test_nll"]["per_seed"] == pytest.approx([0.06, 0.066, -0.085])
    assert p["test_nll"]["median"] == pytest.approx(0.06)
    assert (p["test_nll"]["min"], p["test_nll"]["max"]) == pytest.approx((-0.085, 0.066))
    summary = bench_run.summarise(runs, baselines=("ffjord_direct",))
    assert summary["w"]["tpr_fast"]["paired_to_ffjord_direct"]["test_nll"]["median"] == \
        pytest.approx(0.06)
    # an arm's own baseline outside the suite's baselines (the VAE suite's pairs)
    summary = bench_run.summarise(runs, baselines=(), pairs={"tpr_fast": "ffjord_direct"})
    assert summary["w"]["tpr_fast"]["paired_to_ffjord_direct"]["test_nll"]["per_seed"] == \
        pytest.approx([0.06, 0.066, -0.085])
    assert "paired_to_ffjord_direct" not in summary["w"]["ffjord_direct"]
    # a seed without a baseline run is left out, not compared with another seed's
    p = harness.paired([r for r in runs if r["arm"] == "tpr_fast"],
                       [r for r in runs if r["arm"] == "ffjord_direct" and r["seed"] != 1])
    assert p["seeds"] == [0, 2] and p["test_nll"]["per_seed"] == pytest.approx([0.06, -0.085])


def test_long_goals_are_seed_paired_not_medians_of_arms() -> None:
    base = {"test_nll": [1.00, 1.10, 1.20], "forward_nfe_last10pct": [100.0, 200.0, 300.0],
            "test_nfe": [50.0, 60.0, 70.0]}
    tpr = {"test_nll": [1.06, 1.166, 1.115], "forward_nfe_last10pct": [85.0, 150.0, 290.0],
           "test_nfe": [40.0, 62.0, 50.0]}
    runs = _three_seeds({"ffjord_direct": base, "tpr_fast": tpr})
    # every seed of TPR reaches (3b)'s final value twice as fast: speed-up 2 in every seed
    for r in runs:
        if r["arm"] == "ffjord_direct":
            r["val_curve"] = [(10.0, 1, 3.0), (20.0, 2, 2.0)]
    g = bench_run.long_goals(bench_run.summarise(runs, baselines=("ffjord_direct",)))["w"]
    g = g["tpr_fast"]
    assert g["speedup_within_0.01"] == pytest.approx(2.0)
    # Unpaired medians would say: 1.115 - 1.10 = +0.015 (met) and 1 - 150/200 = 25 % (met).
    assert g["test_nll_diff"]["median"] == pytest.approx(0.06)
    assert g["test_nll_diff"]["per_seed"] == pytest.approx([0.06, 0.066, -0.085])
    assert g["forward_nfe_last10pct_reduction"]["per_seed"] == pytest.approx(
        [0.15, 0.25, 1 - 290 / 300])
    assert g["forward_nfe_last10pct_reduction"]["median"] == pytest.approx(0.15)
    assert not g["met"]
    # test NFE: the median ratio 0.8 looks fine, seed 1 needs more than its own (3b)
    assert g["test_nfe_ratio"]["median"] == pytest.approx(0.8)
    assert not g["test_nfe_met"]


def test_full_suite_goals_are_seed_paired() -> None:
    runs = _three_seeds({
        "ffjord": {"total_nfe": [100.0, 200.0, 300.0], "test_nll": [1.00, 1.10, 1.20]},
        "tpr_paper": {"total_nfe": [70.0, 90.0, 200.0], "test_nll": [1.06, 1.166, 1.115]},
        "ffjord_matched": {"test_nll": [1.0, 1.1, 1.2]},
        "ffjord_direct": {"seconds_per_step": [0.1, 0.2, 0.3]},
        "tpr_fast": {"seconds_per_step": [0.12, 0.19, 0.33], "test_nll": [1.06, 1.166, 1.115]}},
        workload="checkerboard")
    g = bench_run.goals(bench_run.summarise(runs))["checkerboard"]
    paper = g["paper_settings"]
    # per seed 30 %, 55 %, 33 % fewer (median 33 %; unpaired: 1 - 90 / 200 = 55 %)
    assert paper["total_nfe_reduction"]["median"] == pytest.approx(1 - 200 / 300)
    assert paper["test_nll_diff"]["median"] == pytest.approx(0.06) and not paper["met"]
    same = g["tpr_vs_same_engineering"]
    # per seed (3b)'s s/step / (5)'s: 0.83, 1.05, 0.91 (unpaired: 0.2 / 0.19 = 1.05)
    assert same["seconds_per_step_ratio"]["median"] == pytest.approx(0.3 / 0.33)
    assert same["seconds_per_step_ratio"]["per_seed"] == pytest.approx(
        [0.1 / 0.12, 0.2 / 0.19, 0.3 / 0.33])
    assert g["matched_tpr_fast"]["test_nll_diff"]["median"] == pytest.approx(0.06)


def test_suite_caches_finished_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str, int]] = []

    def fake_run_one(w, arm, seed, **kwargs):  # noqa: ANN001, ANN003, ANN202
        calls.append((w.name, arm.name, seed))
        return {**_fake(arm.name, seed, [(1.0, 1, 2.0)]), "workload": w.name,
                "nfe_per_step": {"forward": [10.0], "backward": [5.0]}}

    monkeypatch.setattr(bench_run, "run_one", fake_run_one)
    monkeypatch.setattr(bench_run, "RESULTS", tmp_path)
    monkeypatch.setitem(bench_run.SUITES, "tiny", dict(
        workloads={"checkerboard": 2}, seeds=(0, 1), arms=("ffjord_matched", "tpr_fast")))
    monkeypatch.setattr(sys, "argv", ["run.py", "--suite", "tiny"])
    bench_run.main()
    assert len(calls) == 4
    payload = json.loads((tmp_path / "tiny.json").read_text())
    assert payload["goals"]["checkerboard"]["matched_tpr_fast"]["speedup_median"] == 1.0
    assert (tmp_path / "tiny.md").read_text().startswith("# Benchmark suite `tiny`")
    bench_run.main()  # everything cached: nothing runs again
    assert len(calls) == 4
    monkeypatch.setattr(sys, "argv", ["run.py", "--suite", "tiny", "--fresh"])
    bench_run.main()
    assert len(calls) == 8


def test_bad_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    for argv in (["--arms", "nope"], ["--jobs", "0"], ["--suite", "nope"],
                 ["--workloads", "mnist"]):
        monkeypatch.setattr(sys, "argv", ["run.py", *argv])
        with pytest.raises(SystemExit) as err:
            bench_run.main()
        assert err.value.code == 2


def test_cached_only_summarises_what_finished(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run_one(w, arm, seed):  # noqa: ANN001, ANN202
        return {**_fake(arm.name, seed, [(1.0, 1, 2.0)]), "workload": w.name,
                "nfe_per_step": {"forward": [10.0], "backward": [5.0]}}

    monkeypatch.setattr(bench_run, "run_one", fake_run_one)
    monkeypatch.setattr(bench_run, "RESULTS", tmp_path)
    monkeypatch.setitem(bench_run.SUITES, "tiny", dict(
        workloads={"checkerboard": 2}, seeds=(0,), arms=("ffjord_matched",)))
    monkeypatch.setattr(sys, "argv", ["run.py", "--suite", "tiny", "--cached-only"])
    with pytest.raises(SystemExit):  # nothing cached yet
        bench_run.main()
    monkeypatch.setattr(sys, "argv", ["run.py", "--suite", "tiny"])
    bench_run.main()
    monkeypatch.setitem(bench_run.SUITES, "tiny", dict(
        workloads={"checkerboard": 2}, seeds=(0, 1), arms=("ffjord_matched",)))
    monkeypatch.setattr(sys, "argv", ["run.py", "--suite", "tiny", "--cached-only"])
    bench_run.main()
    payload = json.loads((tmp_path / "tiny.json").read_text())
    assert payload["missing_runs"] == 1 and len(payload["runs"]) == 1
    assert "Partial: 1 runs" in (tmp_path / "tiny.md").read_text()


def test_speedup_within_a_margin_and_the_long_goals() -> None:
    # (3b) ends at 2.00; TPR touches 2.009 (within 0.01) at 20 s and never 2.00 itself; the
    # same in seeds 0-2, with seed-dependent NFE and NLL.
    runs = []
    for seed, (nfe_base, nfe_tpr) in enumerate([(100.0, 75.0), (120.0, 84.0), (80.0, 64.0)]):
        base = _fake("ffjord_direct", seed, [(10.0, 1, 3.0), (30.0, 2, 2.05), (60.0, 3, 2.0)])
        tpr = _fake("tpr_fast", seed, [(10.0, 1, 2.5), (20.0, 2, 2.009), (40.0, 3, 2.004)])
        base.update(forward_nfe_last10pct=nfe_base, test_nfe=50.0, test_nll=2.0 + seed)
        tpr.update(forward_nfe_last10pct=nfe_tpr, test_nfe=40.0, test_nll=2.03 + seed)
        runs += [base, tpr]
    summary = bench_run.summarise(runs, baselines=("ffjord_direct",))
    e = summary["w"]["tpr_fast"]
    assert e["speedup_to_ffjord_direct_final_val"]["median"] is None  # never exactly
    within = e["speedup_to_ffjord_direct_final_val_within_0.01"]
    assert within["median"] == pytest.approx(60.0 / 20.0)  # (3b) reaches 2.01 only at 60 s
    g = bench_run.long_goals(summary)["w"]["tpr_fast"]
    assert g["forward_nfe_last10pct_reduction"]["per_seed"] == pytest.approx([0.25, 0.3, 0.2])
    assert g["forward_nfe_last10pct_reduction"]["median"] == pytest.approx(0.25)
    assert g["test_nll_diff"]["median"] == pytest.approx(0.03) and g["met"]
    assert g["test_nfe_ratio"]["median"] == pytest.approx(0.8) and g["test_nfe_met"]
    assert g["nfe_speedup_within_0.01"] is None  # no per-step NFE in these runs
    # in function evaluations: (3b) needs 3 x 100 to reach 2.01, TPR 2 x 50 to reach 2.009
    for r in runs:
        per_step = 100.0 if r["arm"] == "ffjord_direct" else 50.0
        r["nfe_per_step"] = {"forward": [per_step] * 3, "backward": [0.0] * 3}
    summary = bench_run.summarise(runs, baselines=("ffjord_direct",))
    assert bench_run.long_goals(summary)["w"]["tpr_fast"]["nfe_speedup_within_0.01"] == \
        pytest.approx(300.0 / 100.0)
    assert harness.nfe_to_reach(runs[1], 2.004) == 150.0
    assert harness.nfe_to_reach(runs[1], 1.0) is None
    for r in runs[1::2]:
        r["test_nll"] += 0.03  # 0.06 nats worse: the goal is not met whatever the speed
    summary = bench_run.summarise(runs, baselines=("ffjord_direct",))
    assert not bench_run.long_goals(summary)["w"]["tpr_fast"]["met"]


def test_the_test_nfe_goal_holds_for_every_seed_not_the_median() -> None:
    runs = []
    for seed, (mine, theirs) in enumerate([(40.0, 50.0), (40.0, 50.0), (62.0, 56.0)]):
        base = _fake("ffjord_direct", seed, [(10.0, 1, 2.0)])
        tpr = _fake("tpr_fast", seed, [(10.0, 1, 2.0)])
        base.update(forward_nfe_last10pct=100.0, test_nfe=theirs, test_nll=2.0, workload="w")
        tpr.update(forward_nfe_last10pct=75.0, test_nfe=mine, test_nll=2.0, workload="w")
        runs += [base, tpr]
    summary = bench_run.summarise(runs, baselines=("ffjord_direct",))
    g = bench_run.long_goals(summary)["w"]["tpr_fast"]
    assert g["test_nfe_ratio"]["median"] == pytest.approx(0.8)  # the median alone: met
    assert not g["test_nfe_met"]  # seed 2: 62 > 56
    assert g["test_nfe_ratio"]["per_seed"] == pytest.approx([0.8, 0.8, 62.0 / 56.0])


def test_the_goal_table_shows_only_the_columns_its_goals_fill() -> None:
    def entry(*values: float) -> dict:
        return {"per_seed": list(values), "median": sorted(values)[1], "min": min(values),
                "max": max(values)}

    goals = {"w": {"paper_settings": {"total_nfe_reduction": entry(0.5, 0.4, 0.45),
                                      "test_nll_diff": entry(0.01, -0.02, 0.0), "met": True},
                   "test_nfe_tpr_fast": {"test_nfe": 24.0, "times_floor": 3.0,
                                         "test_nll_diff": entry(0.0, 0.0, 0.0)}}}
    head, _, paper, floor = bench_run.goal_lines(goals)
    assert head == ("| workload | goal (arm) | fewer total NFE (>= 40 %) | test NLL diff (<= 0.05) "
                    "| test NFE = multiple of the floor 8 | met |")
    assert paper == ("| w | paper_settings | 45 % [40, 50] (seeds: 50, 40, 45) | +0.0000 [-0.0200, "
                     "+0.0100] (seeds: +0.0100, -0.0200, +0.0000) | - | met |")
    assert floor.endswith("| 24 = 3.0x | - |")  # a goal without a verdict: no 'met' cell
    assert bench_run.goal_lines({"w": {}}) == [
        "None: the suite lacks the arms its goals compare."]


def test_the_long_markdown_shows_the_paired_values_per_seed_and_fresh_seeds_beside(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nll = {("ffjord_direct", 0): 1.00, ("ffjord_direct", 1): 1.10, ("ffjord_direct", 2): 1.20,
           ("tpr_fast", 0): 1.06, ("tpr_fast", 1): 1.166, ("tpr_fast", 2): 1.115}

    def fake_run_one(w, arm, seed, **kwargs):  # noqa: ANN001, ANN003, ANN202
        return {**_fake(arm.name, seed, [(1.0, 1, 2.0)]), "workload": w.name,
                "test_nll": nll[arm.name, seed],
                "nfe_per_step": {"forward": [10.0], "backward": [5.0]}}

    monkeypatch.setattr(bench_run, "run_one", fake_run_one)
    monkeypatch.setattr(bench_run, "RESULTS", tmp_path)
    monkeypatch.setitem(bench_run.SUITES, "tiny", dict(
        workloads={"checkerboard": 2}, seeds=(0, 1, 2), arms=("ffjord_direct", "tpr_fast"),
        baselines=("ffjord_direct",)))
    monkeypatch.setattr(sys, "argv", ["run.py", "--suite", "tiny"])
    bench_run.main()
    payload = json.loads((tmp_path / "tiny.json").read_text())
    g = payload["goals"]["checkerboard"]["tpr_fast"]
    assert g["test_nll_diff"]["per_seed"] == pytest.approx([0.06, 0.066, -0.085])
    assert not g["met"]
    text = (tmp_path / "tiny.md").read_text()
    assert "+0.0600 [-0.0850, +0.0660] (seeds: +0.0600, +0.0660, -0.0850)" in text
    # Fresh seeds run beside it: still paired with their own baselines, then laid beside the
    # earlier suite's seeds and summarised together.
    nll.update({("ffjord_direct", 3): 2.00, ("ffjord_direct", 4): 2.00,
                ("tpr_fast", 3): 2.01, ("tpr_fast", 4): 1.90})
    monkeypatch.setitem(bench_run.SUITES, "tiny_fresh", dict(
        workloads={"checkerboard": 2}, seeds=(3, 4), arms=("ffjord_direct", "tpr_fast"),
        baselines=("ffjord_direct",), beside="tiny"))
    monkeypatch.setattr(sys, "argv", ["run.py", "--suite", "tiny_fresh"])
    bench_run.main()
    fresh = json.loads((tmp_path / "tiny_fresh.json").read_text())
    assert fresh["goals"]["checkerboard"]["tpr_fast"]["test_nll_diff"]["per_seed"] == \
        pytest.approx([0.01, -0.10])
    both = fresh["beside"]["goals"]["checkerboard"]["tpr_fast"]
    assert both["seeds"] == [0, 1, 2, 3, 4]
    assert both["test_nll_diff"]["per_seed"] == pytest.approx([0.06, 0.066, -0.085, 0.01, -0.1])
    assert both["test_nll_diff"]["median"] == pytest.approx(0.01)  # not the 0.06 of seeds 0-2
    assert "## Beside suite `tiny` (seeds [0, 1, 2])" in (tmp_path / "tiny_fresh.md").read_text()


class _Rotation(torch.nn.Module):
    """dz/dt = R z with R a rotation generator: trajectories are circular arcs of 1 radian."""

    def forward(self, t, z):  # noqa: ANN001, ANN201
        return torch.stack([-z[:, 1], z[:, 0]], dim=1)


class _Flow(L.LightningModule):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.flow = CNF(net, solver=SolverConfig(atol=1e-8, rtol=1e-8), eval_trace="exact")

    def log_prob(self, x):  # noqa: ANN001, ANN201
        z, logdet = self.flow(x)
        return -0.5 * z.square().sum(1) + logdet


def test_straightness_of_a_rotation_is_the_arc_over_the_chord() -> None:
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)) + 3.0
    out = harness.straightness(_Flow(_Rotation()), x)
    # 15 chords of 1/15 rad against the chord of the whole 1-rad arc
    expected = 15 * math.sin(1 / 30) / math.sin(0.5)
    assert out["path_ratio"] == pytest.approx(expected, rel=1e-6)
    assert out["penalty"] > 1e-3 and out["test_nfe"] > 8


def test_straightness_of_a_constant_field_is_one() -> None:
    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.copy_(torch.tensor([1.0, -2.0]))
    model, x = _Flow(lambda_free(net)), torch.randn(32, 2)
    out = harness.straightness(model, x)
    assert out["path_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert out["penalty"] < 1e-12
    # test NFE = one evaluation-mode solve of the rows, counted as the block counts it
    model.eval()
    model.flow.nfe.reset()
    model.log_prob(x)
    assert out["test_nfe"] == model.flow.nfe.forward >= 8
    assert model.training is False  # (set here); straightness restores the mode it found
    model.train()
    harness.straightness(model, x)
    assert model.training


def lambda_free(linear: torch.nn.Linear) -> torch.nn.Module:
    class Field(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = linear

        def forward(self, t, z):  # noqa: ANN001, ANN201
            return self.linear(z)

    return Field()


def test_long_runs_resume_from_their_last_checkpoint(tmp_path: Path) -> None:
    w = dataclasses.replace(harness.WORKLOADS["checkerboard"], steps=4, eval_every=2,
                            num_val=100, num_test=100, hidden_dims=(8,))
    arm = harness.ARMS["tpr_fast"]
    first = harness.run_one(w, arm, 0, work_dir=tmp_path, ckpt_every=2, probe_every=2)
    assert first["resumed_from"] is None
    assert [p["step"] for p in first["probes"]] == [2, 4]
    assert [c[1] for c in first["val_curve"]] == [2, 4]
    # Longer now: the same folder resumes at step 4 and keeps what was measured before it.
    again = harness.run_one(dataclasses.replace(w, steps=6), arm, 0, work_dir=tmp_path,
                            ckpt_every=2, probe_every=2)
    assert again["resumed_from"] is not None and again["steps"] == 6
    assert [p["step"] for p in again["probes"]] == [2, 4, 6]
    assert [c[1] for c in again["val_curve"]] == [2, 4, 6]
    assert again["probes"][:2] == first["probes"]
    with pytest.raises(ValueError, match="multiple of the workload's eval_every"):
        harness.run_one(w, arm, 0, work_dir=tmp_path / "x", ckpt_every=3)


def test_a_run_stopped_by_sigterm_is_not_measured_and_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A SIGTERM used to end a harness run gracefully and the run was then measured and cached
    # as if finished (two long models were kept at steps 4900 and 5904 of 6000).
    import os
    import signal

    w = dataclasses.replace(harness.WORKLOADS["checkerboard"], steps=6, eval_every=2,
                            num_val=100, num_test=100, hidden_dims=(8,))
    arm = harness.ARMS["tpr_fast"]

    def signal_at_step_3(self, trainer, *args) -> None:  # noqa: ANN001, ANN002
        if trainer.global_step == 3:  # the guard stops at the end of the next batch
            os.kill(os.getpid(), signal.SIGTERM)

    # On the class itself: a subclass would store its checkpoint state under another name.
    monkeypatch.setattr(harness._Record, "on_train_batch_end", signal_at_step_3,
                        raising=False)
    model = tmp_path / "model.pt"
    with pytest.raises(harness.RunInterrupted, match=r"stopped at step 4 of 6 \(SIGTERM\)"):
        harness.run_one(w, arm, 0, work_dir=tmp_path / "work", ckpt_every=2, model_path=model)
    assert not model.exists()
    monkeypatch.undo()
    done = harness.run_one(w, arm, 0, work_dir=tmp_path / "work", ckpt_every=2,
                           model_path=model)
    assert done["resumed_from"] is not None and done["steps"] == 6 and model.exists()
    assert [c[1] for c in done["val_curve"]] == [2, 4, 6]


def test_a_seed_that_never_reaches_the_target_counts_as_the_slowest() -> None:
    # (3b) ends at 2.0 in every seed; TPR gets there (within 0.01) in seeds 0 and 2 only.
    runs = []
    for seed, tpr_curve in enumerate([[(10.0, 1, 2.5), (40.0, 2, 2.0)],
                                      [(10.0, 1, 2.5), (40.0, 2, 2.3)],
                                      [(10.0, 1, 2.0)]]):
        runs += [_fake("ffjord_direct", seed, [(10.0, 1, 3.0), (20.0, 2, 2.0)]),
                 _fake("tpr_fast", seed, tpr_curve)]
    summary = bench_run.summarise(runs, baselines=("ffjord_direct",))
    sp = summary["w"]["tpr_fast"]["speedup_to_ffjord_direct_final_val_within_0.01"]
    assert sp["per_seed"] == [0.5, None, 2.0] and sp["median"] is None
    assert sp["median_unreached_as_zero"] == 0.5  # median of (0.5, 0, 2.0)
    assert bench_run.long_goals(summary)["w"]["tpr_fast"]["speedup_within_0.01"] == 0.5
    # A TPR seed whose baseline is still training is left out, not counted as never reaching.
    runs.append(_fake("tpr_fast", 3, [(10.0, 1, 2.0)]))
    summary = bench_run.summarise(runs, baselines=("ffjord_direct",))
    sp = summary["w"]["tpr_fast"]["speedup_to_ffjord_direct_final_val_within_0.01"]
    assert sp["per_seed"] == [0.5, None, 2.0] and (sp["reached"], sp["of"]) == (2, 3)
    assert bench_run.long_goals(summary)["w"]["tpr_fast"]["seeds"] == [0, 1, 2]


def test_smoothed_curves_take_the_luck_out_of_a_one_evaluation_target() -> None:
    curve = [[1.0, 1, 3.0], [2.0, 2, 2.0], [3.0, 3, 2.2], [4.0, 4, 1.9], [5.0, 5, 2.1]]
    assert [c[2] for c in harness.smooth_curve(curve, k=2)] == pytest.approx(
        [3.0, 2.5, 2.1, 2.05, 2.0])
    # (3b) ends on a lucky low evaluation (1.90 after hovering at 2.00); TPR hovers at 1.98 from
    # its second evaluation on: it never gets within 0.01 of 1.90, but on averaged curves it
    # reaches (3b)'s level sooner.
    base = _fake("ffjord_direct", 0, [[10.0 * i, i, v] for i, v in
                                      enumerate([3.0, 2.5] + [2.0] * 7 + [1.9], start=1)])
    tpr = _fake("tpr_fast", 0, [[10.0 * i, i, v] for i, v in
                                enumerate([2.5] + [1.98] * 9, start=1)])
    summary = bench_run.summarise([base, tpr], baselines=("ffjord_direct",))
    e = summary["w"]["tpr_fast"]
    assert e["speedup_to_ffjord_direct_final_val_within_0.01"]["per_seed"] == [None]
    smoothed = e["speedup_to_ffjord_direct_final_val_smoothed_within_0.01"]["per_seed"][0]
    # averaged over 5: (3b) reaches 1.98 + 0.01 at its 10th evaluation only; TPR at its 6th
    assert smoothed == pytest.approx(100.0 / 60.0)


# ---------------------------------------------------------------------- the package and reports
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("name", report.reports())
def test_every_committed_report_renders_byte_for_byte_from_its_json(name: str) -> None:
    assert report.render(name) == (report.RESULTS / f"{name}.md").read_text()


def test_every_committed_report_has_a_renderer_or_a_stated_reason() -> None:
    every = {p.stem for p in report.RESULTS.glob("*.md")}
    assert every == set(report.reports()) | set(report.UNRENDERED)
    assert len(report.reports()) >= 20


def test_the_check_names_a_report_its_json_no_longer_renders(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    for name in ("ddp_scaling", "data_cache"):
        for suffix in (".json", ".md"):
            (tmp_path / f"{name}{suffix}").write_bytes((report.RESULTS / f"{name}{suffix}")
                                                       .read_bytes())
    assert report.main(["--check", "--results", str(tmp_path)]) == 0
    md = tmp_path / "ddp_scaling.md"
    md.write_text(md.read_text().replace("| 2 |", "| 3 |"))
    assert report.main(["--check", "--results", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "ddp_scaling" in err and "data_cache" not in err
    assert report.main(["--results", str(tmp_path)]) == 0  # rewrites it
    assert report.main(["--check", "--results", str(tmp_path)]) == 0


@pytest.mark.parametrize("name", sorted(m.name for m in pkgutil.iter_modules([str(BENCHMARKS)])))
def test_every_docstring_example_of_the_benchmarks_holds(name: str) -> None:
    # tests/test_doctests.py walks polyreg_cnf only
    module = importlib.import_module(f"benchmarks.{name}")
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    assert doctest.testmod(module, optionflags=flags, verbose=False).failed == 0


def test_no_module_of_the_package_edits_sys_path() -> None:
    edits = [p.name for p in BENCHMARKS.glob("*.py") if "sys.path" in p.read_text()]
    assert edits == []


def test_a_study_runs_as_a_module_from_the_repository_root(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.tables", "--out",
                           str(tmp_path / "t.npy"), "--rows", "50", "--dim", "3"],
                          cwd=BENCHMARKS.parent, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows"] == 50 and (tmp_path / "t.npy").exists()


def _smoke(module: Any, argv: list[str], out: Path) -> dict:
    """Run ``module``'s documented command with ``argv`` in this process; its payload."""
    threads = torch.get_num_threads()
    try:
        assert module.main([*argv, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    payload = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".md").read_text() == module.STUDY.render(payload)
    assert payload.get("command", payload.get("meta", {}).get("command")).startswith(
        f"python -m benchmarks.{module.STUDY.name} ")
    return payload


def test_smoke_adjoint_overhead_and_dropin_overhead(tmp_path: Path) -> None:
    from benchmarks import adjoint_overhead, dropin_overhead

    payload = _smoke(adjoint_overhead, ["--seeds", "1", "--train-steps", "1", "--batch", "8",
                                        "--tol", "1e-3"],
                     tmp_path / "adjoint")
    assert set(payload["cases"]) == {"toy-2d", "cnf-30d", "short-16d"}
    rows = payload["cases"]["toy-2d"]["rows"]
    assert rows["tpr_direct"]["median"]["backward_nfe"] == 0
    assert rows["tpr_stock"]["median"]["backward_nfe"] > 0
    payload = _smoke(dropin_overhead, ["--repeats", "1", "--seeds", "1", "--train-steps", "1"],
                     tmp_path / "dropin")
    assert payload["tpr"]["drop-in, TPR"]["backward_nfe"] > 0


def test_smoke_data_cache(tmp_path: Path) -> None:
    from benchmarks import data_cache

    payload = _smoke(data_cache, ["--rows", "20000", "--repeats", "1"], tmp_path / "cache")
    assert payload["split_shapes"]["train"][0] > 0 and payload["cache_MiB"] > 0


def test_identity_finds_a_tree_identical_to_itself_and_one_ulp_of_difference(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The documented command on this tree against itself: two processes, 2 steps of one arm.
    from benchmarks import identity

    tree = str(BENCHMARKS.parent)
    argv = ["--base-tree", tree, "--base-python", sys.executable, "--head-tree", tree,
            "--steps", "2", "--seeds", "0", "--arms", "tpr_fast"]
    payload = _smoke(identity, argv, tmp_path / "same")
    [run] = payload["runs"]
    assert len(run["head"]["loss"]) == len(run["head"]["forward_nfe"]) == 2
    assert run["base"] == {**run["head"], "seconds": run["base"]["seconds"]}
    assert payload["meta"]["exit_status"] == 0 and "| tpr_fast:0 | yes |" in identity.render(
        payload)
    # One unit in the last place of one step's loss, then a step less of forward NFE: found,
    # named with its step, and the exit status says so.
    head = run["head"]
    nudged = {**head, "loss": [head["loss"][0], math.nextafter(head["loss"][1], math.inf)]}
    assert identity.compare(run["base"], nudged) == {
        "loss": {"index": 1, "base": head["loss"][1], "head": nudged["loss"][1]}}
    assert identity.compare(run["base"], {**head, "forward_nfe": head["forward_nfe"][:1]}) == {
        "forward_nfe": {"index": 1, "base": head["forward_nfe"][1], "head": None}}
    monkeypatch.setattr(identity, "record", lambda trees, specs, steps: {
        "base": {"tpr_fast:0": run["base"]}, "head": {"tpr_fast:0": nudged}})
    assert identity.STUDY.main([*argv, "--out", str(tmp_path / "nudged")]) == 1
    assert "| tpr_fast:0 | no | loss at step 1 |" in (tmp_path / "nudged.md").read_text()
    with pytest.raises(SystemExit):
        identity.STUDY.main([*argv[:4], "--arms", "nope"])


@pytest.mark.slow
def test_smoke_the_training_studies(tmp_path: Path) -> None:
    from benchmarks import checkerboard_tpr, ddp_scaling, step_cost, vae_digits

    payload = _smoke(checkerboard_tpr, ["--steps", "3"], tmp_path / "cb")
    assert [r["arm"] for r in payload["rows"]] == ["ffjord_matched", "tpr_paper", "tpr_carry"]
    payload = _smoke(vae_digits, ["--quick"], tmp_path / "vae")
    assert set(payload["summary"]) == {"none", "poly"}
    payload = _smoke(step_cost, ["--presets", "toy", "--seeds", "0", "--steps", "toy=3"],
                     tmp_path / "step_cost")
    assert payload["summary"][0]["preset"] == "toy"
    payload = _smoke(ddp_scaling, ["--repeats", "1", "--rows", "3000"], tmp_path / "ddp")
    assert set(payload["median"]) == {"1", "2"}


def test_the_committed_cache_summarises_to_the_committed_quick_suite(tmp_path: Path) -> None:
    # `python -m benchmarks.run --suite quick --cached-only`: nothing trains, and the summary and
    # goals of the committed runs are those of the committed report.
    assert bench_run.main(["--suite", "quick", "--cached-only", "--out",
                           str(tmp_path / "quick")]) == 0
    made = json.loads((tmp_path / "quick.json").read_text())
    committed = json.loads((report.RESULTS / "quick.json").read_text())
    assert made["trained_runs"] == 0 and made["missing_runs"] == 0
    assert made["summary"] == committed["summary"] and made["goals"] == committed["goals"]
    assert (tmp_path / "quick_nfe.png").exists()


@pytest.mark.slow
def test_the_committed_cache_answers_as_the_committed_frontier(tmp_path: Path) -> None:
    from benchmarks import frontier

    # Every kept model's measurement is in the committed cache: the report comes from it alone.
    assert frontier.main(["--suite", "long_fresh", "--out", str(tmp_path / "fr")]) == 0
    made = json.loads((tmp_path / "fr.json").read_text())
    committed = json.loads((report.RESULTS / "frontier_long_fresh.json").read_text())
    assert made["answer"] == committed["answer"] and made["models"] == committed["models"]
