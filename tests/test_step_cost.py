"""benchmarks/step_cost.py: stand-in files in the standard formats, split sizes, lockstep pairs,
per-step figures and the summary's verdicts."""

from __future__ import annotations

import multiprocessing
import time

import numpy as np
import pytest

from benchmarks import step_cost


def test_split_sizes_follow_the_documented_rules():
    # MAF (shared DATA.md): test = last int(0.1 N), validation = last int(0.1 rest).
    assert step_cost.maf_split_sizes(98_764) == (80_000, 8_888, 9_876)
    assert step_cost.maf_split_sizes(1_000) == (810, 90, 100)
    # user table: int(0.1 N) rows each for validation and test
    assert step_cost.table_split_sizes(20_478) == (16_384, 2_047, 2_047)
    for train in (1, 7, 810, 16_384, 80_000):
        n = step_cost.rows_for_train(train, step_cost.maf_split_sizes)
        assert step_cost.maf_split_sizes(n)[0] == train
        assert step_cost.maf_split_sizes(n - 1)[0] < train  # the smallest such count
    with pytest.raises(ValueError, match="positive"):
        step_cost.rows_for_train(0, step_cost.maf_split_sizes)


def test_standin_files_load_through_the_standard_datamodules_as_whole_batches(tmp_path):
    from polyreg_cnf.datamodules.tabular import TabularDataModule
    from polyreg_cnf.datamodules.user_table import UserTableDataModule

    from polyreg_cnf.app.presets import PRESETS, TABLE_PRESET

    written = step_cost.write_standin_data(tmp_path)
    raw = np.load(tmp_path / "power" / "data.npy")
    assert raw.shape == (98_764, 8) and raw.dtype == np.float64
    assert np.load(tmp_path / "miniboone" / "data.npy").shape == (24_691, 43)
    for name, dim in (("power", 6), ("miniboone", 43)):
        dm = TabularDataModule(name, tmp_path)
        dm.prepare_data()
        dm.setup()
        train = dm.arrays()["train"]
        assert train.shape == (step_cost.TRAIN_ROWS[name], dim)
        assert len(train) % PRESETS[name]["batch_size"] == 0
        # standardised with train+validation statistics: train alone is close to 0 / 1
        assert np.abs(train.mean(0)).max() < 0.05 and np.abs(train.std(0) - 1).max() < 0.05
    table = UserTableDataModule(written["table"]["path"])
    table.prepare_data()
    table.setup()
    assert table.arrays()["train"].shape == (16_384, 16)
    assert len(table.arrays()["train"]) % TABLE_PRESET["batch_size"] == 0


def test_step_stats_excludes_the_first_step_and_labels_the_backprop():
    history = [(14, 21, 0.5), (14, 0, 0.1), (20, 7, 0.3), (14, 0, 0.2)]
    stats = step_cost.step_stats(history, cpu=[0.4, 0.1, 0.2, 0.3])
    assert stats["seconds"] == pytest.approx(0.2) and stats["seconds_all"] == pytest.approx(0.275)
    assert stats["forward"] == 16 and stats["backward"] == pytest.approx(7 / 3)
    assert stats["cpu_seconds"] == pytest.approx(0.2) and stats["first_seconds"] == 0.5
    assert step_cost.backprop_label(stats) == "mixed (1/3 adjoint)"
    assert step_cost.backprop_label(step_cost.step_stats(history[:2])) == "direct"
    assert step_cost.backprop_label(step_cost.step_stats([(1, 1, 1.0)] * 3)) == "adjoint"
    with pytest.raises(ValueError, match="at least 2"):
        step_cost.step_stats(history[:1])
    with pytest.raises(ValueError, match="cpu has 1 steps"):
        step_cost.step_stats(history, cpu=[0.1])


def test_metrics_csv_rows_of_training_steps_in_step_order(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("backprop/adjoint,nfe/backward,nfe/forward,step,time/step_seconds,val/nll\n"
                    "0.0,0.0,20.0,1,0.05,\n"
                    ",,,1,,3.5\n"
                    "0.0,21.0,14.0,0,0.2,\n")
    assert step_cost.read_metrics_csv(path) == [(14, 21, 0.2), (20, 0, 0.05)]


def _run(name, preset, reg, seed, seconds, forward, backward, cpu=None):
    r = dict(preset=preset, reg=reg, seed=seed, seconds=seconds, seconds_all=seconds,
             seconds_median=seconds, forward=forward, backward=backward,
             backprop="direct" if backward == 0 else "adjoint")
    if cpu is not None:
        r["cpu_seconds"] = cpu
    return r


def test_summary_pairs_by_seed_and_judges_each_preset():
    runs = [_run("a", "vae", "none", 0, 0.047, 14, 7, 0.046),
            _run("a", "vae", "poly", 0, 0.107, 14, 21, 0.105),
            _run("a", "vae", "none", 1, 0.050, 14, 7, 0.049),
            _run("a", "vae", "poly", 1, 0.110, 14, 21, 0.104),
            _run("a", "vae", "poly", 2, 0.1, 14, 21),  # no partner: left out
            _run("b", "toy", "none", 0, 1.0, 20, 0), _run("b", "toy", "poly", 0, 1.03, 20, 0)]
    rows = {r["preset"]: r for r in step_cost.summarise(runs)}
    vae = rows["vae"]
    assert vae["seeds"] == [0, 1] and not vae["met"]
    assert vae["ratio"] == pytest.approx((0.107 / 0.047 + 0.110 / 0.050) / 2, abs=1e-6)
    assert vae["ratio_cpu_min"] == pytest.approx(0.104 / 0.049, abs=1e-6)
    assert vae["backward_none"] == 7 and vae["backward_poly"] == 21
    assert rows["toy"]["met"] and "ratio_cpu" not in rows["toy"]


def _lockstep_worker(mine, other, log, name, steps):
    clock = step_cost.lockstep(mine, other, timeout=60)
    clock.on_train_start(None, None)
    for _ in range(steps):
        start = time.monotonic()
        time.sleep(0.02)  # the step
        log.put((name, start, time.monotonic()))
        clock.on_train_batch_end(None, None, None, None, 0)
    clock.on_train_end(None, None)


def test_lockstep_processes_take_strict_turns_one_step_each():
    ctx = multiprocessing.get_context("spawn")
    log = ctx.Queue()
    a, b = ctx.Semaphore(0), ctx.Semaphore(0)
    procs = [ctx.Process(target=_lockstep_worker, args=(a, b, log, "A", 4)),
             ctx.Process(target=_lockstep_worker, args=(b, a, log, "B", 4))]
    for proc in procs:
        proc.start()
    a.release()  # A starts
    steps = sorted((log.get(timeout=60) for _ in range(8)), key=lambda s: s[1])
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    assert [name for name, _, _ in steps] == ["A", "B"] * 4
    # no two steps overlap in time
    assert all(prev[2] <= nxt[1] for prev, nxt in zip(steps, steps[1:]))


def test_front_door_command_is_the_documented_one():
    assert step_cost.front_door_command("poly") == ["--model", "vae", "--reg", "poly"]
    assert step_cost.front_door_command("none", backprop="adjoint")[-2:] == ["--backprop",
                                                                              "adjoint"]


@pytest.mark.parametrize("preset", step_cost.PRESET_STEPS)
def test_every_build_made_preset_resolves_without_validation(preset, tmp_path):
    # The tabular and table presets stop early on validation; a run that skips validation must
    # say it stops never, or the configuration is refused.
    config = step_cost.preset_config(preset, "poly", 0, 3, tmp_path, str(tmp_path))
    assert config.training.max_steps == 3 and config.training.early_stop_patience == 0
