"""The run configuration: one typed definition from which the command line, the presets, the
config files and :func:`polyreg_cnf.app.build.build` all work.

Each option is a field of a frozen dataclass group (:class:`FlowOptions`, :class:`OdeOptions`,
...) declared with :func:`option`: its type, default, help text and, where it has them, its
choices (taken from the registry that defines them) and lower bound. From that one definition
come the ``train.py`` flags (:func:`make_parser`; the flag is ``--`` plus the field name with
``_`` as ``-``, ``--no-NAME`` for a switch that is on by default), the checks (run once, when a
:class:`RunConfig` is made) and the YAML file every run stores (:func:`dump_config`).

Adding an option is one line in its group, e.g. in :class:`OdeOptions`::

    backprop: str = option("auto", "how gradients are computed", choices=("auto", "direct"))

Names are unique across groups, so a configuration also reads as one flat mapping (the names
``train.py`` logs and :mod:`polyreg_cnf.app.presets` uses): see :meth:`RunConfig.flat` and
:meth:`RunConfig.from_flat`.

Example:
    >>> config = resolve({"data": "moons", "lr": 0.01})
    >>> config.training.lr, config.flow.hidden_dims, config.ode.solver
    (0.01, (64, 64, 64), 'dopri5')
    >>> config.replace(atol=1e-3).ode.atol
    0.001
    >>> resolve({"atol": 0})
    Traceback (most recent call last):
    ...
    polyreg_cnf.app.config.ConfigError: --atol must be a finite number > 0, got 0
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import yaml

from polyreg_cnf.app.presets import preset_for
from polyreg_cnf.app.run_logging import LOGGER_KINDS
from polyreg_cnf.callbacks import KineticRegularizer, PolynomialTrajectoryRegularizer
from polyreg_cnf.callbacks.polynomial import POLY_PRESETS
from polyreg_cnf.callbacks.selection import TEST_CHECKPOINTS
from polyreg_cnf.datamodules.images import IMAGE_DATASETS
from polyreg_cnf.datamodules.tabular import TABULAR_SETS
from polyreg_cnf.datamodules.toy import TOY_DENSITIES
from polyreg_cnf.datamodules.user_table import TABLE_FORMATS
from polyreg_cnf.engine.amortized import POSTERIORS
from polyreg_cnf.engine.backprop import BACKPROP_KINDS, Adjoint, Auto, Backprop, make_backprop
from polyreg_cnf.engine.cnf import DIVERGENCE_MODES, TRACE_TYPES
from polyreg_cnf.engine.nets import LAYER_TYPES, NONLINEARITIES
from polyreg_cnf.engine.solver import ADAPTIVE_METHODS, METHODS, SolverConfig
from polyreg_cnf.engine.trace import NOISE_TYPES
from polyreg_cnf.models import CNFDensityEstimator
from polyreg_cnf.models.schedule import LR_SCHEDULES
from polyreg_cnf.models.vae import ARCHITECTURES, CNFVAE

__all__ = [
    "MODELS",
    "REGULARIZERS",
    "SOLVER_METHODS",
    "ConfigError",
    "DataOptions",
    "FlowOptions",
    "HardwareOptions",
    "KineticOptions",
    "OdeOptions",
    "OutputOptions",
    "PolyOptions",
    "RunConfig",
    "TrainingOptions",
    "VAEOptions",
    "command_line",
    "data_kind",
    "dump_config",
    "load_config",
    "make_parser",
    "option",
    "parse_command_line",
    "resolve",
]

#: The LightningModule of each ``--model``.
MODELS: dict[str, type] = {"cnf": CNFDensityEstimator, "vae": CNFVAE}
#: The trajectory regularizer callback of each ``--reg`` (None: no regularizer).
REGULARIZERS: dict[str, type | None] = {"none": None, "poly": PolynomialTrajectoryRegularizer,
                                        "kinetic": KineticRegularizer}
#: The named settings of the polynomial regularizer (``--poly-preset``).
POLY_PRESET_NAMES = tuple(POLY_PRESETS)
#: Every torchdiffeq method the solver accepts (torchdiffeq's registry).
SOLVER_METHODS = METHODS


def _default(owner: Any, name: str) -> Any:
    """The default of argument or field ``name`` of ``owner`` (a class or a function): every
    default of a run is defined once, where the thing it configures is defined."""
    fields = getattr(owner, "__dataclass_fields__", None)
    if fields is not None and name in fields:
        f = fields[name]
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    else:
        value = inspect.signature(owner).parameters[name].default
    return tuple(value) if isinstance(value, list) else value


def _flow(name: str) -> Any:
    return _default(CNFDensityEstimator, name)


def _vae(name: str) -> Any:
    return _default(CNFVAE, name)


def _solver(name: str) -> Any:
    return _default(SolverConfig, name)


class ConfigError(ValueError):
    """A run configuration that cannot work (an option's value, or a combination of them)."""


# ------------------------------------------------------------------------------ declaring
def option(default: Any, help: str = "", *, choices: Sequence[str] | None = None,
           low: float | None = None, strict: bool = False) -> Any:
    """A configuration field: its default, help text, choices and lower bound.

    Args:
        default: The value when neither a flag, a config file nor a preset gives one.
        help: One line for ``--help``.
        choices: The allowed values of a string option (from the registry that defines them).
        low: Smallest allowed value of a number.
        strict: ``value > low`` instead of ``value >= low``.

    Returns:
        A :func:`dataclasses.field` carrying that metadata.
    """
    meta = {"help": help, "choices": None if choices is None else tuple(choices), "low": low,
            "strict": strict}
    if isinstance(default, (list, dict, set)):
        raise TypeError(f"option defaults must be immutable, got {default!r}")
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataOptions:
    """Where the data comes from (``--data`` itself is :attr:`RunConfig.data`)."""

    data_dir: str = option("data", "root folder of the standard data files")
    download: bool = option(False, "download missing standard files (checksum-verified)")
    columns: str | None = option(None, "your table: comma-separated column names or indices "
                                       "to use")
    drop_nonfinite: bool = option(False, "your table: drop rows with NaN/inf instead of "
                                         "refusing them")


@dataclass(frozen=True)
class FlowOptions:
    """The CNF blocks: network, end time, trace estimator."""

    hidden_dims: tuple[int, ...] | None = option(_flow("hidden_dims"),
                                                 "hidden widths, e.g. 64,64,64 (None: "
                                                 "hdim_factor x D, nhidden times)")
    hdim_factor: int | None = option(None, "hidden width = factor x data dimension (tabular "
                                           "presets)", low=1)
    nhidden: int | None = option(None, "number of hidden layers of width hdim_factor x D",
                                 low=1)
    layer_type: str = option(_flow("layer_type"), "layer of the ODE net", choices=LAYER_TYPES)
    nonlinearity: str = option(_flow("nonlinearity"), "nonlinearity of the ODE net",
                               choices=NONLINEARITIES)
    num_blocks: int = option(_flow("num_blocks"), "number of CNF blocks", low=1)
    T: float = option(_flow("T"), "end time of each block", low=0.0, strict=True)
    train_T: bool = option(_flow("train_T"), "learn the end time")
    trace: str = option(_flow("trace"), "trace estimator while training", choices=TRACE_TYPES)
    eval_trace: str = option(_flow("eval_trace"), "trace estimator in evaluation",
                             choices=TRACE_TYPES)
    noise: str = option(_flow("noise"), "Hutchinson probe distribution", choices=NOISE_TYPES)
    divergence: str = option(_flow("divergence"), "divergence: forward mode (auto: wherever the "
                             "net supports it), compiled forward mode, or reverse-mode autograd",
                             choices=DIVERGENCE_MODES)


@dataclass(frozen=True)
class VAEOptions:
    """The VAE with a CNF posterior (``--model vae``)."""

    posterior: str = option(_vae("posterior"), "amortized low-rank CNF (FFJORD), plain CNF, "
                            "or no flow (plain VAE)", choices=POSTERIORS)
    z_dim: int = option(_vae("z_dim"), "latent dimension", low=1)
    rank: int = option(_vae("rank"), "rank of the amortized weight updates", low=1)
    warmup_epochs: int = option(_vae("warmup_epochs"), "KL warm-up: beta goes from 0 to 1 over "
                                "this many epochs", low=0)
    is_samples: int = option(_vae("is_samples"), "importance samples for the test NLL (0: skip)",
                             low=0)
    val_is_samples: int = option(_vae("val_is_samples"), "importance samples for the validation "
                                 "NLL (0: -ELBO)", low=0)
    is_chunk: int = option(_vae("is_chunk"), "importance samples evaluated at once (bounds "
                           "memory)", low=1)
    feature_dim: int = option(_vae("feature_dim"), "width of the encoder feature", low=1)
    architecture: str = option(_vae("architecture"), "encoder/decoder: gated convolutions, MLP, "
                               "or auto (conv for images of 16 x 16 and larger)",
                               choices=ARCHITECTURES)
    mlp_hidden: int = option(_vae("mlp_hidden"), "hidden width of the MLP encoder/decoder", low=1)


@dataclass(frozen=True)
class OdeOptions:
    """How each block's ODE is solved and differentiated (paper: dopri5, train 1e-4, eval
    1e-5). Defaults are :class:`~polyreg_cnf.engine.solver.SolverConfig`'s and its backprop
    strategies'."""

    solver: str = option(_solver("method"), "torchdiffeq method", choices=SOLVER_METHODS)
    step_size: float | None = option(None, "fixed-grid solvers only", low=0.0, strict=True)
    atol: float = option(_solver("atol"), "absolute tolerance while training", low=0.0,
                         strict=True)
    rtol: float = option(_solver("rtol"), "relative tolerance while training", low=0.0,
                         strict=True)
    eval_atol: float = option(_solver("eval_atol"), "absolute tolerance in evaluation", low=0.0,
                              strict=True)
    eval_rtol: float = option(_solver("eval_rtol"), "relative tolerance in evaluation", low=0.0,
                              strict=True)
    # Evaluation solver apart from the training one (issue 28): scores never come from the grid
    # a model was trained on unless asked for.
    eval_solver: str = option(_solver("eval_method"), "method of every evaluation solve "
                              "(validation, test), whatever --solver trains with",
                              choices=SOLVER_METHODS)
    eval_steps: int | None = option(_solver("eval_steps"), "equal steps over each block's "
                                    "[0, T] of a fixed-grid --eval-solver", low=1)
    backprop: str = option(_solver("backprop").kind, "gradients: auto (direct backprop while its "
                           "memory fits --memory-share of the free memory, else memory-bounded: "
                           "step checkpoints for penalised solves, the adjoint for others), "
                           "direct (through the solver), adjoint, or checkpoint (one recomputed "
                           "step at a time)", choices=BACKPROP_KINDS)
    memory_share: float | None = option(_default(Auto, "memory_share"), "--backprop auto: share "
                                        "of free memory direct backprop may use (default 0.25 "
                                        "on CPU, 0.5 on CUDA)", low=0.0, strict=True)
    adjoint_carry_step: bool = option(_default(Adjoint, "carry"), "restart-free adjoint "
                                      "(--no-adjoint-carry-step: torchdiffeq's stock adjoint)")
    seminorm: bool = option(_default(Adjoint, "seminorm"), "seminorm adjoint (fewer backward "
                            "NFE)")
    max_nfe: int | None = option(_solver("max_nfe"), "fail a forward solve that needs more "
                                 "evaluations than this", low=1)


@dataclass(frozen=True)
class PolyOptions:
    """The trajectory polynomial regularizer (``--reg poly``)."""

    poly_preset: str = option("paper", "named setting of coef, K and m (paper: 5, 2, 1); the "
                                       "three flags below override it", choices=POLY_PRESET_NAMES)
    poly_coef: float | None = option(None, "weight of the penalty (default: the preset's)",
                                     low=0.0)
    poly_samples: int | None = option(None, "interior time points K per solve (default: the "
                                            "preset's)", low=0)
    poly_order: int | None = option(None, "polynomial degree m (default: the preset's)", low=0)
    poly_start_step: int = option(_default(PolynomialTrajectoryRegularizer, "start_step"),
                                  "training step the penalty starts at (off before it)", low=0)

    def settings(self) -> dict[str, float | int]:
        """``coef``, ``num_samples`` and ``order`` (the preset's, overridden where given) and
        ``start_step``."""
        given = {"coef": self.poly_coef, "num_samples": self.poly_samples,
                 "order": self.poly_order}
        return {**POLY_PRESETS[self.poly_preset],
                **{k: v for k, v in given.items() if v is not None},
                "start_step": self.poly_start_step}


@dataclass(frozen=True)
class KineticOptions:
    """The RNODE kinetic regularizer (``--reg kinetic``)."""

    kinetic_coef: float = option(_default(KineticRegularizer, "kinetic_coef"),
                                 "weight of the kinetic energy", low=0.0)
    jacobian_coef: float = option(_default(KineticRegularizer, "jacobian_coef"),
                                  "weight of the Jacobian Frobenius norm", low=0.0)


@dataclass(frozen=True)
class TrainingOptions:
    """Optimisation and evaluation."""

    lr: float = option(_flow("lr"), "learning rate", low=0.0, strict=True)
    weight_decay: float = option(_flow("weight_decay"), "weight decay", low=0.0)
    lr_schedule: str = option(_flow("lr_schedule"),
                              "learning rate over the training steps: constant, or "
                                          "cosine from --lr down to 0", choices=LR_SCHEDULES)
    batch_size: int = option(512, "training batch size", low=1)
    eval_batch_size: int | None = option(None, "evaluation batch size (default: the data "
                                               "set's)", low=1)
    max_steps: int | None = option(None, "training steps (default 1000 unless --max-epochs)",
                                   low=1)
    max_epochs: int | None = option(None, "training epochs", low=1)
    val_every: int | None = option(None, "validate every N training steps (default: once per "
                                         "epoch; your table: once per epoch, within 10-200 "
                                         "steps; tabular presets: 200)", low=1)
    early_stop_patience: int = option(0, "stop after N validations without a lower validation "
                                         "NLL (0: off; presets: tabular sets 30, your table 20)",
                                      low=0)
    lr_drop: float = option(1.0, "multiply the learning rate by this after a third and again "
                                 "after two thirds of --early-stop-patience validations without "
                                 "a lower validation NLL (1: off; presets: tabular sets and "
                                 "your table 0.1, as FFJORD)", low=0.0, strict=True)
    limit_val_batches: float = option(1.0, "fraction (<= 1) or number of validation batches",
                                      low=0.0)
    seed: int = option(0, "random seed (data split, initialisation, noise)")
    test: bool = option(True, "final test evaluation (--no-test: skip it)")
    test_ckpt: str = option("best", "weights the final test uses: best (lowest validation NLL; "
                                    "the last weights when no validation ran) or last",
                            choices=TEST_CHECKPOINTS)


@dataclass(frozen=True)
class HardwareOptions:
    """Where the run trains."""

    accelerator: str = option("auto", "cpu, gpu, auto, ...")
    devices: str = option("1", "number of devices, or 'auto'")
    strategy: str = option("auto", "auto, ddp, ddp_spawn, ...")
    num_nodes: int = option(1, "number of nodes", low=1)
    num_workers: int = option(0, "data-loader worker processes", low=0)
    threads: int | None = option(None, "intra-op CPU threads per process (default on CPU: 1, "
                                       "fastest for small CNFs)", low=1)


@dataclass(frozen=True)
class OutputOptions:
    """Logs, plots, checkpoints and the terminal."""

    logger: str = option("auto", "auto: W&B (offline unless logged in) when installed; every "
                                 "kind but none also writes run_dir/metrics.csv",
                         choices=LOGGER_KINDS)
    plot_every: int = option(500, "2-D data: density and trajectory PNGs every N steps and at "
                                  "the end (0: off)", low=0)
    output_dir: str = option("runs", "folder of the run folders")
    run_name: str | None = option(None, "run folder name (default: model-data-reg-seed)")
    ckpt_every: int = option(500, "save a checkpoint every N training steps (0: only on "
                                  "interrupt and at the end)", low=0)
    verbose: bool = option(False, "show Lightning's informational messages and library "
                                  "warnings")
    progress: bool | None = option(None, "progress bar with live NFE and penalty (default: on "
                                         "in a terminal)")


# ------------------------------------------------------------------------------ the options
@dataclass(frozen=True)
class _Option:
    """One field as the command line and the checks see it."""

    name: str
    group: str | None  # attribute of RunConfig holding it (None: a RunConfig field itself)
    kind: type  # bool, int, float, str or tuple (of positive ints)
    optional: bool  # None allowed
    default: Any
    help: str
    choices: tuple[str, ...] | None
    low: float | None
    strict: bool

    @property
    def flag(self) -> str:
        """``--hidden-dims``; ``--no-test`` for a switch that is on by default."""
        stem = self.name.replace("_", "-")
        return f"--no-{stem}" if self.kind is bool and self.default is True else f"--{stem}"

    @property
    def label(self) -> str:
        """How messages name the option: ``--`` plus its name (``--test`` for ``--no-test``)."""
        return f"--{self.name.replace('_', '-')}"

    def expected(self) -> str:
        """What a valid value is, in words."""
        if self.kind is bool:
            return "true or false"
        if self.kind is tuple:
            return "comma-separated positive widths like 64,64,64"
        if self.kind is str:
            return "a string"
        bound = "" if self.low is None else f" {'>' if self.strict else '>='} {self.low:g}"
        if self.kind is int:
            return {" >= 1": "a positive integer"}.get(bound, f"an integer{bound}")
        return f"a finite number{bound}"

    def check(self, value: Any) -> Any:
        """``value`` in this option's type (ints as floats, lists as tuples), or ConfigError."""
        if value is None:
            if self.optional:
                return None
            raise ConfigError(f"{self.label} must be {self.expected()}, got None")
        if self.choices is not None:
            if value not in self.choices:
                raise ConfigError(f"{self.label}: invalid choice {value!r}; valid: "
                                  f"{', '.join(self.choices)}")
            return value
        ok, converted = self._convert(value)
        if not ok:
            raise ConfigError(f"{self.label} must be {self.expected()}, got {value!r}")
        return converted

    def _convert(self, value: Any) -> tuple[bool, Any]:
        if self.kind is bool:
            return isinstance(value, bool), value
        if self.kind is str:
            return isinstance(value, str), value
        if self.kind is tuple:
            ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
            return ok, tuple(value) if ok else value
        number = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, number):
            return False, value
        value = self.kind(value)
        if not math.isfinite(value) or (self.low is not None and (
                value < self.low or (self.strict and value == self.low))):
            return False, value
        return True, value

    def parse(self, text: str) -> Any:
        """An argparse ``type``: the flag's text as a checked value."""
        try:
            if self.kind is tuple:
                value: Any = [int(v) for v in text.replace("-", ",").split(",") if v.strip()]
            else:
                value = self.kind(text)
            return self.check(value)
        except (ValueError, ConfigError):
            raise argparse.ArgumentTypeError(f"expected {self.expected()}, got {text!r}") \
                from None


def _describe(cls: type, group: str | None) -> Iterator[_Option]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:  # a group, not an option
            continue
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and \
            type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else hint
        kind = typing.get_origin(base) or base
        yield _Option(f.name, group, kind, optional, f.default, f.metadata["help"],
                      f.metadata["choices"], f.metadata["low"], f.metadata["strict"])


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run is made of; :func:`resolve` builds one from options and
    presets, :func:`polyreg_cnf.app.build.build` turns it into model, data and Trainer.

    Checks run when it is made: each option's type, range and choices, then the combinations
    (:class:`ConfigError` names the flag, echoes the value and lists what is allowed).
    Resuming is not part of a configuration: it is ``build(config, ckpt_path=...)``.
    """

    model: str = option("cnf", "what to train", choices=MODELS)
    reg: str = option("poly", "trajectory regularizer", choices=REGULARIZERS)
    data: str = option("checkerboard", "a toy density (checkerboard, 8gaussians, ...), a "
                                       "tabular set (power, gas, hepmass, miniboone, bsds300), "
                                       "an image set for --model vae, or a path to your own "
                                       "table (.npy, .npz, .csv, .h5)")
    source: DataOptions = field(default_factory=DataOptions)
    flow: FlowOptions = field(default_factory=FlowOptions)
    vae: VAEOptions = field(default_factory=VAEOptions)
    ode: OdeOptions = field(default_factory=OdeOptions)
    poly: PolyOptions = field(default_factory=PolyOptions)
    kinetic: KineticOptions = field(default_factory=KineticOptions)
    training: TrainingOptions = field(default_factory=TrainingOptions)
    hardware: HardwareOptions = field(default_factory=HardwareOptions)
    output: OutputOptions = field(default_factory=OutputOptions)

    def __post_init__(self) -> None:
        for spec in _OPTIONS.values():
            holder = self if spec.group is None else getattr(self, spec.group)
            object.__setattr__(holder, spec.name, spec.check(getattr(holder, spec.name)))
        self._check_combinations()

    def _check_combinations(self) -> None:
        ode, flow = self.ode, self.flow
        kind = data_kind(self.data, self.model)
        devices = self.hardware.devices
        if devices != "auto" and not (devices.isdigit() and int(devices) >= 1):
            raise ConfigError(f"--devices must be a positive integer or 'auto', got {devices!r}")
        poly = self.poly.settings()
        if self.reg == "poly" and poly["num_samples"] < poly["order"]:
            raise ConfigError(f"--poly-samples must be >= --poly-order, got "
                              f"{poly['num_samples']} < {poly['order']}")
        eval_fixed = ode.eval_solver not in ADAPTIVE_METHODS
        if eval_fixed != (ode.eval_steps is not None):
            raise ConfigError(f"a fixed-grid --eval-solver needs --eval-steps, an adaptive one "
                              f"takes none; got --eval-solver {ode.eval_solver} --eval-steps "
                              f"{ode.eval_steps}")
        try:
            self.solver().backprop.check(ode.solver, train_T=flow.train_T)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"--solver {ode.solver} --backprop {ode.backprop}: {err}") from None
        if flow.hidden_dims is None and (kind == "image" or None in (flow.hdim_factor,
                                                                     flow.nhidden)):
            needs = "--hidden-dims" if kind == "image" else \
                "--hidden-dims, or --hdim-factor and --nhidden"
            raise ConfigError(f"give {needs}; got hidden_dims=None, hdim_factor="
                              f"{flow.hdim_factor!r}, nhidden={flow.nhidden!r}")
        t = self.training
        if t.early_stop_patience > 0 and t.limit_val_batches == 0:
            raise ConfigError(f"--early-stop-patience {t.early_stop_patience} needs validation, "
                              f"but --limit-val-batches is 0; give both, or "
                              f"--early-stop-patience 0")
        if t.lr_drop > 1:
            raise ConfigError(f"--lr-drop must be in (0, 1] (1: off), got {t.lr_drop}")
        if self.model == "vae" and self.reg != "none" and self.vae.posterior == "gaussian":
            raise ConfigError(f"--reg {self.reg} acts on the CNF posterior, but --posterior "
                              f"gaussian has no flow; use --reg none or another --posterior")

    def solver(self) -> SolverConfig:
        """The solver settings of this run (the checks of the solver and its strategy apply)."""
        ode = self.ode
        return SolverConfig(method=ode.solver, atol=ode.atol, rtol=ode.rtol,
                            eval_atol=ode.eval_atol, eval_rtol=ode.eval_rtol,
                            backprop=backprop_from_options(ode), step_size=ode.step_size,
                            max_nfe=ode.max_nfe, eval_method=ode.eval_solver,
                            eval_steps=ode.eval_steps)

    def regularizer(self) -> L.Callback | None:
        """The regularizer callback ``--reg`` names (:data:`REGULARIZERS`) with this run's
        settings, or None."""
        if self.reg == "poly":
            return PolynomialTrajectoryRegularizer(**self.poly.settings())
        if self.reg == "kinetic":
            return KineticRegularizer(kinetic_coef=self.kinetic.kinetic_coef,
                                      jacobian_coef=self.kinetic.jacobian_coef)
        return None

    # -------------------------------------------------------------------- flat view
    def flat(self) -> dict[str, Any]:
        """Option name -> value for every option (the names train.py logs and presets use)."""
        return {name: getattr(self if spec.group is None else getattr(self, spec.group), name)
                for name, spec in _OPTIONS.items()}

    @classmethod
    def from_flat(cls, options: Mapping[str, Any]) -> RunConfig:
        """A configuration from option name -> value (missing names keep their defaults).

        Raises:
            ConfigError: An unknown name, or a value that does not pass the checks.
        """
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise ConfigError(f"unknown options {unknown}; valid: {', '.join(_OPTIONS)}")
        top: dict[str, Any] = {}
        groups: dict[str, dict[str, Any]] = {}
        for name, value in options.items():
            group = _OPTIONS[name].group
            (top if group is None else groups.setdefault(group, {}))[name] = value
        made = {g: _GROUPS[g](**values) for g, values in groups.items()}
        return cls(**top, **made)

    def replace(self, **options: Any) -> RunConfig:
        """A copy with some options changed (by flat name), checked again."""
        return RunConfig.from_flat({**self.flat(), **options})

    def nested(self) -> dict[str, Any]:
        """Plain nested dict (groups as mappings, tuples as lists): what the YAML file holds."""
        def plain(value: Any) -> Any:
            return list(value) if isinstance(value, tuple) else value

        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = {k: plain(v) for k, v in dataclasses.asdict(value).items()} \
                if f.name in _GROUPS else plain(value)
        return out


def backprop_from_options(ode: OdeOptions) -> Backprop:
    """The strategy ``--backprop`` names, with the settings of the flags that belong to it.

    ``--seminorm`` and ``--no-adjoint-carry-step`` set the adjoint (of ``--backprop adjoint``,
    or the one ``auto`` falls back to); ``--memory-share`` belongs to ``auto``.

    Raises:
        ConfigError: A flag given for a strategy it does not apply to.
    """
    adjoint = dict(carry=ode.adjoint_carry_step, seminorm=ode.seminorm)
    settings: dict[str, Any] = {"memory_share": ode.memory_share}
    if ode.backprop in ("adjoint", "auto"):
        settings.update(adjoint if ode.backprop == "adjoint" else {"adjoint": Adjoint(**adjoint)})
    else:
        settings.update(adjoint)
    flags = {"memory_share": "--memory-share", "seminorm": "--seminorm",
             "carry": "--no-adjoint-carry-step"}
    given = {k: v for k, v in settings.items()
             if k in flags and v != _default(Auto if k == "memory_share" else Adjoint, k)}
    kind = BACKPROP_KINDS[ode.backprop]
    fields = getattr(kind, "__dataclass_fields__", {})
    wrong = sorted(flags[k] for k in given if k not in fields)
    if wrong:
        raise ConfigError(f"{', '.join(wrong)} does not apply to --backprop {ode.backprop}; it "
                          f"sets --backprop {'auto' if 'memory_share' in given else 'adjoint'} "
                          f"(or auto)")
    return make_backprop(ode.backprop, **{k: v for k, v in settings.items() if k in fields})


_GROUPS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)
                            if f.default_factory is not dataclasses.MISSING}
_OPTIONS: dict[str, _Option] = {}
for _spec in [*_describe(RunConfig, None),
              *(s for name, cls in _GROUPS.items() for s in _describe(cls, name))]:
    if _spec.name in _OPTIONS:
        raise TypeError(f"option name {_spec.name!r} is used twice; names must be unique")
    _OPTIONS[_spec.name] = _spec


# ------------------------------------------------------------------------------ resolving
def data_kind(name: str, model: str = "cnf") -> str:
    """The family ``name`` belongs to: ``"toy"``, ``"tabular"``, ``"table"`` or ``"image"``.

    Raises:
        ConfigError: ``name`` is not a data set of the model's kind, nor a table file.
    """
    if model == "vae":
        if name.lower() not in IMAGE_DATASETS:
            raise ConfigError(f"--model vae needs an image data set; got --data {name!r}, "
                              f"valid: {', '.join(IMAGE_DATASETS)}")
        return "image"
    if name in TOY_DENSITIES:
        return "toy"
    if name.lower() in TABULAR_SETS:
        return "tabular"
    if Path(name).suffix.lower() in TABLE_FORMATS:
        return "table"
    raise ConfigError(
        f"--data {name!r} is not a known data set or a table file; valid: toy densities "
        f"{sorted(TOY_DENSITIES)}, tabular sets {list(TABULAR_SETS)}, or a path ending in "
        f"{', '.join(TABLE_FORMATS)}")


def resolve(given: Mapping[str, Any] | None = None) -> RunConfig:
    """The configuration of a run: the options ``given``, the rest from the data set's preset.

    Order of precedence: ``given`` (flags, a config file), then the preset of the data set
    (:mod:`polyreg_cnf.app.presets`), then the defaults of the fields. ``data`` defaults to
    ``checkerboard`` (``digits`` for ``model="vae"``); without ``max_steps`` and ``max_epochs``
    a run takes 1000 steps.

    Args:
        given: Option name -> value, e.g. ``{"data": "power", "lr": 1e-4}``.

    Raises:
        ConfigError: Unknown names, bad values or combinations that cannot work.
    """
    given = dict(given or {})
    unknown = sorted(set(given) - set(_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown options {unknown}; valid: {', '.join(_OPTIONS)}")
    model = _OPTIONS["model"].check(given.get("model", _OPTIONS["model"].default))
    data = given.get("data") or ("digits" if model == "vae" else "checkerboard")
    data = _OPTIONS["data"].check(data)
    kind = data_kind(data, model)
    merged = {**preset_for(data.lower(), kind), **given, "model": model, "data": data}
    if merged.get("max_steps") is None and merged.get("max_epochs") is None:
        merged["max_steps"] = 1000
    return RunConfig.from_flat(merged)


# ------------------------------------------------------------------------------ files
class _Dumper(yaml.SafeDumper):
    """Safe YAML with lists on one line (``hidden_dims: [64, 64, 64]``)."""


_Dumper.add_representer(list, lambda dumper, value: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", value, flow_style=True))


def dump_config(config: RunConfig) -> str:
    """The YAML text of ``config`` (grouped as :class:`RunConfig` is); :func:`load_config`
    reads it back."""
    header = ("# polyreg-cnf run configuration. Run it again from scratch with\n"
              "#   python train.py --config THIS_FILE [flags that override it]\n")
    return header + yaml.dump(config.nested(), Dumper=_Dumper, sort_keys=False)


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a config file (as :func:`dump_config` writes it) as flat option name -> value.

    Group sections (``ode:``, ``flow:``, ...) and top-level option names are both accepted.

    Raises:
        FileNotFoundError: No such file.
        ConfigError: Not a YAML mapping, or unknown sections or names.
    """
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {str(path)!r} must hold a mapping of options, got "
                          f"{type(loaded).__name__}")
    flat: dict[str, Any] = {}
    for key, value in loaded.items():
        if key in _GROUPS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    unknown = sorted(set(flat) - set(_OPTIONS))
    if unknown:
        raise ConfigError(f"--config {str(path)!r} has unknown options {unknown}; valid: "
                          f"{', '.join(_OPTIONS)}")
    for name, value in flat.items():
        # YAML 1.1 reads 1e-4 (no dot) as a string: take numbers written that way too.
        kind = _OPTIONS[name].kind
        if isinstance(value, str) and kind in (int, float):
            try:
                flat[name] = kind(value)
            except ValueError:
                pass  # the checks report it with the allowed values
    return flat


# ------------------------------------------------------------------------------ command line
_TITLES = {None: "what to train", "source": "data", "flow": "network",
           "vae": "VAE (--model vae)", "ode": "solver (paper: dopri5, train 1e-4, evaluation 1e-5)",
           "poly": "trajectory polynomial regularizer (--reg poly)",
           "kinetic": "RNODE kinetic regularizer (--reg kinetic)", "training": "optimisation",
           "hardware": "hardware", "output": "outputs"}


def make_parser(prog: str = "train.py", description: str | None = None
                ) -> argparse.ArgumentParser:
    """The command line of :class:`RunConfig`: one flag per option, plus ``--config``,
    ``--print-config`` and ``--ckpt-path``.

    An option left off the command line is absent from the parsed namespace (so presets and
    config files can fill it); use :func:`parse_command_line` to get the given options.
    """
    parser = argparse.ArgumentParser(
        prog=prog, description=description, allow_abbrev=False,
        argument_default=argparse.SUPPRESS, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {g: parser.add_argument_group(title) for g, title in _TITLES.items()}
    for spec in _OPTIONS.values():
        default = spec.default
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        text = spec.help if default is None else f"{spec.help} (default: {default})"
        group = groups[spec.group]
        if spec.kind is bool and spec.optional:
            group.add_argument(spec.flag, dest=spec.name, action=argparse.BooleanOptionalAction,
                               help=text)
        elif spec.kind is bool:
            group.add_argument(spec.flag, dest=spec.name, help=spec.help,
                               action="store_false" if spec.default else "store_true")
        elif spec.choices is not None:
            group.add_argument(spec.flag, dest=spec.name, choices=spec.choices, help=text)
        else:
            group.add_argument(spec.flag, dest=spec.name, type=spec.parse, help=text,
                               metavar=spec.name.upper())
    run = parser.add_argument_group("run")
    run.add_argument("--config", metavar="FILE",
                     help="run a stored configuration (a run folder's config.yaml) again from "
                          "scratch; flags after it override it")
    run.add_argument("--print-config", action="store_true",
                     help="print the resolved configuration (YAML) and exit")
    run.add_argument("--ckpt-path", help="checkpoint to resume from, or 'last' (the latest "
                                         "run of this name)")
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str]
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The options given on a command line, with ``--config`` files applied in order.

    A ``--config FILE`` replaces what came before it; flags after it override the file.

    Returns:
        ``(options, run)``: option name -> value, and the run flags (``print_config``,
        ``ckpt_path``) that are not part of a configuration.

    Raises:
        SystemExit: Bad flags (argparse's message and exit status 2).
        ConfigError: A config file that cannot be read.
    """
    argv = list(argv)
    starts = [i for i, token in enumerate(argv)
              if token == "--config" or token.startswith("--config=")]
    bounds = [0, *starts, len(argv)]
    options: dict[str, Any] = {}
    run: dict[str, Any] = {"print_config": False, "ckpt_path": None}
    for begin, end in zip(bounds[:-1], bounds[1:]):
        parsed = vars(parser.parse_args(argv[begin:end]))
        if "config" in parsed:
            options.update(load_config(parsed.pop("config")))
        for key in run:
            if key in parsed:
                run[key] = parsed.pop(key)
        options.update(parsed)
    return options, run


def command_line(config: RunConfig) -> list[str]:
    """The ``train.py`` flags that give ``config``: ``--model``, ``--data`` and every option
    whose value differs from what the data set's preset gives.

    Example:
        >>> command_line(resolve({"data": "power", "lr": 0.01, "backprop": "direct"}))
        ['--model', 'cnf', '--data', 'power', '--backprop', 'direct', '--lr', '0.01']

    Raises:
        ConfigError: ``config`` holds a value no flag can give (e.g. ``hidden_dims=None`` for
            a data set whose preset sets the widths).
    """
    base = resolve({"model": config.model, "data": config.data}).flat()
    argv = ["--model", config.model, "--data", config.data]
    for name, value in config.flat().items():
        spec = _OPTIONS[name]
        if name in ("model", "data") or value == base[name] or value is None:
            continue
        if spec.kind is bool:
            stem = name.replace("_", "-")
            argv.append(f"--{stem}" if spec.optional and value else
                        f"--no-{stem}" if spec.optional else spec.flag)
        else:
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            argv += [spec.flag, text]
    given, _ = parse_command_line(make_parser(), argv)
    if resolve(given) != config:
        differ = sorted(k for k, v in resolve(given).flat().items() if config.flat()[k] != v)
        raise ConfigError(f"no flags give this configuration: options {differ} hold values "
                          f"that only a config file can set")
    return argv
