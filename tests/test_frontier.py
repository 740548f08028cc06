"""The accuracy frontier of a suite's kept models: hand-made kept models through the real loader,
each TPR arm paired with its own seed's baseline, the cache, the report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import accuracy, frontier, harness, report
from benchmarks import run as bench_run
from polyreg_cnf.engine.ode import solving_with

ROWS = ["--rows", "24", "--sample-rows", "16", "--check-rows", "8", "--batch-size", "12"]


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[tuple[str, str, int], Path]:
    """A suite of four kept models (two arms x seeds 0 and 1) made by hand, untrained but each
    with its own weights, written where the suite keeps its models."""
    monkeypatch.setattr(bench_run, "RESULTS", tmp_path)
    monkeypatch.setitem(bench_run.SUITES, "tiny", dict(
        workloads={"checkerboard": 40}, seeds=(0, 1), arms=("ffjord_direct", "tpr_fast"),
        baselines=("ffjord_direct",), keep_models=True))
    monkeypatch.setitem(bench_run.WORKLOADS, "checkerboard", dataclasses.replace(
        bench_run.WORKLOADS["checkerboard"], num_val=40, num_test=40, hidden_dims=(8,)))
    w = bench_run.suite_workload("tiny", "checkerboard")
    paths = {}
    for i, (aname, seed) in enumerate([(a, s) for a in ("ffjord_direct", "tpr_fast")
                                       for s in (0, 1)]):
        arm = harness.ARMS[aname]
        dm, config = harness._run_inputs(w, arm, seed, w.steps, tmp_path / "build")
        dm.prepare_data()
        dm.setup("fit")
        model = harness.make_model(config, dm)
        with torch.no_grad():  # a field with some bend, different for every model
            gen = torch.Generator().manual_seed(100 + i)
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.7)
        paths[aname, seed] = bench_run.model_file("tiny", w, arm, seed)
        harness.save_final_model(model, w, arm, seed, paths[aname, seed])
    return paths


def _run(tmp_path: Path, *extra: str) -> dict[str, Any]:
    assert frontier.main(["--suite", "tiny", *ROWS, *extra]) == 0
    return json.loads((tmp_path / "frontier_tiny.json").read_text())


def test_each_kept_model_is_measured_on_its_runs_test_rows_and_paired_by_seed(
        tiny: dict, tmp_path: Path) -> None:
    payload = _run(tmp_path)
    models = {(m["workload"], m["arm"], m["seed"]): m for m in payload["models"]}
    assert set(models) == {("checkerboard", a, s) for a in ("ffjord_direct", "tpr_fast")
                           for s in (0, 1)}
    w = bench_run.suite_workload("tiny", "checkerboard")
    for (_, aname, seed), m in models.items():
        # The converged NLL is that of this model file on the first 24 rows of its run's test
        # split, solved here apart from the frontier (float64, dopri5 at 1e-8).
        model, dm = harness.load_final_model(tiny[aname, seed], w, harness.ARMS[aname], seed,
                                             tmp_path / "check")
        x = torch.cat([b[0] for b in dm.test_dataloader()])[:24].double()
        model = model.double()
        solver = accuracy.Setting("dopri5", tol=1e-8).solver(model.solver)
        with torch.no_grad(), solving_with(model.flow, solver):
            nll = float(-model.log_prob(x).mean())
        assert m["reference"]["converged_nll"] == pytest.approx(nll, abs=1e-6)
        assert m["reference"]["rows"] == 24 and m["model"] == tiny[aname, seed].name
        assert [r["setting"] for r in m["settings"]] == [
            s.name for s in accuracy.default_settings()]
    # Seed 0's and seed 1's models differ, and each TPR model is compared with its own seed's
    # baseline: the NLL differences are of the same seed.
    nll = {k[1:]: m["reference"]["converged_nll"] for k, m in models.items()}
    assert nll["ffjord_direct", 0] != pytest.approx(nll["ffjord_direct", 1], abs=1e-3)
    for e in map(str, accuracy.ACCURACIES):
        c = payload["answer"]["checkerboard"]["tpr_fast"][e]
        for seed in (0, 1):
            v = c["per_seed"][str(seed)]
            assert v["nll_diff"] == pytest.approx(nll["tpr_fast", seed] - nll["ffjord_direct",
                                                                               seed])
            want = accuracy.compare(accuracy.records_of(models["checkerboard", "ffjord_direct",
                                                               seed]),
                                    accuracy.records_of(models["checkerboard", "tpr_fast", seed]),
                                    float(e))
            assert v["verdict"] == want["verdict"] and v["ratio"] == want["ratio"]
        assert c["wins"] + c["ties"] + c["losses"] + c["neither"] == 2
    # The few-step table gives, per arm and grid setting, the spread over both seeds.
    rk4 = payload["few_steps"]["checkerboard"]["tpr_fast"]["rk4x2"]
    per_seed = [models["checkerboard", "tpr_fast", s]["settings"] for s in (0, 1)]
    got = sorted(r["mean_abs_d"] for rs in per_seed for r in rs if r["setting"] == "rk4x2")
    assert (rk4["abs_d"]["min"], rk4["abs_d"]["max"], rk4["seeds"]) == (*got, 2)
    # The page renders from the committed JSON alone, as benchmarks.report checks it.
    assert report.study_of("frontier_tiny") == "frontier"
    assert report.render("frontier_tiny", tmp_path) == (tmp_path / "frontier_tiny.md").read_text()
    assert (tmp_path / "frontier_tiny.png").stat().st_size > 0


def test_a_rerun_reads_the_cache_until_the_model_or_the_rows_change(
        tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _run(tmp_path, "--seeds", "0")
    calls = []
    real = accuracy.measure
    monkeypatch.setattr(accuracy, "measure", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert _run(tmp_path, "--seeds", "0")["models"] == first["models"]
    assert calls == []
    # A changed model file is measured again (and only that one) ...
    path = tiny["tpr_fast", 0]
    saved = torch.load(path, weights_only=True)
    saved["state_dict"] = {k: v * 1.1 for k, v in saved["state_dict"].items()}
    torch.save(saved, path)
    again = _run(tmp_path, "--seeds", "0")
    assert calls == [1]
    assert again["models"][0] == first["models"][0]
    assert again["models"][1]["reference"] != first["models"][1]["reference"]
    # ... and so is every model when the rows change.
    _run(tmp_path, "--seeds", "0", "--rows", "20")
    assert calls == [1, 1, 1]


def test_bad_flags_and_missing_models_are_refused(
        tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny["tpr_fast", 1].unlink()
    for argv, expected in [(["--seeds", "9"], "seeds [9] are not in suite 'tiny'"),
                           (["--rows", "0"], "must be >= 1"),
                           (["--rows", "41"], "--rows 41 is more than the 40 test rows"),
                           (["--seeds", "1"], "no kept model"),
                           (["--workloads", "moons"], "workloads ['moons'] are not in suite")]:
        with pytest.raises(SystemExit):
            frontier.main(["--suite", "tiny", *ROWS, *argv])
        assert expected in capsys.readouterr().err
