"""The run configuration: one typed definition from which the command line, the presets, the
config files and :func:`polyreg_cnf.app.build.build` all work.

Each option is a field of a frozen dataclass group (:class:`~polyreg_cnf.engine.flow_config.
FlowConfig` for the network, :class:`OdeOptions` for the solver, ...) with its type, default,
help text and, where it has them, its choices and lower bound. From that one definition come
the ``train.py`` flags (:func:`make_parser`; the flag is ``--`` plus the field name with ``_``
as ``-``, ``--no-NAME`` for a switch that is on by default), the checks (run once, when a
:class:`RunConfig` is made) and the YAML file every run stores (:func:`dump_config`).

The parts, one job each (this module re-exports their public names):

- :mod:`polyreg_cnf.app.options`: declaring and reading a typed option (:func:`option`,
  :class:`ConfigError`);
- :mod:`polyreg_cnf.app.groups`: the option groups;
- :mod:`polyreg_cnf.app.schema`: :class:`RunConfig` and its checks, the backprop mapping,
  each model's own defaults and :func:`resolve`;
- :mod:`polyreg_cnf.app.config_io`: YAML files, the command line and rebuilding it.

Adding a flow option is one field of :class:`~polyreg_cnf.engine.flow_config.FlowConfig`;
adding another option is one line in its group, e.g. in :class:`OdeOptions`::

    backprop: str = option("auto", "how gradients are computed", choices=("auto", "direct"))

Example:
    >>> config = resolve({"data": "moons", "lr": 0.01})
    >>> config.training.lr, config.flow.hidden_dims, config.ode.solver
    (0.01, (64, 64, 64), 'dopri5')
    >>> resolve({"atol": 0})
    Traceback (most recent call last):
    ...
    polyreg_cnf.app.options.ConfigError: --atol must be a finite number > 0, got 0
"""

from polyreg_cnf.app.config_io import (
    command_line,
    dump_config,
    load_config,
    make_parser,
    parse_command_line,
)
from polyreg_cnf.app.groups import (
    POLY_PRESET_NAMES,
    SOLVER_METHODS,
    DataOptions,
    FlowOptions,
    HardwareOptions,
    KineticOptions,
    OdeOptions,
    OutputOptions,
    PolyOptions,
    TrainingOptions,
    VAEOptions,
)
from polyreg_cnf.app.options import ConfigError, option
from polyreg_cnf.app.schema import (
    GROUPS,
    MODELS,
    OPTIONS,
    REGULARIZERS,
    RunConfig,
    backprop_from_options,
    data_kind,
    model_defaults,
    resolve,
)
from polyreg_cnf.engine.flow_config import FlowConfig

__all__ = [
    "GROUPS",
    "MODELS",
    "OPTIONS",
    "POLY_PRESET_NAMES",
    "REGULARIZERS",
    "SOLVER_METHODS",
    "ConfigError",
    "DataOptions",
    "FlowConfig",
    "FlowOptions",
    "HardwareOptions",
    "KineticOptions",
    "OdeOptions",
    "OutputOptions",
    "PolyOptions",
    "RunConfig",
    "TrainingOptions",
    "VAEOptions",
    "backprop_from_options",
    "command_line",
    "data_kind",
    "dump_config",
    "load_config",
    "make_parser",
    "model_defaults",
    "option",
    "parse_command_line",
    "resolve",
]
