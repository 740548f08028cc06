"""Typed flow settings: the network and the CNF blocks, beside :class:`SolverConfig`.

:class:`FlowConfig` says what a stack of CNF blocks is (each block's vector field, end time and
trace estimator); :class:`~polyreg_cnf.engine.solver_config.SolverConfig` says how each block's
ODE is solved. Every flow default is written here, once: :class:`~polyreg_cnf.engine.cnf.CNF`, the
VAE's :class:`~polyreg_cnf.engine.amortized.FlowPosterior`, the LightningModules and the command
line (whose ``network`` flags are these fields, help text and choices included) all read it.

Adding a flow option is one field here (default, help, choices or bound) and the code that uses
it (:class:`~polyreg_cnf.engine.cnf.CNF` for a block setting, :meth:`FlowConfig.make_net` and
:class:`~polyreg_cnf.engine.nets.ODENet` for a network one): the ``train.py`` flag, its
``--help`` line, its checks, the YAML config files and the checkpoints follow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from polyreg_cnf.engine._checks import check_bool, check_int, check_ints, check_number
from polyreg_cnf.engine.nets import (
    DEFAULT_HIDDEN_DIMS,
    DEFAULT_LAYER_TYPE,
    DEFAULT_NONLINEARITY,
    LAYER_TYPES,
    NONLINEARITIES,
    ODENet,
)
from polyreg_cnf.engine.trace import NOISE_TYPES

__all__ = ["DIVERGENCE_MODES", "TRACE_TYPES", "FlowConfig"]

#: Trace estimators of a CNF block (see :class:`~polyreg_cnf.engine.cnf.CNF`).
TRACE_TYPES = ("exact", "hutchinson")
#: How a CNF evaluation computes its divergence (see :class:`~polyreg_cnf.engine.cnf.CNF`).
DIVERGENCE_MODES = ("auto", "forward", "compiled", "reverse")


def _spec(default: Any, help: str, *, choices: Sequence[str] | None = None,
          low: float | None = None, strict: bool = False) -> Any:
    """A field with the metadata the command line reads (see :mod:`polyreg_cnf.app.options`)."""
    return field(default=default, metadata={"help": help, "low": low, "strict": strict,
                                            "choices": None if choices is None else tuple(choices)})


@dataclass(frozen=True)
class FlowConfig:
    """What a stack of CNF blocks is: its vector field and each block's time and trace.

    Args:
        hidden_dims: Hidden widths of each block's net; None: ``hdim_factor`` x the dimension,
            ``nhidden`` times (FFJORD's tabular networks).
        hdim_factor: Hidden width per data dimension (with ``hidden_dims=None``).
        nhidden: Number of hidden layers of width ``hdim_factor`` x D.
        layer_type: A layer of :data:`~polyreg_cnf.engine.nets.LAYER_TYPES`.
        nonlinearity: A name of :data:`~polyreg_cnf.engine.nets.NONLINEARITIES`.
        num_blocks: Number of CNF blocks.
        T: End time of each block.
        train_T: Learn each block's end time.
        trace: Trace estimator while training (:data:`TRACE_TYPES`).
        eval_trace: Trace estimator in evaluation (exact, as published numbers use).
        noise: Hutchinson probe distribution.
        divergence: Forward mode, compiled forward mode or reverse-mode autograd
            (:data:`DIVERGENCE_MODES`; see :class:`~polyreg_cnf.engine.cnf.CNF`).

    Example:
        >>> flow = FlowConfig(hidden_dims=None, hdim_factor=10, nhidden=2, T=0.5)
        >>> flow.widths(3), flow.trace, flow.eval_trace
        ((30, 30), 'hutchinson', 'exact')
        >>> FlowConfig.from_dict(flow.to_dict()) == flow
        True
        >>> FlowConfig(trace="exakt")
        Traceback (most recent call last):
        ...
        ValueError: unknown trace 'exakt'; valid: exact, hutchinson
    """

    hidden_dims: tuple[int, ...] | None = _spec(
        DEFAULT_HIDDEN_DIMS, "hidden widths, e.g. 64,64,64 (None: hdim_factor x D, nhidden "
                             "times)")
    hdim_factor: int | None = _spec(None, "hidden width = factor x data dimension (tabular "
                                          "presets)", low=1)
    nhidden: int | None = _spec(None, "number of hidden layers of width hdim_factor x D", low=1)
    layer_type: str = _spec(DEFAULT_LAYER_TYPE, "layer of the ODE net", choices=LAYER_TYPES)
    nonlinearity: str = _spec(DEFAULT_NONLINEARITY, "nonlinearity of the ODE net",
                              choices=NONLINEARITIES)
    num_blocks: int = _spec(1, "number of CNF blocks", low=1)
    T: float = _spec(1.0, "end time of each block", low=0.0, strict=True)
    train_T: bool = _spec(False, "learn the end time")
    trace: str = _spec("hutchinson", "trace estimator while training", choices=TRACE_TYPES)
    eval_trace: str = _spec("exact", "trace estimator in evaluation", choices=TRACE_TYPES)
    noise: str = _spec("rademacher", "Hutchinson probe distribution", choices=NOISE_TYPES)
    divergence: str = _spec("auto", "divergence: forward mode (auto: wherever the net supports "
                                    "it), compiled forward mode, or reverse-mode autograd",
                            choices=DIVERGENCE_MODES)

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.hidden_dims is not None:
            if isinstance(self.hidden_dims, (str, bytes)) or not isinstance(self.hidden_dims,
                                                                          Sequence):
                raise ValueError(f"hidden_dims must be a sequence of positive ints, got "
                                 f"{self.hidden_dims!r}")
            put("hidden_dims", check_ints("hidden_dims", self.hidden_dims))
        for name in ("hdim_factor", "nhidden"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name))
        check_int("num_blocks", self.num_blocks)
        put("T", check_number("T", self.T, strict=True))
        check_bool("train_T", self.train_T)
        # Every field's choices and lower bound (from its metadata, which the command line
        # reads too): a new field needs no check of its own here.
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if meta["choices"] is not None and value not in meta["choices"]:
                raise ValueError(f"unknown {f.name} {value!r}; valid: "
                                 f"{', '.join(meta['choices'])}")
            if meta["low"] is not None and value is not None:
                check_number(f.name, value, meta["low"], meta["strict"])

    def widths(self, dim: int) -> tuple[int, ...]:
        """The hidden widths of a net over ``dim`` dimensions.

        Raises:
            ValueError: Neither ``hidden_dims`` nor both ``hdim_factor`` and ``nhidden``.
        """
        if self.hidden_dims is not None:
            return self.hidden_dims
        if self.hdim_factor is None or self.nhidden is None:
            raise ValueError(f"give hidden_dims, or hdim_factor and nhidden; got "
                             f"hidden_dims=None, hdim_factor={self.hdim_factor!r}, "
                             f"nhidden={self.nhidden!r}")
        return (self.hdim_factor * dim,) * self.nhidden

    def make_net(self, dim: int) -> ODENet:
        """The vector field of one block over ``dim`` dimensions: the network fields' ODENet."""
        return ODENet(dim, self.widths(dim), self.layer_type, self.nonlinearity)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (widths as a list): what a checkpoint's hyperparameters hold."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FlowConfig:
        """The inverse of :meth:`to_dict` (missing fields keep their defaults).

        Raises:
            TypeError: A key that is not a field.
        """
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise TypeError(f"unknown FlowConfig fields {unknown}; valid: "
                            f"{', '.join(cls.__dataclass_fields__)}")
        return cls(**values)

    @classmethod
    def resolve(cls, flow: FlowConfig | Mapping[str, Any] | None, owner: str,
                default: FlowConfig | None = None, **fields: Any) -> FlowConfig:
        """The flow of a component: ``flow`` (or its ``default``), with flat fields over it.

        The constructors of release 0.2 took the flow's fields as flat keywords (``T=0.5,
        trace="exact"``), and their checkpoints store them so; they keep working through here.

        Args:
            flow: A FlowConfig, its :meth:`to_dict`, or None for ``default``.
            owner: The component, for messages (``"CNF"``).
            default: The component's own default flow (None: ``FlowConfig()``).
            **fields: Flow fields given as flat keywords; they override ``flow``'s.

        Raises:
            TypeError: ``flow`` of another type, or a keyword that is not a flow field.
        """
        if flow is None:
            flow = cls() if default is None else default
        elif isinstance(flow, Mapping):
            flow = cls.from_dict(flow)
        elif not isinstance(flow, cls):
            raise TypeError(f"{owner}: flow must be a FlowConfig, got {type(flow).__name__} "
                            f"{flow!r}; e.g. {owner}(..., flow=FlowConfig(hidden_dims=(64, 64)))")
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
        if unknown:
            raise TypeError(f"{owner} got unexpected keyword arguments {unknown}; flow settings "
                            f"are the fields of FlowConfig: {', '.join(cls.__dataclass_fields__)}")
        return dataclasses.replace(flow, **fields) if fields else flow
