r"""Backprop through an adaptive solve by recomputing its accepted steps (step checkpoints).

Direct backprop keeps every evaluation's activations until the backward pass: memory grows with
the forward NFE. The continuous adjoint keeps nothing but solves a second ODE backwards, and
every output time is a barrier for it (the adjoint jumps there): the trajectory penalty's K
interior times add one step and one restart each, which triples a one-step backward solve.

:func:`checkpointed_solve` does neither. The forward solve runs without a graph and records the
state at the start of every ACCEPTED step (and the step size). The backward pass walks the steps
from last to first: it recomputes one step from its stored start (the same Runge-Kutta stages,
same step size), builds the dense-output polynomial of that step where an output time falls in
it, and backpropagates through just that step. So:

- the gradients are those of the forward computation itself, as with direct backprop, except that
  the step sizes are held fixed (direct backprop also differentiates the step-size controller,
  a term of the order of the tolerance); rejected steps and the initial step selection are not
  redone;
- memory is the stored step starts (one state per accepted step) plus the graph of ONE step
  (7 evaluations with dopri5), whatever the NFE;
- output times cost nothing extra: they are dense output inside steps that are recomputed
  anyway. With dopri5 the backward pass costs exactly 7 evaluations per accepted step (the
  step's first evaluation plus its six stages), with or without the penalty's interior times.

Fixed grids (euler, midpoint, heun2, heun3, rk4) work the same way: every step is kept (from
``callback_step``; fixed grids have no accepted/rejected steps) and redone in the backward pass
by the solver's own ``_step_func``, with its own interpolation (linear, or cubic Hermite with
``interp="cubic"``) for output times inside the step. A fixed step's backward cost is its stages
(rk4: 4), plus one evaluation per cubic output, exactly the forward cost; the gradients are
direct backprop's to rounding. The multistep Adams methods cannot be redone from one state.

This is the "adaptive checkpoint adjoint" of Zhuang et al. (ICML 2020) with every accepted step
checkpointed. The arithmetic is torchdiffeq's own (its Butcher tableau, step and interpolation
functions), so the recomputed steps reproduce the forward solve bit for bit;
``tests/test_torchdiffeq_contract.py`` checks that this still holds.

References:
    J. Zhuang, N. Dvornek, X. Li, S. Tatikonda, X. Papademetris, J. Duncan, "Adaptive
    Checkpoint Adjoint Method for Gradient Estimation in Neural ODE", ICML 2020.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

# torchdiffeq internals the recomputation must share with the forward solve to reproduce it
# exactly; torchdiffeq is pinned (0.2.5) and tests/test_torchdiffeq_contract.py names them.
from polyreg_cnf.engine._torchdiffeq import (
    FIXED_METHODS,
    RK_METHODS,
    SOLVERS,
    Perturb,
    PerturbFunc,
    StepRelay,
    fixed_grid_stepper,
    interp_evaluate,
    interp_fit,
    mixed_norm,
    odeint,
    runge_kutta_step,
)

__all__ = ["CHECKPOINT_METHODS", "evaluations_per_step", "checkpointed_solve"]

State = tuple[Tensor, ...]
Field = Callable[[Tensor, Any], Any]

#: Evaluations per step of torchdiffeq's one-step fixed-grid methods (their ``_step_func``). The
#: Adams methods are left out: a multistep method's step depends on earlier steps' evaluations,
#: so it cannot be recomputed from its start state alone.
_FIXED_STAGES = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}

#: Methods whose steps can be recomputed: every adaptive Runge-Kutta method of torchdiffeq and
#: its one-step fixed-grid methods.
CHECKPOINT_METHODS: tuple[str, ...] = RK_METHODS + tuple(
    name for name in FIXED_METHODS if name in _FIXED_STAGES)


def evaluations_per_step(method: str) -> int:
    """Evaluations the backward pass makes per recomputed step of ``method`` (dopri5: 7, rk4: 4).

    Also the number of evaluations whose graph the backward pass holds at once. A fixed-grid step
    is recomputed with exactly the evaluations the forward step made (with ``interp="cubic"``
    one more per output time inside the step, as in the forward solve).
    """
    if method not in CHECKPOINT_METHODS:
        raise ValueError(f"not a method whose steps can be recomputed: {method!r}; valid: "
                         f"{', '.join(CHECKPOINT_METHODS)}")
    if method in FIXED_METHODS:
        return _FIXED_STAGES[method]
    return len(SOLVERS[method].tableau.alpha) + 1


class _FlatField(StepRelay):
    """A field as torchdiffeq's solvers see it: one flat state, increasing time.

    The caller's state is a tensor or a tuple of tensors (``single`` says which); it is handed
    to the field, its step callbacks and its error norm in that form. A decreasing grid t is
    solved in s = -t (dy/ds = -f(-s, y)), as torchdiffeq does, so the recorded steps and the
    recomputation live in one increasing time. The accepted steps are kept in ``steps``.
    """

    def __init__(self, func: Field, shapes: list[torch.Size], single: bool, sign: float) -> None:
        super().__init__(func)
        self.shapes = shapes
        self.single = single
        self.sign = sign
        self.steps: list[tuple[Tensor, Tensor, Tensor]] = []
        #: Whether every step is kept from ``callback_step`` (fixed grids: they call no accept
        #: callback) rather than from ``callback_accept_step`` (:class:`_AdaptiveFlatField`).
        self.fixed = True

    def unflatten(self, y: Tensor, lead: tuple[int, ...] = ()) -> State:
        out, start = [], 0
        for shape in self.shapes:
            size = shape.numel()
            out.append(y[..., start:start + size].reshape(*lead, *shape))
            start += size
        return tuple(out)

    def state(self, y: Tensor, lead: tuple[int, ...] = ()) -> Tensor | State:
        """The flat ``y`` in the caller's form."""
        parts = self.unflatten(y, lead)
        return parts[0] if self.single else parts

    def __call__(self, s: Tensor, y: Tensor) -> Tensor:
        dy = self.func(s * self.sign, self.state(y))
        flat = dy.reshape(-1) if self.single else torch.cat([d.reshape(-1) for d in dy])
        return flat if self.sign > 0 else -flat

    def caller_form(self, t0: Tensor, y0: Tensor) -> tuple[Tensor, Tensor | State]:
        return t0 * self.sign, self.state(y0)

    def callback_step(self, t0: Tensor, y0: Tensor, dt: Tensor) -> None:
        if self.fixed:  # a fixed-grid step is always taken; only the forward solve steps here
            self.steps.append((t0, y0, dt))
        self.relay("callback_step", t0, y0, dt)


class _AdaptiveFlatField(_FlatField):
    """A :class:`_FlatField` for adaptive methods: accepted steps come from their callback.

    (A separate class because torchdiffeq warns when a fixed-grid method's field has the
    accept/reject callbacks, which fixed grids never call.)
    """

    def callback_accept_step(self, t0: Tensor, y0: Tensor, dt: Tensor) -> None:
        # Only the forward solve calls this (the backward pass takes no adaptive steps).
        self.steps.append((t0, y0, dt))
        self.relay("callback_accept_step", t0, y0, dt)

    def callback_reject_step(self, t0: Tensor, y0: Tensor, dt: Tensor) -> None:
        self.relay("callback_reject_step", t0, y0, dt)


class _CheckpointedSolve(torch.autograd.Function):
    """Forward: the adaptive solve, no graph, steps recorded. Backward: one step at a time."""

    @staticmethod
    def forward(ctx: Any, flat: _FlatField, s: Tensor, solve_kwargs: dict[str, Any],
                y0: Tensor, *params: Tensor) -> Tensor:
        flat.steps.clear()
        solution = odeint(flat, y0, s, **solve_kwargs)
        ctx.flat = flat
        ctx.s = s
        ctx.method = solve_kwargs["method"]
        ctx.options = solve_kwargs["options"]
        ctx.save_for_backward(*params)
        return solution

    @staticmethod
    def backward(ctx: Any, grad_solution: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.flat.fixed:
            return _fixed_backward(ctx, grad_solution)
        flat: _FlatField = ctx.flat
        params = ctx.saved_tensors
        steps = flat.steps
        solver = SOLVERS[ctx.method]
        y_dtype = steps[0][1].dtype
        device = grad_solution.device
        tableau = type(solver.tableau)(
            alpha=solver.tableau.alpha.to(device=device, dtype=y_dtype),
            beta=[b.to(device=device, dtype=y_dtype) for b in solver.tableau.beta],
            c_sol=solver.tableau.c_sol.to(device=device, dtype=y_dtype),
            c_error=solver.tableau.c_error.to(device=device, dtype=y_dtype))
        mid = solver.mid.to(device=device, dtype=y_dtype)
        func = PerturbFunc(flat)

        # Which step produced each output: torchdiffeq steps until a step ends at or beyond
        # the output time, then interpolates inside that step.
        owner: dict[int, list[int]] = {}
        times = ctx.s.to(steps[0][0].dtype)
        ends = (torch.stack([t0 for t0, _, _ in steps])
                + torch.stack([dt for _, _, dt in steps])).tolist()
        n = -1
        for i, t in enumerate(times.tolist()[1:], start=1):
            while n < 0 or t > ends[n]:
                n += 1
            owner.setdefault(n, []).append(i)

        adjoint: Tensor | None = None  # dL/dy at the end of the step being walked back
        grads: list[Tensor | None] = [None] * len(params)
        for n in range(len(steps) - 1, -1, -1):
            t0, y_start, dt = steps[n]
            outputs = owner.get(n, [])
            if adjoint is None and not outputs:
                continue
            with torch.enable_grad():
                y = y_start.detach().requires_grad_(True)
                # The forward solve's first evaluation of a step is the previous step's last
                # stage, made one ulp before that step's end (torchdiffeq's Perturb.PREV).
                f0 = func(t0, y, perturb=Perturb.PREV if n > 0 else Perturb.NONE)
                t1 = t0 + dt
                y1, _, _, k = runge_kutta_step(func, y, f0, t0, dt, t1, tableau=tableau)
                targets: list[Tensor] = []
                cotangents: list[Tensor] = []
                if adjoint is not None:
                    targets.append(y1)
                    cotangents.append(adjoint)
                if outputs:
                    h = dt.type_as(y)
                    y_mid = y + torch.sum(k * (h * mid), dim=-1).view_as(y)
                    coeff = interp_fit(y, y1, y_mid, k[..., 0], k[..., -1], h)
                    for i in outputs:
                        targets.append(interp_evaluate(coeff, t0, t1, times[i]))
                        cotangents.append(grad_solution[i])
                step_grads = torch.autograd.grad(targets, (y, *params), cotangents,
                                                 allow_unused=True)
            adjoint = _add_step(grads, step_grads)
        grad_y0 = grad_solution[0] if adjoint is None else adjoint + grad_solution[0]
        return (None, None, None, grad_y0, *grads)


def _add_step(grads: list[Tensor | None], step_grads: Sequence[Tensor | None]) -> Tensor | None:
    """Add one recomputed step's parameter gradients into ``grads``; return its state gradient
    (the adjoint carried into the step before it)."""
    for j, g in enumerate(step_grads[1:]):
        if g is not None:
            grads[j] = g if grads[j] is None else grads[j] + g
    return step_grads[0]


def _fixed_backward(ctx: Any, grad_solution: Tensor) -> tuple[Tensor | None, ...]:
    """The backward pass through a fixed-grid solve: one recomputed step at a time.

    Each step is redone by torchdiffeq's own step function from its stored start (same stages,
    same ``t0``, ``dt`` and ``t1``), and each output time inside it by the solver's own
    interpolation between the step's ends (linear by default, cubic Hermite with
    ``options["interp"] = "cubic"``, which evaluates the field at the step's end once per
    output time, as the forward solve does).
    """
    flat: _FlatField = ctx.flat
    params = ctx.saved_tensors
    steps = flat.steps
    times = ctx.s.to(steps[0][0].dtype)
    stepper = fixed_grid_stepper(ctx.method, steps[0][1], ctx.options)
    func = PerturbFunc(flat)
    # A step ends where the next one starts (t0 + dt may round differently); the last step ends
    # on the grid's last time, as torchdiffeq's grid does.
    ends = [t0 for t0, _, _ in steps[1:]] + [times[-1]]
    # Which step produced each output: the first step whose end is at or beyond it, as in
    # torchdiffeq's fixed-grid loop.
    owner: dict[int, list[int]] = {}
    n = 0
    end_values = [float(t1) for t1 in ends]
    for i, t in enumerate(times.tolist()[1:], start=1):
        while t > end_values[n]:
            n += 1
        owner.setdefault(n, []).append(i)

    adjoint: Tensor | None = None
    grads: list[Tensor | None] = [None] * len(params)
    for n in range(len(steps) - 1, -1, -1):
        t0, y_start, dt = steps[n]
        t1 = ends[n]
        outputs = owner.get(n, [])
        if adjoint is None and not outputs:
            continue
        with torch.enable_grad():
            y = y_start.detach().requires_grad_(True)
            dy, f0 = stepper._step_func(func, t0, dt, t1, y)
            y1 = y + dy
            targets: list[Tensor] = []
            cotangents: list[Tensor] = []
            if adjoint is not None:
                targets.append(y1)
                cotangents.append(adjoint)
            for i in outputs:
                if stepper.interp == "cubic":
                    out = stepper._cubic_hermite_interp(t0, y, f0, t1, y1, func(t1, y1), times[i])
                else:
                    out = stepper._linear_interp(t0, t1, y, y1, times[i])
                targets.append(out)
                cotangents.append(grad_solution[i])
            step_grads = torch.autograd.grad(targets, (y, *params), cotangents, allow_unused=True)
        adjoint = _add_step(grads, step_grads)
    grad_y0 = grad_solution[0] if adjoint is None else adjoint + grad_solution[0]
    return (None, None, None, grad_y0, *grads)


def checkpointed_solve(func: Field, y0: Tensor | State, t: Tensor, *, params: Sequence[Tensor],
                       rtol: float, atol: float, method: str = "dopri5",
                       options: dict[str, Any] | None = None) -> Tensor | State:
    """Solve like ``torchdiffeq.odeint``; backprop by recomputing one accepted step at a time.

    Args:
        func: The field ``func(t, y) -> dy/dt`` on a tensor or a tuple of tensors (one dtype),
            as ``y0``. It may have torchdiffeq's step callbacks; they are called during the
            forward solve, in the caller's time and state form.
        y0: The initial state: a tensor or a tuple of tensors.
        t: Output times, 1-D, strictly increasing or strictly decreasing. They may not require
            gradients (the recorded step sizes are constants here); use direct backprop or the
            adjoint to learn them.
        params: Every tensor the field depends on that needs a gradient (its parameters and any
            tensor it closes over): gradients reach exactly these and ``y0``.
        rtol: Relative tolerance.
        atol: Absolute tolerance.
        method: An adaptive Runge-Kutta method or a one-step fixed-grid method (euler,
            midpoint, heun2, heun3, rk4; one of ``CHECKPOINT_METHODS``), the latter with
            ``options["step_size"]``, a ``grid_constructor`` or on the output times.
        options: torchdiffeq options (``first_step``, ``max_num_steps``, ``norm`` taking the
            state in ``y0``'s form, ...); ``step_t`` and ``jump_t`` are not supported.

    Returns:
        The state at every time of ``t`` in ``y0``'s form, with a leading time dimension.

    Raises:
        ValueError: For a method outside ``CHECKPOINT_METHODS`` (e.g. the multistep Adams),
            times that require gradients, step barriers in ``options``, a bad grid or states of
            mixed dtypes.
    """
    if method not in CHECKPOINT_METHODS:
        raise ValueError(f"checkpointed_solve needs an adaptive Runge-Kutta method or a one-step "
                         f"fixed-grid method ({', '.join(CHECKPOINT_METHODS)}), got {method!r}")
    options = dict(options or {})
    barriers = sorted({"step_t", "jump_t"} & set(options))
    if barriers:
        raise ValueError(f"checkpointed_solve does not support {barriers} in options; use "
                         f"direct backprop or the adjoint for solves with step barriers")
    if not isinstance(t, Tensor) or t.dim() != 1 or len(t) < 2:
        raise ValueError(f"t must be a 1-D tensor of at least 2 times, got "
                         f"{getattr(t, 'shape', type(t).__name__)}")
    if t.requires_grad:
        raise ValueError("checkpointed_solve cannot differentiate the output times (t requires "
                         "grad); use direct backprop or the adjoint to learn them")
    steps = t[1:] - t[:-1]
    if not (bool((steps > 0).all()) or bool((steps < 0).all())):
        raise ValueError(f"t must be strictly increasing or strictly decreasing, got "
                         f"{t.tolist()}")
    single = isinstance(y0, Tensor)
    states = (y0,) if single else tuple(y0)
    if not states or len({y.dtype for y in states}) != 1:
        raise ValueError(f"y0 must be a tensor or a non-empty tuple of tensors of one dtype, "
                         f"got dtypes {[y.dtype for y in states]}")
    sign = 1.0 if bool(steps[0] > 0) else -1.0
    fixed = method in FIXED_METHODS
    flat = (_FlatField if fixed else _AdaptiveFlatField)(
        func, [y.shape for y in states], single, sign)
    flat.fixed = fixed
    y0_flat = torch.cat([y.reshape(-1) for y in states])
    # The error norm as torchdiffeq measures it for this state (the largest RMS over the
    # tensors of a tuple, the RMS of a tensor, or the caller's norm of the state in its form),
    # so the steps are those torchdiffeq's own solve would take.
    norm = options.get("norm")
    options["norm"] = ((lambda y: mixed_norm(flat.unflatten(y))) if norm is None
                       else (lambda y: norm(flat.state(y))))
    kwargs = dict(rtol=rtol, atol=atol, method=method, options=options)
    params = tuple(p for p in params if p.requires_grad)
    solution = _CheckpointedSolve.apply(flat, (t * sign).detach(), kwargs, y0_flat, *params)
    return flat.state(solution, (len(t),))
