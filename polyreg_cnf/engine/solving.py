r"""The one place the engine solves an ODE: :func:`solve`.

``ODEBlock``, ``CNF``, the drop-in ``odeint`` / ``odeint_adjoint`` / ``odeint_checkpoint`` and
the trajectory plots are thin wrappers over it. It lets the active observers
(:mod:`polyreg_cnf.engine.observers`) watch: the innermost
:class:`~polyreg_cnf.engine.nfe.NFECounter` counts the evaluations and steps, the innermost
:class:`~polyreg_cnf.engine.recording.TrajectoryRecorder` adds its interior times and records
the penalty. The backprop strategy (:mod:`polyreg_cnf.engine.strategies`) runs the solve itself
(:meth:`~polyreg_cnf.engine.strategies.Backprop.solve`) through the torchdiffeq adapter
(:mod:`polyreg_cnf.engine._torchdiffeq`). With no observer active the solution is
torchdiffeq's, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polyreg_cnf.engine import _torchdiffeq as tde
from polyreg_cnf.engine.nfe import NFECounter, NFELimitError
from polyreg_cnf.engine.observers import active
from polyreg_cnf.engine.recording import TrajectoryRecorder, dense_output_options
from polyreg_cnf.engine.strategies import AutoDecision, Backprop, Direct, Problem

__all__ = ["solve"]

Params = Sequence[Tensor] | Callable[[], Sequence[Tensor]] | None


class _Evaluations(tde.StepRelay):
    """The caller's function for ONE solve, counting its calls; step callbacks passed on.

    A separate object (never an attribute set on the caller's function: users keep their own
    counters there). Calls made after the forward solve returned can only come from the
    adjoint, so they count as backward. ``max_nfe`` caps the forward calls. A step callback is
    defined only where the caller has one or the counter counts steps (torchdiffeq warns about
    callbacks a fixed-grid method does not call).
    """

    def __init__(self, func: Callable[..., Any], counter: NFECounter | None, adaptive: bool,
                 max_nfe: int | None) -> None:
        super().__init__(func)
        self.counter = counter
        self.max_nfe = max_nfe
        self.backward = False
        self.calls = 0
        for name in (*tde.CALLBACKS, *tde.ADJOINT_CALLBACKS):
            step = tde.STEP_COUNTS.get(name) if adaptive and counter is not None else None
            if step is not None or getattr(func, name, None) is not None:
                setattr(self, name, self._step_callback(name, step))

    def _step_callback(self, name: str, step: tuple[bool, bool] | None) -> Callable[..., None]:
        def callback(t0: Tensor, y0: Any, dt: Tensor) -> None:
            if step is not None:
                self.counter.step(*step)
            self.relay(name, t0, y0, dt)

        return callback

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


def _params(params: Params, func: Callable[..., Any]) -> tuple[Tensor, ...]:
    if callable(params):
        return tuple(params())
    if params is not None:
        return tuple(params)
    if not isinstance(func, nn.Module):
        # The phrase torchdiffeq uses, so code written against its odeint_adjoint still matches.
        raise ValueError(f"func must be an instance of nn.Module to find its parameters, got a "
                         f"{type(func).__name__}; pass params= (adjoint_params= to "
                         f"odeint_adjoint): every tensor func depends on that needs a gradient, "
                         f"() if none")
    return tuple(tde.find_parameters(func))


def solve(func: Callable[..., Any], y0: Tensor | tuple[Tensor, ...], t: Tensor, *,
          rtol: float | Tensor, atol: float | Tensor, method: str | None = None,
          options: dict[str, Any] | None = None, backprop: Backprop | None = None,
          params: Params = None, max_nfe: int | None = None,
          event_fn: Callable[..., Tensor] | None = None, decision: AutoDecision | None = None,
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
        backprop: How gradients are computed: a strategy, which runs the solve (default
            :class:`~polyreg_cnf.engine.strategies.Direct`).
        params: Tensors receiving gradients under the adjoint and the step checkpoints (default
            ``func.parameters()``); a callable is called only when they are needed.
        max_nfe: Cap on the forward evaluations of this solve (:class:`NFELimitError`).
        event_fn: Stop where ``event_fn(t, y)`` crosses zero (Direct or torchdiffeq's
            adjoint only; never penalised).
        decision: Where :class:`~polyreg_cnf.engine.strategies.Auto` keeps its decision for the
            solving block (``ODEBlock.backprop_decision``); None: an ``Auto`` solve decides
            afresh, memory-bounded while it measures.
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
    # Without gradients every strategy is a plain solve.
    grad = torch.is_grad_enabled()
    strategy = Direct() if backprop is None or not grad else backprop
    if not isinstance(strategy, Backprop):
        raise TypeError(f"backprop must be a Backprop strategy or None, got {backprop!r}")
    counter = active(NFECounter)
    recorder = active(TrajectoryRecorder) if grad and penalise else None
    grid = None if recorder is None else recorder.plan(y0, t, method, options, event_fn,
                                                       state_index)
    if grid is not None:
        options = dense_output_options(method, options, t)
    if counter is not None:
        counter.solves += 1
    counted = _Evaluations(func, counter, method in tde.ADAPTIVE_METHODS, max_nfe)
    problem = Problem(func=counted, field=func, y0=y0, t=t if grid is None else grid.times,
                      rtol=rtol, atol=atol, method=method, options=options, event_fn=event_fn,
                      params=lambda: _params(params, func), forward_nfe=lambda: counted.calls,
                      decision=decision)
    solution = strategy.solve(problem)
    counted.backward = True
    if grid is None:
        return solution
    recorder.record(grid, solution, state_index)
    if isinstance(solution, Tensor):
        return grid.select(solution)
    return tuple(grid.select(x) for x in solution)
