"""ODEBlock: one neural ODE solve, the unit the regularizer callbacks and NFE reports see.

The block owns the vector field, the end time, the solver settings and an NFE counter; the
solve itself is :func:`polyreg_cnf.engine.solving.solve`, with the block's counter active. Solves
over a given grid of times (any start, increasing or decreasing) and reversed solves are
penalised like the default [0, T] solve while a
:class:`~polyreg_cnf.engine.recording.TrajectoryRecorder` is active.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from polyreg_cnf.engine.nfe import NFECounter
from polyreg_cnf.engine.observers import observe
from polyreg_cnf.engine.solver_config import SolverConfig
from polyreg_cnf.engine.solving import solve
from polyreg_cnf.engine.strategies import AutoDecision

__all__ = ["ODEBlock", "ode_blocks", "per_solve_context", "solving_with", "training_solves",
           "uncounted"]

State = tuple[Tensor, ...]
VectorField = Callable[[Tensor, State], State]


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
        solver: Solver settings; defaults to ``SolverConfig()`` (dopri5, the paper's
            tolerances, automatic backprop).

    Example:
        >>> from polyreg_cnf.engine.nets import ODENet
        >>> block = ODEBlock(ODENet(2, (8,)), solver=SolverConfig(backprop="direct"))
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
        solver.backprop.check(solver.method, train_T=bool(train_T))
        self.net = net
        self.solver = solver
        self.train_T = bool(train_T)
        # A fixed end time stays a Python float: a float32 parameter would round it, and every
        # solve would then end slightly off T.
        self.end_time = float(T)
        if self.train_T:
            self.sqrt_T = nn.Parameter(torch.tensor(float(T) ** 0.5))
        self.nfe = NFECounter()
        #: What an :class:`~polyreg_cnf.engine.strategies.Auto` strategy measured and decided for
        #: this block (plain state; ``BackpropSelector`` agrees it across blocks and ranks).
        self.backprop_decision = AutoDecision()
        self._params_checked = False
        # Set by training_solves(): solve with the training method and tolerances even in eval
        # mode (to measure the solver gap); never saved.
        self._training_solves = False

    def end_time_tensor(self, like: Tensor) -> Tensor:
        """End time T as a tensor of ``like``'s dtype and device (differentiable if ``train_T``)."""
        if self.train_T:
            return self.sqrt_T.square().to(like.dtype)
        return torch.tensor(self.end_time, dtype=like.dtype, device=like.device)

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
        context, extra = per_solve_context(net, context)

        def field(s: Tensor, state: State) -> State:
            return (net(s, state[0]) if context is None else net(s, state[0], context),)

        return self.solve(field, (y0,), extra_params=extra, t=t)[0]

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
        ends_only = t is None
        if ends_only:
            end = self.end_time_tensor(y0[0])
            t = torch.stack([torch.zeros_like(end), end])
            if reverse:
                t = t.flip(0)
        # The training solver in training, the evaluation solver (its own method) otherwise.
        as_training = self.training or self._training_solves
        atol, rtol = self.solver.tolerances(as_training)

        def params() -> tuple[Tensor, ...]:
            # The tensors the adjoint or the step checkpoints send gradients to (checked once).
            found = tuple(p for p in self.net.parameters() if p.requires_grad)
            found += tuple(p for p in extra_params if p is not None and p.requires_grad)
            if not self._params_checked:
                _check_adjoint_sees_everything(field, t[0], y0, found)
                self._params_checked = True
            return found

        with observe(self.nfe):
            traj = solve(field, y0, t, rtol=rtol, atol=atol,
                         method=self.solver.method_for(as_training),
                         options=self.solver.options(as_training), backprop=self.solver.backprop,
                         params=params, max_nfe=self.solver.max_nfe,
                         decision=self.backprop_decision, state_index=0,
                         penalise=self.training)
        return tuple(x[-1] for x in traj) if ends_only else traj


def per_solve_context(net: nn.Module, context: Tensor | None
                      ) -> tuple[Any, tuple[Tensor | None, ...]]:
    """The context as every evaluation of ``net`` takes it, and the tensors to differentiate.

    A net with a ``prepare_context(context) -> tuple[Tensor, ...]`` method (the amortized net:
    its per-sample factors as views of the context) has it called here, once per solve: work
    that does not change during the solve is not redone by every evaluation, and the adjoint
    and the step checkpoints differentiate those views, so each evaluation's gradient has the
    size of the factor it reaches instead of the whole context's. Other nets get the context
    as it is.

    Returns:
        ``(context for net, extra_params for ODEBlock.solve)``.
    """
    prepare = getattr(net, "prepare_context", None)
    if context is None or not callable(prepare):
        return context, (context,)
    factors = prepare(context)
    return factors, tuple(factors)


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


@contextmanager
def _on_every_block(module: nn.Module, name: str, value: object) -> Iterator[list[ODEBlock]]:
    """Set attribute ``name`` of every block of ``module`` to ``value``; restore it after."""
    blocks = ode_blocks(module)
    saved = [getattr(block, name) for block in blocks]
    for block in blocks:
        setattr(block, name, value)
    try:
        yield blocks
    finally:
        for block, own in zip(blocks, saved):
            setattr(block, name, own)


@contextmanager
def training_solves(module: nn.Module) -> Iterator[None]:
    """Every block of ``module`` solves with its training method and tolerances, even in eval
    mode; nothing else about eval mode changes (the evaluation trace, no penalty).

    The difference to the evaluation solve is then the training solver's own error: what
    ``val/solver_gap`` reports. The evaluations made inside are not counted in the blocks' NFE,
    so that ``val/nfe`` stays the evaluation solver's.
    """
    with _on_every_block(module, "_training_solves", True), uncounted(module):
        yield


@contextmanager
def uncounted(module: nn.Module) -> Iterator[None]:
    """The evaluations every block of ``module`` makes inside are not counted: each block's NFE
    counter gets its values back after (a side solve during validation stays out of
    ``val/nfe``)."""
    blocks = ode_blocks(module)
    saved = [block.nfe.as_dict() for block in blocks]
    try:
        yield
    finally:
        for block, counts in zip(blocks, saved):
            for name, value in counts.items():
                setattr(block.nfe, name, value)


@contextmanager
def solving_with(module: nn.Module, solver: SolverConfig) -> Iterator[None]:
    """Every block of ``module`` solves with ``solver`` inside the block, then gets its own
    settings back (e.g. a few fixed steps for sampling).

    Raises:
        TypeError: ``solver`` is not a :class:`SolverConfig`.
    """
    if not isinstance(solver, SolverConfig):
        raise TypeError(f"solver must be a SolverConfig, got {type(solver).__name__}")
    with _on_every_block(module, "solver", solver):
        yield
