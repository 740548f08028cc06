r"""Drop-in ``odeint`` and ``odeint_adjoint``: torchdiffeq's solvers, visible to the regularizer.

:func:`odeint` and :func:`odeint_adjoint` take exactly torchdiffeq 0.2.5's arguments, defaults
and return structure. Outside a :class:`TrajectoryRecorder` results and gradients are
torchdiffeq's, bit for bit (the one difference: a failure of the solver raises
:class:`~polyreg_cnf.engine.errors.SolverError` instead of torchdiffeq's ``AssertionError``).
While a recorder is active and gradients are on (a training step of a run with
``polyreg_cnf.callbacks.PolynomialTrajectoryRegularizer``) a solve is penalised as
:mod:`polyreg_cnf.engine.recording` describes, and returns the requested times only (a tensor or
a tuple, as torchdiffeq). All three are thin wrappers over :func:`polyreg_cnf.engine.solving.solve`.

:func:`odeint` backpropagates through the solver's operations. :func:`odeint_adjoint`
backpropagates with the restart-free adjoint
:func:`~polyreg_cnf.engine.adjoint.odeint_adjoint_carry` for adaptive methods (the interior
times then cost about one backward evaluation each) and with torchdiffeq's own adjoint where that
one cannot honour an argument (fixed-grid methods, an ``adjoint_method`` other than ``method``,
tensor tolerances, ...). :func:`odeint_checkpoint` (not a torchdiffeq function: the same call as
``odeint``, plus ``params``) backpropagates by step checkpoints: the memory of one step, and the
interior times cost nothing backward either.

Not penalised (passed through unchanged, with a one-time warning per recorder): calls with
``event_fn``, and fixed-grid methods without ``options["step_size"]`` (they step on the output
grid itself, so added times would change the solution).

:func:`~polyreg_cnf.engine.nfe.record_nfe` counts the function evaluations of drop-in solves.
:func:`redirect_torchdiffeq` rebinds, in given modules, the names bound to
torchdiffeq's ``odeint``/``odeint_adjoint`` (or to the ``torchdiffeq`` module itself) to the
drop-in, and restores them on exit.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor

from polyreg_cnf.engine import _torchdiffeq as tde
from polyreg_cnf.engine.observers import active
from polyreg_cnf.engine.recording import TrajectoryRecorder
from polyreg_cnf.engine.solving import solve
from polyreg_cnf.engine.strategies import Adjoint, Direct, StepCheckpoint

__all__ = ["odeint", "odeint_adjoint", "odeint_checkpoint", "redirect_torchdiffeq"]


def odeint(func: Callable[..., Any], y0: Tensor | tuple[Tensor, ...], t: Tensor, *,
           rtol: float | Tensor = 1e-7, atol: float | Tensor = 1e-9, method: str | None = None,
           options: dict[str, Any] | None = None,
           event_fn: Callable[..., Tensor] | None = None) -> Any:
    r"""``torchdiffeq.odeint``, plus the trajectory penalty while a recorder is active.

    Same arguments, defaults and result as torchdiffeq 0.2.5's ``odeint`` (see the module
    docstring for what an active :class:`TrajectoryRecorder` adds). Gradients flow through the
    solver's operations.

    Args:
        func: ``func(t, y) -> dy/dt``; y a tensor or a tuple of tensors.
        y0: Initial state at ``t[0]``: a tensor or a tuple of tensors.
        t: 1-D tensor of output times, strictly increasing or decreasing.
        rtol: Relative tolerance.
        atol: Absolute tolerance.
        method: A torchdiffeq method name (default dopri5).
        options: The method's options.
        event_fn: Stop when ``event_fn(t, y)`` crosses zero (never penalised).

    Returns:
        The solution at ``t`` (time first), a tensor or a tuple as ``y0``; with ``event_fn``,
        ``(event_t, solution)``.

    Example:
        >>> import torch
        >>> y = odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]))
        >>> torch.allclose(y[-1], torch.exp(torch.tensor(-1.0)).expand(2))
        True
    """
    return solve(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                 backprop=Direct(), event_fn=event_fn)


def odeint_adjoint(func: Callable[..., Any], y0: Tensor | tuple[Tensor, ...], t: Tensor, *,
                   rtol: float | Tensor = 1e-7, atol: float | Tensor = 1e-9,
                   method: str | None = None, options: dict[str, Any] | None = None,
                   event_fn: Callable[..., Tensor] | None = None,
                   adjoint_rtol: float | Tensor | None = None,
                   adjoint_atol: float | Tensor | None = None,
                   adjoint_method: str | None = None,
                   adjoint_options: dict[str, Any] | None = None,
                   adjoint_params: Iterable[Tensor] | None = None) -> Any:
    r"""``torchdiffeq.odeint_adjoint``, plus the trajectory penalty while a recorder is active.

    Same arguments, defaults, rules (``func`` must be an ``nn.Module`` unless ``adjoint_params``
    is given) and result as torchdiffeq 0.2.5's ``odeint_adjoint``. Outside a recorder it runs
    torchdiffeq's adjoint. Inside one, adaptive methods backpropagate with the restart-free adjoint
    (same gradients within the solver tolerance, the interior times cost about one backward
    evaluation each); everything else keeps torchdiffeq's adjoint.

    Args:
        func: ``func(t, y) -> dy/dt``.
        y0: Initial state: a tensor or a tuple of tensors.
        t: 1-D tensor of output times, strictly increasing or decreasing.
        rtol: Relative tolerance of the forward solve.
        atol: Absolute tolerance of the forward solve.
        method: A torchdiffeq method name (default dopri5).
        options: Forward solver options.
        event_fn: Stop when ``event_fn(t, y)`` crosses zero (never penalised).
        adjoint_rtol: Backward relative tolerance (default ``rtol``).
        adjoint_atol: Backward absolute tolerance (default ``atol``).
        adjoint_method: Backward method (default ``method``).
        adjoint_options: Backward options (default: ``options`` without ``norm``).
        adjoint_params: Tensors receiving gradients (default: ``func.parameters()``).

    Returns:
        The solution at ``t``, as :func:`odeint`.

    Example:
        >>> import torch
        >>> from polyreg_cnf.engine.nets import ODENet
        >>> func = ODENet(2, (8,))
        >>> y = odeint_adjoint(func, torch.ones(3, 2), torch.linspace(0, 1, 4))
        >>> y.sum().backward()
        >>> y.shape, all(p.grad is not None for p in func.parameters())
        (torch.Size([4, 3, 2]), True)
    """
    # Outside a recorder this is torchdiffeq's own adjoint; inside one, the restart-free adjoint
    # where it honours every argument.
    carry = active(TrajectoryRecorder) is not None
    strategy = Adjoint(carry=carry, rtol=adjoint_rtol, atol=adjoint_atol, method=adjoint_method,
                       options=adjoint_options)
    return solve(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                 backprop=strategy, params=adjoint_params, event_fn=event_fn)


def odeint_checkpoint(func: Callable[..., Any], y0: Tensor | tuple[Tensor, ...], t: Tensor, *,
                      rtol: float | Tensor = 1e-7, atol: float | Tensor = 1e-9,
                      method: str | None = None, options: dict[str, Any] | None = None,
                      params: Iterable[Tensor] | None = None) -> Any:
    r"""``torchdiffeq.odeint``'s call, backpropagating by step checkpoints; penalised in a recorder.

    A third choice next to :func:`odeint` (direct backprop: memory grows with NFE) and
    :func:`odeint_adjoint` (memory independent of NFE, but the backward solve stops at every
    output time): the forward solve keeps only the state at each accepted step, the backward pass
    recomputes and backpropagates one step at a time
    (:func:`polyreg_cnf.engine.step_checkpoint.checkpointed_solve`). Gradients are direct
    backprop's with the step sizes held fixed; the penalty's interior times cost no evaluation
    forward or backward. Swap it in where a model calls ``odeint_adjoint`` to save memory and
    the regularizer is attached.

    Args:
        func: ``func(t, y) -> dy/dt``; y a tensor or a tuple of tensors (one dtype).
        y0: Initial state at ``t[0]``.
        t: 1-D tensor of output times, strictly increasing or decreasing, not requiring grad.
        rtol: Relative tolerance.
        atol: Absolute tolerance.
        method: An adaptive Runge-Kutta method of torchdiffeq (default dopri5), or euler,
            midpoint, heun2, heun3 or rk4 (with ``options["step_size"]``).
        options: The method's options (``step_t``/``jump_t`` not supported).
        params: Every tensor ``func`` depends on that needs a gradient (default:
            ``func.parameters()``, which requires ``func`` to be an ``nn.Module``).

    Returns:
        The solution at ``t`` (time first), a tensor or a tuple as ``y0``.

    Raises:
        ValueError: For a non-Module ``func`` without ``params``, and for the cases
            :func:`~polyreg_cnf.engine.step_checkpoint.checkpointed_solve` refuses.

    Example:
        >>> import torch
        >>> from polyreg_cnf.engine.nets import ODENet
        >>> func = ODENet(2, (8,))
        >>> y0, t = torch.ones(3, 2), torch.linspace(0, 1, 4)
        >>> y = odeint_checkpoint(func, y0, t)
        >>> torch.equal(y, odeint(func, y0, t))  # the same forward solve, to the bit
        True
        >>> y.square().sum().backward()  # the gradients arrive at func's parameters
    """
    return solve(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                 backprop=StepCheckpoint(), params=params)


_PROXY = tde.proxy_module({"odeint": odeint, "odeint_adjoint": odeint_adjoint})
#: What each of torchdiffeq's objects (by id) is rebound to.
_REPLACEMENTS: dict[int, Any] = {
    key: {"odeint": odeint, "odeint_adjoint": odeint_adjoint, "module": _PROXY}[name]
    for key, name in tde.stock_solvers().items()}


@contextmanager
def redirect_torchdiffeq(modules: Iterable[types.ModuleType | str]
                         ) -> Iterator[list[tuple[str, str]]]:
    """Rebind torchdiffeq's solvers to the drop-in in the given modules, and restore on exit.

    Every module-level name bound to ``torchdiffeq.odeint`` or ``torchdiffeq.odeint_adjoint``
    (whatever it is called: ``from torchdiffeq import odeint_adjoint as odeint`` works) becomes
    the drop-in, and a name bound to the ``torchdiffeq`` module becomes a proxy module whose two
    solvers are the drop-in's (for ``torchdiffeq.odeint(...)`` calls). Names are looked up when
    the code runs, so the calls inside those modules' functions and methods go through the
    drop-in. Not caught: references kept elsewhere (an attribute ``self.solve = odeint``, a
    closure, ``functools.partial``, a default argument), imports inside function bodies, and
    modules not listed. On exit, each
    name still bound to the replacement gets its original back.

    Args:
        modules: Module objects or names (names not in ``sys.modules`` are skipped).

    Yields:
        ``(module name, variable name)`` of every rebound name.

    Example:
        >>> import types, torchdiffeq
        >>> m = types.ModuleType("user_model")
        >>> m.odeint = torchdiffeq.odeint_adjoint
        >>> with redirect_torchdiffeq([m]) as names:
        ...     print(names, m.odeint is odeint_adjoint)
        [('user_model', 'odeint')] True
        >>> m.odeint is torchdiffeq.odeint_adjoint
        True
    """
    changed: list[tuple[types.ModuleType, str, Any, Any]] = []
    seen: set[int] = set()
    try:
        for module in modules:
            if isinstance(module, str):
                module = sys.modules.get(module)
            if not isinstance(module, types.ModuleType) or id(module) in seen:
                continue
            seen.add(id(module))
            for name, value in list(vars(module).items()):
                new = _REPLACEMENTS.get(id(value))
                if new is not None and not name.startswith("__"):
                    setattr(module, name, new)
                    changed.append((module, name, value, new))
        yield [(m.__name__, name) for m, name, _, _ in changed]
    finally:
        for module, name, old, new in reversed(changed):
            if vars(module).get(name) is new:  # leave a name the user rebound meanwhile alone
                setattr(module, name, old)
