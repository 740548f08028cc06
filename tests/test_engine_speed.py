"""benchmarks/engine_speed.py: FLOPs counted by hand, and a tiny run that writes its tables."""

from __future__ import annotations

import json

import torch

from benchmarks import engine_speed


def test_flops_of_the_checkerboard_evaluation_by_hand():
    w = engine_speed.WORKLOADS["checkerboard"]  # 2 -> 64 -> 64 -> 64 -> 2, concat, batch 100
    value = 2 * 100 * (3 * 64 + 65 * 64 + 65 * 64 + 65 * 2)  # the time column is an input
    tangents = 2 * 2 * 100 * (64 * 64 + 64 * 64)  # D = 2 tangents through the middle layers
    diagonal = 2 * 100 * 2 * 64  # the last layer: only the diagonal of the Jacobian
    assert engine_speed.flops(w, exact=True) == value + tangents + diagonal == 5_030_800
    # Hutchinson: one tangent through every layer, no time column on it.
    assert engine_speed.flops(w, exact=False) == value + 2 * 100 * (2 * 64 + 2 * 64 * 64
                                                                     + 64 * 2)


def test_flops_of_an_amortized_layer_count_the_low_rank_products():
    w = engine_speed.Workload("t", 4, (8,), "concat", "tanh", "hutchinson", 10, rank=2)
    value = 2 * 10 * (5 * 8 + 9 * 4) + 2 * 10 * 2 * ((5 + 8) + (9 + 4))
    tangents = 2 * 10 * (4 * 8 + 8 * 4) + 2 * 10 * 2 * ((4 + 8) + (8 + 4))
    assert engine_speed.flops(w, exact=False) == value + tangents


def test_a_tiny_run_writes_json_and_markdown(tmp_path):
    out = tmp_path / "speed"
    torch_threads = torch.get_num_threads()
    try:
        assert engine_speed.main(["--workloads", "checkerboard", "--repeats", "2",
                                  "--block-seconds", "0.001", "--profile-calls", "1",
                                  "--no-compile", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(torch_threads)
    data = json.loads(out.with_suffix(".json").read_text())
    (result,) = data["results"]
    for mode in ("eval", "field", "step"):
        seconds = result[mode]["seconds"]
        assert set(seconds) >= {"reference", "forward"}
        assert all(s["median"] > 0 for s in seconds.values())
    assert result["eval"]["flops"] == 5_030_800 and result["step"]["flops"] == 3 * 5_030_800
    profile = result["step"]["profile"]["forward"]
    assert 0.99 < sum(v for k, v in profile.items() if k != "profiled_seconds") < 1.01
    text = out.with_suffix(".md").read_text()
    assert "| checkerboard | step | exact | 15.09 |" in text
    assert "Load average" in text and data["meta"]["threads"] == 1
