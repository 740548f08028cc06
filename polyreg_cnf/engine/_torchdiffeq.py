"""Everything the project takes from torchdiffeq, in one place: the only module importing it.

The solver functions, the method registry, the names of the step callbacks, the error norm and
the Runge-Kutta internals the step checkpoints recompute with come from here and nowhere else,
so a torchdiffeq upgrade is checked in one file (and by ``tests/test_torchdiffeq_contract.py``,
which names the private parts used here). ``tests/test_boundaries.py`` checks that no other
module of the package imports torchdiffeq.

The solvers raise :class:`~polyreg_cnf.engine.errors.SolverError` where torchdiffeq fails with
an ``AssertionError`` (its way of giving up: step size underflow, ``max_num_steps`` exceeded,
a non-finite state, or an invalid input).
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Callable
from typing import Any

import torchdiffeq
from torchdiffeq._impl.adjoint import find_parameters
from torchdiffeq._impl.interp import _interp_evaluate, _interp_fit
from torchdiffeq._impl.misc import Perturb, _mixed_norm, _PerturbFunc
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver, _runge_kutta_step
from torchdiffeq._impl.solvers import AdaptiveStepsizeODESolver, FixedGridODESolver

from polyreg_cnf.engine.errors import SolverError

__all__ = ["ADAPTIVE_METHODS", "ADJOINT_CALLBACKS", "CALLBACKS", "FIXED_METHODS", "METHODS",
           "RK_METHODS", "SOLVERS", "STEP_COUNTS", "Perturb", "PerturbFunc", "StepRelay",
           "find_parameters", "fixed_grid_stepper", "interp_evaluate", "interp_fit",
           "mixed_norm", "odeint", "odeint_adjoint", "proxy_module", "runge_kutta_step",
           "solver_failure", "stock_solvers"]

#: torchdiffeq's package folder: an AssertionError raised from code inside it is a solver failure.
_PACKAGE = os.path.dirname(os.path.abspath(torchdiffeq.__file__)) + os.sep


def solver_failure(error: BaseException) -> SolverError | None:
    """``error`` as a :class:`SolverError` if it is a solver failure, else None.

    A :class:`SolverError` is returned as it is; an ``AssertionError`` raised by torchdiffeq's
    own code (recognised by the file it was raised in, not by its text: the backward pass of
    torchdiffeq's adjoint runs out of the engine's reach) becomes one.

    Example:
        >>> solver_failure(SolverError("underflow in dt 1e-17")) is not None
        True
        >>> solver_failure(AssertionError("underflow in dt 1e-17")) is None  # not torchdiffeq's
        True
    """
    if isinstance(error, SolverError):
        return error
    if not isinstance(error, AssertionError):
        return None
    trace = error.__traceback__
    while trace is not None and trace.tb_next is not None:
        trace = trace.tb_next
    if trace is None or not os.path.abspath(trace.tb_frame.f_code.co_filename).startswith(
            _PACKAGE):
        return None
    failure = SolverError(str(error))
    failure.__cause__ = error
    return failure


def _typed(solver: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(solver)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return solver(*args, **kwargs)
        except AssertionError as err:
            failure = solver_failure(err)
            if failure is None:  # the caller's own assert, raised in its function
                raise
            raise failure from err

    return run


#: torchdiffeq's solvers, their failures raised as SolverError: the engine's only references.
odeint = _typed(torchdiffeq.odeint)
odeint_adjoint = _typed(torchdiffeq.odeint_adjoint)
#: torchdiffeq's error norm of a tuple state: the largest RMS norm of its tensors.
mixed_norm = _mixed_norm
#: The Runge-Kutta internals the step checkpoints recompute a step with, bit for bit.
interp_evaluate = _interp_evaluate
interp_fit = _interp_fit
runge_kutta_step = _runge_kutta_step
PerturbFunc = _PerturbFunc


def fixed_grid_stepper(method: str, y0: Any, options: dict[str, Any]) -> FixedGridODESolver:
    """torchdiffeq's fixed-grid solver of ``method`` for ``y0``, to recompute single steps with.

    Only the options that change a step or its output (``interp``, ``perturb``) are passed on:
    the grid is the one the forward solve recorded. The step checkpoints call its private
    ``_step_func``, ``_linear_interp`` and ``_cubic_hermite_interp`` so that a recomputed step
    is the forward step bit for bit.
    """
    kept = {key: options[key] for key in ("interp", "perturb") if key in options}
    return SOLVERS[method](func=None, y0=y0, atol=0.0, **kept)


def stock_solvers() -> dict[int, str]:
    """``{id: name}`` of the objects a user module may bind: torchdiffeq's two solvers and the
    ``torchdiffeq`` module itself (for :func:`polyreg_cnf.engine.dropin.redirect_torchdiffeq`)."""
    return {id(torchdiffeq.odeint): "odeint", id(torchdiffeq.odeint_adjoint): "odeint_adjoint",
            id(torchdiffeq): "module"}


def proxy_module(solvers: dict[str, Callable[..., Any]]) -> types.ModuleType:
    """A stand-in for the ``torchdiffeq`` module whose ``solvers`` (by name) are replaced and
    whose other attributes are torchdiffeq's."""

    class _Proxy(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            return getattr(torchdiffeq, name)

    proxy = _Proxy("torchdiffeq", torchdiffeq.__doc__)
    for name, solver in solvers.items():
        setattr(proxy, name, solver)
    return proxy


#: Adaptive-step methods (their NFE grows with stiffness: what the regularizer targets), read from
#: torchdiffeq's registry. Their steps never depend on the output times (dense output).
ADAPTIVE_METHODS: tuple[str, ...] = tuple(sorted(
    (name for name, cls in SOLVERS.items() if issubclass(cls, AdaptiveStepsizeODESolver)),
    key=lambda name: name != "dopri5"))  # torchdiffeq's default first
#: Fixed-grid methods (they need ``step_size``, or they step on the output times themselves).
FIXED_METHODS: tuple[str, ...] = tuple(
    name for name, cls in SOLVERS.items() if issubclass(cls, FixedGridODESolver))
#: Every method this project solves with (torchdiffeq's ``scipy_solver`` is left out: it has no
#: autograd path).
METHODS: tuple[str, ...] = ADAPTIVE_METHODS + FIXED_METHODS
#: Adaptive Runge-Kutta methods, whose steps can be recomputed (every adaptive torchdiffeq method).
RK_METHODS: tuple[str, ...] = tuple(
    name for name in ADAPTIVE_METHODS if issubclass(SOLVERS[name], RKAdaptiveStepsizeODESolver))

class StepRelay:
    """Base of the engine's wrappers around a caller's function: the one place torchdiffeq's step
    callbacks are passed on to the function's own.

    A wrapper that changes the time or state form the solver sees (a flat state, a reversed
    time, a 1-tuple) says how to undo it in :meth:`caller_form`; its callbacks call
    :meth:`relay`, which hands the caller's callback of that name (if it has one) its own form.

    Args:
        func: The caller's function, maybe with ``callback_*`` methods.
    """

    def __init__(self, func: Any) -> None:
        self.func = func

    def caller_form(self, t0: Any, y0: Any) -> tuple[Any, Any]:
        """``(t0, y0)`` as the caller's function sees them (here: unchanged)."""
        return t0, y0

    def relay(self, name: str, t0: Any, y0: Any, dt: Any) -> None:
        """Call the caller's callback ``name`` with ``(t0, y0, dt)`` in its form, if it has one."""
        callback = getattr(self.func, name, None)
        if callback is not None:
            t0, y0 = self.caller_form(t0, y0)
            callback(t0, y0, dt)


#: The step callbacks torchdiffeq calls on the function it solves, forward and under the adjoint.
CALLBACKS: tuple[str, ...] = ("callback_step", "callback_accept_step", "callback_reject_step")
ADJOINT_CALLBACKS: tuple[str, ...] = tuple(name + "_adjoint" for name in CALLBACKS)
#: The callbacks that say whether a step was accepted, and whether it was a backward step.
STEP_COUNTS: dict[str, tuple[bool, bool]] = {
    "callback_accept_step": (True, False), "callback_reject_step": (False, False),
    "callback_accept_step_adjoint": (True, True),
    "callback_reject_step_adjoint": (False, True)}
