"""The benchmark harness: runs end to end on tiny budgets, caches runs, summarises honestly."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import harness  # noqa: E402
import run as bench_run  # noqa: E402


@pytest.mark.parametrize("workload,arm", [("checkerboard", "tpr_fast"),
                                          ("vae_digits", "ffjord")])
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
            "backward_nfe_last100": 5.0, "seconds_per_step": 0.1, "train_seconds": 1.0,
            "test_nll": 1.0, "test_nfe": 16.0, "tolerance_gap": 0.0, "val_curve": curve}


def test_speedup_is_time_to_the_baselines_final_value() -> None:
    base = _fake("ffjord_matched", 0, [(10.0, 1, 3.0), (30.0, 2, 2.0)])
    fast = _fake("tpr_fast", 0, [(5.0, 1, 2.5), (15.0, 2, 1.9)])
    slow = _fake("rnode", 0, [(10.0, 1, 3.0), (30.0, 2, 2.1)])
    for r in (base, fast, slow):
        r["workload"] = "checkerboard"
    summary = bench_run.summarise([base, fast, slow])
    s = summary["checkerboard"]
    assert s["tpr_fast"]["speedup_to_ffjord_matched_final_val"]["median"] == pytest.approx(2.0)
    assert s["rnode"]["speedup_to_ffjord_matched_final_val"]["median"] is None
    g = bench_run.goals(summary)["checkerboard"]
    assert g["matched_tpr_fast"]["met"] and not g["matched_rnode"]["met"]
    assert g["test_nfe_tpr_fast"]["times_floor"] == pytest.approx(2.0)


def test_suite_caches_finished_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str, int]] = []

    def fake_run_one(w, arm, seed):  # noqa: ANN001, ANN202
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
