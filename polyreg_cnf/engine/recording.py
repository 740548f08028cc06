r"""The trajectory penalty as an observer of solves: :class:`TrajectoryRecorder`.

While a recorder is active and gradients are on (a training step of a run with
``polyreg_cnf.callbacks.PolynomialTrajectoryRegularizer``), every solve of the engine over the
grid :math:`t_0, \dots, t_N` (increasing or decreasing, any :math:`t_0`)

1. draws K interior times :math:`t_0 + u_k (t_N - t_0)`, :math:`u_k \sim U(0, 1)`, from the
   recorder's own generator (the global RNG is never touched);
2. is solved ONCE on the merged grid. The solver's steps do not depend on the output times (dense
   output), so the forward steps, the forward NFE and the values at the requested times are
   exactly those of the solve on the requested grid alone;
3. fits one degree-m polynomial per sample and dimension through the whole trajectory
   (requested and interior times, sorted increasing) of one state element and records
   :func:`~polyreg_cnf.engine.penalty.trajectory_polynomial_penalty`;
4. returns the requested times only.

On a fixed grid (``options["step_size"]``) the interior times are read from the solver's dense
output within a step, cubic Hermite (``interp="cubic"``) for a requested grid of two times unless
the caller chose ``interp``: see :func:`dense_output_options` for why not linear, nor the grid
points themselves.

Not penalised (with a one-time warning per recorder): solves with ``event_fn``, and fixed-grid
methods without ``options["step_size"]`` (they step on the output grid itself, so added times
would change the solution).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from polyreg_cnf.engine._checks import check_int
from polyreg_cnf.engine._torchdiffeq import FIXED_METHODS, METHODS
from polyreg_cnf.engine.observers import Observer
from polyreg_cnf.engine.penalty import sample_penalty_times, trajectory_polynomial_penalty

__all__ = ["PenaltyGrid", "TrajectoryRecorder", "dense_output_options", "penalty_grid"]


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


def dense_output_options(method: str, options: dict[str, Any], t: Tensor) -> dict[str, Any]:
    """The options of a penalised solve over ``t``: cubic Hermite dense output on a fixed grid.

    torchdiffeq's fixed-grid default, linear interpolation between a step's ends, puts every
    interior time on a chord: with one step per solve the trajectory the penalty sees is exactly
    a straight line, so an order-1 penalty is identically zero whatever the model does, and with
    few steps it misses most of the curvature. Cubic Hermite interpolation (the step's end
    values and slopes) is accurate to the step's order of the curve. The grid points themselves
    are free but measure another quantity (fixed, evenly spaced times instead of uniform random
    ones; nothing at all with one step). ``python -m benchmarks.fixed_grid_penalty`` measures the
    three against the closed form on a linear ODE, with the evaluations each costs; cubic costs
    one evaluation more per output time (the field at the end of its step), forward and in the
    step checkpoints' recomputation.

    Only where the requested grid is its two ends (every CNF and ODE block solve): those are
    grid points, where cubic and linear output both return the step's end state, so the
    requested values stay those of the unpenalised solve. A requested grid with times inside
    steps keeps linear output for the same reason. Adaptive methods and a caller's own
    ``interp`` are left as they are.
    """
    if method in FIXED_METHODS and "interp" not in options and len(t) == 2:
        return {**options, "interp": "cubic"}
    return options


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


class TrajectoryRecorder(Observer):
    r"""Makes the solves inside it record the trajectory polynomial penalty.

    Use it as a context manager around a training step's forward pass (the Lightning callback
    does this for you); the penalties of every solve made inside (with gradients on) add up:
    ``ODEBlock`` and ``CNF`` solves and the drop-in :func:`polyreg_cnf.odeint` alike.

    Args:
        num_samples: K >= 0 interior times drawn per solve.
        order: Polynomial degree m >= 0 (a non-zero penalty needs K + 2 > m + 1 points).
        state_index: Which element of a tuple state the drop-in solves penalise (a tensor state
            is penalised as a whole; ODE blocks always penalise their first element).
        generator: Source of the interior times; ``None`` uses a fresh generator seeded with 0.
            The global RNG is never used.

    Example:
        >>> from polyreg_cnf import odeint
        >>> A = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
        >>> recorder = TrajectoryRecorder(num_samples=3, order=1)
        >>> with recorder:
        ...     y = odeint(lambda t, y: y @ A.T, torch.ones(4, 2), torch.linspace(0, 1, 5))
        >>> y.shape, len(recorder.penalties), bool(recorder.penalty() > 0)
        (torch.Size([5, 4, 2]), 1, True)
    """

    def __init__(self, num_samples: int = 2, order: int = 1, *, state_index: int = 0,
                 generator: torch.Generator | None = None) -> None:
        self.num_samples = check_int("num_samples", num_samples, minimum=0)
        self.order = check_int("order", order, minimum=0)
        self.state_index = check_int("state_index", state_index, minimum=0)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got "
                            f"{type(generator).__name__}")
        self.generator = torch.Generator().manual_seed(0) if generator is None else generator
        #: Penalties recorded since the last :meth:`clear`, one per penalised solve.
        self.penalties: list[Tensor] = []
        #: Solves seen while active since the last :meth:`clear` (penalised or not).
        self.solves = 0
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

    # ------------------------------------------------------------------ called by solve()
    def plan(self, y0: Any, t: Any, method: str, options: dict[str, Any] | None,
             event_fn: Any, state_index: int | None) -> PenaltyGrid | None:
        """The merged grid of this solve, or None to leave it unpenalised."""
        self.solves += 1
        if event_fn is not None:
            self._warn_once("event", "polyreg_cnf: solves with event_fn are not penalised "
                            "(their end time is not known in advance); passed through to "
                            "torchdiffeq unchanged.")
            return None
        if not isinstance(t, Tensor) or t.ndim != 1 or len(t) < 2 or not t.is_floating_point():
            return None  # torchdiffeq reports invalid grids itself; one time has no trajectory
        steps_on_grid = method in FIXED_METHODS and (options or {}).get("step_size") is None
        if steps_on_grid or method not in METHODS:
            self._warn_once(f"method:{method}", (
                f"polyreg_cnf: method={method!r} without options['step_size'] steps on the "
                f"output times themselves, so interior times would change the solution; these "
                f"solves are not penalised. Give a step_size (or an adaptive method) to penalise "
                f"them." if steps_on_grid else
                f"polyreg_cnf: method={method!r} is not penalised (no dense output)."))
            return None
        index = self.state_index if state_index is None else state_index
        if isinstance(y0, tuple) and index >= len(y0):
            raise ValueError(f"state_index={index} is out of range for a tuple state of "
                             f"{len(y0)} tensors; valid: 0..{len(y0) - 1}")
        return penalty_grid(t, self.num_samples, self.generator)

    def record(self, grid: PenaltyGrid, solution: Tensor | tuple[Tensor, ...],
               state_index: int | None) -> None:
        """Record the penalty of a solution on the merged grid."""
        if not isinstance(solution, Tensor):
            solution = solution[self.state_index if state_index is None else state_index]
        self.penalties.append(grid.penalty(solution, self.order))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=5)

    def __repr__(self) -> str:
        return (f"TrajectoryRecorder(num_samples={self.num_samples}, order={self.order}, "
                f"state_index={self.state_index})")
