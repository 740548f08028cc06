"""Typed solver settings: one object instead of loose string keys, and every solver default."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from polyreg_cnf.engine._checks import check_int, check_number
from polyreg_cnf.engine._torchdiffeq import ADAPTIVE_METHODS, FIXED_METHODS, METHODS
from polyreg_cnf.engine.strategies import Adjoint, Auto, Backprop, backprop_from_dict, make_backprop

__all__ = ["ADAPTIVE_METHODS", "FIXED_METHODS", "METHODS", "SolverConfig", "UniformGrid"]


@dataclass(frozen=True)
class UniformGrid:
    """torchdiffeq ``grid_constructor``: ``steps`` equal steps from the first output time to the
    last, whatever their span (a learned end time included).

    A step count instead of a step size: the cost is known in advance (``steps`` times the
    method's stages per solve) and no rounding of ``T / step_size`` adds a sliver of a step.

    Example:
        >>> UniformGrid(4)(None, None, torch.tensor([0.0, 1.0]))
        tensor([0.0000, 0.2500, 0.5000, 0.7500, 1.0000])
    """

    steps: int

    def __call__(self, func: Any, y0: Any, t: Tensor) -> Tensor:
        """The grid over ``[t[0], t[-1]]``; its ends are exactly ``t``'s (torchdiffeq checks)."""
        frac = torch.linspace(0.0, 1.0, self.steps + 1, dtype=t.dtype, device=t.device)
        inner = t[0] + (t[-1] - t[0]) * frac[1:-1]
        return torch.cat([t[:1], inner, t[-1:]])


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
        eval_method: The method of every solve in evaluation (module in eval mode: validation,
            test, sampling), whatever ``method`` trains with: the default dopri5 at the
            evaluation tolerances scores a model trained on a coarse fixed grid by its
            continuous flow, not by the grid it may have learned to game.
        eval_steps: Number of equal steps over each block's [0, T] of a fixed-grid
            ``eval_method`` (required for one, refused for an adaptive one).
        backprop: How gradients are computed: a strategy of :mod:`polyreg_cnf.engine.strategies`
            (:class:`~polyreg_cnf.engine.strategies.Auto` by default: direct backprop while it fits
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
        >>> fast = SolverConfig(method="rk4", step_size=0.25)
        >>> fast.method_for(training=True), fast.method_for(training=False)
        ('rk4', 'dopri5')
        >>> SolverConfig(eval_method="rk4", eval_steps=4).describe(training=False)
        'rk4, 4 steps'
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
    eval_method: str = "dopri5"
    eval_steps: int | None = None
    backprop: Backprop = field(default_factory=Auto)
    first_step: float | None = None
    step_size: float | None = None
    max_num_steps: int | None = None
    max_nfe: int | None = None
    extra_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown solver method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.eval_method not in METHODS:
            raise ValueError(f"unknown eval_method {self.eval_method!r}; valid: "
                             f"{', '.join(METHODS)}")
        for name in ("atol", "rtol", "eval_atol", "eval_rtol", "first_step", "step_size"):
            value = getattr(self, name)
            if value is not None or name in ("atol", "rtol", "eval_atol", "eval_rtol"):
                check_number(name, value, strict=True)
        for name in ("max_num_steps", "max_nfe", "eval_steps"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name))
        if self.method in FIXED_METHODS and self.step_size is None:
            raise ValueError(f"fixed-grid method {self.method!r} needs step_size, got None")
        if self.eval_method in FIXED_METHODS and self.eval_steps is None:
            raise ValueError(f"fixed-grid eval_method {self.eval_method!r} needs eval_steps, got "
                             f"None")
        if self.eval_method in ADAPTIVE_METHODS and self.eval_steps is not None:
            raise ValueError(f"eval_steps applies to a fixed-grid eval_method only, got "
                             f"eval_steps={self.eval_steps!r} with eval_method="
                             f"{self.eval_method!r}")
        object.__setattr__(self, "backprop", make_backprop(self.backprop))
        self.backprop.check(self.method)

    @property
    def adaptive(self) -> bool:
        """Whether the method chooses its own steps."""
        return self.method in ADAPTIVE_METHODS

    @property
    def evaluation_differs(self) -> bool:
        """Whether evaluation solves with another method (or grid) than training.

        Tolerances alone do not count: the same adaptive method at a looser tolerance is the
        same continuous model, its error bounded by that tolerance. This is when
        ``val/solver_gap`` is measured.
        """
        return self.method != self.eval_method or not self.adaptive

    def method_for(self, training: bool) -> str:
        """The torchdiffeq method of a solve in training or in evaluation."""
        return self.method if training else self.eval_method

    def tolerances(self, training: bool) -> tuple[float, float]:
        """(atol, rtol) for training or for evaluation."""
        return (self.atol, self.rtol) if training else (self.eval_atol, self.eval_rtol)

    def options(self, training: bool = True) -> dict[str, Any]:
        """The ``options`` dict torchdiffeq's odeint takes for the training method, or for the
        evaluation method with ``training=False``."""
        opts: dict[str, Any] = dict(self.extra_options)
        if self.method_for(training) in ADAPTIVE_METHODS:
            if self.first_step is not None:
                opts["first_step"] = self.first_step
            if self.max_num_steps is not None:
                opts["max_num_steps"] = self.max_num_steps
        elif training:
            opts["step_size"] = self.step_size
        else:
            opts["grid_constructor"] = UniformGrid(self.eval_steps)
        return opts

    def describe(self, training: bool) -> str:
        """One line naming the training or the evaluation solve (for summaries)."""
        method = self.method_for(training)
        if method in ADAPTIVE_METHODS:
            atol, rtol = self.tolerances(training)
            return f"{method}, atol={atol:g}, rtol={rtol:g}"
        if training:
            return f"{method}, step_size={self.step_size:g}"
        return f"{method}, {self.eval_steps} steps"

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
        hyperparameters), a config is taken as is (it holds settings only: what an ``Auto``
        strategy decides lives in each block, so models may share one).

        Raises:
            TypeError: Anything else.
        """
        if solver is None:
            solver = cls()
        elif isinstance(solver, dict):
            solver = cls.from_dict(solver)
        elif not isinstance(solver, cls):
            raise TypeError(f"solver must be a SolverConfig or dict, got {type(solver).__name__}")
        return solver

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

