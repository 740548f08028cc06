"""On a CUDA device: the engine and training agree with the CPU; benchmarks/gpu_check.py's parts.

The CUDA tests skip (with the reason) where torch sees no CUDA device; ``python -m
benchmarks.gpu_check`` runs this file on a GPU machine and counts such a skip as a failure.
The tests of gpu_check.py's no-CUDA path and helpers run everywhere.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torchdiffeq
from polyreg_cnf.callbacks import BackpropSelector, NFEMonitor
from polyreg_cnf.datamodules.toy import ToyDataModule

from benchmarks import gpu_check
from polyreg_cnf import (
    CNF,
    NFECounter,
    ODEBlock,
    ODENet,
    SolverConfig,
    odeint,
    odeint_adjoint,
    sample_penalty_times,
    standard_normal_logprob,
    trajectory_polynomial_penalty,
)
from polyreg_cnf.engine.nfe import record_nfe
from polyreg_cnf.engine.recording import TrajectoryRecorder
from polyreg_cnf.engine.strategies import Auto
from polyreg_cnf.models import CNFDensityEstimator

ROOT = Path(__file__).resolve().parents[1]

HAS_CUDA = torch.cuda.is_available()
DEVICES = torch.cuda.device_count() if HAS_CUDA else 0
cuda = pytest.mark.skipif(not HAS_CUDA, reason=f"{gpu_check.CUDA_SKIP_REASON} "
                                               f"(torch.cuda.is_available() is False)")
two_gpus = pytest.mark.skipif(DEVICES < 2, reason=f"needs 2 CUDA devices, found {DEVICES}")


def _cpu(values):
    return [v.detach().cpu() for v in values]


# ------------------------------------------------------------------------------ engine on CUDA
@cuda
@pytest.mark.parametrize("backprop", ["direct", "adjoint", "checkpoint"])
def test_cnf_on_cuda_matches_cpu_in_float64(backprop):
    torch.manual_seed(0)
    solver = SolverConfig(atol=1e-9, rtol=1e-9, backprop=backprop)
    on_cpu = CNF(ODENet(3, (32, 32), layer_type="concatsquash"), solver=solver,
                 trace="exact").double()
    on_gpu = copy.deepcopy(on_cpu).cuda()
    x = torch.randn(64, 3, dtype=torch.float64)
    results = []
    for model in (on_cpu, on_gpu):
        device = next(model.parameters()).device
        # Interior times from a CPU generator: the same on both devices.
        with TrajectoryRecorder(2, 1, generator=torch.Generator().manual_seed(3)) as recorder:
            z, ladj = model(x.to(device))
        penalty = recorder.penalty()
        loss = -(standard_normal_logprob(z) + ladj).mean() + 5 * penalty
        grads = torch.autograd.grad(loss, list(model.parameters()))
        assert z.device.type == device.type and all(g.device == device for g in grads)
        results.append((_cpu([z, ladj, penalty]), _cpu(grads), model.nfe.forward,
                        model.nfe.backward))
    (values_c, grads_c, fwd_c, bwd_c), (values_g, grads_g, fwd_g, bwd_g) = results
    assert fwd_g == fwd_c and bwd_g == bwd_c
    assert (bwd_c > 0) == (backprop != "direct")
    for a, b in zip(values_g + grads_g, values_c + grads_c):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


@cuda
@pytest.mark.parametrize("backprop", ["direct", "adjoint", "checkpoint"])
@pytest.mark.parametrize("grid", [[0.0, 0.3, 1.0], [1.0, 0.4, -0.5]])
def test_odeblock_grid_on_cuda_matches_cpu_in_float64(backprop, grid):
    torch.manual_seed(1)
    solver = SolverConfig(atol=1e-9, rtol=1e-9, backprop=backprop)
    on_cpu = ODEBlock(ODENet(2, (16, 16)), solver=solver).double()
    on_gpu = copy.deepcopy(on_cpu).cuda()
    y0 = torch.randn(5, 2, dtype=torch.float64)
    t = torch.tensor(grid, dtype=torch.float64)  # stays on the CPU: the block moves it
    results = []
    for model in (on_cpu, on_gpu):
        start = y0.to(next(model.parameters()).device).requires_grad_(True)
        with TrajectoryRecorder(2, 1, generator=torch.Generator().manual_seed(4)) as recorder:
            traj = model(start, t=t)
        loss = traj.square().sum() + 3 * recorder.penalty()
        grads = torch.autograd.grad(loss, [start, *model.parameters()])
        results.append(_cpu([traj, recorder.penalty(), *grads]))
    assert results[0][0].shape == (3, 5, 2)
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-9)


@cuda
@pytest.mark.parametrize("t_device", ["cuda", "cpu"])
def test_dropin_odeint_on_cuda_returns_torchdiffeqs_values(t_device):
    torch.manual_seed(2)
    func = ODENet(2, (16, 16)).double().cuda()
    y0 = torch.randn(4, 2, dtype=torch.float64, device="cuda")
    t = torch.linspace(0.0, 1.0, 5, dtype=torch.float64, device=t_device)
    stock = torchdiffeq.odeint(func, y0, t)
    assert torch.equal(odeint(func, y0, t), stock)  # no recorder: torchdiffeq itself
    counter, plain = NFECounter(), NFECounter()
    recorder = TrajectoryRecorder(3, 1, generator=torch.Generator().manual_seed(5))
    with record_nfe(counter), recorder:
        ours = odeint(func, y0, t)
    with record_nfe(plain):
        odeint(func, y0, t)
    # Same values at the requested times, same steps (interior times are dense output).
    assert ours.device.type == "cuda" and torch.equal(ours, stock)
    assert counter.forward == plain.forward > 0
    # The penalty is the one of torchdiffeq's solution on the merged grid, drawn as documented.
    u = sample_penalty_times(3, 0.0, 1.0, generator=torch.Generator().manual_seed(5),
                             dtype=torch.float64)[1:-1].to(t.device)
    merged = torch.sort(torch.cat([t, t[0] + u * (t[-1] - t[0])])).values
    expected = trajectory_polynomial_penalty(merged, torchdiffeq.odeint(func, y0, merged), 1)
    torch.testing.assert_close(recorder.penalty(), expected, rtol=1e-10, atol=1e-12)


@cuda
def test_dropin_adjoint_on_cuda_matches_direct_backprop_with_the_penalty():
    torch.manual_seed(3)
    func = ODENet(2, (16, 16)).double().cuda()
    y0 = torch.randn(3, 2, dtype=torch.float64, device="cuda")
    t = torch.tensor([0.5, 0.8, 1.3, 2.0], dtype=torch.float64, device="cuda")
    grads = []
    for solve in (odeint, odeint_adjoint):
        recorder = TrajectoryRecorder(3, 1, generator=torch.Generator().manual_seed(1))
        with recorder:
            sol = solve(func, y0, t, rtol=1e-9, atol=1e-11)
        loss = sol.square().sum() + 10 * recorder.penalty()
        grads.append(torch.autograd.grad(loss, list(func.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)
    # Counting only (no recorder): torchdiffeq's adjoint with the evaluations counted.
    stock = torchdiffeq.odeint_adjoint(func, y0, t, rtol=1e-9, atol=1e-11)
    stock_grads = torch.autograd.grad(stock.square().sum(), list(func.parameters()))
    counter = NFECounter()
    with record_nfe(counter):
        counted = odeint_adjoint(func, y0, t, rtol=1e-9, atol=1e-11)
        counted_grads = torch.autograd.grad(counted.square().sum(), list(func.parameters()))
    torch.testing.assert_close(counted, stock, rtol=1e-12, atol=1e-14)
    for a, b in zip(counted_grads, stock_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert counter.forward > 0 and counter.backward > 0


# ------------------------------------------------------------------------------ auto backprop
class StepBackward(L.Callback):
    """Backward NFE of every training step."""

    def __init__(self):
        self.backward = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.backward.append(sum(b.nfe.backward for b in pl_module.flow.blocks))


def _fit_on_gpu(model, steps, callbacks=()):
    dm = ToyDataModule("8gaussians", num_train=512, num_val=64, num_test=64, batch_size=64)
    trainer = L.Trainer(max_steps=steps, accelerator="gpu", devices=1,
                        callbacks=[NFEMonitor(), *callbacks], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, dm)
    return trainer


@cuda
def test_auto_backprop_measures_chooses_direct_and_trains_on_cuda():
    L.seed_everything(0)
    model = CNFDensityEstimator(2, hidden_dims=[16, 16],
                                solver=SolverConfig(atol=1e-3, rtol=1e-3))
    spy = StepBackward()
    trainer = _fit_on_gpu(model, 4, [spy])
    block = model.flow.blocks[0]
    assert next(model.parameters()).device.type == "cuda"
    # step 1 on the adjoint while measuring, then direct backprop (nothing evaluated backwards)
    assert spy.backward[0] > 0 and spy.backward[1:] == [0, 0, 0]
    assert _site(block).bytes_per_row > 0 and _site(block).choice == "direct"
    selector = next(c for c in trainer.callbacks if isinstance(c, BackpropSelector))
    assert selector.state_dict() == {"choice": "direct", "fell_back": False}

    L.seed_everything(0)
    tight = CNFDensityEstimator(2, hidden_dims=[16, 16],
                                solver=SolverConfig(atol=1e-3, rtol=1e-3,
                                                    backprop=Auto(memory_share=1e-12)))
    spy = StepBackward()
    _fit_on_gpu(tight, 3, [spy])
    assert all(n > 0 for n in spy.backward)  # the estimate does not fit: the adjoint throughout


@cuda
def test_auto_backprop_falls_back_when_a_direct_solve_really_runs_out_of_cuda_memory():
    torch.manual_seed(0)
    cnf = CNF(ODENet(2, (64, 64, 64), layer_type="concatsquash"),
              solver=SolverConfig(atol=1e-5, rtol=1e-5)).cuda()
    x = torch.randn(100_000, 2, device="cuda")

    def step():
        cnf.nfe.reset()
        z, ladj = cnf(x)
        (-(standard_normal_logprob(z) + ladj).mean()).backward()

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()  # measures on the adjoint, then proposes direct backprop (the device is large)
    adjoint_peak = torch.cuda.max_memory_allocated() - base
    direct_need = _site(cnf).bytes_per_row * x.shape[0] * cnf.nfe.forward
    assert _site(cnf).choice == "direct" and cnf.nfe.backward > 0
    assert direct_need > 3 * adjoint_peak, "set-up: direct backprop must need far more memory"
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    # Cap this process: room for an adjoint step (x2), far from enough for a direct one.
    torch.cuda.set_per_process_memory_fraction(
        (torch.cuda.memory_reserved() + 2 * adjoint_peak) / total)
    try:
        with pytest.warns(RuntimeWarning, match="ran out of memory"):
            step()
        assert _site(cnf).fell_back and _site(cnf).choice == "memory_bounded"
        assert cnf.nfe.backward > 0  # the redone solve was the adjoint
        assert all(torch.isfinite(p.grad).all() for p in cnf.parameters())
        step()  # and it stays there
        assert cnf.nfe.backward > 0 and _site(cnf).choice == "memory_bounded"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


@cuda
def test_short_fit_through_build_on_the_gpu(tmp_path):
    from polyreg_cnf.app.build import build, execute
    from polyreg_cnf.app.config import resolve

    config = resolve(dict(data="8gaussians", reg="poly", hidden_dims=(16, 16), batch_size=256,
                          eval_batch_size=1000, max_steps=5, limit_val_batches=0, atol=1e-3,
                          rtol=1e-3, eval_atol=1e-3, eval_rtol=1e-3, accelerator="gpu",
                          devices="1", logger="csv", plot_every=0, progress=False,
                          output_dir=str(tmp_path / "runs")))
    run = build(config)
    assert execute(run, quiet=True) == 0
    assert next(run.model.parameters()).device.type == "cuda"
    history = run.monitor.history
    assert len(history) == 5 and all(f > 0 for f, _, _ in history)
    assert history[0][1] > 0 and all(b == 0 for _, b, _ in history[1:])  # auto: then direct
    metrics = run.trainer.callback_metrics
    assert torch.isfinite(metrics["test/nll"]) and metrics["test/nfe"] > 0
    assert "reg/poly" in (run.run_dir / "metrics.csv").read_text().splitlines()[0]


# ------------------------------------------------------------------------------ DDP on 2 GPUs
class SaveState(L.Callback):
    """Each process writes its final weights and backprop choice."""

    def __init__(self, out):
        self.out = str(out)

    def on_fit_end(self, trainer, pl_module):
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        choices = [_site(b).choice for b in pl_module.flow.blocks]
        torch.save({"state": state, "choices": choices},
                   os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


@two_gpus
def test_ddp_spawn_on_two_gpus_keeps_identical_weights_and_choices(tmp_path):
    from polyreg_cnf.callbacks import PolynomialTrajectoryRegularizer

    L.seed_everything(0)
    model = CNFDensityEstimator(2, hidden_dims=[16, 16],
                                solver=SolverConfig(atol=1e-3, rtol=1e-3))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    dm = ToyDataModule("8gaussians", num_train=512, num_val=64, num_test=64, batch_size=64)
    trainer = L.Trainer(strategy="ddp_spawn", accelerator="gpu", devices=2, max_steps=4,
                        callbacks=[PolynomialTrajectoryRegularizer(), NFEMonitor(),
                                   SaveState(tmp_path)],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(model, dm)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in (0, 1))
    assert r0["choices"] == r1["choices"] == ["direct"]
    for key in r0["state"]:
        torch.testing.assert_close(r0["state"][key], r1["state"][key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(r0["state"][k], init[k]) for k in init if "flow" in k)


@two_gpus
def test_train_py_under_the_ddp_launcher_on_two_gpus(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", "cnf", "--reg", "poly",
           "--data", "8gaussians", "--hidden-dims", "16,16", "--batch-size", "64",
           "--eval-batch-size", "1000", "--max-steps", "3", "--atol", "1e-3", "--rtol", "1e-3",
           "--eval-atol", "1e-3", "--eval-rtol", "1e-3", "--limit-val-batches", "0",
           "--accelerator", "gpu", "--devices", "2", "--strategy", "ddp",
           "--output-dir", str(tmp_path / "runs"), "--logger", "csv"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("== polyreg-cnf") == 1  # the summary from rank 0 only
    assert "test NLL (nats):" in proc.stdout


# ------------------------------------------------------------------------------ everywhere
class _Tracked:
    """What autograd keeps for one saved tensor: alive exactly while its graph node is."""

    def __init__(self, tensor):
        self.tensor = tensor.detach()
        self.nbytes = tensor.numel() * tensor.element_size()


class _OOMOnDirect(torch.nn.Module):
    """Raises CUDA's out-of-memory error on the 12th evaluation of the armed (direct) solve and
    records how many bytes of that solve's graph are still alive when the next solve starts."""

    def __init__(self, tracked):
        super().__init__()
        self.net = ODENet(2, (32, 32))
        self.tracked, self.armed, self.calls = tracked, False, 0
        self.before_oom = self.at_fallback = None

    def alive(self):
        return sum(r().nbytes for r in self.tracked if r() is not None)

    def forward(self, t, z):
        if self.armed:
            self.calls += 1
            if self.calls == 12:
                self.armed = False
                self.before_oom = self.alive()
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        elif self.before_oom is not None and self.at_fallback is None:
            self.at_fallback = self.alive()
        return self.net(t, z)


def test_the_fallback_adjoint_starts_after_the_failed_direct_solve_is_released():
    import gc
    import weakref

    tracked = []

    def pack(tensor):
        box = _Tracked(tensor)
        if not (tensor.is_leaf and tensor.requires_grad):
            tracked.append(weakref.ref(box))
        return box

    torch.manual_seed(0)
    field = _OOMOnDirect(tracked)
    cnf = CNF(field, solver=SolverConfig(atol=1e-6, rtol=1e-6), trace="exact")
    x = torch.randn(256, 2)
    cnf(x)  # measures, chooses direct
    assert _site(cnf).choice == "direct"
    field.armed = True
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor):
        with pytest.warns(RuntimeWarning, match="ran out of memory"):
            z, _ = cnf(x)
    gc.collect()
    assert _site(cnf).fell_back and field.before_oom > 0
    # What the failed direct solve had allocated must be free before the adjoint solve starts.
    assert field.at_fallback < 0.1 * field.before_oom, (field.at_fallback, field.before_oom)


def test_measuring_bytes_per_evaluation_frees_the_measured_evaluation():
    import gc
    import weakref

    from polyreg_cnf.engine.memory import saved_tensor_bytes

    x = torch.randn(100, 8)
    weight = torch.randn(8, 16, requires_grad=True)
    outputs = []

    def evaluation(v):
        out = torch.tanh(v @ weight)
        outputs.append(weakref.ref(out))
        return out

    result, nbytes = saved_tensor_bytes(evaluation, x)
    assert nbytes == (100 * 8 + 100 * 16) * 4  # x for the matmul, tanh's output
    del result
    gc.collect()
    assert outputs[0]() is None, "the measured evaluation is still alive"


def test_gpu_check_without_cuda_exits_2_names_the_cause_and_writes_nothing(tmp_path):
    out = tmp_path / "results" / "gpu_check"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no device, even on a GPU machine
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == gpu_check.EXIT_NO_CUDA == 2
    assert "no CUDA device" in proc.stderr and "torch.cuda.is_available() is False" in proc.stderr
    assert "CUDA_VISIBLE_DEVICES=''" in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "results").exists()


def test_junit_outcomes_read_passes_failures_errors_and_skips():
    xml = ('<testsuites><testsuite name="pytest">'
           '<testcase classname="tests.test_gpu" name="test_ok" time="0.1"/>'
           '<testcase classname="tests.test_gpu" name="test_bad"><failure message="assert 1 == 2">'
           'trace</failure></testcase>'
           '<testcase classname="tests.test_gpu" name="test_broken"><error message="fixture">'
           '</error></testcase>'
           '<testcase classname="tests.test_gpu" name="test_cuda[direct]"><skipped '
           'type="pytest.skip" message="needs a CUDA device (no)"/></testcase>'
           '</testsuite></testsuites>')
    assert [(o["name"], o["outcome"], o["message"]) for o in gpu_check.junit_outcomes(xml)] == [
        ("tests.test_gpu::test_ok", "passed", ""),
        ("tests.test_gpu::test_bad", "failed", "assert 1 == 2"),
        ("tests.test_gpu::test_broken", "failed", "fixture"),
        ("tests.test_gpu::test_cuda[direct]", "skipped", "needs a CUDA device (no)"),
    ]


def test_cuda_tests_skip_with_the_reason_gpu_check_treats_as_a_failure():
    # gpu_check.run_device_tests recognises a skipped CUDA test by this reason.
    assert cuda.kwargs["reason"].startswith(gpu_check.CUDA_SKIP_REASON)
    assert cuda.args == (not HAS_CUDA,)


def test_memory_estimate_is_bytes_per_row_times_rows_times_nfe_summed_over_blocks():
    assert gpu_check.memory_estimate([]) == 0.0
    assert gpu_check.memory_estimate([(3931.5, 512, 14)]) == 3931.5 * 512 * 14
    assert gpu_check.memory_estimate([(10.0, 4, 2), (1.5, 4, 8)]) == 80.0 + 48.0


def test_memory_probe_records_each_step_against_the_nfe_monitor():
    """The probe's bookkeeping on CPU, with stand-in memory readers (CUDA's on a GPU)."""
    readings = iter(range(0, 10_000, 100))  # allocated() at each step's start: 0, 100, 200
    peaks = []

    def allocated():
        return next(readings)

    def peak():
        value = 10_000 + len(peaks)
        peaks.append(value)
        return value

    probe = gpu_check.memory_probe(allocated, peak, reset=lambda: None)
    L.seed_everything(0)
    model = CNFDensityEstimator(2, hidden_dims=[16, 16], num_blocks=2,
                                solver=SolverConfig(atol=1e-3, rtol=1e-3))
    monitor = NFEMonitor()
    dm = ToyDataModule("8gaussians", num_train=512, num_val=64, num_test=64, batch_size=64)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", callbacks=[monitor, probe], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, dm)
    records = probe.records
    assert [r["step"] for r in records] == [0, 1, 2]
    assert [r["direct"] for r in records] == [False, True, True]  # step 0 measures (adjoint)
    assert [r["growth"] for r in records] == [10_000 - 0, 10_001 - 100, 10_002 - 200]
    per_row = [_site(b).bytes_per_row for b in model.flow.blocks]
    for record, (forward, _, _) in zip(records, monitor.history):
        assert [rows for _, rows, _ in record["blocks"]] == [64, 64]
        assert [b for b, _, _ in record["blocks"]] == per_row
        assert sum(n for _, _, n in record["blocks"]) == forward
        expected = sum(p * 64 * n for p, (_, _, n) in zip(per_row, record["blocks"]))
        assert record["estimate"] == pytest.approx(expected)
    assert all(p > 0 for p in per_row)


def test_markdown_reports_failures_and_leaves_out_what_was_not_measured():
    results = dict(
        meta=dict(command="python -m benchmarks.gpu_check", gpus="1 x Some GPU (80 GiB)",
                  cpu="cpu", python="3.11", torch="2.x", cuda="12.x", git_commit="abc",
                  wall_seconds=12.0, exit_status=1),
        tests=dict(command="python -m pytest tests/test_gpu.py", returncode=1, seconds=3.0,
                   counts=dict(passed=1, failed=1, skipped=1), ok=False,
                   outcomes=[dict(name="t::a", outcome="passed", message=""),
                             dict(name="t::b", outcome="failed", message="boom"),
                             dict(name="t::ddp", outcome="skipped",
                                  message="needs 2 CUDA devices, found 1")]),
        timing=dict(runs=[], summary=[]), memory=[],
        errors=[dict(part="power --reg poly", error="RuntimeError: x")])
    text = gpu_check.markdown(results)
    assert "1 passed, 1 failed, 1 skipped" in text and "| t::b | failed | boom |" in text
    assert "needs 2 CUDA devices, found 1" in text
    assert text.count("Not measured.") == 2
    assert "- power --reg poly: RuntimeError: x" in text


def _site(block):
    """What the block's Auto strategy decided for it (the decision lives in the block)."""
    return block.backprop_decision
