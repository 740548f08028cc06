"""ODEBlock: one neural ODE solve with torchdiffeq, NFE accounting and trajectory recording.

The block is the unit the regularizer callbacks act on: a callback switches trajectory
recording on for a training step, the block then asks the solver for the state at K extra
interior times (dense output: the solver takes exactly the same steps) and stores the penalty,
and the callback adds it to the loss. Solves over a given grid of times (any start, increasing
or decreasing) and reversed solves are penalised the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

from polyreg_cnf.engine.adjoint import odeint_adjoint_carry
from polyreg_cnf.engine.dropin import penalty_grid
from polyreg_cnf.engine.memory import (
    available_memory,
    choose_backprop,
    default_memory_share,
    saved_tensor_bytes,
)
from polyreg_cnf.engine.nfe import NFECounter, NFELimitError
from polyreg_cnf.engine.solver import SolverConfig
from polyreg_cnf.engine.step_checkpoint import checkpointed_solve, evaluations_per_step

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
    r"""Integrates :math:`dy/dt = f(t, y)` from 0 to T (or over a given grid of times).

    Use it to put any neural ODE into a Lightning model: the regularizer callbacks find every
    ODEBlock inside a LightningModule and need nothing else. (For a model that calls torchdiffeq
    directly, :func:`polyreg_cnf.odeint` is the one-line alternative.)

    Args:
        net: The vector field, called as ``net(t, y)`` or ``net(t, y, context)``; y has shape
            (B, ...).
        T: End time (> 0) of solves without an explicit grid.
        train_T: Learn the end time (parametrised as ``T = s**2``, as FFJORD does).
        solver: Solver settings; defaults to ``SolverConfig()`` (dopri5, adjoint).

    Example:
        >>> from polyreg_cnf.engine.nets import ODENet
        >>> block = ODEBlock(ODENet(2, (8,)), solver=SolverConfig(adjoint=False))
        >>> y0 = torch.ones(3, 2)
        >>> block(y0).shape, block(y0, t=torch.tensor([0.5, 0.0, -1.0])).shape
        (torch.Size([3, 2]), torch.Size([3, 3, 2]))
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
        if self.train_T and solver.backprop == "checkpoint":
            raise ValueError("train_T=True needs gradients with respect to the end time, which "
                             "backprop='checkpoint' does not give (its step sizes are fixed); "
                             "use backprop='direct', 'adjoint' or 'auto'")
        # A fixed end time stays a Python float: a float32 parameter would round it, and every
        # solve would then end slightly off T.
        self.end_time = float(T)
        if self.train_T:
            self.sqrt_T = nn.Parameter(torch.tensor(float(T) ** 0.5))
        self.nfe = NFECounter()
        self._poly: tuple[int, int, torch.Generator | None] | None = None
        self._penalties: list[Tensor] = []
        self._adjoint_checked = False
        # backprop="auto" (see SolverConfig): the choice in force, this block's own proposal
        # from its last training solve (a callback may overrule it, e.g. to agree across DDP
        # ranks), whether a direct solve ran out of memory (then the adjoint for good), and the
        # measured bytes autograd keeps per evaluation and batch row.
        self.backprop_choice: str | None = None
        self.backprop_proposal: str | None = None
        self.backprop_fell_back = False
        self._bytes_per_row: float | None = None
        self._checkpoint_fits = False

    def end_time_tensor(self, like: Tensor) -> Tensor:
        """End time T as a tensor of ``like``'s dtype and device (differentiable if ``train_T``)."""
        if self.train_T:
            return self.sqrt_T.square().to(like.dtype)
        return torch.tensor(self.end_time, dtype=like.dtype, device=like.device)

    # ------------------------------------------------------------------ regularization hooks
    def start_trajectory_penalty(self, num_samples: int, order: int,
                                 generator: torch.Generator | None = None) -> None:
        """Record the polynomial penalty on every training solve until :meth:`stop_...`.

        Args:
            num_samples: K interior times per solve.
            order: Polynomial degree m.
            generator: Source of the interior times (the global RNG if None).
        """
        self._poly = (num_samples, order, generator)
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
    def forward(self, y0: Tensor, context: Tensor | None = None,
                t: Tensor | None = None) -> Tensor:
        """Solve from 0 to T, or over the grid ``t``.

        Args:
            y0: Initial state, shape (B, ...).
            context: Optional per-sample conditioning passed to ``net`` as a third argument.
            t: Optional output grid: 1-D, strictly increasing or decreasing, any start; y0 is
                the state at ``t[0]``.

        Returns:
            y(T), same shape as y0; with ``t``, the trajectory at ``t``, shape (len(t), B, ...).
        """
        net = self.net

        def field(s: Tensor, state: State) -> State:
            return (net(s, state[0]) if context is None else net(s, state[0], context),)

        return self.solve(field, (y0,), extra_params=(context,), t=t)[0]

    def solve(self, field: VectorField, y0: State, extra_params: Sequence[Tensor | None] = (),
              reverse: bool = False, t: Tensor | None = None) -> State:
        """Integrate a tuple state; return its value at the end time, or its trajectory at ``t``.

        The first element of the state is the trajectory the penalty looks at (reversed solves
        and grids included: the same trajectory, its times sorted increasing for the fit).

        Args:
            field: ``field(t, state) -> d state / dt``.
            y0: Initial state tuple.
            extra_params: Tensors the field depends on besides ``net``'s parameters (e.g. an
                amortized context); the adjoint needs them to send gradients back. Under the
                adjoint, the first solve of the block checks that the field depends on no other
                tensor requiring gradients (the adjoint would drop its gradient silently).
            reverse: Integrate from T down to 0 (only without ``t``; give a decreasing grid
                otherwise).
            t: Optional output grid, 1-D and strictly monotone, at least 2 times.

        Returns:
            The state tuple at the final time; with ``t``, a tuple of trajectories of shape
            (len(t), ...).

        Raises:
            ValueError: For an invalid grid, ``reverse`` together with ``t``, or (adjoint only)
                a field depending on tensors requiring gradients outside ``net`` and
                ``extra_params``.
        """
        if t is not None:
            t = self._check_grid(t, y0[0], reverse)
        escape = torch.inference_mode(False) if torch.is_inference_mode_enabled() else None
        with escape or nullcontext():
            if escape is not None:
                # Tensors made under inference mode cannot enter autograd, and the trace needs
                # autograd even in evaluation: work on ordinary copies.
                y0 = tuple(y.clone() for y in y0)
                t = None if t is None else t.clone()
            return self._solve(field, y0, extra_params, reverse, t)

    @staticmethod
    def _check_grid(t: Tensor, ref: Tensor, reverse: bool) -> Tensor:
        if not isinstance(t, Tensor):
            raise TypeError(f"t must be a 1-D tensor of times, got {type(t).__name__}")
        if reverse:
            raise ValueError("reverse=True applies to the default [0, T] solve only; with a grid "
                             "t, give a decreasing grid instead")
        if t.ndim != 1 or len(t) < 2 or not t.is_floating_point():
            raise ValueError(f"t must be a 1-D floating-point tensor of at least 2 times, got "
                             f"shape {tuple(t.shape)} and dtype {t.dtype}")
        steps = t[1:] - t[:-1]
        if not (bool((steps > 0).all()) or bool((steps < 0).all())):
            raise ValueError(f"t must be strictly increasing or strictly decreasing, got "
                             f"{t.tolist()}")
        return t.to(device=ref.device, dtype=ref.dtype)

    def _solve(self, field: VectorField, y0: State, extra_params: Sequence[Tensor | None],
               reverse: bool, t: Tensor | None) -> State:
        ref = y0[0]
        if t is None:
            end = self.end_time_tensor(ref)
            t = torch.stack([torch.zeros_like(end), end])
            if reverse:
                t = t.flip(0)
            requested_end_only = True
        else:
            requested_end_only = False
        grid = None
        if self.recording:
            num_samples, order, generator = self._poly
            grid = penalty_grid(t, num_samples, generator)
        times = t if grid is None else grid.times
        atol, rtol = self.solver.tolerances(self.training)
        kind = _CountedAdaptiveField if self.solver.adaptive else _CountedField
        counted = kind(field, self.nfe, self.solver.max_nfe)
        kwargs = dict(rtol=rtol, atol=atol, method=self.solver.method,
                      options=self.solver.options())
        self.nfe.solves += 1
        grad = torch.is_grad_enabled()
        auto = grad and self.training and self.solver.backprop == "auto"
        if auto and self._bytes_per_row is None:
            self._measure(field, times[0], y0)
        mode = self._backprop_mode(times) if grad else "direct"
        if mode == "adjoint":
            traj = self._adjoint_solve(counted, y0, times, extra_params, field, kwargs)
        elif mode == "checkpoint":
            traj = checkpointed_solve(counted, y0, times,
                                     params=self._gradient_params(field, times, y0,
                                                                  extra_params),
                                     **kwargs)
        else:
            out_of_memory = False
            try:
                traj = odeint(counted, y0, times, **kwargs)
            except torch.OutOfMemoryError:
                if not auto:
                    raise
                out_of_memory = True
            # Outside the except block: there the traceback would still hold the failed direct
            # solve's frames, and with them its whole graph, while the adjoint runs.
            if out_of_memory:
                self._fall_back(ref)
                traj = self._adjoint_solve(counted, y0, times, extra_params, field, kwargs)
        if auto:
            self._propose(counted.calls, ref)
        counted.backward = True
        if grid is not None:
            self._penalties.append(grid.penalty(traj[0], order))
        if requested_end_only:
            return tuple(x[-1] for x in traj)
        return traj if grid is None else tuple(grid.select(x) for x in traj)

    def _gradient_params(self, field: VectorField, times: Tensor, y0: State,
                         extra_params: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
        """The tensors the adjoint or the step checkpoints send gradients to (checked once)."""
        params = tuple(p for p in self.net.parameters() if p.requires_grad)
        params += tuple(p for p in extra_params if p is not None and p.requires_grad)
        if not self._adjoint_checked:
            _check_adjoint_sees_everything(field, times[0], y0, params)
            self._adjoint_checked = True
        return params

    def _adjoint_solve(self, counted: _CountedField, y0: State, times: Tensor,
                       extra_params: Sequence[Tensor | None], field: VectorField,
                       kwargs: dict) -> State:
        params = self._gradient_params(field, times, y0, extra_params)
        adjoint_options = dict(self.solver.options())
        if self.solver.seminorm:
            adjoint_options["norm"] = "seminorm"
        # The restart-free adjoint needs an adaptive method (it carries the step size).
        solve = (odeint_adjoint_carry if self.solver.adaptive and self.solver.adjoint_carry_step
                 else odeint_adjoint)
        return solve(counted, y0, times, adjoint_params=params, adjoint_options=adjoint_options,
                     **kwargs)

    # ------------------------------------------------------------------ backprop="auto"
    def _backprop_mode(self, times: Tensor) -> str:
        """How this training solve backpropagates: "direct", "adjoint" or "checkpoint".

        With ``backprop="auto"`` the agreed choice is direct or memory-bounded ("adjoint").
        Memory-bounded means the adjoint for a solve output at its ends only, and the step
        checkpoints for one with interior output times (the penalty's, or a grid's): the
        adjoint must stop at each of those, which cost 21 backward evaluations instead of 14 on
        a two-step solve and as much as the checkpoints elsewhere, while on an ends-only solve
        the adjoint is the cheaper of the two (``benchmarks/results/adjoint_overhead.md``).
        """
        mode = self.solver.backprop
        if mode != "auto":
            return mode
        if not self.backprop_fell_back and self.backprop_choice == "direct":
            return "direct"
        # Undecided (the first training solve, while the block measures) means the adjoint:
        # it is the choice that cannot run out of memory (_checkpoint_fits is still False).
        if self._checkpoint_fits and len(times) > 2 and not times.requires_grad:
            return "checkpoint"
        return "adjoint"

    def _measure(self, field: VectorField, t: Tensor, y0: State) -> None:
        """Bytes autograd keeps per evaluation and batch row (one uncounted evaluation)."""
        with torch.enable_grad():
            state = tuple(y.detach().requires_grad_(y.is_floating_point()) for y in y0)
            _, nbytes = saved_tensor_bytes(field, t.detach(), state)
        self._bytes_per_row = nbytes / max(int(y0[0].shape[0]), 1)

    def _propose(self, forward_nfe: int, ref: Tensor) -> None:
        """Direct or adjoint for the next training solve, from this solve's NFE and memory."""
        share = self.solver.memory_share or default_memory_share(ref.device)
        # Free memory is read after every training solve (about 40 us: /proc/meminfo and the
        # cgroup files, or the CUDA driver), so memory taken meanwhile by other processes or
        # other blocks counts in the next decision.
        need = int(self._bytes_per_row * max(int(ref.shape[0]), 1))
        free = available_memory(ref.device)
        self.backprop_proposal = ("adjoint" if self.backprop_fell_back else
                                  choose_backprop(need, forward_nfe, free, share))
        self.backprop_choice = self.backprop_proposal
        # The step checkpoints hold one step's graph at a time.
        self._checkpoint_fits = self.solver.adaptive and choose_backprop(
            need, evaluations_per_step(self.solver.method), free, share) == "direct"

    def _fall_back(self, ref: Tensor) -> None:
        self.backprop_fell_back = True
        self.backprop_choice = self.backprop_proposal = "adjoint"
        if ref.device.type == "cuda":
            torch.cuda.empty_cache()
        warnings.warn("backprop='auto': a direct-backprop solve ran out of memory; this block "
                      "uses the adjoint for the rest of the run.", RuntimeWarning, stacklevel=3)


def _check_adjoint_sees_everything(field: VectorField, t: Tensor, y0: State,
                                   params: tuple[Tensor, ...]) -> None:
    """Raise if one evaluation of ``field`` depends on tensors requiring grad outside ``params``.

    The adjoint (and the step checkpoints) differentiate the field with respect to the state and
    ``params`` only: the gradient of anything else the field reads (a tensor in a closure, a
    non-parameter attribute) would be dropped without a word. One evaluation's autograd graph is
    walked back to its leaves (stopping at ``params``, which may be non-leaf tensors such as a
    context); this evaluation is not counted as NFE.
    """
    with torch.enable_grad():
        state = tuple(y.detach().requires_grad_(y.is_floating_point()) for y in y0)
        out = field(t.detach(), state)
    allowed = {id(x) for x in params + state}
    stop = {p.grad_fn for p in params if p.grad_fn is not None}
    pending = [o.grad_fn for o in out if isinstance(o, Tensor) and o.grad_fn is not None]
    seen: set[object] = set()
    missing: list[Tensor] = []
    while pending:
        node = pending.pop()
        if node in seen or node in stop:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)  # AccumulateGrad: a leaf requiring grad
        if leaf is not None:
            if id(leaf) not in allowed:
                missing.append(leaf)
            continue
        pending.extend(n for n, _ in node.next_functions if n is not None)
    if missing:
        shapes = ", ".join(str(tuple(x.shape)) for x in missing)
        raise ValueError(
            f"the vector field depends on {len(missing)} tensor(s) requiring gradients that the "
            f"adjoint or the step checkpoints cannot see (shapes {shapes}): their gradients "
            f"would be dropped silently. Pass them in extra_params, make them parameters of "
            f"net, or solve with SolverConfig(backprop='direct').")


def ode_blocks(module: nn.Module) -> list[ODEBlock]:
    """Every ODEBlock inside ``module`` (including CNF blocks), in module order."""
    return [m for m in module.modules() if isinstance(m, ODEBlock)]
