"""train.py under Lightning's plain DDP launcher and across two "nodes" on loopback (gloo)."""

import csv
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from polyreg_cnf.models import CNFDensityEstimator

ROOT = Path(__file__).resolve().parents[1]

# A user's launcher script: train.py's command line plus one callback that writes each process's
# weights, added through build's extension point (train.main passes it on to build).
WRAPPER = textwrap.dedent("""
    import os, sys
    import lightning as L
    import torch
    sys.path.insert(0, {root!r})
    import train

    class SaveRankWeights(L.Callback):
        def on_train_end(self, trainer, pl_module):
            state = {{k: v.detach().cpu() for k, v in pl_module.state_dict().items()}}
            torch.save(state, os.path.join({out!r}, f"rank{{trainer.global_rank}}.pt"))

    sys.exit(train.main(callbacks=[SaveRankWeights()]))
""")


def table(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(610, 3)) @ np.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.5], [0, 0, 1]])
    path = tmp_path / "table.npy"
    np.save(path, data)
    return path


def command(script, data, out, extra):
    return [sys.executable, str(script), "--data", str(data), "--hidden-dims", "16,16",
            "--batch-size", "64", "--eval-batch-size", "50", "--max-steps", "6",
            "--val-every", "6", "--atol", "1e-3", "--rtol", "1e-3", "--eval-atol", "1e-4",
            "--eval-rtol", "1e-4", "--accelerator", "cpu", "--strategy", "ddp",
            "--logger", "csv", "--plot-every", "0", "--output-dir", str(out), "--no-test", *extra]


def write_wrapper(tmp_path):
    script = tmp_path / "launch.py"
    script.write_text(WRAPPER.format(root=str(ROOT), out=str(tmp_path)))
    return script


def assert_same_weights(tmp_path, ranks):
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(ranks)]
    for key in states[0]:
        for other in states[1:]:
            torch.testing.assert_close(states[0][key], other[key], rtol=0, atol=0, msg=key)


def last_logged(path, key):
    with open(path, newline="") as handle:
        values = [row[key] for row in csv.DictReader(handle) if row.get(key)]
    return float(values[-1])


def test_plain_ddp_launcher_syncs_weights_and_val_nll_is_the_exact_global_mean(tmp_path):
    data, script = table(tmp_path), write_wrapper(tmp_path)
    out = tmp_path / "runs"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(command(script, data, out, ["--devices", "2"]), cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(tmp_path, 2)
    run = out / "cnf-table-poly-s0"
    ddp_val = last_logged(run / "metrics.csv", "val/nll")
    # The same checkpoint evaluated in one process: the 61 validation rows split 31/30 by the
    # unpadded shard sampler (a padded DistributedSampler would count one row twice), so the
    # DDP mean must equal the single-process mean.
    model = CNFDensityEstimator.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    from polyreg_cnf.datamodules.user_table import UserTableDataModule

    dm = UserTableDataModule(data, batch_size=64, eval_batch_size=50)
    single = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                       enable_model_summary=False).validate(model, dm, verbose=False)
    assert single[0]["val/nll"] == pytest.approx(ddp_val, rel=1e-5, abs=1e-5)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_nodes(script, data, tmp_path, extra=()):
    """One process per "node" on loopback, each writing to ``tmp_path / node<k>``."""
    port = free_port()
    procs = []
    for node in (0, 1):
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(node))
        procs.append(subprocess.Popen(
            command(script, data, tmp_path / f"node{node}",
                    ["--devices", "1", "--num-nodes", "2", *extra]),
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.slow  # the plain launcher test above keeps DDP in the default run
def test_two_nodes_on_loopback(tmp_path):
    data, script = table(tmp_path), write_wrapper(tmp_path)
    procs = start_two_nodes(script, data, tmp_path)
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    assert "== polyreg-cnf" in results[0][0]  # the summary comes from global rank 0 only
    assert "== polyreg-cnf" not in results[1][0]
    assert_same_weights(tmp_path, 2)


# The same launcher, but one global rank alone sends itself a real SIGTERM in the middle of step 3
# (a scheduler's signal reaches the processes at different points). Saving is collective, so
# both processes must agree to stop at the same batch, or the run hangs in the save's barrier.
SIGTERM_ONE_RANK = textwrap.dedent("""
    import os, signal, sys
    import lightning as L
    sys.path.insert(0, {root!r})
    import train

    class SigtermOnOneRank(L.Callback):
        def on_before_backward(self, trainer, pl_module, loss):
            if trainer.global_rank == {rank} and trainer.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    sys.exit(train.main(callbacks=[SigtermOnOneRank()]))
""")


@pytest.mark.slow  # the launching-process SIGTERM test below stays in the default run
def test_sigterm_on_one_process_stops_every_process_at_the_same_step(tmp_path):
    data = table(tmp_path)
    script = tmp_path / "launch_sigterm.py"
    script.write_text(SIGTERM_ONE_RANK.format(root=str(ROOT), rank=1))
    procs = start_two_nodes(script, data, tmp_path, ["--max-steps", "12"])
    try:
        results = [p.communicate(timeout=180) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("the DDP run hung after one process received SIGTERM")
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 143, err[-3000:]
    # Rank 0 never received the signal itself, yet stopped after the same step and saved.
    assert "interrupted by SIGTERM at step 4;" in results[0][0]
    saved = tmp_path / "node0" / "cnf-table-poly-s0" / "checkpoints" / "last.ckpt"
    assert torch.load(saved, weights_only=True)["global_step"] == 4


def test_sigterm_on_the_launching_process_stops_the_processes_it_started(tmp_path):
    # Lightning's plain launcher (--devices 2): rank 0 starts rank 1; the signal reaches rank 0
    # only (as `kill <pid>` does), and the whole run still stops at one step, saved, exit 143.
    data = table(tmp_path)
    script = tmp_path / "launch_sigterm.py"
    script.write_text(SIGTERM_ONE_RANK.format(root=str(ROOT), rank=0))
    out = tmp_path / "runs"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    try:
        proc = subprocess.run(command(script, data, out, ["--devices", "2", "--max-steps", "12"]),
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("the DDP run hung after its launching process received SIGTERM")
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "interrupted by SIGTERM at step 4;" in proc.stdout
    saved = out / "cnf-table-poly-s0" / "checkpoints" / "last.ckpt"
    assert torch.load(saved, weights_only=True)["global_step"] == 4


# Each process writes what it decided: its best checkpoint and score, its early-stopping state,
# the step it stopped at and its validation record. Selection and stopping must agree.
SELECTION_WRAPPER = textwrap.dedent("""
    import json, os, sys
    import lightning as L
    sys.path.insert(0, {root!r})
    import train
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from polyreg_cnf.callbacks.selection import LearningRateDrops, ValidationRecord

    class WriteDecisions(L.Callback):
        def on_train_end(self, trainer, pl_module):
            best = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)][0]
            early = [c for c in trainer.callbacks if isinstance(c, EarlyStopping)][0]
            record = [c for c in trainer.callbacks if isinstance(c, ValidationRecord)][0]
            drops = [c for c in trainer.callbacks if isinstance(c, LearningRateDrops)][0]
            out = dict(best_path=best.best_model_path, best_score=float(best.best_model_score),
                       wait=early.wait_count, reason=str(early.stopping_reason),
                       step=trainer.global_step, history=record.history, drops=drops.drops,
                       lr=trainer.optimizers[0].param_groups[0]["lr"])
            with open(os.path.join({out!r}, f"rank{{trainer.global_rank}}.json"), "w") as f:
                json.dump(out, f)

    sys.exit(train.main(callbacks=[WriteDecisions()]))
""")


@pytest.mark.slow  # two processes, up to 60 steps with a validation every 2
def test_ddp_ranks_select_the_same_checkpoint_and_stop_at_the_same_step(tmp_path):
    data = table(tmp_path)
    script = tmp_path / "launch_selection.py"
    script.write_text(SELECTION_WRAPPER.format(root=str(ROOT), out=str(tmp_path)))
    out = tmp_path / "runs"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    argv = command(script, data, out, ["--devices", "2", "--max-steps", "60", "--val-every", "2",
                                       "--lr", "5e-2", "--early-stop-patience", "2",
                                       "--lr-drop", "0.5"])
    argv.remove("--no-test")  # the best checkpoint is tested on both processes
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    decided = ranks[0]
    assert decided["reason"].endswith("PATIENCE_EXHAUSTED") and decided["step"] < 60
    best_step = min(decided["history"], key=lambda h: h[1])[0]
    assert decided["step"] == best_step + 2 * 2
    # Patience 2: the rate halves after each validation without a lower NLL, twice at most.
    assert decided["drops"] and decided["lr"] == 5e-2 * 0.5 ** len(decided["drops"])
    assert f"best validation checkpoint, step {best_step}" in proc.stdout
    assert "stopped:                    early" in proc.stdout
    folder = out / "cnf-table-poly-s0" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]
