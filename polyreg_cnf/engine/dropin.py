r"""Drop-in ``odeint`` and ``odeint_adjoint``: torchdiffeq's solvers, visible to the regularizer.

:func:`odeint` and :func:`odeint_adjoint` take exactly torchdiffeq 0.2.5's arguments, defaults
and return structure. Outside a :class:`TrajectoryRecorder` they call torchdiffeq and nothing
else: results and gradients are torchdiffeq's, bit for bit. While a recorder is active and
gradients are on (a training step of a run with
``polyreg_cnf.callbacks.PolynomialTrajectoryRegularizer``) a solve over the grid
:math:`t_0, \dots, t_N` (increasing or decreasing, any :math:`t_0`)

1. draws K interior times :math:`t_0 + u_k (t_N - t_0)`, :math:`u_k \sim U(0, 1)`, from the
   recorder's own generator (the global RNG is never touched);
2. solves ONCE on the merged grid. The solver's steps do not depend on the output times (dense
   output), so the forward steps, the forward NFE and the values at the requested times are
   exactly those of the solve on the requested grid alone;
3. fits one degree-m polynomial per sample and dimension through the whole trajectory
   (requested and interior times, sorted increasing) of one state element and records
   :func:`~polyreg_cnf.engine.penalty.trajectory_polynomial_penalty`;
4. returns the requested times only (a tensor or a tuple, as torchdiffeq).

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

:func:`record_nfe` counts the function evaluations of drop-in solves into an
:class:`~polyreg_cnf.engine.nfe.NFECounter` (forward apart from backward) without touching the
user's function object. :func:`redirect_torchdiffeq` rebinds, in given modules, the names bound to
torchdiffeq's ``odeint``/``odeint_adjoint`` (or to the ``torchdiffeq`` module itself) to the
drop-in, and restores them on exit.
"""

from __future__ import annotations

import sys
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any

import torch
import torchdiffeq
from torch import Tensor, nn

from polyreg_cnf.engine.adjoint import odeint_adjoint_carry
from polyreg_cnf.engine.nfe import NFECounter
from polyreg_cnf.engine.penalty import sample_penalty_times, trajectory_polynomial_penalty
from polyreg_cnf.engine.step_checkpoint import checkpointed_solve

__all__ = ["TrajectoryRecorder", "odeint", "odeint_adjoint", "odeint_checkpoint", "record_nfe",
           "redirect_torchdiffeq"]

_TORCHDIFFEQ_ODEINT = torchdiffeq.odeint
_TORCHDIFFEQ_ADJOINT = torchdiffeq.odeint_adjoint

#: torchdiffeq's adaptive Runge-Kutta methods (``method=None`` means dopri5): their steps never
#: depend on the output times.
_ADAPTIVE = frozenset({"dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun"})
#: torchdiffeq's fixed-grid methods: with ``step_size`` the grid depends on t[0] and t[-1] only;
#: without it they step on the output times themselves.
_FIXED = frozenset({"euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams",
                    "implicit_adams", "fixed_adams"})

_CALLBACKS = ("callback_step", "callback_accept_step", "callback_reject_step")
_ALL_CALLBACKS = _CALLBACKS + tuple(name + "_adjoint" for name in _CALLBACKS)
#: Step callbacks of adaptive solvers and the NFECounter field each one counts.
_STEP_COUNTS = {"callback_accept_step": "accepted", "callback_reject_step": "rejected",
                "callback_accept_step_adjoint": "accepted_backward",
                "callback_reject_step_adjoint": "rejected_backward"}

_RECORDER: ContextVar[TrajectoryRecorder | None] = ContextVar("polyreg_cnf_recorder",
                                                              default=None)
_COUNTER: ContextVar[NFECounter | None] = ContextVar("polyreg_cnf_nfe_counter", default=None)


class TrajectoryRecorder:
    r"""Makes drop-in solves record the trajectory polynomial penalty while it is active.

    Use it as a context manager around a training step's forward pass (the Lightning callback
    does this for you); the penalties of every solve made inside (with gradients on) add up.

    Args:
        num_samples: K >= 0 interior times drawn per solve.
        order: Polynomial degree m >= 0 (a non-zero penalty needs K + 2 > m + 1 points).
        state_index: Which element of a tuple state the penalty looks at (a tensor state is
            penalised as a whole).
        generator: Source of the interior times; ``None`` uses a fresh generator seeded with 0.
            The global RNG is never used.

    Example:
        >>> A = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
        >>> recorder = TrajectoryRecorder(num_samples=3, order=1)
        >>> with recorder:
        ...     y = odeint(lambda t, y: y @ A.T, torch.ones(4, 2), torch.linspace(0, 1, 5))
        >>> y.shape, len(recorder.penalties), bool(recorder.penalty() > 0)
        (torch.Size([5, 4, 2]), 1, True)
    """

    def __init__(self, num_samples: int = 2, order: int = 1, *, state_index: int = 0,
                 generator: torch.Generator | None = None) -> None:
        for name, value in (("num_samples", num_samples), ("order", order),
                            ("state_index", state_index)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got "
                            f"{type(generator).__name__}")
        self.num_samples = num_samples
        self.order = order
        self.state_index = state_index
        self.generator = torch.Generator().manual_seed(0) if generator is None else generator
        #: Penalties recorded since the last :meth:`clear`, one per penalised solve.
        self.penalties: list[Tensor] = []
        #: Drop-in solves seen while active since the last :meth:`clear` (penalised or not).
        self.solves = 0
        self._tokens: list[Token] = []
        self._warned: set[str] = set()

    def penalty(self) -> Tensor | None:
        """Sum of the recorded penalties, or None if nothing was recorded."""
        if not self.penalties:
            return None
        return torch.stack(self.penalties).sum()

    def clear(self) -> None:
        """Drop what was recorded (the generator's state is kept)."""
        self.penalties = []
        self.solves = 0

    def __enter__(self) -> TrajectoryRecorder:
        self._tokens.append(_RECORDER.set(self))
        return self

    def __exit__(self, *exc: object) -> None:
        _reset(_RECORDER, self._tokens.pop())

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=4)

    def __repr__(self) -> str:
        return (f"TrajectoryRecorder(num_samples={self.num_samples}, order={self.order}, "
                f"state_index={self.state_index})")


def _reset(var: ContextVar, token: Token) -> None:
    try:
        var.reset(token)
    except ValueError:  # exited from another context (a different thread): just switch off
        var.set(None)


@contextmanager
def record_nfe(counter: NFECounter) -> Iterator[NFECounter]:
    """Count the function evaluations of the drop-in solves made inside into ``counter``.

    Evaluations made after a solve returned (the adjoint's backward pass) count as backward, even
    when backward runs after the block exits. The user's function object is never modified.

    Example:
        >>> counter = NFECounter()
        >>> with record_nfe(counter):
        ...     _ = odeint(lambda t, y: -y, torch.ones(3), torch.tensor([0.0, 1.0]))
        >>> counter.forward > 0 and counter.solves == 1
        True
    """
    if not isinstance(counter, NFECounter):
        raise TypeError(f"counter must be an NFECounter, got {type(counter).__name__}")
    token = _COUNTER.set(counter)
    try:
        yield counter
    finally:
        _reset(_COUNTER, token)


# ------------------------------------------------------------------------------ counting
class _CountedFunc:
    """The user's ``func`` for one solve, counting its calls; callbacks are passed on.

    A separate object (never an attribute set on ``func``): users keep their own counters on
    their function objects. Calls after the solve returned come from the adjoint: backward.
    """

    def __init__(self, func: Callable[..., Any], counter: NFECounter, adaptive: bool) -> None:
        self.func = func
        self.counter = counter
        self.backward = False
        for name in _ALL_CALLBACKS:
            user = getattr(func, name, None)
            field = _STEP_COUNTS.get(name) if adaptive else None
            if user is not None or field is not None:
                setattr(self, name, _step_callback(counter, field, user))

    def __call__(self, t: Tensor, y: Any) -> Any:
        if self.backward:
            self.counter.backward += 1
        else:
            self.counter.forward += 1
        return self.func(t, y)


def _step_callback(counter: NFECounter, field: str | None,
                   user: Callable[..., Any] | None) -> Callable[..., None]:
    def callback(t0: Tensor, y0: Any, dt: Tensor) -> None:
        if field is not None:
            setattr(counter, field, getattr(counter, field) + 1)
        if user is not None:
            user(t0, y0, dt)

    return callback


# ------------------------------------------------------------------------------ the grid
@dataclass
class PenaltyGrid:
    """A requested output grid merged with the penalty's interior times.

    Attributes:
        times: Requested and interior times, strictly monotone in the requested grid's direction.
        requested: Positions of the requested times within ``times``.
        decreasing: Whether the grid runs backwards in time.
    """

    times: Tensor
    requested: Tensor
    decreasing: bool

    def select(self, x: Tensor) -> Tensor:
        """The rows of a trajectory (time first) at the requested times."""
        # torchdiffeq accepts t on another device than y0 (it moves t): so must the selection
        return x.index_select(0, self.requested.to(x.device))

    def penalty(self, z: Tensor, order: int) -> Tensor:
        """The penalty of the trajectory ``z`` (time first) over every time, sorted increasing."""
        times = self.times
        if self.decreasing:
            times, z = times.flip(0), z.flip(0)
        if z.ndim == 1:  # a scalar state: one sample of one dimension
            z = z.unsqueeze(1)
        return trajectory_polynomial_penalty(times, z, order)


def penalty_grid(t: Tensor, num_samples: int, generator: torch.Generator | None) -> PenaltyGrid:
    """Merge the grid ``t`` (1-D, strictly monotone, len >= 2) with K interior times.

    The interior times are ``t[0] + u (t[-1] - t[0])`` with K sorted uniforms u from
    ``generator`` (the global RNG when None), so they are differentiable with respect to the
    grid's ends. A time that rounds onto a requested time (or onto another interior time) is
    dropped: the merged grid must stay strictly monotone.
    """
    u = sample_penalty_times(num_samples, 0.0, 1.0, generator=generator,
                             dtype=torch.float64)[1:-1]
    u = u.to(device=t.device, dtype=t.dtype)
    inner = t[0] + u * (t[-1] - t[0])
    keep = ~torch.isin(inner.detach(), t.detach())
    if len(inner) > 1:
        keep[1:] &= inner.detach()[1:] != inner.detach()[:-1]
    inner = inner[keep]
    decreasing = bool(t[-1] < t[0])
    merged = torch.cat([t, inner])
    order = torch.sort(merged.detach(), descending=decreasing, stable=True).indices
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order), device=order.device)
    return PenaltyGrid(merged[order], position[:len(t)], decreasing)


# ------------------------------------------------------------------------------ the drop-in
def _state_element(recorder: TrajectoryRecorder, y0: Any) -> None:
    if isinstance(y0, tuple) and recorder.state_index >= len(y0):
        raise ValueError(f"state_index={recorder.state_index} is out of range for a tuple state "
                         f"of {len(y0)} tensors; valid: 0..{len(y0) - 1}")


def _plan(y0: Any, t: Any, method: str | None, options: dict[str, Any] | None,
          event_fn: Any) -> tuple[TrajectoryRecorder, PenaltyGrid] | None:
    """What the active recorder does with this solve: None = pass through unpenalised."""
    recorder = _RECORDER.get()
    if recorder is None or not torch.is_grad_enabled():
        return None
    recorder.solves += 1
    if event_fn is not None:
        recorder._warn_once("event", "polyreg_cnf.odeint: solves with event_fn are not "
                            "penalised (their end time is not known in advance); passed through "
                            "to torchdiffeq unchanged.")
        return None
    if not isinstance(t, Tensor) or t.ndim != 1 or len(t) < 2 or not t.is_floating_point():
        return None  # torchdiffeq reports invalid grids itself; a single time has no trajectory
    name = "dopri5" if method is None else method
    steps_on_grid = name in _FIXED and (options or {}).get("step_size") is None
    if steps_on_grid or name not in _ADAPTIVE | _FIXED:
        recorder._warn_once(f"method:{name}", (
            f"polyreg_cnf.odeint: method={name!r} without options['step_size'] steps on the "
            f"output times themselves, so interior times would change the solution; these "
            f"solves are not penalised. Give a step_size (or an adaptive method) to penalise "
            f"them." if steps_on_grid else
            f"polyreg_cnf.odeint: method={name!r} is not penalised (no dense output)."))
        return None
    _state_element(recorder, y0)
    return recorder, penalty_grid(t, recorder.num_samples, recorder.generator)


def _finish(plan: tuple[TrajectoryRecorder, PenaltyGrid], solution: Tensor | tuple[Tensor, ...]
            ) -> Tensor | tuple[Tensor, ...]:
    recorder, grid = plan
    if isinstance(solution, Tensor):
        recorder.penalties.append(grid.penalty(solution, recorder.order))
        return grid.select(solution)
    recorder.penalties.append(grid.penalty(solution[recorder.state_index], recorder.order))
    return tuple(grid.select(x) for x in solution)


def _wrap(func: Callable[..., Any], method: str | None) -> Callable[..., Any]:
    counter = _COUNTER.get()
    if counter is None:
        return func
    counter.solves += 1
    return _CountedFunc(func, counter, adaptive=(method or "dopri5") in _ADAPTIVE)


def _done(func: Callable[..., Any]) -> None:
    if isinstance(func, _CountedFunc):
        func.backward = True


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
        >>> y = odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]))
        >>> torch.allclose(y[-1], torch.exp(torch.tensor(-1.0)).expand(2))
        True
    """
    if _RECORDER.get() is None and _COUNTER.get() is None:
        return _TORCHDIFFEQ_ODEINT(func, y0, t, rtol=rtol, atol=atol, method=method,
                                   options=options, event_fn=event_fn)
    plan = _plan(y0, t, method, options, event_fn)
    counted = _wrap(func, method)
    times = t if plan is None else plan[1].times
    solution = _TORCHDIFFEQ_ODEINT(counted, y0, times, rtol=rtol, atol=atol, method=method,
                                   options=options, event_fn=event_fn)
    _done(counted)
    return solution if plan is None else _finish(plan, solution)


def _carry_accepts(y0: Any, method: str | None, rtol: Any, atol: Any,
                   options: dict[str, Any] | None, adjoint_rtol: Any, adjoint_atol: Any,
                   adjoint_method: str | None, adjoint_options: dict[str, Any] | None) -> bool:
    """Whether the restart-free adjoint honours every argument (else torchdiffeq's adjoint)."""
    name = "dopri5" if method is None else method
    if name not in _ADAPTIVE or (adjoint_method is not None and adjoint_method != name):
        return False
    numbers = (rtol, atol) + tuple(x for x in (adjoint_rtol, adjoint_atol) if x is not None)
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in numbers):
        return False
    states = (y0,) if isinstance(y0, Tensor) else y0
    if len({y.dtype for y in states}) != 1:
        return False
    options = options or {}
    backward = adjoint_options if adjoint_options is not None else options
    if "step_t" in backward or "jump_t" in backward:
        return False
    # torchdiffeq hands a tensor state's norm the tensor, the carry adjoint a 1-tuple
    return not (isinstance(y0, Tensor) and callable(options.get("norm")))


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
    is given) and result as torchdiffeq 0.2.5's ``odeint_adjoint``. Outside a recorder it IS
    torchdiffeq's. Inside one, adaptive methods backpropagate with the restart-free adjoint
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
        >>> from polyreg_cnf.engine.nets import ODENet
        >>> func = ODENet(2, (8,))
        >>> y = odeint_adjoint(func, torch.ones(3, 2), torch.linspace(0, 1, 4))
        >>> y.sum().backward()
        >>> y.shape, all(p.grad is not None for p in func.parameters())
        (torch.Size([4, 3, 2]), True)
    """
    kwargs = dict(rtol=rtol, atol=atol, method=method, options=options, event_fn=event_fn,
                  adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol,
                  adjoint_method=adjoint_method, adjoint_options=adjoint_options)
    if (_RECORDER.get() is None and _COUNTER.get() is None) or (
            adjoint_params is None and not isinstance(func, nn.Module)):
        # the second case is torchdiffeq's own error: let it say so in its words
        return _TORCHDIFFEQ_ADJOINT(func, y0, t, adjoint_params=adjoint_params, **kwargs)
    if adjoint_params is None:
        adjoint_params = _find_parameters(func)
    adjoint_params = tuple(adjoint_params)
    plan = _plan(y0, t, method, options, event_fn)
    counted = _wrap(func, method)
    if plan is None:
        solution = _TORCHDIFFEQ_ADJOINT(counted, y0, t, adjoint_params=adjoint_params, **kwargs)
    elif _carry_accepts(y0, method, rtol, atol, options, adjoint_rtol, adjoint_atol,
                        adjoint_method, adjoint_options):
        solution = odeint_adjoint_carry(
            counted, y0, plan[1].times, rtol=rtol, atol=atol,
            method="dopri5" if method is None else method, options=options,
            adjoint_params=adjoint_params, adjoint_rtol=adjoint_rtol,
            adjoint_atol=adjoint_atol, adjoint_options=adjoint_options)
    else:
        solution = _TORCHDIFFEQ_ADJOINT(counted, y0, plan[1].times,
                                        adjoint_params=adjoint_params, **kwargs)
    _done(counted)
    return solution if plan is None else _finish(plan, solution)


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
        method: An adaptive Runge-Kutta method of torchdiffeq (default dopri5).
        options: The method's options (``step_t``/``jump_t`` not supported).
        params: Every tensor ``func`` depends on that needs a gradient (default:
            ``func.parameters()``, which requires ``func`` to be an ``nn.Module``).

    Returns:
        The solution at ``t`` (time first), a tensor or a tuple as ``y0``.

    Raises:
        ValueError: For a non-Module ``func`` without ``params``, and for the cases
            :func:`~polyreg_cnf.engine.step_checkpoint.checkpointed_solve` refuses.

    Example:
        >>> from polyreg_cnf.engine.nets import ODENet
        >>> func = ODENet(2, (8,))
        >>> y0, t = torch.ones(3, 2), torch.linspace(0, 1, 4)
        >>> y = odeint_checkpoint(func, y0, t)
        >>> torch.equal(y, odeint(func, y0, t))  # the same forward solve, to the bit
        True
        >>> y.square().sum().backward()  # the gradients arrive at func's parameters
    """
    if params is None:
        if not isinstance(func, nn.Module):
            raise ValueError(f"odeint_checkpoint: func is a {type(func).__name__}, not an "
                             f"nn.Module, so its parameters cannot be found; pass params= "
                             f"(every tensor func depends on that needs a gradient)")
        params = _find_parameters(func)
    params = tuple(params)
    plan = _plan(y0, t, method, options, None)
    counted = _wrap(func, method)
    times = t if plan is None else plan[1].times
    solution = checkpointed_solve(counted, y0, times, params=params, rtol=rtol, atol=atol,
                                  method=method or "dopri5", options=options)
    _done(counted)
    return solution if plan is None else _finish(plan, solution)


def _find_parameters(module: nn.Module) -> tuple[Tensor, ...]:
    """torchdiffeq's default ``adjoint_params`` (its helper also handles DataParallel replicas)."""
    from torchdiffeq._impl.adjoint import find_parameters

    return tuple(find_parameters(module))


# ------------------------------------------------------------------------------ redirection
class _TorchdiffeqProxy(types.ModuleType):
    """Stands in for the ``torchdiffeq`` module: its two solvers are the drop-in's."""

    def __init__(self) -> None:
        super().__init__("torchdiffeq", torchdiffeq.__doc__)
        self.odeint = odeint
        self.odeint_adjoint = odeint_adjoint

    def __getattr__(self, name: str) -> Any:
        return getattr(torchdiffeq, name)


_PROXY = _TorchdiffeqProxy()
_REPLACEMENTS: dict[int, Any] = {id(_TORCHDIFFEQ_ODEINT): odeint,
                                 id(_TORCHDIFFEQ_ADJOINT): odeint_adjoint, id(torchdiffeq): _PROXY}


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
        >>> import types
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
