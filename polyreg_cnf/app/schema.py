"""The run configuration: :class:`RunConfig` (the option groups, every check), the backprop
mapping and :func:`resolve` (flags over presets over each model's own defaults).

Names are unique across groups, so a configuration also reads as one flat mapping (the names
``train.py`` logs and :mod:`polyreg_cnf.app.presets` uses): see :meth:`RunConfig.flat` and
:meth:`RunConfig.from_flat`.

Example:
    >>> config = resolve({"data": "moons", "lr": 0.01})
    >>> config.training.lr, config.flow.hidden_dims, config.ode.solver
    (0.01, (64, 64, 64), 'dopri5')
    >>> config.replace(atol=1e-3).ode.atol
    0.001
    >>> vae = resolve({"model": "vae"})  # CNFVAE's own defaults, then the digits preset
    >>> model_defaults("vae")["T"], vae.flow.T, vae.flow.hidden_dims
    (0.5, 0.5, (64, 64))
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L

from polyreg_cnf.app.groups import (
    DataOptions,
    HardwareOptions,
    KineticOptions,
    OdeOptions,
    OutputOptions,
    PolyOptions,
    TrainingOptions,
    VAEOptions,
)
from polyreg_cnf.app.options import ConfigError, Option, default_of, describe, option
from polyreg_cnf.app.presets import preset_for
from polyreg_cnf.callbacks import KineticRegularizer, PolynomialTrajectoryRegularizer
from polyreg_cnf.datamodules.images import IMAGE_DATASETS
from polyreg_cnf.datamodules.tabular import TABULAR_SETS
from polyreg_cnf.datamodules.toy import TOY_DENSITIES
from polyreg_cnf.datamodules.user_table import TABLE_FORMATS
from polyreg_cnf.engine.flow_config import FlowConfig
from polyreg_cnf.engine.solver_config import ADAPTIVE_METHODS, SolverConfig
from polyreg_cnf.engine.strategies import BACKPROP_KINDS, Adjoint, Auto, Backprop, make_backprop
from polyreg_cnf.models import CNFDensityEstimator
from polyreg_cnf.models.vae import CNFVAE

__all__ = ["GROUPS", "MODELS", "OPTIONS", "REGULARIZERS", "RunConfig", "backprop_from_options",
           "data_kind", "model_defaults", "resolve"]

#: The LightningModule of each ``--model``.
MODELS: dict[str, type] = {"cnf": CNFDensityEstimator, "vae": CNFVAE}
#: The trajectory regularizer callback of each ``--reg`` (None: no regularizer).
REGULARIZERS: dict[str, type | None] = {"none": None, "poly": PolynomialTrajectoryRegularizer,
                                        "kinetic": KineticRegularizer}


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
    flow: FlowConfig = field(default_factory=FlowConfig)
    vae: VAEOptions = field(default_factory=VAEOptions)
    ode: OdeOptions = field(default_factory=OdeOptions)
    poly: PolyOptions = field(default_factory=PolyOptions)
    kinetic: KineticOptions = field(default_factory=KineticOptions)
    training: TrainingOptions = field(default_factory=TrainingOptions)
    hardware: HardwareOptions = field(default_factory=HardwareOptions)
    output: OutputOptions = field(default_factory=OutputOptions)

    def __post_init__(self) -> None:
        for spec in OPTIONS.values():
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
                for name, spec in OPTIONS.items()}

    @classmethod
    def from_flat(cls, options: Mapping[str, Any]) -> RunConfig:
        """A configuration from option name -> value (missing names keep their defaults).

        Raises:
            ConfigError: An unknown name, or a value that does not pass the checks.
        """
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"unknown options {unknown}; valid: {', '.join(OPTIONS)}")
        top: dict[str, Any] = {}
        groups: dict[str, dict[str, Any]] = {}
        # Each value is checked here, before a group that checks itself (FlowConfig) sees it,
        # so that messages name the flag.
        for name, spec in OPTIONS.items():
            if name in options:
                value = spec.check(options[name])
                (top if spec.group is None else groups.setdefault(spec.group, {}))[name] = value
        made = {g: GROUPS[g](**values) for g, values in groups.items()}
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
                if f.name in GROUPS else plain(value)
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
             if k in flags and v != default_of(Auto if k == "memory_share" else Adjoint, k)}
    kind = BACKPROP_KINDS[ode.backprop]
    fields = getattr(kind, "__dataclass_fields__", {})
    wrong = sorted(flags[k] for k in given if k not in fields)
    if wrong:
        raise ConfigError(f"{', '.join(wrong)} does not apply to --backprop {ode.backprop}; it "
                          f"sets --backprop {'auto' if 'memory_share' in given else 'adjoint'} "
                          f"(or auto)")
    return make_backprop(ode.backprop, **{k: v for k, v in settings.items() if k in fields})


GROUPS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)
                            if f.default_factory is not dataclasses.MISSING}
OPTIONS: dict[str, Option] = {}
for _spec in [*describe(RunConfig, None),
              *(s for name, cls in GROUPS.items() for s in describe(cls, name))]:
    if _spec.name in OPTIONS:
        raise TypeError(f"option name {_spec.name!r} is used twice; names must be unique")
    OPTIONS[_spec.name] = _spec



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


def model_defaults(model: str) -> dict[str, Any]:
    """The options whose default the ``--model``'s class sets otherwise than the fields do.

    A model's own defaults are its constructor's (``lr``, the VAE options) and its default
    flow (``CNFVAE.default_flow``: T, hidden widths, ...); ``--help`` and ``--print-config``
    show them.

    Example:
        >>> model_defaults("cnf")
        {}
        >>> sorted(model_defaults("vae"))
        ['T', 'hidden_dims', 'layer_type', 'lr', 'nonlinearity', 'num_blocks']
    """
    cls = MODELS[OPTIONS["model"].check(model)]
    own = dict(dataclasses.asdict(getattr(cls, "default_flow", FlowConfig())))
    for name, param in inspect.signature(cls).parameters.items():
        if name in OPTIONS and OPTIONS[name].group in ("training", "vae"):
            own[name] = param.default
    return {name: value for name, value in own.items() if value != OPTIONS[name].default}


def resolve(given: Mapping[str, Any] | None = None) -> RunConfig:
    """The configuration of a run: the options ``given``, the rest from the data set's preset.

    Order of precedence: ``given`` (flags, a config file), then the preset of the data set
    (:mod:`polyreg_cnf.app.presets`), then the model's own defaults (:func:`model_defaults`),
    then the defaults of the fields. ``data`` defaults to
    ``checkerboard`` (``digits`` for ``model="vae"``); without ``max_steps`` and ``max_epochs``
    a run takes 1000 steps.

    Args:
        given: Option name -> value, e.g. ``{"data": "power", "lr": 1e-4}``.

    Raises:
        ConfigError: Unknown names, bad values or combinations that cannot work.
    """
    given = dict(given or {})
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"unknown options {unknown}; valid: {', '.join(OPTIONS)}")
    model = OPTIONS["model"].check(given.get("model", OPTIONS["model"].default))
    data = given.get("data") or ("digits" if model == "vae" else "checkerboard")
    data = OPTIONS["data"].check(data)
    kind = data_kind(data, model)
    merged = {**model_defaults(model), **preset_for(data.lower(), kind), **given,
              "model": model, "data": data}
    if merged.get("max_steps") is None and merged.get("max_epochs") is None:
        merged["max_steps"] = 1000
    return RunConfig.from_flat(merged)

