"""The test-cost frontier: end to end on a tiny suite, and its equal-NLL answer by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import frontier
from benchmarks import run as bench_run


def _curve(points: list[tuple[float, float, float]]) -> list[dict[str, float]]:
    return [{"tol": t, "test_nll": nll, "test_nfe": nfe} for t, nll, nfe in points]


def test_equal_nll_cost_by_hand() -> None:
    # The better model's best is 3.60 (TPR at 1e-5): the target is 3.61. The baseline gets
    # there at 1e-4 (80 NFE), TPR already at 1e-3 (50 NFE): 50 / 80.
    base = _curve([(1e-3, 3.65, 40.0), (1e-4, 3.609, 80.0), (1e-5, 3.605, 150.0)])
    tpr = _curve([(1e-3, 3.610, 50.0), (1e-4, 3.602, 70.0), (1e-5, 3.600, 100.0)])
    out = frontier.equal_nll_cost(base, tpr)
    assert out["target_nll"] == pytest.approx(3.61)
    assert (out["base_nfe"], out["nfe"]) == (80.0, 50.0)
    assert (out["base_tol"], out["tol"]) == (1e-4, 1e-3)
    assert out["ratio"] == pytest.approx(0.625) and out["verdict"] == "wins"
    # Swapped, the baseline is the one that wins: TPR loses.
    assert frontier.equal_nll_cost(tpr, base)["verdict"] == "loses"
    # A model that never gets within 0.01 nats of the other's best loses outright.
    worse = _curve([(1e-3, 3.70, 20.0), (1e-5, 3.62, 60.0)])
    out = frontier.equal_nll_cost(base, worse)
    assert out["nfe"] is None and out["ratio"] is None and out["verdict"] == "loses"
    assert frontier.equal_nll_cost(worse, base)["verdict"] == "wins"
    # Within 5 %: a tie.
    near = _curve([(1e-4, 3.605, 78.0)])
    assert frontier.equal_nll_cost(base, near)["verdict"] == "ties"


def test_a_loose_point_that_reads_below_the_converged_nll_sets_the_target() -> None:
    # The rule as it is today: the target is the better model's best point at ANY tolerance,
    # so a loose point that reads below its model's converged NLL (solver error, not density)
    # moves the target. Here the baseline converges to 3.604 but its 1e-2 point reads 3.590:
    # the target is 3.600, which only that dipped point reaches, and TPR, whose converged NLL
    # (3.608) is within 0.004 nats of the baseline's, loses.
    base = _curve([(1e-2, 3.590, 30.0), (1e-3, 3.605, 60.0), (1e-6, 3.604, 200.0)])
    tpr = _curve([(1e-2, 3.612, 30.0), (1e-3, 3.6085, 45.0), (1e-6, 3.608, 150.0)])
    out = frontier.equal_nll_cost(base, tpr)
    assert out["target_nll"] == pytest.approx(3.600)
    assert (out["base_nfe"], out["base_tol"]) == (30.0, 1e-2)
    assert out["nfe"] is None and out["ratio"] is None and out["verdict"] == "loses"
    # The other way round: TPR's own dip sets the target and wins it, at its cheapest point,
    # against a baseline that converges 0.004 nats below TPR.
    out = frontier.equal_nll_cost(tpr, base)
    assert (out["nfe"], out["tol"]) == (30.0, 1e-2) and out["base_nfe"] is None
    assert out["verdict"] == "wins"
    # Without the dip (the baseline's loose point reads its converged value) the target is
    # 3.604 + 0.01 and both get there: TPR loses on cost (45 against 30), not to solver error.
    flat = _curve([(1e-2, 3.604, 30.0)] + [(p["tol"], p["test_nll"], p["test_nfe"])
                                          for p in base[1:]])
    tpr_late = _curve([(1e-2, 3.640, 20.0), (1e-3, 3.6085, 45.0), (1e-6, 3.608, 150.0)])
    out = frontier.equal_nll_cost(flat, tpr_late)
    assert out["target_nll"] == pytest.approx(3.614)
    assert (out["base_nfe"], out["nfe"], out["verdict"]) == (30.0, 45.0, "loses")


def test_answer_pairs_each_seed_with_its_own_baseline() -> None:
    # Seed 1's TPR curve would win against seed 0's baseline; against its own it loses.
    curves = {("w", "base", 0): _curve([(1e-3, 3.60, 100.0)]),
              ("w", "base", 1): _curve([(1e-3, 3.70, 20.0)]),
              ("w", "tpr", 0): _curve([(1e-3, 3.60, 50.0)]),
              ("w", "tpr", 1): _curve([(1e-3, 3.70, 40.0)])}
    out = frontier.answer(curves, "base")["w"]["tpr"]
    assert out["per_seed"][0]["ratio"] == pytest.approx(0.5)
    assert out["per_seed"][0]["ratio_at_reference_tol"] is None  # no 1e-5 point here
    assert out["per_seed"][1]["ratio"] == pytest.approx(2.0)
    assert out["verdict"] == "mixed" and out["counts"] == {"wins": 1, "ties": 0, "loses": 1}
    assert out["ratio"]["median"] == pytest.approx(1.25)
    assert (out["ratio"]["min"], out["ratio"]["max"]) == (0.5, 2.0)


def test_frontier_end_to_end_on_a_tiny_suite(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_run, "RESULTS", tmp_path)
    monkeypatch.setitem(bench_run.SUITES, "tiny", dict(
        workloads={"checkerboard": 40}, seeds=(0,), arms=("ffjord_direct", "tpr_fast"),
        baselines=("ffjord_direct",), keep_models=True))
    monkeypatch.setitem(bench_run.WORKLOADS, "checkerboard", bench_run.dataclasses.replace(
        bench_run.WORKLOADS["checkerboard"], num_val=200, num_test=300, hidden_dims=(16, 16)))
    # The suite keeps its models ...
    monkeypatch.setattr(sys, "argv", ["run.py", "--suite", "tiny"])
    bench_run.main()
    w = bench_run.suite_workload("tiny", "checkerboard")
    kept = bench_run.model_file("tiny", w, bench_run.ARMS["ffjord_direct"], 0)
    assert kept.exists()
    # ... and the frontier makes a missing one (as a suite run before keeping models left it)
    # again the way the suite did, leaving the suite's own measurement alone.
    bench_run.model_file("tiny", w, bench_run.ARMS["tpr_fast"], 0).unlink()
    measured = tmp_path / ".cache" / "tiny" / "checkerboard-40-tpr_fast-0.json"
    before = measured.read_bytes()
    monkeypatch.setattr(sys, "argv", ["frontier.py", "--suite", "tiny", "--samples", "500"])
    frontier.main()
    assert measured.read_bytes() == before
    payload = json.loads((tmp_path / "frontier_tiny.json").read_text())
    [remade] = payload["remade"]
    assert remade["key"] == ["checkerboard", "tpr_fast", 0] and remade["steps"] == 40
    # the same code and seed on CPU: the remade run repeats the measured one
    assert remade["test_nll"][1] == pytest.approx(remade["test_nll"][0], abs=1e-6)
    assert remade["forward_nfe"][1] == pytest.approx(remade["forward_nfe"][0], rel=1e-6)
    assert "1 of these models were made again" in (tmp_path / "frontier_tiny.md").read_text()
    assert (tmp_path / "frontier_tiny.png").stat().st_size > 0
    assert "## checkerboard" in (tmp_path / "frontier_tiny.md").read_text()
    curves = {tuple(k): c for k, c in payload["curves_by_key"]}
    assert set(curves) == {("checkerboard", "ffjord_direct", 0), ("checkerboard", "tpr_fast", 0)}
    for curve in curves.values():
        assert [p["tol"] for p in curve] == list(frontier.TOLERANCES)  # one point per tol
        nfe = [p["test_nfe"] for p in curve]
        assert nfe[0] < nfe[-1] and all(a <= b for a, b in zip(nfe, nfe[1:]))
        assert all(p["batch_rows"] == 300 and p["rows_per_second"] > 0 for p in curve)
        assert curve[0]["sample_nfe"] < curve[-1]["sample_nfe"]
    seed0 = payload["answer"]["checkerboard"]["tpr_fast"]["per_seed"]["0"]
    base, tpr = curves["checkerboard", "ffjord_direct", 0], curves["checkerboard", "tpr_fast", 0]
    # The answer follows the documented rule, checked point by point on the measured curves:
    # the target is the better model's best NLL + 0.01; each cost is the fewest NFE of the
    # points at or below it; the ratio sets the verdict; the reference ratio is at 1e-5.
    target = min(p["test_nll"] for p in base + tpr) + 0.01
    assert seed0["target_nll"] == pytest.approx(target)
    for curve, nfe, tol in ((base, "base_nfe", "base_tol"), (tpr, "nfe", "tol")):
        under = [p for p in curve if p["test_nll"] <= target]
        if not under:
            assert seed0[nfe] is None and seed0[tol] is None
            continue
        [chosen] = [p for p in curve if p["tol"] == seed0[tol]]
        assert chosen["test_nll"] <= target and chosen["test_nfe"] == seed0[nfe]
        assert seed0[nfe] == min(p["test_nfe"] for p in under)
    assert seed0["base_nfe"] is not None or seed0["nfe"] is not None  # the best one gets there
    if seed0["base_nfe"] is not None and seed0["nfe"] is not None:
        ratio = seed0["nfe"] / seed0["base_nfe"]
        assert seed0["ratio"] == pytest.approx(ratio)
        assert seed0["verdict"] == ("wins" if ratio <= 0.95 else "loses" if ratio >= 1.05
                                    else "ties")
    else:
        assert seed0["ratio"] is None
        assert seed0["verdict"] == ("wins" if seed0["base_nfe"] is None else "loses")
    assert base[5]["tol"] == tpr[5]["tol"] == 1e-5
    assert seed0["ratio_at_reference_tol"] == pytest.approx(tpr[5]["test_nfe"]
                                                            / base[5]["test_nfe"])
    # Every curve is cached: a report from the cache alone is the same report ...
    cache = tmp_path / ".cache" / "frontier" / "tiny"
    assert sorted(p.name for p in cache.iterdir()) == ["checkerboard-40-ffjord_direct-0.json",
                                                       "checkerboard-40-tpr_fast-0.json",
                                                       "remade"]
    monkeypatch.setattr(sys, "argv", ["frontier.py", "--suite", "tiny", "--samples", "500",
                                      "--cached-only"])
    frontier.main()
    again = json.loads((tmp_path / "frontier_tiny.json").read_text())
    assert again["answer"] == payload["answer"] and again["missing"] == []
    # ... and a cached curve is what the report reads (nothing is evaluated again) ...
    entry = json.loads((cache / "checkerboard-40-tpr_fast-0.json").read_text())
    entry["curve"][0]["test_nll"] = -99.0
    (cache / "checkerboard-40-tpr_fast-0.json").write_text(json.dumps(entry))
    frontier.main()
    curves = {tuple(k): c for k, c in
              json.loads((tmp_path / "frontier_tiny.json").read_text())["curves_by_key"]}
    assert curves["checkerboard", "tpr_fast", 0][0]["test_nll"] == -99.0
    # ... until the model changes: then the curve is stale, and missing from the report.
    model = bench_run.model_file("tiny", bench_run.suite_workload("tiny", "checkerboard"),
                                 bench_run.ARMS["tpr_fast"], 0)
    model.write_bytes(model.read_bytes() + b"\0")
    assert frontier.cached_curve("tiny", "checkerboard", "tpr_fast", 0, 500) is None
    assert frontier.cached_curve("tiny", "checkerboard", "tpr_fast", 0, 0) is None  # samples
    frontier.main()
    last = json.loads((tmp_path / "frontier_tiny.json").read_text())
    assert last["missing"] == [["checkerboard", "tpr_fast", 0]] and last["answer"] == {}
    assert "Not measured yet" in (tmp_path / "frontier_tiny.md").read_text()


def test_flags_choose_workloads_and_seeds_and_bad_ones_are_refused(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    asked = []
    monkeypatch.setattr(frontier, "_curve_of", lambda *args: asked.append(args[1:4]))
    monkeypatch.setattr(frontier, "cached_curve", lambda *args: None)
    for argv, expected in [(["--seeds", "4"], "no cached frontier curves"),
                           (["--seeds", "9"], "seeds [9] are not in suite 'long_fresh'"),
                           (["--seeds", "x"], "--seeds takes comma-separated integers"),
                           (["--workloads", "moons"], "workloads ['moons'] are not in suite"),
                           (["--jobs", "0"], "--jobs must be >= 1")]:
        monkeypatch.setattr(sys, "argv", ["frontier.py", "--suite", "long_fresh", *argv])
        with pytest.raises(SystemExit):
            frontier.main()
        assert expected in capsys.readouterr().err
    # only the chosen seed was evaluated, every arm of it
    assert asked == [("checkerboard", a, 4)
                     for a in ("ffjord_direct", "tpr_fast_c1", "tpr_fast_late")]
