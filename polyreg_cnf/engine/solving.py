r"""The one place the engine solves an ODE: :func:`solve`.

``ODEBlock``, ``CNF`` and the drop-in ``odeint`` / ``odeint_adjoint`` / ``odeint_checkpoint``
are thin wrappers over it. It takes the backprop strategy as an object
(:mod:`polyreg_cnf.engine.backprop`) and lets the active observers
(:mod:`polyreg_cnf.engine.observers`) watch: the innermost
:class:`~polyreg_cnf.engine.nfe.NFECounter` counts the evaluations and steps, the innermost
:class:`~polyreg_cnf.engine.recording.TrajectoryRecorder` adds its interior times and records
the penalty. With no observer active, no ``max_nfe`` and a plain strategy, the call goes
straight to torchdiffeq with the caller's function: results are torchdiffeq's, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polyreg_cnf.engine import _torchdiffeq as tde
from polyreg_cnf.engine.adjoint import odeint_adjoint_carry
from polyreg_cnf.engine.backprop import Adjoint, Auto, Backprop, Direct, StepCheckpoint
from polyreg_cnf.engine.nfe import NFECounter, NFELimitError
from polyreg_cnf.engine.observers import active
from polyreg_cnf.engine.recording import TrajectoryRecorder
from polyreg_cnf.engine.step_checkpoint import checkpointed_solve

__all__ = ["solve"]

Params = Sequence[Tensor] | Callable[[], Sequence[Tensor]] | None


class _Evaluations:
    """The caller's function for ONE solve, counting its calls; step callbacks passed on.

    A separate object (never an attribute set on the caller's function: users keep their own
    counters there). Calls made after the forward solve returned can only come from the
    adjoint, so they count as backward. ``max_nfe`` caps the forward calls.
    """

    def __init__(self, func: Callable[..., Any], counter: NFECounter | None, adaptive: bool,
                 max_nfe: int | None) -> None:
        self.func = func
        self.counter = counter
        self.max_nfe = max_nfe
        self.backward = False
        self.calls = 0
        for name in (*tde.CALLBACKS, *tde.ADJOINT_CALLBACKS):
            user = getattr(func, name, None)
            step = tde.STEP_COUNTS.get(name) if adaptive and counter is not None else None
            if user is not None or step is not None:
                setattr(self, name, _step_callback(counter, step, user))

    def __call__(self, t: Tensor, y: Any) -> Any:
        if self.backward:
            if self.counter is not None:
                self.counter.backward += 1
        else:
            self.calls += 1
            if self.counter is not None:
                self.counter.forward += 1
            if self.max_nfe is not None and self.calls > self.max_nfe:
                raise NFELimitError(
                    f"forward solve exceeded max_nfe={self.max_nfe} function evaluations "
                    f"(at t={float(t):.6g}); the dynamics have become stiff. Try a looser "
                    f"tolerance, a smaller learning rate, or a trajectory regularizer.")
        return self.func(t, y)


def _step_callback(counter: NFECounter | None, step: tuple[bool, bool] | None,
                   user: Callable[..., Any] | None) -> Callable[..., None]:
    def callback(t0: Tensor, y0: Any, dt: Tensor) -> None:
        if step is not None:
            counter.step(*step)
        if user is not None:
            user(t0, y0, dt)

    return callback


def _params(params: Params, func: Callable[..., Any]) -> tuple[Tensor, ...]:
    if callable(params):
        return tuple(params())
    if params is not None:
        return tuple(params)
    if not isinstance(func, nn.Module):
        raise ValueError(f"func is a {type(func).__name__}, not an nn.Module, so its parameters "
                         f"cannot be found; pass params= (every tensor func depends on that "
                         f"needs a gradient)")
    return tuple(tde.find_parameters(func))


def _carry_accepts(y0: Any, method: str, rtol: Any, atol: Any, options: dict[str, Any],
                   strategy: Adjoint, event_fn: Any) -> bool:
    """Whether the restart-free adjoint honours every argument (else torchdiffeq's adjoint)."""
    if (not strategy.carry or event_fn is not None or method not in tde.ADAPTIVE_METHODS
            or strategy.method not in (None, method)):
        return False
    numbers = (rtol, atol) + tuple(x for x in (strategy.rtol, strategy.atol) if x is not None)
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in numbers):
        return False
    states = (y0,) if isinstance(y0, Tensor) else y0
    if len({y.dtype for y in states}) != 1:
        return False
    backward = strategy.options if strategy.options is not None else options
    if "step_t" in backward or "jump_t" in backward:
        return False
    # torchdiffeq hands a tensor state's norm the tensor, the carry adjoint a 1-tuple
    return not (isinstance(y0, Tensor) and callable(options.get("norm")))


def solve(func: Callable[..., Any], y0: Tensor | tuple[Tensor, ...], t: Tensor, *,
          rtol: float | Tensor, atol: float | Tensor, method: str | None = None,
          options: dict[str, Any] | None = None, backprop: Backprop | None = None,
          params: Params = None, max_nfe: int | None = None,
          event_fn: Callable[..., Tensor] | None = None, site: object | None = None,
          state_index: int | None = None, penalise: bool = True) -> Any:
    r"""Solve :math:`dy/dt = f(t, y)` at the times ``t``, watched by the active observers.

    Args:
        func: ``func(t, y) -> dy/dt``; y a tensor or a tuple of tensors, as ``y0``.
        y0: Initial state at ``t[0]``.
        t: 1-D output times, strictly increasing or decreasing.
        rtol: Relative tolerance.
        atol: Absolute tolerance.
        method: A torchdiffeq method (``None``: dopri5).
        options: The method's options.
        backprop: How gradients are computed (default :class:`Direct`).
        params: Tensors receiving gradients under the adjoint and the step checkpoints (default
            ``func.parameters()``); a callable is called only when they are needed.
        max_nfe: Cap on the forward evaluations of this solve (:class:`NFELimitError`).
        event_fn: Stop where ``event_fn(t, y)`` crosses zero (Direct or torchdiffeq's
            adjoint only; never penalised).
        site: Who solves (an ODE block): the key of :class:`Auto`'s per-site decision.
        state_index: The element of a tuple state the penalty looks at (default: the active
            recorder's ``state_index``).
        penalise: Whether an active recorder may penalise this solve (an ``ODEBlock`` in eval
            mode is never penalised).

    Returns:
        The solution at ``t`` (time first), a tensor or a tuple as ``y0``; with ``event_fn``,
        ``(event_t, solution)``.
    """
    method = "dopri5" if method is None else method
    options = {} if options is None else options
    strategy = Direct() if backprop is None else backprop
    grad = torch.is_grad_enabled()
    counter = active(NFECounter)
    recorder = active(TrajectoryRecorder) if grad and penalise else None
    plain = counter is None and recorder is None and max_nfe is None
    if plain and isinstance(strategy, Direct):
        return tde.odeint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                          event_fn=event_fn)
    if plain and isinstance(strategy, Adjoint) and not strategy.carry:
        return tde.odeint_adjoint(func, y0, t, rtol=rtol, atol=atol, method=method,
                                  options=options, event_fn=event_fn,
                                  adjoint_params=None if params is None else _params(params, func),
                                  **_stock_adjoint(strategy, options))

    grid = None if recorder is None else recorder.plan(y0, t, method, options, event_fn,
                                                       state_index)
    times = t if grid is None else grid.times
    if counter is not None:
        counter.solves += 1
    counted = _Evaluations(func, counter, method in tde.ADAPTIVE_METHODS, max_nfe)
    kwargs = dict(rtol=rtol, atol=atol, method=method, options=options)
    auto = isinstance(strategy, Auto) and grad
    ref = y0 if isinstance(y0, Tensor) else y0[0]
    if auto:
        states = (y0,) if isinstance(y0, Tensor) else y0
        strategy.measure(site, func, times[0], states)
        strategy.weigh_adjoint(site, states, lambda: _params(params, func), method)
        mode = strategy.mode(site, times)
        chosen: Backprop = {"direct": Direct(), "adjoint": strategy.adjoint,
                            "checkpoint": StepCheckpoint()}[mode]
    else:
        chosen = strategy if grad else Direct()
    out_of_memory = False
    try:
        solution = _run(chosen, counted, y0, times, kwargs, params, func, event_fn)
    except torch.OutOfMemoryError:
        if not (auto and isinstance(chosen, Direct)):
            raise
        out_of_memory = True
    # Outside the except block: there the traceback would still hold the failed direct solve's
    # frames, and with them its whole graph, while the adjoint runs.
    if out_of_memory:
        strategy.fall_back(site, ref)
        solution = _run(strategy.adjoint, counted, y0, times, kwargs, params, func, event_fn)
    if auto:
        strategy.propose(site, counted.calls, ref, method)
    counted.backward = True
    if grid is None:
        return solution
    recorder.record(grid, solution, state_index)
    if isinstance(solution, Tensor):
        return grid.select(solution)
    return tuple(grid.select(x) for x in solution)


def _stock_adjoint(strategy: Adjoint, options: dict[str, Any]) -> dict[str, Any]:
    """torchdiffeq's ``adjoint_*`` arguments for the strategy."""
    adjoint_options = strategy.options
    if strategy.seminorm:
        adjoint_options = strategy.backward_options(options)
    return dict(adjoint_rtol=strategy.rtol, adjoint_atol=strategy.atol,
                adjoint_method=strategy.method, adjoint_options=adjoint_options)


def _run(strategy: Backprop, counted: _Evaluations, y0: Any, times: Tensor,
         kwargs: dict[str, Any], params: Params, func: Callable[..., Any],
         event_fn: Any) -> Any:
    if isinstance(strategy, Direct):
        return tde.odeint(counted, y0, times, event_fn=event_fn, **kwargs)
    found = _params(params, func)
    if isinstance(strategy, StepCheckpoint):
        if event_fn is not None:
            raise ValueError("StepCheckpoint cannot stop at events; use Direct() or Adjoint()")
        return checkpointed_solve(counted, y0, times, params=found, **kwargs)
    assert isinstance(strategy, Adjoint)
    if _carry_accepts(y0, kwargs["method"], kwargs["rtol"], kwargs["atol"], kwargs["options"],
                      strategy, event_fn):
        return odeint_adjoint_carry(counted, y0, times, adjoint_params=found,
                                    adjoint_rtol=strategy.rtol, adjoint_atol=strategy.atol,
                                    adjoint_options=strategy.backward_options(
                                        kwargs["options"]) if strategy.seminorm
                                    else strategy.options, **kwargs)
    return tde.odeint_adjoint(counted, y0, times, event_fn=event_fn, adjoint_params=found,
                              **_stock_adjoint(strategy, kwargs["options"]), **kwargs)
