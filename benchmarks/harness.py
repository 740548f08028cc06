"""Benchmark harness: train named arms on named workloads over several seeds and summarise.

Each run is a :class:`polyreg_cnf.app.config.RunConfig` (:func:`run_config`) made by
:func:`polyreg_cnf.app.build.build`, as train.py makes its runs. What a run measures and how the
summaries compare arms (seed by seed): docs/benchmarks.md, "Reading the reports".
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from polyreg_cnf.callbacks import NFEMonitor
from polyreg_cnf.datamodules.toy import ToyDataModule
from polyreg_cnf.datamodules.user_table import UserTableDataModule

from benchmarks.common import spread
from polyreg_cnf.app.build import build, make_model
from polyreg_cnf.app.config import RunConfig, resolve
from polyreg_cnf.engine.ode import ODEBlock, ode_blocks
from polyreg_cnf.engine.penalty import trajectory_polynomial_penalty

EVAL_TOL = 1e-5  # the paper's evaluation tolerance, for every arm
# One intra-op thread per run: these small models gain nothing from two, and a second thread
# competing with any other process makes every parallel region wait (see README).
RUN_THREADS = 1


@dataclass(frozen=True)
class Workload:
    """A data set, its network and its training length."""

    name: str
    kind: str  # "toy", "table" or "vae"
    steps: int
    eval_every: int
    # Arm (1)'s tolerance: the authors' FFJORD scripts used 1e-8/1e-6 for density estimation and
    # 1e-5 for the VAE.
    baseline_tol: tuple[float, float] = (1e-8, 1e-6)
    batch_size: int = 256
    hidden_dims: tuple[int, ...] = (64, 64, 64)
    layer_type: str = "concatsquash"
    nonlinearity: str = "tanh"
    num_blocks: int = 1
    lr: float = 1e-3
    num_val: int = 2000
    num_test: int = 5000


@dataclass(frozen=True)
class Arm:
    """One training configuration (regularizer, tolerances, engineering options)."""

    name: str
    label: str
    reg: str | None = None  # None, "poly" or "kinetic"
    atol: float = 1e-4
    rtol: float = 1e-4
    adjoint: bool = True
    adjoint_carry_step: bool = True
    seminorm: bool = False
    trace: str = "hutchinson"
    baseline_tol: bool = False  # train at the workload's baseline tolerance instead
    extra: dict[str, Any] = field(default_factory=dict)


def _direct(name: str, label: str, reg: str | None = "poly", **extra: Any) -> Arm:
    """An arm with direct backprop through the solver (arm (5)'s engineering) and ``extra``."""
    return Arm(name, label, reg=reg, adjoint=False, extra=extra)


ARMS = {arm.name: arm for arm in (
    Arm("ffjord", "(1) FFJORD, authors' baseline tolerance (1e-8/1e-6; VAE 1e-5)",
        adjoint_carry_step=False, baseline_tol=True),
    Arm("tpr_paper", "(2) TPR, paper settings (train 1e-4, stock adjoint)", reg="poly",
        adjoint_carry_step=False),
    Arm("ffjord_matched", "(3) FFJORD at matched train tol 1e-4", adjoint_carry_step=False),
    Arm("rnode", "(4) RNODE (kinetic + Jacobian, 0.01 each), train 1e-4", reg="kinetic",
        adjoint_carry_step=False),
    # Arm (5): direct backprop needs no backward solve, so the penalty's times cost nothing.
    _direct("tpr_fast", "(5) TPR + direct backprop through the solver"),
    # Controls that separate the engineering from the regularizer.
    _direct("ffjord_direct", "(3b) FFJORD at 1e-4 + direct backprop (arm 5 without TPR)",
            reg=None),
    Arm("tpr_carry", "(5a) TPR + restart-free seminorm adjoint", reg="poly",
        adjoint_carry_step=True, seminorm=True),
    # One engineering change at a time (the 'engineering' suite).
    Arm("tpr_seminorm", "(2s) TPR + stock seminorm adjoint", reg="poly",
        adjoint_carry_step=False, seminorm=True),
    Arm("tpr_carry_only", "(2c) TPR + restart-free adjoint", reg="poly", adjoint_carry_step=True),
    Arm("tpr_fast_exact", "(5e) TPR + direct backprop + exact trace", reg="poly", adjoint=False,
        trace="exact"),
    # The VAE suite: both arms with direct backprop; also on a harder posterior (z 64, T 2).
    Arm("ffjord_base_direct", "(1d) FFJORD at the authors' tolerance + direct backprop",
        adjoint=False, baseline_tol=True),
    Arm("ffjord_base_direct_hard", "(1d) on z 64, T 2", adjoint=False, baseline_tol=True,
        extra={"z_dim": 64, "T": 2.0}),
    _direct("tpr_fast_hard", "(5) on z 64, T 2", z_dim=64, T=2.0),
    # The settings sweep: arm (5) with one factor changed from the paper's (coef 5, K 2, m 1).
    _direct("tpr_fast_c1", "(5) with coef 1", poly_coef=1.0),
    _direct("tpr_fast_c20", "(5) with coef 20", poly_coef=20.0),
    _direct("tpr_fast_c50", "(5) with coef 50", poly_coef=50.0),
    _direct("tpr_fast_k4", "(5) with K = 4 interior times", poly_samples=4),
    _direct("tpr_fast_m2", "(5) with degree m = 2", poly_order=2),
    # The late-start lever (issue 21; why: docs/results.md): coef 5 from step 3000 on.
    _direct("tpr_fast_late", "(5) from step 3000 (coef 0 before)", poly_start_step=3000),
    _direct("ffjord_direct_cos", "(3b) with a cosine learning rate", reg=None,
            lr_schedule="cosine"),
    _direct("tpr_fast_cos", "(5) with a cosine learning rate", lr_schedule="cosine"),
)}

WORKLOADS = {w.name: w for w in (
    Workload("checkerboard", "toy", steps=3000, eval_every=250),
    Workload("8gaussians", "toy", steps=3000, eval_every=250),
    Workload("breast_cancer", "table", steps=2000, eval_every=200, batch_size=128,
             hidden_dims=(64, 64), layer_type="concat", nonlinearity="softplus", num_val=0,
             num_test=0),
    # A 16-D table with a known density (benchmarks/tables.py), 5,000 test rows.
    Workload("mixture16", "table", steps=4000, eval_every=250, batch_size=256,
             hidden_dims=(128, 128), layer_type="concat", nonlinearity="softplus", num_val=0,
             num_test=0),
    # The digits preset of polyreg_cnf.models.vae (its other settings are the preset's).
    Workload("vae_digits", "vae", steps=420, eval_every=42, batch_size=100, hidden_dims=(64, 64),
             nonlinearity="softplus", lr=2e-3, baseline_tol=(1e-5, 1e-5)),
)}


def _run_inputs(w: Workload, arm: Arm, seed: int, steps: int, tmp: Path
                ) -> tuple[L.LightningDataModule, RunConfig]:
    """The data module and run configuration of one run (table files are written into ``tmp``)."""
    config = run_config(w, arm, seed, steps, tmp / "runs",
                        {"table": str(tmp / f"{w.name}.npy"), "vae": "digits"}.get(w.kind))
    if w.kind == "vae":
        from polyreg_cnf.datamodules.images import DigitsDataModule

        # The split and the static binarization are fixed (seed 0) for every arm and seed.
        return DigitsDataModule(seed=0, batch_size=w.batch_size), config
    if w.kind == "toy":
        return ToyDataModule(w.name, num_train=50_000, num_val=w.num_val, num_test=w.num_test,
                             seed=seed, batch_size=w.batch_size, eval_batch_size=5000), config
    path = tmp / f"{w.name}.npy"
    if w.name == "breast_cancer" and not path.exists():
        from sklearn.datasets import load_breast_cancer

        np.save(path, load_breast_cancer().data)
    elif w.name == "mixture16" and not path.exists():
        from benchmarks.tables import write_mixture_table

        write_mixture_table(path, rows=50_000, dim=16)
    elif w.name not in ("breast_cancer", "mixture16"):
        raise ValueError(f"no table for workload {w.name!r}")
    # The split is fixed (seed 0) so every arm and seed sees the same test rows.
    return UserTableDataModule(path, seed=0, batch_size=w.batch_size,
                               eval_batch_size=1000), config


class _Record(L.Callback):
    """What each validation measures, kept in the run's checkpoints (so a run resumes with it):
    (training seconds so far, step, val NLL) in ``curve`` (seconds from the run's NFEMonitor);
    every ``probe_every`` steps :func:`straightness` on ``rows`` in ``probes`` (0: none)."""

    def __init__(self, probe_every: int = 0, rows: torch.Tensor | None = None) -> None:
        self.probe_every, self.rows = probe_every, rows
        self.curve: list[list[float]] = []
        self.probes: list[dict[str, float]] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step, metrics = trainer.global_step, trainer.callback_metrics
        if trainer.sanity_checking:
            return
        if "val/nll" in metrics:
            monitor = next(c for c in trainer.callbacks if isinstance(c, NFEMonitor))
            seconds = sum(r[2] for r in monitor.history)
            self.curve.append([seconds, step, float(metrics["val/nll"])])
        if self.probe_every and step and not step % self.probe_every \
                and all(p["step"] != step for p in self.probes):
            self.probes.append({"step": step, **straightness(pl_module, self.rows)})

    def state_dict(self) -> dict[str, Any]:
        return {"curve": self.curve, "probes": self.probes}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.curve, self.probes = (list(state_dict.get(k, [])) for k in ("curve", "probes"))


class _ResumePoint(L.Callback):
    """Writes the run's ``last.ckpt`` after the validation of every ``every``-th step.

    After the validation, not at the end of the training batch as Lightning's step-based
    checkpoint does: a run resumed from it then keeps that step's validation point and probe.
    """

    def __init__(self, every: int) -> None:
        self.every = every

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if not (trainer.sanity_checking or step == 0 or step % self.every):
            # the run folder build() made (its trainer's root), where a resume looks
            trainer.save_checkpoint(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt")


def straightness(model: L.LightningModule, rows: torch.Tensor) -> dict[str, float]:
    """Test NFE, polynomial penalty and path length / displacement of ``model``'s flow.

    The forward NFE of one solve of ``rows`` at the evaluation tolerance (``log_prob``), and for
    the state trajectory at 16 equally spaced times of every block: the degree-1 polynomial
    penalty (unweighted) and the path length over the displacement (1 for straight lines; the
    mean over rows).
    """
    blocks = ode_blocks(model)
    was_training = model.training
    model.eval()
    try:
        for b in blocks:
            b.nfe.reset()
        penalty, ratio, z = 0.0, [], rows.to(model.device)
        with torch.no_grad():
            model.log_prob(z)
            test_nfe = float(sum(b.nfe.forward for b in blocks))
            for b in blocks:
                grid = torch.linspace(0.0, float(b.end_time_tensor(z)), 16, dtype=z.dtype,
                                      device=z.device)
                # The state's own dynamics (a CNF's log-density is a passenger).
                traj = ODEBlock.forward(b, z, t=grid)
                penalty += float(trajectory_polynomial_penalty(grid, traj, order=1))
                length = (traj[1:] - traj[:-1]).flatten(2).norm(dim=2).sum(0)
                shift = (traj[-1] - traj[0]).flatten(1).norm(dim=1)
                ratio.append(length / shift.clamp_min(1e-12))
                z = traj[-1]
        for b in blocks:
            b.nfe.reset()
    finally:
        model.train(was_training)
    return {"test_nfe": test_nfe, "penalty": penalty,
            "path_ratio": float(torch.cat(ratio).mean())}


def _set_eval_tolerance(model: torch.nn.Module, atol: float, rtol: float) -> None:
    for block in ode_blocks(model):
        block.solver = dataclasses.replace(block.solver, eval_atol=atol, eval_rtol=rtol)


def run_config(w: Workload, arm: Arm, seed: int, steps: int, out_dir: Path,
               data: str | None = None) -> RunConfig:
    """The run configuration of one arm on one workload: every setting of the two, as options."""
    atol, rtol = w.baseline_tol if arm.baseline_tol else (arm.atol, arm.rtol)
    given: dict[str, Any] = dict(
        model="vae" if w.kind == "vae" else "cnf", data=data or w.name, reg=arm.reg or "none",
        hidden_dims=w.hidden_dims, nonlinearity=w.nonlinearity, lr=w.lr,
        batch_size=w.batch_size, trace=arm.trace, eval_trace="exact", atol=atol, rtol=rtol,
        eval_atol=EVAL_TOL, eval_rtol=EVAL_TOL, backprop="adjoint" if arm.adjoint else "direct",
        adjoint_carry_step=arm.adjoint_carry_step, seminorm=arm.seminorm, max_steps=steps,
        max_epochs=None, val_every=w.eval_every, seed=seed, threads=RUN_THREADS,
        accelerator="cpu", devices="1", logger="none", plot_every=0, ckpt_every=0,
        progress=False, output_dir=str(out_dir),
        # the suites measure fixed-length runs and test their last weights (as they always did)
        early_stop_patience=0, test_ckpt="last")
    if w.kind != "vae":  # the VAE's other settings are the digits preset's
        given.update(layer_type=w.layer_type, num_blocks=w.num_blocks)
    return resolve({**given, **arm.extra})


class RunInterrupted(RuntimeError):
    """A run ended before its last step (SIGTERM, SIGINT, an early stop): it measured nothing."""


def run_one(w: Workload, arm: Arm, seed: int, steps: int | None = None,
            work_dir: Path | None = None, ckpt_every: int = 0,
            probe_every: int = 0, model_path: Path | None = None) -> dict[str, Any]:
    """Train one arm on one workload with one seed; return its measurements.

    Args:
        w: The workload.
        arm: The arm.
        seed: The run's seed.
        steps: Training steps (default: the workload's).
        work_dir: A folder that outlives the call: the run checkpoints there every
            ``ckpt_every`` steps, and a later call with it resumes from the latest checkpoint
            (curves and probes included). None: a temporary folder, no resume.
        ckpt_every: Checkpoint interval in steps (with ``work_dir``).
        probe_every: Every this many steps, :func:`straightness` on 2,000 fixed test rows
            (density workloads only).
        model_path: Keep the final model there (:func:`save_final_model`). None: not kept.

    Raises:
        RunInterrupted: The fit ended before ``steps`` (e.g. SIGTERM): nothing is returned or
            kept, so a cache never holds a short run as a finished one.
    """
    steps = steps or w.steps
    resume = work_dir is not None and ckpt_every > 0
    if resume and ckpt_every % w.eval_every:
        raise ValueError(f"ckpt_every ({ckpt_every}) must be a multiple of the workload's "
                         f"eval_every ({w.eval_every})")
    run_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch) if work_dir is None else Path(work_dir)
        tmp.mkdir(parents=True, exist_ok=True)
        dm, config = _run_inputs(w, arm, seed, steps, tmp)
        atol, rtol = config.ode.atol, config.ode.rtol
        record = _Record()
        if probe_every and w.kind != "vae":
            dm.prepare_data()
            dm.setup("test")
            record = _Record(probe_every, torch.as_tensor(
                np.asarray(dm.arrays()["test"][:2000]), dtype=torch.float32))
        callbacks = [record, _ResumePoint(ckpt_every)] if resume else [record]
        run = build(config, datamodule=dm, callbacks=callbacks,
                    ckpt_path="last" if resume else None)
        model, trainer, monitor = run.model, run.trainer, run.monitor
        start = time.perf_counter()
        trainer.fit(model, dm, ckpt_path=run.ckpt_path)
        fit_wall = time.perf_counter() - start
        if run.guard.interrupted is not None or trainer.global_step < steps:
            # A signal (or anything else) ended the fit early: the measurements of a short run
            # must not pass for a finished one. The run's checkpoint stays in ``work_dir``.
            why = run.guard.interrupted or "an early stop"
            raise RunInterrupted(f"{w.name}/{arm.name}/seed {seed} stopped at step "
                                 f"{trainer.global_step} of {steps} ({why}); nothing was kept"
                                 + ("; the same call resumes it" if resume else ""))
        if model_path is not None:
            save_final_model(model, w, arm, seed, Path(model_path))
        test = trainer.test(model, dm, verbose=False)[0]
        test_nfe = monitor.last_test_nfe
        _set_eval_tolerance(model, atol, rtol)  # the tolerance this run trained at
        test_train_tol = trainer.test(model, dm, verbose=False)[0]
        test_metrics = {k: float(v) for k, v in test.items()}
    fwd, bwd, secs = ([r[i] for r in monitor.history] for i in range(3))
    return {
        "workload": w.name, "arm": arm.name, "seed": seed, "steps": len(fwd),
        "forward_nfe": float(np.mean(fwd)), "backward_nfe": float(np.mean(bwd)),
        "total_nfe": float(np.mean(fwd) + np.mean(bwd)),
        "forward_nfe_last100": float(np.mean(fwd[-100:])),
        # The last tenth of training: where TPR's effect shows.
        "forward_nfe_last10pct": float(np.mean(fwd[-max(1, len(fwd) // 10):])),
        "backward_nfe_last100": float(np.mean(bwd[-100:])),
        "seconds_per_step": float(np.mean(secs)), "train_seconds": float(np.sum(secs)),
        "fit_wall_seconds": fit_wall, "run_wall_seconds": time.perf_counter() - run_start,
        "test_nll": float(test["test/nll"]), "test_nfe": float(test_nfe),
        "test_nll_at_train_tol": float(test_train_tol["test/nll"]),
        "tolerance_gap": float(test_train_tol["test/nll"] - test["test/nll"]),
        "train_tol": [atol, rtol], "test_metrics": test_metrics, "val_curve": record.curve,
        "probes": record.probes, "resumed_from": run.ckpt_path,
        "nfe_per_step": {"forward": fwd, "backward": bwd}}


def save_final_model(model: torch.nn.Module, w: Workload, arm: Arm, seed: int,
                     path: Path) -> None:
    """Write ``model``'s weights (no optimizer state) with the workload, arm and seed that made
    them, atomically; :func:`load_final_model` rebuilds the module from the same definitions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    torch.save({**definitions(w, arm), "seed": seed,
                "state_dict": {k: v.detach().cpu().clone()
                               for k, v in model.state_dict().items()}}, tmp)
    os.replace(tmp, path)


def definitions(w: Workload, arm: Arm) -> dict[str, Any]:
    """The workload's and arm's definitions as a stored run keeps them (through JSON, so tuples
    are lists, as they are in a cached file)."""
    return json.loads(json.dumps({"workload_def": dataclasses.asdict(w),
                                  "arm_def": dataclasses.asdict(arm)}))


def load_final_model(path: Path, w: Workload, arm: Arm, seed: int, tmp: Path
                     ) -> tuple[L.LightningModule, L.LightningDataModule]:
    """The model :func:`save_final_model` kept for (``w``, ``arm``, ``seed``), in eval mode,
    with the run's data module (set up for testing; table files are written into ``tmp``).

    Raises:
        ValueError: The file was made by another workload, arm or seed definition.
    """
    saved = torch.load(path, map_location="cpu", weights_only=True)
    made_by = {**definitions(w, arm), "seed": seed}
    got = {k: saved.get(k) for k in made_by}
    if json.loads(json.dumps(got)) != made_by:
        raise ValueError(f"{path} was made by {got}, not by {made_by}")
    dm, config = _run_inputs(w, arm, seed, w.steps, tmp)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    model = make_model(config, dm)
    model.load_state_dict(saved["state_dict"])
    model.eval()
    return model, dm


def time_to_reach(curve: list[list[float]], target: float) -> float | None:
    """Training seconds until the validation NLL first reaches ``target`` (None: never)."""
    return next((float(seconds) for seconds, _, nll in curve if nll <= target), None)


#: Validation evaluations averaged by :func:`smooth_curve` (why: docs/benchmarks.md, "Reading
#: the reports").
SMOOTH_EVALS = 5


def smooth_curve(curve: list[list[float]], k: int = SMOOTH_EVALS) -> list[list[float]]:
    """The validation curve with each NLL replaced by the mean of the last ``k`` evaluations."""
    return [[seconds, step, float(np.mean([c[2] for c in curve[max(0, i - k + 1):i + 1]]))]
            for i, (seconds, step, _) in enumerate(curve)]


def nfe_to_reach(run: dict[str, Any], target: float) -> float | None:
    """Function evaluations (forward + backward, summed over training steps) until the
    validation NLL first reaches ``target`` (None: never); unlike seconds, free of machine load."""
    nfe = run.get("nfe_per_step")
    if not nfe:
        return None
    work = np.cumsum(np.add(nfe["forward"], nfe["backward"]))
    return next((float(work[min(int(step), len(work)) - 1])
                 for _, step, nll in run["val_curve"] if nll <= target), None)


def speedups(per_seed: list[float | None]) -> dict[str, Any]:
    """A speed-up entry of per-seed values (None: never reached): the median (None unless every
    seed reached), the median counting an unreached seed as 0 (the slowest), how many reached."""
    return {"median": spread(per_seed)["median"], "per_seed": per_seed,
            "median_unreached_as_zero": float(statistics.median(
                [0.0 if v is None else v for v in per_seed])) if per_seed else None,
            "reached": sum(v is not None for v in per_seed), "of": len(per_seed)}


#: Seed-paired comparisons with a baseline: measurement -> how a seed's value is compared with
#: the same seed's baseline value ("diff": mine - base, "ratio": mine / base).
PAIRED = {"test_nll": "diff", "tolerance_gap": "diff", "test_nfe": "ratio",
          "forward_nfe": "ratio", "total_nfe": "ratio", "forward_nfe_last10pct": "ratio",
          "seconds_per_step": "ratio", "train_seconds": "ratio"}


def paired(mine: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, Any]:
    """Each of ``mine``'s runs against the run of ``base`` with the same seed (:data:`PAIRED`).

    Returns:
        ``seeds`` (the seeds both have, in ``mine``'s order) and per measurement the per-seed
        comparisons with their median, min and max (:func:`benchmarks.common.spread`).
    """
    by_seed = {r["seed"]: r for r in base}
    pairs = [(r, by_seed[r["seed"]]) for r in mine if r["seed"] in by_seed]
    out: dict[str, Any] = {"seeds": [r["seed"] for r, _ in pairs]}
    for key, how in PAIRED.items():
        values = [float(r[key] - b[key]) if how == "diff" else
                  None if not b[key] else float(r[key] / b[key]) for r, b in pairs]
        out[key] = {"per_seed": values, **spread(values)}
    return out


def _reach(run: dict[str, Any], ref: dict[str, Any], margin: float, smooth: bool
           ) -> tuple[float | None, float | None, float | None]:
    """``run``'s seconds to ``ref``'s final validation NLL + ``margin`` (on smoothed curves if
    ``smooth``) and its speed-ups in seconds and NFE (``ref``'s own cost to that value, which it
    may touch earlier, over ``run``'s); None where never reached or ``ref`` has no curve."""
    if not ref["val_curve"]:
        return None, None, None
    if smooth:
        run = {**run, "val_curve": smooth_curve(run["val_curve"])}
        ref = {**ref, "val_curve": smooth_curve(ref["val_curve"])}
    target = ref["val_curve"][-1][2] + margin
    mine, theirs = time_to_reach(run["val_curve"], target), time_to_reach(ref["val_curve"], target)
    my_nfe, their_nfe = nfe_to_reach(run, target), nfe_to_reach(ref, target)
    return (mine, None if mine is None or theirs is None else theirs / mine,
            None if not my_nfe or their_nfe is None else their_nfe / my_nfe)


def summarise(runs: list[dict[str, Any]],
              baselines: tuple[str, ...] = ("ffjord", "ffjord_matched", "ffjord_direct"),
              pairs: dict[str, str] | None = None) -> dict[str, Any]:
    """Medians and spreads per (workload, arm); against each baseline of ``baselines`` in the
    same workload, seed by seed: time to its final val NLL (speed-ups) and :func:`paired`
    differences and ratios (``paired_to_<baseline>``). ``pairs`` (arm -> its own baseline)
    adds ``paired_to_<baseline>`` for arms whose baseline is not among ``baselines``."""
    out: dict[str, Any] = {}
    keys = ("forward_nfe", "backward_nfe", "total_nfe", "forward_nfe_last100",
            "forward_nfe_last10pct", "backward_nfe_last100", "seconds_per_step", "train_seconds",
            "test_nll", "test_nfe", "tolerance_gap")
    by: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in runs:
        by.setdefault(r["workload"], {}).setdefault(r["arm"], []).append(r)
    for wname, arms in by.items():
        out[wname] = {}
        for aname, rs in arms.items():
            entry: dict[str, Any] = {"seeds": [r["seed"] for r in rs]}
            entry.update({k: spread([r[k] for r in rs]) for k in keys})
            for base in baselines:
                if base not in arms:
                    continue
                if base != aname:
                    entry[f"paired_to_{base}"] = paired(rs, arms[base])
                # The baseline's final validation NLL exactly, within 0.01 nats, and within 0.01
                # on smoothed curves. A seed without a baseline run is left out (as in paired()).
                base_by_seed = {b["seed"]: b for b in arms[base]}
                for margin, suffix, smooth in ((0.0, "", False),
                                               (0.01, "_within_0.01", False),
                                               (0.01, "_smoothed_within_0.01", True)):
                    reach = [_reach(r, base_by_seed[r["seed"]], margin, smooth)
                             for r in rs if r["seed"] in base_by_seed]
                    times, wall, work_ratios = ([c[i] for c in reach] for i in range(3))
                    entry[f"seconds_to_{base}_final_val{suffix}"] = {
                        "median": spread(times)["median"], "per_seed": times}
                    entry[f"speedup_to_{base}_final_val{suffix}"] = speedups(wall)
                    # The same ratio in function evaluations: independent of machine load.
                    entry[f"nfe_speedup_to_{base}_final_val{suffix}"] = speedups(work_ratios)
            own = (pairs or {}).get(aname)
            if own in arms and f"paired_to_{own}" not in entry:
                entry[f"paired_to_{own}"] = paired(rs, arms[own])
            out[wname][aname] = entry
    return out


def fmt(entry: dict[str, Any] | None, digits: int = 1) -> str:
    """'median [min, max]' of a summary entry ('median' alone without a range)."""
    if entry is None or entry.get("median") is None:
        return "not reached"
    if "min" not in entry:
        return f"{entry['median']:.{digits}f}"
    return f"{entry['median']:.{digits}f} [{entry['min']:.{digits}f}, {entry['max']:.{digits}f}]"
