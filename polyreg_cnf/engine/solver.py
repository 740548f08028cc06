"""Typed solver settings: one object instead of loose string keys."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ADAPTIVE_METHODS", "BACKPROP_MODES", "FIXED_METHODS", "SolverConfig"]

#: How gradients of a training solve are computed (see :mod:`polyreg_cnf.engine.memory`).
BACKPROP_MODES = ("auto", "direct", "adjoint", "checkpoint")

#: Adaptive-step methods of torchdiffeq (their NFE grows with stiffness: what TPR targets).
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
#: Fixed-grid methods of torchdiffeq (need ``step_size``).
FIXED_METHODS = ("euler", "midpoint", "rk4", "explicit_adams", "implicit_adams")


def _positive(name: str, value: object, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class SolverConfig:
    """How a block integrates its ODE.

    Args:
        method: A torchdiffeq method: one of ``ADAPTIVE_METHODS`` or ``FIXED_METHODS``.
        atol: Absolute tolerance while training.
        rtol: Relative tolerance while training.
        eval_atol: Absolute tolerance in evaluation (module in eval mode); defaults to ``atol``.
        eval_rtol: Relative tolerance in evaluation; defaults to ``rtol``.
        backprop: How gradients are computed: ``"direct"`` backpropagates through the solver's
            operations (fastest, memory grows with NFE), ``"adjoint"`` solves the adjoint ODE
            backwards (O(1) memory in NFE, a second solve), ``"auto"`` (default) uses direct
            backprop while the step's activations fit a share of the free memory (measured:
            bytes kept per evaluation x forward NFE x 2, see :mod:`polyreg_cnf.engine.memory`)
            and memory-bounded backprop otherwise (the adjoint, or the step checkpoints for
            solves with interior output times, such as the penalty's, when one step's graph
            fits); a block's first training solve uses the adjoint while it measures. On
            CUDA, a direct solve that runs out of memory is redone with the adjoint, and the
            block stays memory-bounded. ``"checkpoint"`` (adaptive methods only)
            stores the state at every accepted step and backpropagates through one recomputed
            step at a time (:func:`polyreg_cnf.engine.step_checkpoint.checkpointed_solve`): the
            gradients of direct backprop with the step sizes held fixed, the memory of one step,
            and no extra cost for output times (the adjoint stops at each of them).
        adjoint: Shorthand kept for older code: ``True`` means ``backprop="adjoint"``,
            ``False`` means ``backprop="direct"`` (it stays as given; read ``backprop``).
        seminorm: With the adjoint, measure the backward error on the state and its adjoint
            only (Kidger, Chen & Lyons, ICML 2021): typically far fewer backward steps.
        adjoint_carry_step: With the adjoint and an adaptive method, use the restart-free
            adjoint (:func:`polyreg_cnf.engine.adjoint.odeint_adjoint_carry`): the backward
            pass keeps its step size across the output times instead of re-selecting it on every
            interval, so the penalty's interior times cost about one evaluation each. ``False`` uses
            torchdiffeq's stock ``odeint_adjoint`` (kept for comparison).
        first_step: Initial step size for adaptive methods; ``None`` lets the solver choose
            (costs one extra evaluation per solve).
        step_size: Step size of fixed-grid methods (required for them).
        max_num_steps: Solver steps allowed per solve before torchdiffeq gives up.
        memory_share: With ``backprop="auto"``, the share of free memory direct backprop may
            use; default 0.25 on CPU (an overrun is the kernel's OOM killer, not an
            exception) and 0.5 on CUDA.
        max_nfe: Cap on function evaluations per forward solve; exceeding it raises
            :class:`polyreg_cnf.NFELimitError` at once instead of grinding on for hours.

    Example:
        >>> solver = SolverConfig(atol=1e-4, rtol=1e-4, eval_atol=1e-6, first_step=0.1)
        >>> solver.tolerances(training=True), solver.tolerances(training=False)
        ((0.0001, 0.0001), (1e-06, 0.0001))
        >>> solver.options()
        {'first_step': 0.1}
        >>> SolverConfig(method="rk4")
        Traceback (most recent call last):
        ...
        ValueError: fixed-grid method 'rk4' needs step_size, got None
    """

    method: str = "dopri5"
    atol: float = 1e-5
    rtol: float = 1e-5
    eval_atol: float | None = None
    eval_rtol: float | None = None
    backprop: str = "auto"
    adjoint: bool | None = None
    seminorm: bool = False
    adjoint_carry_step: bool = True
    first_step: float | None = None
    step_size: float | None = None
    max_num_steps: int | None = None
    max_nfe: int | None = None
    memory_share: float | None = None
    extra_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        valid = ADAPTIVE_METHODS + FIXED_METHODS
        if self.method not in valid:
            raise ValueError(f"unknown solver method {self.method!r}; valid: {', '.join(valid)}")
        _positive("atol", self.atol)
        _positive("rtol", self.rtol)
        _positive("eval_atol", self.eval_atol, allow_none=True)
        _positive("eval_rtol", self.eval_rtol, allow_none=True)
        _positive("first_step", self.first_step, allow_none=True)
        _positive("step_size", self.step_size, allow_none=True)
        for name in ("max_num_steps", "max_nfe"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if self.method in FIXED_METHODS and self.step_size is None:
            raise ValueError(f"fixed-grid method {self.method!r} needs step_size, got None")
        if self.backprop not in BACKPROP_MODES:
            raise ValueError(f"backprop must be one of {', '.join(BACKPROP_MODES)}, got "
                             f"{self.backprop!r}")
        if self.adjoint is not None:
            implied = "adjoint" if self.adjoint else "direct"
            if self.backprop not in ("auto", implied):
                raise ValueError(f"adjoint={self.adjoint} contradicts backprop={self.backprop!r}; "
                                 f"give one of them")
            object.__setattr__(self, "backprop", implied)
        if self.memory_share is not None and (
                isinstance(self.memory_share, bool) or not isinstance(self.memory_share,
                                                                      (int, float))
                or not 0 < self.memory_share <= 1):
            raise ValueError(f"memory_share must be a number in (0, 1], got "
                             f"{self.memory_share!r}")
        if self.seminorm and self.backprop in ("direct", "checkpoint"):
            raise ValueError(f"seminorm=True only applies to the adjoint; got "
                             f"backprop={self.backprop!r}")
        if self.backprop == "checkpoint" and self.method not in ADAPTIVE_METHODS:
            raise ValueError(f"backprop='checkpoint' recomputes adaptive Runge-Kutta steps; "
                             f"method {self.method!r} is fixed-grid (use one of "
                             f"{', '.join(ADAPTIVE_METHODS)}, or backprop='direct')")

    @property
    def adaptive(self) -> bool:
        """Whether the method chooses its own steps."""
        return self.method in ADAPTIVE_METHODS

    def tolerances(self, training: bool) -> tuple[float, float]:
        """(atol, rtol) for training or for evaluation."""
        if training:
            return self.atol, self.rtol
        return (self.eval_atol if self.eval_atol is not None else self.atol,
                self.eval_rtol if self.eval_rtol is not None else self.rtol)

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

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for hyperparameter logging."""
        return asdict(self)
