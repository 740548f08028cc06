r"""A continuous adjoint that does not restart step-size selection at every output time.

torchdiffeq's ``odeint_adjoint`` integrates the adjoint system backwards one output interval at a
time, each with a fresh ``odeint`` call: every interval picks its first step again (2 extra
evaluations with dopri5), starts from that small step and ramps up. A solve output at
:math:`K + 2` times (the trajectory penalty's :math:`0 < t_1 < \dots < t_K < T`) therefore costs
more backward evaluations than the same solve output at :math:`[0, T]` only, although the forward
steps are identical. :func:`odeint_adjoint_carry` computes the same gradients without those
restarts: the step size carries over from one interval into the next and the last step lands on
the end instead of overshooting it.

Maths (Chen et al. 2018). For :math:`\dot y = f(t, y; \theta)` observed at
:math:`t_0, \dots, t_N` with a loss :math:`L(y(t_0), \dots, y(t_N))`, let
:math:`g_i = \partial L / \partial y(t_i)`. The adjoint :math:`a(t) = dL/dy(t)` and the parameter
adjoint :math:`a_\theta` solve, backwards from :math:`t_N` with :math:`a(t_N) = g_N`,
:math:`a_\theta(t_N) = 0`,

.. math::

    \dot a = -a^\top \frac{\partial f}{\partial y}, \qquad
    \dot a_\theta = -a^\top \frac{\partial f}{\partial \theta}, \qquad
    a(t_i^-) = a(t_i^+) + g_i,

alongside the state itself (re-integrated backwards from the stored :math:`y(t_N)`).
Then :math:`dL/dy_0 = a(t_0)` and :math:`dL/d\theta = a_\theta(t_0)`. Times:
:math:`dL/dt_i = f(t_i, y_i)^\top g_i` for :math:`i \ge 1` and
:math:`dL/dt_0 = -\sum_{i \ge 1} f(t_i, y_i)^\top g_i + \int_{t_0}^{t_N} a^\top
\partial f / \partial t \, dt` (an extra scalar state, as in torchdiffeq).

Why the output times stay step barriers: the jump :math:`g_i` makes :math:`a` discontinuous at
:math:`t_i`; a Runge-Kutta step across it would lose its order, so the backward solve must stop
there and evaluate the right-hand side again with the new :math:`a` (one evaluation per output
time, and the step that straddled :math:`t_i` is split in two). What need not happen there is a
step-size restart: the backward pass is one ``odeint`` per interval, as torchdiffeq's, but each
started with the step size the previous one ended on (``first_step``, recorded through
``callback_step``/``callback_accept_step``) and with the state reset to its stored forward value.
The last step of every interval lands on the interval's end (``step_t``) instead of overshooting
it, and the first backward step is the last step the forward solve accepted
(``seed_first_step``) rather than a fresh selection (which costs an evaluation and starts ~100
times too small). With dopri5 a backward pass therefore costs :math:`N + 6\,(\text{accepted} +
\text{rejected})` evaluations: one to start each interval, six per step (plus one per user
``jump_t`` passed, and :math:`N` evaluations of :math:`f(t_i, y_i)` if ``t`` requires grad).

The forward options' ``jump_t`` (times where :math:`f` is discontinuous) and ``step_t`` (times a
step must land on) hold for the backward system too, whose right-hand side evaluates :math:`f`:
inside an interval they become that interval's ``jump_t``/``step_t``, and an interval that starts
on a jump time evaluates its first right-hand side one ulp inside the interval (on the side of the
discontinuity it integrates into, as torchdiffeq does after stopping at a jump).

References:
    R. T. Q. Chen, Y. Rubanova, J. Bettencourt, D. Duvenaud, "Neural Ordinary Differential
    Equations", NeurIPS 2018 (the continuous adjoint).
    P. Kidger, R. T. Q. Chen, T. Lyons, "'Hey, that's not an ODE': Faster ODE Adjoints via
    Seminorms", ICML 2021 (``adjoint_options={"norm": "seminorm"}``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from polyreg_cnf.engine import _torchdiffeq as tde
from polyreg_cnf.engine._checks import check_times

__all__ = ["odeint_adjoint_carry"]

State = tuple[Tensor, ...]
TupleField = Callable[[Tensor, State], State]
Norm = Callable[[State], Tensor]

#: torchdiffeq options that place steps: the forward solve's hold for the backward one too.
_BARRIERS = ("step_t", "jump_t")


@dataclass
class _Settings:
    """Everything the autograd Function needs besides tensors (kept off the autograd graph)."""

    func: Any
    n_state: int
    rtol: float
    atol: float
    method: str
    options: dict[str, Any]
    adjoint_rtol: float
    adjoint_atol: float
    adjoint_options: dict[str, Any]
    seminorm: bool
    state_norm: Norm | None
    adjoint_norm: Norm | None
    seed_first_step: bool
    t_requires_grad: bool
    #: Sorted, unique float64 times where the backward solve must stop and re-evaluate (``f`` is
    #: discontinuous there) or only land, from the forward and the adjoint options; disjoint.
    jump_t: Tensor
    step_t: Tensor


class _StepTracker(tde.StepRelay):
    """Relays torchdiffeq's step callbacks to the caller's function and remembers the size of
    the last accepted step *as proposed by the error control* (the value ``callback_step``
    receives, before a step is clipped to land on a barrier), so the next solve can start
    with it.

    Args:
        func: The caller's right-hand side; its callbacks are called as ``name + suffix``.
        unwrap: Hand the callbacks the state's only tensor rather than the tuple.
    """

    suffix = ""

    def __init__(self, func: Any, unwrap: bool = False) -> None:
        super().__init__(func)
        self.unwrap = unwrap
        self._proposed: Tensor | None = None
        self.accepted_step: Tensor | None = None

    # torchdiffeq calls these with (t0, y0, dt); dt is positive in the solver's own time.
    def callback_step(self, t0: Tensor, y0: State, dt: Tensor) -> None:
        self._proposed = dt.detach().clone()
        self.relay("callback_step" + self.suffix, t0, y0, dt)

    def callback_accept_step(self, t0: Tensor, y0: State, dt: Tensor) -> None:
        self.accepted_step = self._proposed if self._proposed is not None else dt.detach()
        self.relay("callback_accept_step" + self.suffix, t0, y0, dt)

    def callback_reject_step(self, t0: Tensor, y0: State, dt: Tensor) -> None:
        self.relay("callback_reject_step" + self.suffix, t0, y0, dt)

    def caller_form(self, t0: Tensor, y0: State) -> tuple[Tensor, State | Tensor]:
        return t0, y0[0] if self.unwrap else y0


class _AugmentedDynamics(_StepTracker):
    r"""Right-hand side of the augmented backward system for one backward pass.

    State: ``(a_t, *y, *a_y, *a_theta)`` where ``a_t`` is the scalar time adjoint. Returns
    :math:`(-a^\top \partial f / \partial t,\ f,\ -a^\top \partial f / \partial y,\
    -a^\top \partial f / \partial \theta)`, the vector-Jacobian products from one evaluation of
    ``func`` under ``enable_grad`` and one ``torch.autograd.grad``. Its backward steps reach
    the caller's ``callback_*_adjoint`` methods, and the last one seeds the next interval.
    """

    suffix = "_adjoint"

    def __init__(self, func: Any, n_state: int, params: tuple[Tensor, ...],
                 t_requires_grad: bool) -> None:
        super().__init__(func)
        self.n_state = n_state
        self.params = params
        self.t_requires_grad = t_requires_grad

    def __call__(self, t: Tensor, aug: State) -> State:
        n = self.n_state
        y, adj = aug[1:1 + n], aug[1 + n:1 + 2 * n]
        with torch.enable_grad():
            t_in = t.detach().requires_grad_(self.t_requires_grad)
            y_in = tuple(x.detach().requires_grad_(True) for x in y)
            f = tuple(self.func(t_in, y_in))
            if len(f) != n:
                raise ValueError(f"func returned {len(f)} tensors for a state of {n}")
            # Outputs that do not depend on anything differentiable add nothing to the vjp.
            used = [i for i, fi in enumerate(f) if fi.requires_grad]
            inputs = ((t_in,) if self.t_requires_grad else ()) + y_in + self.params
            if used:
                grads = torch.autograd.grad([f[i] for i in used], inputs,
                                            grad_outputs=[-adj[i] for i in used],
                                            allow_unused=True)
            else:
                grads = (None,) * len(inputs)
        grads = tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads))
        if self.t_requires_grad:
            vjp_t, grads = grads[0].to(aug[0].dtype).reshape(()), grads[1:]
        else:
            vjp_t = torch.zeros_like(aug[0])
        vjp_y, vjp_params = grads[:n], grads[n:]
        return (vjp_t, *(fi.detach() for fi in f), *vjp_y, *vjp_params)


class _CarryAdjoint(torch.autograd.Function):
    """Forward: ``odeint`` without a graph. Backward: the augmented system, restart-free."""

    @staticmethod
    def forward(ctx: Any, settings: _Settings, t: Tensor, *tensors: Tensor) -> State:
        n = settings.n_state
        y0, params = tensors[:n], tensors[n:]
        with torch.no_grad():
            traj = tuple(tde.odeint(settings.func, y0, t, rtol=settings.rtol, atol=settings.atol,
                                    method=settings.method, options=settings.options))
        ctx.settings = settings
        ctx.save_for_backward(t, *traj, *params)
        return traj

    @staticmethod
    def backward(ctx: Any, *grad_traj: Tensor | None) -> tuple[Tensor | None, ...]:
        settings: _Settings = ctx.settings
        n = settings.n_state
        saved = ctx.saved_tensors
        t, traj, params = saved[0], saved[1:1 + n], tuple(saved[1 + n:])
        grads = tuple(torch.zeros_like(y) if g is None else g for y, g in zip(traj, grad_traj))
        with torch.no_grad():
            adj_y0, adj_params, time_vjps = _backward_intervals(settings, t, traj, grads, params)
        return (None, time_vjps, *adj_y0, *adj_params)


def _time_jumps(settings: _Settings, t: Tensor, traj: State, grads: State,
                time_vjps: Tensor | None, a_t: Tensor, i: int) -> Tensor:
    """Add :math:`dL/dt_i = f(t_i, y_i)^\\top g_i` to the time vjps (only if t needs a grad)."""
    if time_vjps is None:
        return a_t
    f = settings.func(t[i], tuple(y[i] for y in traj))
    dl_dti = sum((fi * g[i]).sum() for fi, g in zip(f, grads))
    time_vjps[i] = dl_dti
    return a_t - dl_dti.to(a_t.dtype)


def _seed_step(settings: _Settings, opts: dict[str, Any]) -> Tensor | None:
    """First backward step: the forward solve's last one, unless the caller fixed a first step."""
    if not settings.seed_first_step or "first_step" in opts:
        return None
    return settings.func.accepted_step


def _adjoint_solve_options(settings: _Settings, params: tuple[Tensor, ...]) -> dict[str, Any]:
    """The backward solve's options with its norm over ``(a_t, *y, *a_y, *a_theta)``."""
    n = settings.n_state
    opts = dict(settings.adjoint_options)
    if settings.adjoint_norm is not None:
        opts["norm"] = settings.adjoint_norm
        return opts
    state_norm = settings.state_norm or tde.mixed_norm

    def norm(aug: State) -> Tensor:
        # The time adjoint and the state/adjoint-of-state always count; the parameter adjoints
        # only without seminorm (they never feed back into the dynamics, Kidger et al. 2021).
        parts = [aug[0].abs(), state_norm(aug[1:1 + n]), state_norm(aug[1 + n:1 + 2 * n])]
        if not settings.seminorm and params:
            parts.append(tde.mixed_norm(aug[1 + 2 * n:]))
        return torch.stack([torch.as_tensor(p, dtype=aug[0].dtype) for p in parts]).max()

    opts["norm"] = norm
    return opts


def _interval_grid(settings: _Settings, start: Tensor, end: Tensor, state_dtype: torch.dtype
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """Time grid and ``step_t``/``jump_t`` of the backward solve over one output interval.

    The interval's end is a ``step_t`` (the final step lands on it instead of overshooting); the
    user's barrier times strictly inside the interval keep their kind. If ``f`` jumps at the
    start, the solve starts one ulp (of the dtype ``f`` sees) inside the interval, so its first
    evaluation is on the side it integrates into.
    """
    lo, hi = torch.minimum(start, end), torch.maximum(start, end)

    def inside(times: Tensor) -> Tensor:
        return times[(times > lo) & (times < hi)]

    barriers = {"step_t": torch.cat([end.reshape(1), inside(settings.step_t)])}
    jumps = inside(settings.jump_t)
    if len(jumps):
        barriers["jump_t"] = jumps
    if bool((settings.jump_t == start).any()):
        start = torch.nextafter(start.to(state_dtype), end.to(state_dtype)).to(start.dtype)
    return torch.stack([start, end]), barriers


def _backward_intervals(settings: _Settings, t: Tensor, traj: State, grads: State,
                        params: tuple[Tensor, ...]
                        ) -> tuple[State, tuple[Tensor, ...], Tensor | None]:
    """One ``odeint`` per output interval, each started with the step the previous one ended on.

    The last step of every interval is clipped onto the interval's end (``step_t``), so no work
    is spent beyond it and the step-size proposal that was clipped is the one carried on.
    """
    n = settings.n_state
    dtype = traj[0].dtype
    t = t.detach()
    # torchdiffeq keeps time in float64 whatever the state's dtype; so do the barriers.
    t64 = t.to(torch.float64)
    a_t = torch.zeros((), dtype=dtype, device=t.device)
    adj = [g[-1] for g in grads]
    adj_params = [torch.zeros_like(p) for p in params]
    time_vjps = torch.empty(len(t), dtype=t.dtype, device=t.device) \
        if settings.t_requires_grad else None
    dynamics = _AugmentedDynamics(settings.func, n, params, settings.t_requires_grad)
    base = _adjoint_solve_options(settings, params)
    carried = _seed_step(settings, base)
    for i in range(len(t) - 1, 0, -1):
        a_t = _time_jumps(settings, t, traj, grads, time_vjps, a_t, i)
        grid, barriers = _interval_grid(settings, t64[i], t64[i - 1], dtype)
        opts = {**base, **barriers}
        if carried is not None:
            opts["first_step"] = carried
        aug0 = (a_t, *(y[i] for y in traj), *adj, *adj_params)
        sol = tde.odeint(dynamics, aug0, grid, rtol=settings.adjoint_rtol,
                         atol=settings.adjoint_atol, method=settings.method, options=opts)
        end = [s[1] for s in sol]
        a_t = end[0]
        # The state restarts from the stored forward value; the adjoint takes the jump g_{i-1}.
        adj = [a + g[i - 1] for a, g in zip(end[1 + n:1 + 2 * n], grads)]
        adj_params = end[1 + 2 * n:]
        if dynamics.accepted_step is not None:
            carried = dynamics.accepted_step
    if time_vjps is not None:
        time_vjps[0] = a_t.to(time_vjps.dtype)
    return tuple(adj), tuple(adj_params), time_vjps


def odeint_adjoint_carry(func: TupleField, y0: State | Tensor, t: Tensor, *, rtol: float,
                         atol: float, method: str, options: dict[str, Any] | None,
                         adjoint_params: Sequence[Tensor],
                         adjoint_rtol: float | None = None, adjoint_atol: float | None = None,
                         adjoint_options: dict[str, Any] | None = None,
                         seed_first_step: bool = True) -> State | Tensor:
    r"""Solve :math:`\dot y = f(t, y)` and backpropagate with a restart-free continuous adjoint.

    Same semantics as ``torchdiffeq.odeint_adjoint``: returns the trajectory at the times ``t``
    (first dimension = time) and, on backward, gradients for ``y0``, ``adjoint_params`` and ``t``
    (if it requires grad) from the augmented adjoint system integrated backwards (see the module
    docstring for the maths). Unlike torchdiffeq, the backward pass keeps the step size from one
    output interval to the next and never steps beyond an interval's end, so asking for extra
    output times costs about one evaluation each instead of a fresh step-size ramp.

    Args:
        func: ``func(t, y) -> dy/dt`` for a tuple state (or a single tensor). Its optional
            ``callback_*_adjoint`` methods are called for the backward steps.
        y0: Initial state: a tuple of tensors (one dtype) or one tensor.
        t: Output times, 1-D, strictly increasing or decreasing; may require grad.
        rtol: Relative tolerance of the forward solve.
        atol: Absolute tolerance of the forward solve.
        method: An adaptive torchdiffeq method (one of ``_torchdiffeq.ADAPTIVE_METHODS``).
        options: Forward solver options (as for ``odeint``); ``norm`` may be a callable on the
            state tuple. Its ``jump_t`` and ``step_t`` (tensors or sequences of times) also
            apply to the backward pass.
        adjoint_params: Tensors ``func`` depends on that should receive gradients; those that
            do not require grad are dropped.
        adjoint_rtol: Backward relative tolerance (default ``rtol``).
        adjoint_atol: Backward absolute tolerance (default ``atol``).
        adjoint_options: Backward solver options (default: ``options`` without ``norm``);
            ``{"norm": "seminorm"}`` leaves the parameter adjoints out of the error estimate.
            Its ``jump_t``/``step_t`` are added to those of ``options``; the output times are
            step barriers of the backward pass in any case.
        seed_first_step: Start the backward pass with the last step the forward solve accepted
            instead of selecting a first step from scratch (ignored if ``adjoint_options`` sets
            ``first_step``).

    Returns:
        The solution at every time of ``t``: a tuple of tensors of shape (len(t), ...) for a
        tuple ``y0``, else one tensor.

    Raises:
        TypeError: If ``y0`` or ``t`` is not a tensor (tuple) or ``adjoint_params`` holds a
            non-tensor.
        ValueError: For a fixed-grid method, fewer than 2 times, mixed dtypes, an adjoint
            ``norm`` that is neither ``"seminorm"`` nor callable, or ``step_t``/``jump_t`` that
            are not 1-D finite times.

    Example:
        >>> A = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], requires_grad=True)
        >>> y = odeint_adjoint_carry(lambda t, y: (y[0] @ A.T,), (torch.ones(1, 2),),
        ...                          torch.linspace(0, 1, 4), rtol=1e-6, atol=1e-8,
        ...                          method="dopri5", options=None, adjoint_params=(A,))
        >>> y[0].shape
        torch.Size([4, 1, 2])
    """
    is_tensor = isinstance(y0, Tensor)
    state = (y0,) if is_tensor else y0
    if not isinstance(state, tuple) or not state or not all(isinstance(y, Tensor) for y in state):
        raise TypeError(f"y0 must be a tensor or a non-empty tuple of tensors, got "
                        f"{type(y0).__name__}")
    if len({y.dtype for y in state}) != 1:
        raise ValueError(f"all parts of y0 must share one dtype, got {[y.dtype for y in state]}")
    if not isinstance(t, Tensor) or t.ndim != 1 or len(t) < 2:
        raise ValueError(f"t must be a 1-D tensor of at least 2 times, got "
                         f"{t if not isinstance(t, Tensor) else tuple(t.shape)}")
    if method not in tde.ADAPTIVE_METHODS:
        raise ValueError(f"odeint_adjoint_carry needs an adaptive method, got {method!r}; "
                         f"valid: {', '.join(tde.ADAPTIVE_METHODS)}")
    params = tuple(adjoint_params)
    if not all(isinstance(p, Tensor) for p in params):
        raise TypeError(f"adjoint_params must be tensors, got {[type(p).__name__ for p in params]}")
    params = tuple(p for p in params if p.requires_grad)
    options = dict(options or {})
    barriers = {key: [] for key in _BARRIERS}
    for key in _BARRIERS:
        if key in options:
            options[key] = check_times(f"options[{key!r}]", options[key], t.device)
            barriers[key].append(options[key])
    adjoint_options = ({k: v for k, v in options.items() if k not in ("norm", *_BARRIERS)}
                       if adjoint_options is None else dict(adjoint_options))
    for key in _BARRIERS:
        if key in adjoint_options:
            barriers[key].append(check_times(f"adjoint_options[{key!r}]",
                                                adjoint_options.pop(key), t.device))
    # torchdiffeq refuses a time listed twice; a time that is both a jump and a step is a jump.
    jump_t, step_t = (torch.cat(barriers[key]).unique() if barriers[key]
                      else torch.empty(0, dtype=torch.float64, device=t.device)
                      for key in ("jump_t", "step_t"))
    step_t = step_t[~torch.isin(step_t, jump_t)]
    norm = adjoint_options.pop("norm", None)
    if norm is not None and norm != "seminorm" and not callable(norm):
        raise ValueError(f"adjoint_options['norm'] must be 'seminorm' or a callable, got {norm!r}")
    state_norm = options.get("norm")
    if state_norm is not None and not callable(state_norm):
        raise TypeError(f"options['norm'] must be callable, got {type(state_norm).__name__}")

    field_ = _TupleField(func, unwrap=is_tensor)
    settings = _Settings(
        func=field_, n_state=len(state), rtol=rtol, atol=atol, method=method, options=options,
        adjoint_rtol=rtol if adjoint_rtol is None else adjoint_rtol,
        adjoint_atol=atol if adjoint_atol is None else adjoint_atol,
        adjoint_options=adjoint_options, seminorm=norm == "seminorm",
        state_norm=state_norm, adjoint_norm=norm if callable(norm) else None,
        seed_first_step=bool(seed_first_step), t_requires_grad=t.requires_grad,
        jump_t=jump_t, step_t=step_t)
    traj = _CarryAdjoint.apply(settings, t, *state, *params)
    return traj[0] if is_tensor else tuple(traj)


class _TupleField(_StepTracker):
    """``func`` on a tuple state; forwards the caller's callbacks and remembers the forward step.

    The last step the forward solve accepted (as proposed by its error control) seeds the first
    backward step: the backward system has the same Jacobian, so that step is a far better first
    guess than torchdiffeq's selection from scratch, which starts ~100 times too small and ramps.

    Args:
        func: The caller's right-hand side.
        unwrap: ``func`` takes and returns one tensor rather than a tuple.
    """

    def __init__(self, func: Callable[..., Any], unwrap: bool) -> None:
        super().__init__(func, unwrap)
        for name in tde.ADJOINT_CALLBACKS:  # found here by the backward pass's relay
            adjoint_callback = getattr(func, name, None)
            if adjoint_callback is not None:
                setattr(self, name, adjoint_callback)

    def __call__(self, t: Tensor, y: State) -> State:
        if self.unwrap:
            return (self.func(t, y[0]),)
        return tuple(self.func(t, y))
