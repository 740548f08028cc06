"""ODEBlock: one neural ODE solve with torchdiffeq, NFE accounting and trajectory recording.

The block is the unit the regularizer callbacks act on: a callback switches trajectory
recording on for a training step, the block then asks the solver for the state at K extra
interior times (dense output: the solver takes exactly the same steps) and stores the penalty,
and the callback adds it to the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

from polyreg_cnf.engine.adjoint import odeint_adjoint_carry
from polyreg_cnf.engine.nfe import NFECounter, NFELimitError
from polyreg_cnf.engine.penalty import sample_penalty_times, trajectory_polynomial_penalty
from polyreg_cnf.engine.solver import SolverConfig

__all__ = ["ODEBlock", "ode_blocks"]

State = tuple[Tensor, ...]
VectorField = Callable[[Tensor, State], State]


class _CountedField:
    """The right-hand side handed to torchdiffeq for ONE solve.

    A fresh object per solve keeps per-solve data (the Hutchinson probe, the context) alive for
    the adjoint's backward pass even if the block is solved again before backward runs. Calls made
    after the forward solve returned can only come from the adjoint, so they count as backward.
    """

    def __init__(self, field: VectorField, counter: NFECounter, max_nfe: int | None) -> None:
        self.field = field
        self.counter = counter
        self.max_nfe = max_nfe
        self.backward = False
        self.calls = 0

    def __call__(self, t: Tensor, state: State) -> State:
        if self.backward:
            self.counter.backward += 1
        else:
            self.counter.forward += 1
            self.calls += 1
            if self.max_nfe is not None and self.calls > self.max_nfe:
                raise NFELimitError(
                    f"forward solve exceeded max_nfe={self.max_nfe} function evaluations "
                    f"(at t={float(t):.6g}); the dynamics have become stiff. Try a looser "
                    f"tolerance, a smaller learning rate, or a trajectory regularizer.")
        return self.field(t, state)


class _CountedAdaptiveField(_CountedField):
    """Adds torchdiffeq's step callbacks (adaptive solvers only): accepted/rejected steps."""

    def callback_accept_step(self, t0: Tensor, y0: Tensor, dt: Tensor) -> None:
        self.counter.accepted += 1

    def callback_reject_step(self, t0: Tensor, y0: Tensor, dt: Tensor) -> None:
        self.counter.rejected += 1

    def callback_accept_step_adjoint(self, t0: Tensor, y0: Tensor, dt: Tensor) -> None:
        self.counter.accepted_backward += 1

    def callback_reject_step_adjoint(self, t0: Tensor, y0: Tensor, dt: Tensor) -> None:
        self.counter.rejected_backward += 1


class ODEBlock(nn.Module):
    r"""Integrates :math:`dy/dt = f(t, y)` from 0 to T and returns y(T).

    Use it to put any neural ODE into a Lightning model: the regularizer callbacks find every
    ODEBlock inside a LightningModule and need nothing else.

    Args:
        net: The vector field, called as ``net(t, y)`` or ``net(t, y, context)``; y has shape
            (B, ...).
        T: End time (> 0).
        train_T: Learn the end time (parametrised as ``T = s**2``, as FFJORD does).
        solver: Solver settings; defaults to ``SolverConfig()`` (dopri5, adjoint).

    Example:
        >>> block = ODEBlock(nn.Linear(2, 2), solver=SolverConfig(adjoint=False))  # doctest: +SKIP
    """

    def __init__(self, net: nn.Module, T: float = 1.0, train_T: bool = False,
                 solver: SolverConfig | None = None) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be an nn.Module, got {type(net).__name__}")
        if isinstance(T, bool) or not isinstance(T, (int, float)) or not T > 0:
            raise ValueError(f"T must be a number > 0, got {T!r}")
        solver = SolverConfig() if solver is None else solver
        if not isinstance(solver, SolverConfig):
            raise TypeError(f"solver must be a SolverConfig, got {type(solver).__name__}")
        self.net = net
        self.solver = solver
        self.train_T = bool(train_T)
        # A fixed end time stays a Python float: a float32 parameter would round it, and every
        # solve would then end slightly off T.
        self.end_time = float(T)
        if self.train_T:
            self.sqrt_T = nn.Parameter(torch.tensor(float(T) ** 0.5))
        self.nfe = NFECounter()
        self._poly: tuple[int, int] | None = None
        self._penalties: list[Tensor] = []

    def end_time_tensor(self, like: Tensor) -> Tensor:
        """End time T as a tensor of ``like``'s dtype and device (differentiable if ``train_T``)."""
        if self.train_T:
            return self.sqrt_T.square().to(like.dtype)
        return torch.tensor(self.end_time, dtype=like.dtype, device=like.device)

    # ------------------------------------------------------------------ regularization hooks
    def start_trajectory_penalty(self, num_samples: int, order: int) -> None:
        """Record the polynomial penalty on every training solve until :meth:`stop_...`."""
        self._poly = (num_samples, order)
        self._penalties = []

    def stop_trajectory_penalty(self) -> None:
        """Stop recording and drop what was recorded."""
        self._poly = None
        self._penalties = []

    def trajectory_penalty(self) -> Tensor | None:
        """Sum of the penalties recorded since recording started, or None if none was."""
        if not self._penalties:
            return None
        return torch.stack(self._penalties).sum()

    @property
    def recording(self) -> bool:
        """Whether the next solve records a penalty (training mode, gradients on, switched on)."""
        return self._poly is not None and self.training and torch.is_grad_enabled()

    # ------------------------------------------------------------------ solving
    def forward(self, y0: Tensor, context: Tensor | None = None) -> Tensor:
        """Solve from 0 to T.

        Args:
            y0: Initial state, shape (B, ...).
            context: Optional per-sample conditioning passed to ``net`` as a third argument.

        Returns:
            y(T), same shape as y0.
        """
        net = self.net

        def field(t: Tensor, state: State) -> State:
            return (net(t, state[0]) if context is None else net(t, state[0], context),)

        return self.solve(field, (y0,), extra_params=(context,))[0]

    def solve(self, field: VectorField, y0: State, extra_params: Sequence[Tensor | None] = (),
              reverse: bool = False) -> State:
        """Integrate a tuple state and return its value at the end time.

        The first element of the state is the trajectory the penalty looks at.

        Args:
            field: ``field(t, state) -> d state / dt``.
            y0: Initial state tuple.
            extra_params: Tensors the field depends on besides ``net``'s parameters (e.g. an
                amortized context); the adjoint needs them to send gradients back.
            reverse: Integrate from T down to 0.

        Returns:
            The state tuple at the final time.
        """
        escape = torch.inference_mode(False) if torch.is_inference_mode_enabled() else None
        with escape or nullcontext():
            if escape is not None:
                # Tensors made under inference mode cannot enter autograd, and the trace needs
                # autograd even in evaluation: work on ordinary copies.
                y0 = tuple(y.clone() for y in y0)
            return self._solve(field, y0, extra_params, reverse)

    def _solve(self, field: VectorField, y0: State, extra_params: Sequence[Tensor | None],
               reverse: bool) -> State:
        ref = y0[0]
        record = self.recording and not reverse
        end = self.end_time_tensor(ref)
        if record:
            num_samples, order = self._poly
            t = sample_penalty_times(num_samples, 0.0, end, device=ref.device, dtype=ref.dtype)
        else:
            t = torch.stack([torch.zeros_like(end), end])
        if reverse:
            t = t.flip(0)
        atol, rtol = self.solver.tolerances(self.training)
        kind = _CountedAdaptiveField if self.solver.adaptive else _CountedField
        counted = kind(field, self.nfe, self.solver.max_nfe)
        kwargs = dict(rtol=rtol, atol=atol, method=self.solver.method,
                      options=self.solver.options())
        self.nfe.solves += 1
        if self.solver.adjoint and torch.is_grad_enabled():
            params = tuple(p for p in self.net.parameters() if p.requires_grad)
            params += tuple(p for p in extra_params if p is not None and p.requires_grad)
            adjoint_options = dict(self.solver.options())
            if self.solver.seminorm:
                adjoint_options["norm"] = "seminorm"
            # The restart-free adjoint needs an adaptive method (it carries the step size).
            solve = (odeint_adjoint_carry
                     if self.solver.adaptive and self.solver.adjoint_carry_step
                     else odeint_adjoint)
            traj = solve(counted, y0, t, adjoint_params=params,
                         adjoint_options=adjoint_options, **kwargs)
        else:
            traj = odeint(counted, y0, t, **kwargs)
        counted.backward = True
        if record:
            self._penalties.append(trajectory_polynomial_penalty(t, traj[0], order))
        return tuple(x[-1] for x in traj)


def ode_blocks(module: nn.Module) -> list[ODEBlock]:
    """Every ODEBlock inside ``module`` (including CNF blocks), in module order."""
    return [m for m in module.modules() if isinstance(m, ODEBlock)]
