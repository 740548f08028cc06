"""How accurate is a cheap evaluation setting? The rule that compares models by evaluation cost,
and the measurement behind it (issue 28, item 4).

    python -m benchmarks.accuracy --ckpt runs/x/checkpoints/last.ckpt --data checkerboard
    python -m benchmarks.accuracy --ckpt base.ckpt tpr.ckpt --names none tpr --out PREFIX

writes ``PREFIX.json`` and ``PREFIX.md``: each checkpoint's measurement on the same test rows
and latent draws, and every checkpoint after the first compared with the first.

**The reference.** Each test row's log-density from the model in float64, dopri5 at atol = rtol
= :data:`REFERENCE_TOL` (checked against :data:`CHECK_TOL` on the first rows). "Converged NLL"
means the mean of this reference: a model's quality is never read off a loose solve, whose
error can lower the NLL it reads (:func:`compare` is tested on exactly that case).

**The settings** (:func:`default_settings`): dopri5 at the tolerances :data:`TOLERANCES`; euler,
midpoint and rk4 at :data:`STEPS` equal steps per block. Each is measured on the model as users
run it (its own dtype, the evaluation trace): NFE per batch, rows per second, the mean per-row
:math:`|d|` and the mean signed :math:`d` where :math:`d = \\log p_{setting} - \\log p_{ref}`,
and, for sampling from the same latent draws, the NFE per batch and the RMS distance per
coordinate of the samples to the reference solve's (standardised units: a fraction of the
data's standard deviation).

**The rule.** A model's evaluation cost at accuracy e is its cheapest setting (fewest NFE per
batch) whose mean :math:`|d|` is at most e (:func:`cost_at`). Two models are compared seed by
seed (:func:`compare`, :func:`compare_seeds`) on converged NLL (within :data:`NLL_MARGIN`) and
on that cost.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from polyreg_cnf.engine.ode import ode_blocks, solving_with
from polyreg_cnf.engine.solver_config import ADAPTIVE_METHODS, FIXED_METHODS, SolverConfig
from polyreg_cnf.models import CNFDensityEstimator

__all__ = ["ACCURACIES", "CHECK_TOL", "NLL_MARGIN", "REFERENCE_TOL", "STEPS", "STUDY",
           "TOLERANCES",
           "Record", "Setting", "compare", "compare_seeds", "comparisons", "cost_at",
           "default_settings", "main", "markdown", "measure", "model_table", "records_of"]

#: atol = rtol of the reference solve (dopri5, float64).
REFERENCE_TOL = 1e-8
#: The tighter solve the reference is checked against, on a subset of the rows.
CHECK_TOL = 1e-10
#: dopri5 tolerances (atol = rtol) measured, loosest first.
TOLERANCES = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
#: Fixed-grid methods measured, and their numbers of equal steps per block.
FIXED = ("euler", "midpoint", "rk4")
STEPS = (1, 2, 4, 8, 16)
#: The accuracies (mean per-row nats) at which costs are reported.
ACCURACIES = (0.01, 0.003)
#: Converged NLLs within this many nats count as equal quality.
NLL_MARGIN = 0.01


# ------------------------------------------------------------------------------ the rule
@dataclass(frozen=True)
class Record:
    """One evaluation setting of one model, measured against the model's converged reference.

    Args:
        setting: The setting's name (e.g. ``"rk4x4"``, ``"dopri5@1e-05"``).
        nfe: Forward evaluations per batch.
        mean_abs_d: Mean per-row :math:`|\\log p_{setting} - \\log p_{ref}|` (nats).
        mean_d: Mean per-row signed difference (nats; > 0: the setting reads a lower NLL).
        converged_nll: The model's converged NLL (the same in every record of a model).
    """

    setting: str
    nfe: float
    mean_abs_d: float
    mean_d: float
    converged_nll: float

    def __post_init__(self) -> None:
        for name in ("nfe", "mean_abs_d", "converged_nll"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"Record {self.setting!r}: {name} must be a finite number, got "
                                 f"{value!r}")
        if self.nfe < 0 or self.mean_abs_d < 0:
            raise ValueError(f"Record {self.setting!r}: nfe and mean_abs_d must be >= 0, got "
                             f"{self.nfe!r} and {self.mean_abs_d!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Record:
        """A record from a dict with (at least) the fields' names."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


def _converged_nll(records: Sequence[Record]) -> float:
    if not records:
        raise ValueError("a model needs at least one record, got none")
    values = {r.converged_nll for r in records}
    if len(values) != 1:
        raise ValueError(f"the records of one model must share its converged NLL, got "
                         f"{sorted(values)}")
    return values.pop()


def cost_at(records: Sequence[Record], accuracy: float) -> Record | None:
    """The cheapest setting that meets ``accuracy`` (mean :math:`|d|` <= accuracy), or None.

    Fewest NFE wins; among equally cheap settings the more accurate, then the first name.

    Example:
        >>> recs = [Record("rk4x1", 4, 0.2, 0.1, 3.7), Record("rk4x4", 16, 0.004, 0.0, 3.7)]
        >>> cost_at(recs, 0.01).setting, cost_at(recs, 0.001)
        ('rk4x4', None)
    """
    _converged_nll(records)
    if not (isinstance(accuracy, (int, float)) and accuracy > 0):
        raise ValueError(f"accuracy must be a number > 0 (nats per row), got {accuracy!r}")
    meeting = [r for r in records if r.mean_abs_d <= accuracy]
    if not meeting:
        return None
    return min(meeting, key=lambda r: (r.nfe, r.mean_abs_d, r.setting))


def compare(base: Sequence[Record], other: Sequence[Record], accuracy: float,
            nll_margin: float = NLL_MARGIN) -> dict[str, Any]:
    """``other`` against ``base`` (same seed and workload) at ``accuracy``.

    The verdict: ``"loses"`` if ``other``'s converged NLL is worse than ``base``'s by more than
    ``nll_margin``; otherwise by cost at ``accuracy``: ``"wins"`` (cheaper, or ``base`` never
    meets it), ``"ties"`` (equal NFE), ``"loses"`` (dearer, or ``other`` never meets it) and
    ``"neither"`` when no setting of either model meets it. A setting's NLL reading is never
    compared: only its distance to its own model's reference counts.

    Returns:
        ``verdict``, ``reason``, ``nll_diff`` (other minus base, converged), ``base_cost``
        and ``other_cost`` (each ``{"setting", "nfe"}`` or None) and ``ratio`` (other's NFE
        over base's, None unless both meet ``accuracy``).
    """
    base_nll, other_nll = _converged_nll(base), _converged_nll(other)
    base_cost, other_cost = cost_at(base, accuracy), cost_at(other, accuracy)
    diff = other_nll - base_nll
    ratio = (other_cost.nfe / base_cost.nfe if base_cost is not None and other_cost is not None
             and base_cost.nfe > 0 else None)
    if diff > nll_margin:
        verdict, reason = "loses", f"converged NLL worse by {diff:.4f} > {nll_margin:g} nats"
    elif base_cost is None and other_cost is None:
        verdict, reason = "neither", f"no setting of either model meets {accuracy:g} nats"
    elif other_cost is None:
        verdict, reason = "loses", f"no setting meets {accuracy:g} nats"
    elif base_cost is None:
        verdict, reason = "wins", f"the baseline has no setting meeting {accuracy:g} nats"
    elif other_cost.nfe < base_cost.nfe:
        verdict, reason = "wins", f"{other_cost.nfe:g} < {base_cost.nfe:g} NFE"
    elif other_cost.nfe == base_cost.nfe:
        verdict, reason = "ties", f"both {other_cost.nfe:g} NFE"
    else:
        verdict, reason = "loses", f"{other_cost.nfe:g} > {base_cost.nfe:g} NFE"

    def cost(r: Record | None) -> dict[str, Any] | None:
        return None if r is None else {"setting": r.setting, "nfe": r.nfe}

    return {"verdict": verdict, "reason": reason, "nll_diff": diff,
            "base_cost": cost(base_cost), "other_cost": cost(other_cost), "ratio": ratio}


def compare_seeds(base: Mapping[Any, Sequence[Record]], other: Mapping[Any, Sequence[Record]],
                  accuracy: float, nll_margin: float = NLL_MARGIN) -> dict[str, Any]:
    """:func:`compare` seed by seed; the seeds of both must be the same.

    Returns:
        ``per_seed`` (seed -> comparison) and the counts ``wins``, ``ties``, ``losses``,
        ``neither``.
    """
    if set(base) != set(other):
        raise ValueError(f"compare_seeds needs the same seeds on both sides, got "
                         f"{sorted(base)} and {sorted(other)}")
    per_seed = {seed: compare(base[seed], other[seed], accuracy, nll_margin)
                for seed in sorted(base)}
    counts = {key: sum(r["verdict"] == verdict for r in per_seed.values())
              for key, verdict in (("wins", "wins"), ("ties", "ties"), ("losses", "loses"),
                                   ("neither", "neither"))}
    return {"per_seed": per_seed, **counts}


# ------------------------------------------------------------------------------ measuring
@dataclass(frozen=True)
class Setting:
    """An evaluation setting: an adaptive method at a tolerance or a fixed-grid method at a
    number of equal steps per block.

    Example:
        >>> Setting("rk4", steps=4).name, Setting("dopri5", tol=1e-5).name
        ('rk4x4', 'dopri5@1e-05')
    """

    method: str
    tol: float | None = None
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.method in ADAPTIVE_METHODS and (self.tol is None or self.steps is not None):
            raise ValueError(f"adaptive {self.method!r} takes tol and no steps, got tol="
                             f"{self.tol!r}, steps={self.steps!r}")
        if self.method in FIXED_METHODS and (self.steps is None or self.tol is not None):
            raise ValueError(f"fixed-grid {self.method!r} takes steps and no tol, got tol="
                             f"{self.tol!r}, steps={self.steps!r}")
        if self.method not in ADAPTIVE_METHODS + FIXED_METHODS:
            raise ValueError(f"unknown method {self.method!r}")

    @property
    def name(self) -> str:
        """``method@tol`` or ``methodxsteps``."""
        return f"{self.method}@{self.tol:.0e}" if self.steps is None else \
            f"{self.method}x{self.steps}"

    def solver(self, base: SolverConfig) -> SolverConfig:
        """``base`` evaluating with this setting (no NFE cap: this measures, not guards)."""
        tol = {} if self.tol is None else {"eval_atol": self.tol, "eval_rtol": self.tol}
        return dataclasses.replace(base, eval_method=self.method, eval_steps=self.steps,
                                   max_nfe=None, **tol)


def default_settings() -> list[Setting]:
    """dopri5 at :data:`TOLERANCES`, then euler, midpoint and rk4 at :data:`STEPS`."""
    return ([Setting("dopri5", tol=t) for t in TOLERANCES]
            + [Setting(m, steps=k) for m in FIXED for k in STEPS])


def _forward_nfe(model: torch.nn.Module) -> int:
    return sum(block.nfe.forward for block in ode_blocks(model))


def _solve_rows(model: CNFDensityEstimator, x: Tensor, solver: SolverConfig, batch_size: int,
                sample: bool) -> tuple[Tensor, float, float]:
    """log p of the rows of ``x`` (or, with ``sample``, the samples from latents ``x``) with
    ``solver`` in eval mode: (values, forward NFE per batch, seconds)."""
    for block in ode_blocks(model):
        block.nfe.reset()
    out = []
    start = time.perf_counter()
    with torch.no_grad(), solving_with(model.flow, solver):
        for chunk in x.split(batch_size):
            out.append(model.flow(chunk, reverse=True)[0] if sample else model.log_prob(chunk))
    seconds = time.perf_counter() - start
    batches = math.ceil(x.shape[0] / batch_size)
    return torch.cat(out), _forward_nfe(model) / batches, seconds


def measure(model: CNFDensityEstimator, x: Tensor, settings: Sequence[Setting] | None = None,
            batch_size: int = 1000, check_rows: int = 500, sample_rows: int = 2000,
            seed: int = 0) -> dict[str, Any]:
    """Measure every setting of ``model`` on the standardised test rows ``x``.

    Args:
        model: The density model (copied; it is left as it was).
        x: Test rows in the model's standardised units, shape (N, D).
        settings: The settings (default :func:`default_settings`).
        batch_size: Rows per batch (NFE are per batch).
        check_rows: Rows the reference is checked on against :data:`CHECK_TOL`.
        sample_rows: Latent draws for the sampling error (0: not measured).
        seed: Seed of the latent draws.

    Returns:
        ``reference`` (``converged_nll``, ``tol``, ``rows``, and ``check``: the max and mean
        per-row difference to the :data:`CHECK_TOL` solve) and ``settings``: one dict per
        setting with the :class:`Record` fields plus ``method``, ``tol``, ``steps``,
        ``rows_per_s``, ``nll_read`` (the NLL the setting reads), and ``sample_nfe``,
        ``sample_rms`` (None without ``sample_rows``).
    """
    if not isinstance(model, CNFDensityEstimator):
        raise TypeError(f"measure needs a CNFDensityEstimator, got {type(model).__name__}")
    if x.ndim != 2 or x.shape[1] != model.dim or x.shape[0] < 1:
        raise ValueError(f"x must have shape (N, {model.dim}) with N >= 1, got {tuple(x.shape)}")
    settings = default_settings() if settings is None else list(settings)
    work = copy.deepcopy(model).eval()
    exact = copy.deepcopy(model).double().eval()
    x = x.to(dtype=work.data_std.dtype)
    ref_setting = Setting("dopri5", tol=REFERENCE_TOL)
    ref, _, _ = _solve_rows(exact, x.double(), ref_setting.solver(exact.solver), batch_size,
                            sample=False)
    rows = min(check_rows, x.shape[0])
    tight, _, _ = _solve_rows(exact, x[:rows].double(),
                              Setting("dopri5", tol=CHECK_TOL).solver(exact.solver), batch_size,
                              sample=False)
    check = (tight - ref[:rows]).abs()
    converged = float(-ref.mean())
    z = torch.randn(sample_rows, model.dim, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    x_ref = (_solve_rows(exact, z, ref_setting.solver(exact.solver), batch_size, sample=True)[0]
             if sample_rows else None)
    records = []
    for setting in settings:
        solver = setting.solver(work.solver)
        log_p, nfe, seconds = _solve_rows(work, x, solver, batch_size, sample=False)
        d = log_p.double() - ref
        entry = {"setting": setting.name, "method": setting.method, "tol": setting.tol,
                 "steps": setting.steps, "nfe": nfe, "rows_per_s": x.shape[0] / seconds,
                 "mean_abs_d": float(d.abs().mean()), "mean_d": float(d.mean()),
                 "converged_nll": converged, "nll_read": float(-log_p.double().mean()),
                 "sample_nfe": None, "sample_rms": None}
        if x_ref is not None:
            samples, sample_nfe, _ = _solve_rows(work, z.to(x.dtype), solver, batch_size,
                                                 sample=True)
            entry["sample_nfe"] = sample_nfe
            entry["sample_rms"] = float((samples.double() - x_ref).square().mean().sqrt())
        records.append(entry)
    return {"reference": {"converged_nll": converged, "tol": REFERENCE_TOL,
                          "rows": int(x.shape[0]),
                          "check": {"tol": CHECK_TOL, "rows": rows,
                                    "max_abs": float(check.max()),
                                    "mean_abs": float(check.mean())}},
            "settings": records}


# ------------------------------------------------------------------------------ report
def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def records_of(result: Mapping[str, Any]) -> list[Record]:
    """The :class:`Record` of every setting of one :func:`measure` result."""
    return [Record.from_dict(r) for r in result["settings"]]


def model_table(result: Mapping[str, Any]) -> list[str]:
    """Markdown lines for one model's :func:`measure` result: its reference, one row per
    setting, and its cost at each accuracy of :data:`ACCURACIES`."""
    ref = result["reference"]
    lines = [f"Converged NLL (dopri5 at {ref['tol']:g}, float64, {ref['rows']} rows): "
             f"{ref['converged_nll']:.4f} nats; against {ref['check']['tol']:g} on "
             f"{ref['check']['rows']} rows: max {ref['check']['max_abs']:.1e}, mean "
             f"{ref['check']['mean_abs']:.1e} nats.", "",
             "| setting | NFE/batch | rows/s | mean abs d | mean d | NLL read | sample NFE/batch "
             "| sample RMS |", "|---|---|---|---|---|---|---|---|"]
    for r in result["settings"]:
        lines.append(f"| {r['setting']} | {r['nfe']:.1f} | {r['rows_per_s']:.0f} | "
                     f"{r['mean_abs_d']:.2e} | {r['mean_d']:+.2e} | {r['nll_read']:.4f} | "
                     f"{_fmt(r['sample_nfe'], '.1f')} | {_fmt(r['sample_rms'], '.2e')} |")
    lines.append("")
    for e in ACCURACIES:
        best = cost_at(records_of(result), e)
        lines.append(f"- cost at {e:g} nats per row: " + (
            "no setting meets it" if best is None else f"{best.setting}, {best.nfe:.1f} NFE per "
                                                       f"batch"))
    return lines


def comparisons(models: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every model after the first against the first (its baseline) at each accuracy of
    :data:`ACCURACIES` (:func:`compare`)."""
    base = records_of(models[0])
    return [{"base": models[0]["name"], "other": m["name"], "accuracy": e,
             **compare(base, records_of(m), e)} for m in models[1:] for e in ACCURACIES]


def markdown(payload: Mapping[str, Any]) -> str:
    """The page of a :func:`main` run: a note, each model's table, the comparisons."""
    lines = [f"# {payload['title']}", ""]
    if payload.get("note"):
        lines += [payload["note"], ""]
    lines += [f"Command: `{payload['setup']['command']}`", ""]
    for m in payload["models"]:
        lines += [f"## {m['name']}", "", f"Checkpoint: `{m['ckpt']}`", "", *model_table(m), ""]
    if payload["comparisons"]:
        lines += ["## Against the first model", "",
                  "| model | accuracy (nats) | converged NLL diff | its cost | baseline's cost "
                  "| verdict |", "|---|---|---|---|---|---|"]

        def cost(c: Mapping[str, Any] | None) -> str:
            return "never" if c is None else f"{c['setting']} ({c['nfe']:.1f} NFE)"

        for c in payload["comparisons"]:
            lines.append(f"| {c['other']} | {c['accuracy']:g} | {c['nll_diff']:+.4f} | "
                         f"{cost(c['other_cost'])} | {cost(c['base_cost'])} | {c['verdict']}: "
                         f"{c['reason']} |")
    return "\n".join(lines) + "\n"


class _Study:
    """What ``benchmarks.report`` asks of a study: its committed pages rendered from their
    JSON."""

    @staticmethod
    def render(payload: Mapping[str, Any]) -> str:
        """The page of ``payload`` (:func:`markdown`)."""
        return markdown(payload)


#: This study, for ``benchmarks.report`` (reports ``accuracy_*``).
STUDY = _Study()


# ------------------------------------------------------------------------------ command line
def _test_rows(data: str, rows: int, seed: int) -> np.ndarray:
    """Raw test rows: fresh points of a named toy density, or the rows of a .npy file."""
    from polyreg_cnf.datamodules.toy import TOY_DENSITIES, sample_toy

    if data in TOY_DENSITIES:
        return sample_toy(data, rows, seed=seed)
    path = Path(data)
    if path.suffix != ".npy" or not path.is_file():
        raise ValueError(f"--data must be a toy density ({', '.join(TOY_DENSITIES)}) or an "
                         f"existing .npy file of raw rows, got {data!r}")
    return np.load(path)[:rows]


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.accuracy``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, nargs="+",
                        help="density-model checkpoints (train.py); from the second on, each is "
                             "compared with the first")
    parser.add_argument("--names", nargs="+", default=None,
                        help="a name per checkpoint (default: the file paths)")
    parser.add_argument("--data", default="checkerboard",
                        help="toy density to draw fresh test points from, or a .npy file of "
                             "raw test rows")
    parser.add_argument("--rows", type=int, default=10000, help="test rows")
    parser.add_argument("--data-seed", type=int, default=10_000,
                        help="seed of the fresh toy points and of the latent draws (apart from "
                             "training seeds)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--check-rows", type=int, default=500)
    parser.add_argument("--sample-rows", type=int, default=2000)
    parser.add_argument("--settings", nargs="*", default=None,
                        help="setting names to measure (default: all, e.g. rk4x4 dopri5@1e-05)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--title", default="Evaluation accuracy", help="the page's title")
    parser.add_argument("--note", default="", help="a paragraph under the title")
    parser.add_argument("--out", default=None,
                        help="output prefix (default benchmarks/results/accuracy_<first ckpt's "
                             "stem>)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Measure the checkpoints; write ``<out>.json`` and ``<out>.md``."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = default_settings()
    if args.settings is not None:
        known = {s.name: s for s in settings}
        unknown = [name for name in args.settings if name not in known]
        if unknown:
            raise SystemExit(f"unknown settings {unknown}; valid: {', '.join(known)}")
        settings = [known[name] for name in args.settings]
    names = args.names or args.ckpt
    if len(names) != len(args.ckpt):
        raise SystemExit(f"--names needs one name per --ckpt, got {len(names)} for "
                         f"{len(args.ckpt)}")
    raw = torch.as_tensor(_test_rows(args.data, args.rows, args.data_seed), dtype=torch.float32)
    models = []
    for name, ckpt in zip(names, args.ckpt):
        model = CNFDensityEstimator.load_from_checkpoint(ckpt, map_location="cpu").eval()
        x = (raw - model.data_mean) / model.data_std
        result = measure(model, x, settings, batch_size=args.batch_size,
                         check_rows=args.check_rows, sample_rows=args.sample_rows,
                         seed=args.data_seed)
        models.append({"name": name, "ckpt": str(ckpt), **result})
    payload = {"title": args.title, "note": args.note,
               "setup": {"data": args.data, "rows": args.rows, "data_seed": args.data_seed,
                         "threads": args.threads,
                         "command": "python -m benchmarks.accuracy " + shlex.join(
                             sys.argv[1:] if argv is None else argv),
                         "machine": {"cpu": platform.processor() or platform.machine(),
                                     "cores": os.cpu_count(), "torch": torch.__version__}},
               "models": models, "comparisons": comparisons(models)}
    out = Path(args.out) if args.out else (
        Path(__file__).resolve().parent / "results" / f"accuracy_{Path(args.ckpt[0]).stem}")
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(payload, indent=1) + "\n")
    Path(f"{out}.md").write_text(markdown(payload))
    print(Path(f"{out}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
