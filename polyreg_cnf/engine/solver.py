"""Typed solver settings: one object instead of loose string keys, and every solver default."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from polyreg_cnf.engine._checks import check_int, check_number
from polyreg_cnf.engine._torchdiffeq import ADAPTIVE_METHODS, FIXED_METHODS, METHODS
from polyreg_cnf.engine.backprop import (
    Adjoint,
    Auto,
    Backprop,
    backprop_from_dict,
    make_backprop,
)

__all__ = ["ADAPTIVE_METHODS", "FIXED_METHODS", "METHODS", "SolverConfig"]


@dataclass(frozen=True)
class SolverConfig:
    """How a block integrates its ODE. The defaults are the paper's and every entry point's.

    Args:
        method: A torchdiffeq method: one of ``METHODS`` (adaptive ``ADAPTIVE_METHODS`` or
            fixed-grid ``FIXED_METHODS``).
        atol: Absolute tolerance while training (paper: 1e-4).
        rtol: Relative tolerance while training (paper: 1e-4).
        eval_atol: Absolute tolerance in evaluation, module in eval mode (paper: 1e-5).
        eval_rtol: Relative tolerance in evaluation (paper: 1e-5).
        backprop: How gradients are computed: a strategy of :mod:`polyreg_cnf.engine.backprop`
            (:class:`~polyreg_cnf.engine.backprop.Auto` by default: direct backprop while it fits
            a share of the free memory, memory-bounded otherwise), or its name (``"auto"``,
            ``"direct"``, ``"adjoint"``, ``"checkpoint"``) for the strategy with its defaults.
        first_step: Initial step size for adaptive methods; ``None`` lets the solver choose
            (costs one extra evaluation per solve).
        step_size: Step size of fixed-grid methods (required for them).
        max_num_steps: Solver steps allowed per solve before torchdiffeq gives up.
        max_nfe: Cap on function evaluations per forward solve; exceeding it raises
            :class:`polyreg_cnf.NFELimitError` at once instead of grinding on for hours.
        extra_options: More torchdiffeq options, passed as they are.

    Example:
        >>> solver = SolverConfig(eval_atol=1e-6, first_step=0.1)
        >>> solver.tolerances(training=True), solver.tolerances(training=False)
        ((0.0001, 0.0001), (1e-06, 1e-05))
        >>> solver.options(), solver.backprop
        ({'first_step': 0.1}, Auto(memory_share=None, adjoint=Adjoint(carry=True, seminorm=False)))
        >>> SolverConfig(method="rk4")
        Traceback (most recent call last):
        ...
        ValueError: fixed-grid method 'rk4' needs step_size, got None
    """

    method: str = "dopri5"
    atol: float = 1e-4
    rtol: float = 1e-4
    eval_atol: float = 1e-5
    eval_rtol: float = 1e-5
    backprop: Backprop = field(default_factory=Auto)
    first_step: float | None = None
    step_size: float | None = None
    max_num_steps: int | None = None
    max_nfe: int | None = None
    extra_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown solver method {self.method!r}; valid: {', '.join(METHODS)}")
        for name in ("atol", "rtol", "eval_atol", "eval_rtol", "first_step", "step_size"):
            value = getattr(self, name)
            if value is not None or name in ("atol", "rtol", "eval_atol", "eval_rtol"):
                check_number(name, value, strict=True)
        for name in ("max_num_steps", "max_nfe"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name))
        if self.method in FIXED_METHODS and self.step_size is None:
            raise ValueError(f"fixed-grid method {self.method!r} needs step_size, got None")
        object.__setattr__(self, "backprop", make_backprop(self.backprop))
        self.backprop.check(self.method)

    @property
    def adaptive(self) -> bool:
        """Whether the method chooses its own steps."""
        return self.method in ADAPTIVE_METHODS

    def tolerances(self, training: bool) -> tuple[float, float]:
        """(atol, rtol) for training or for evaluation."""
        return (self.atol, self.rtol) if training else (self.eval_atol, self.eval_rtol)

    def options(self) -> dict[str, Any]:
        """The ``options`` dict torchdiffeq's odeint takes for this method."""
        opts: dict[str, Any] = dict(self.extra_options)
        if self.adaptive:
            if self.first_step is not None:
                opts["first_step"] = self.first_step
            if self.max_num_steps is not None:
                opts["max_num_steps"] = self.max_num_steps
        else:
            opts["step_size"] = self.step_size
        return opts

    def fresh(self) -> SolverConfig:
        """The same settings with a strategy holding no decisions (one per model)."""
        if isinstance(self.backprop, Auto):
            return dataclasses.replace(self, backprop=self.backprop.fresh())
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for hyperparameter logging and checkpoints (:meth:`from_dict` reads it)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["backprop"] = self.backprop.to_dict()
        out["extra_options"] = dict(self.extra_options)
        return out

    @classmethod
    def for_model(cls, solver: SolverConfig | dict[str, Any] | None) -> SolverConfig:
        """A model's own solver settings from what its constructor received.

        ``None`` gives the defaults, a dict is read with :meth:`from_dict` (a checkpoint's
        hyperparameters), a config is taken as is; each model gets its own :meth:`fresh` copy,
        shared by its blocks.

        Raises:
            TypeError: Anything else.
        """
        if solver is None:
            solver = cls()
        elif isinstance(solver, dict):
            solver = cls.from_dict(solver)
        elif not isinstance(solver, cls):
            raise TypeError(f"solver must be a SolverConfig or dict, got {type(solver).__name__}")
        return solver.fresh()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SolverConfig:
        """A config from :meth:`to_dict`'s form, or from the flat form older checkpoints hold.

        Older checkpoints stored ``backprop`` as a name beside ``adjoint``, ``seminorm``,
        ``adjoint_carry_step`` and ``memory_share``, and ``None`` for an evaluation tolerance
        equal to the training one.
        """
        data = dict(data)
        legacy = {k: data.pop(k) for k in ("adjoint", "seminorm", "adjoint_carry_step",
                                           "memory_share") if k in data}
        backprop = data.pop("backprop", None)
        if isinstance(backprop, dict):
            data["backprop"] = backprop_from_dict(backprop)
        elif backprop is not None or legacy:
            name = backprop or "auto"
            if legacy.get("adjoint") is not None:
                name = "adjoint" if legacy["adjoint"] else "direct"
            settings: dict[str, Any] = {}
            adjoint = Adjoint(carry=legacy.get("adjoint_carry_step", True),
                              seminorm=legacy.get("seminorm", False))
            if name == "adjoint":
                settings = dict(carry=adjoint.carry, seminorm=adjoint.seminorm)
            elif name == "auto":
                settings = dict(memory_share=legacy.get("memory_share"), adjoint=adjoint)
            data["backprop"] = make_backprop(name, **settings)
        for name, train in (("eval_atol", "atol"), ("eval_rtol", "rtol")):
            if name in data and data[name] is None:
                data[name] = data.get(train, getattr(cls, train))
        return cls(**data)

