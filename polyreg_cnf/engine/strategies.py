r"""How the gradients of a solve are computed: strategy objects that run the solve themselves.

:func:`polyreg_cnf.engine.solving.solve` prepares a :class:`Problem` (the observers' counting
function, the output grid) and hands it to the strategy's :meth:`Backprop.solve`:

- :class:`Direct`: backpropagate through the solver's operations (fastest; memory grows with
  the forward NFE);
- :class:`Adjoint`: solve the adjoint ODE backwards (memory independent of NFE, a second solve);
- :class:`StepCheckpoint`: keep the state at each accepted step and backpropagate through one
  recomputed step at a time (:mod:`polyreg_cnf.engine.step_checkpoint`);
- :class:`Auto`: direct while the step's activations fit a share of the free memory, else
  memory-bounded (step checkpoints for solves with interior output times, the adjoint for
  others). Its settings are the object; its decisions are an :class:`AutoDecision` per ODE
  block (``ODEBlock.backprop_decision``), which
  :class:`polyreg_cnf.callbacks.BackpropSelector` agrees across the blocks and DDP ranks.

A new strategy is a subclass with a ``kind`` and a ``solve``: nothing else dispatches on the
classes. An invalid combination cannot be built: each strategy checks its arguments in its
constructor, and :meth:`Backprop.check` checks it against the solver method.

Example:
    >>> Adjoint(seminorm=True)
    Adjoint(carry=True, seminorm=True)
    >>> Auto(memory_share=2.0)
    Traceback (most recent call last):
    ...
    ValueError: Auto: memory_share must be a number in (0, 1] or None, got 2.0
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from polyreg_cnf.engine import _torchdiffeq as tde
from polyreg_cnf.engine._checks import check_bool, check_number
from polyreg_cnf.engine.adjoint import odeint_adjoint_carry
from polyreg_cnf.engine.memory import (
    available_memory,
    choose_backprop,
    default_memory_share,
    saved_tensor_bytes,
)
from polyreg_cnf.engine.step_checkpoint import CHECKPOINT_METHODS as RECOMPUTABLE
from polyreg_cnf.engine.step_checkpoint import checkpointed_solve, evaluations_per_step

__all__ = ["ADJOINT_HEAVY_RATIO", "BACKPROP_KINDS", "CHOICES", "MEMORY_BOUNDED", "Adjoint", "Auto",
           "AutoDecision", "Backprop", "Direct", "Problem", "StepCheckpoint",
           "backprop_from_dict", "make_backprop", "read_choice"]

#: :class:`Auto`'s two choices: direct backprop, or memory-bounded (step checkpoints or adjoint).
MEMORY_BOUNDED = "memory_bounded"
CHOICES = ("direct", MEMORY_BOUNDED)


def read_choice(choice: str) -> str:
    """An :class:`Auto` choice, old names read: ``"adjoint"`` (before 0.3) is memory-bounded.

    Raises:
        ValueError: Anything else.
    """
    choice = MEMORY_BOUNDED if choice == "adjoint" else choice
    if choice not in CHOICES:
        raise ValueError(f"choice must be one of {', '.join(CHOICES)} (or the old 'adjoint'), "
                         f"got {choice!r}")
    return choice


@dataclass
class Problem:
    """One solve, as :func:`~polyreg_cnf.engine.solving.solve` hands it to a strategy.

    Attributes:
        func: What the solver evaluates: the caller's function, counted by the observers.
        field: The caller's own function (for evaluations that must not count).
        y0: Initial state: a tensor or a tuple of tensors.
        t: Output times (the requested ones merged with the penalty's, if any).
        rtol: Relative tolerance.
        atol: Absolute tolerance.
        method: The torchdiffeq method.
        options: The method's options.
        event_fn: Stop where it crosses zero, or None.
        params: The tensors receiving gradients, found when called.
        forward_nfe: The forward evaluations made so far.
        decision: Where :class:`Auto` keeps its decision for the block (None: decide afresh).
    """

    func: Callable[..., Any]
    field: Callable[..., Any]
    y0: Tensor | tuple[Tensor, ...]
    t: Tensor
    rtol: float | Tensor
    atol: float | Tensor
    method: str
    options: dict[str, Any]
    event_fn: Callable[..., Tensor] | None
    params: Callable[[], tuple[Tensor, ...]]
    forward_nfe: Callable[[], int]
    decision: AutoDecision | None = None

    def tolerances_and_method(self) -> dict[str, Any]:
        """``rtol``, ``atol``, ``method`` and ``options`` as torchdiffeq's keyword arguments."""
        return dict(rtol=self.rtol, atol=self.atol, method=self.method, options=self.options)


@dataclass(frozen=True)
class Backprop(ABC):
    """Base of the strategies; ``kind`` is the name the command line and checkpoints use."""

    kind: ClassVar[str] = ""

    def check(self, method: str, train_T: bool = False) -> None:  # noqa: B027 (optional hook)
        """Raise ValueError if this strategy cannot differentiate solves of ``method``."""

    def to_dict(self) -> dict[str, Any]:
        """The strategy's settings as plain values (``kind`` included)."""
        return {"kind": self.kind}

    @abstractmethod
    def solve(self, problem: Problem) -> Any:
        """Run the solve so that its gradients are computed this strategy's way.

        Returns:
            The solution at ``problem.t`` (time first), a tensor or a tuple as ``problem.y0``;
            with an ``event_fn``, ``(event_t, solution)``.
        """


@dataclass(frozen=True)
class Direct(Backprop):
    """Backpropagate through the solver's operations."""

    kind: ClassVar[str] = "direct"

    def solve(self, problem: Problem) -> Any:
        return tde.odeint(problem.func, problem.y0, problem.t, event_fn=problem.event_fn,
                          **problem.tolerances_and_method())


@dataclass(frozen=True)
class Adjoint(Backprop):
    """Solve the adjoint ODE backwards.

    Args:
        carry: With an adaptive method, keep the backward step size across output times
            (:func:`polyreg_cnf.engine.adjoint.odeint_adjoint_carry`): the penalty's interior
            times cost about one backward evaluation each. ``False``: torchdiffeq's own adjoint,
            which re-selects its step on every interval.
        seminorm: Measure the backward error on the state and its adjoint only (Kidger, Chen &
            Lyons, ICML 2021): fewer backward steps.
        rtol: Backward relative tolerance (default: the forward one).
        atol: Backward absolute tolerance (default: the forward one).
        method: Backward method (default: the forward one; another one rules out ``carry``).
        options: Backward solver options (default: the forward ones without ``norm``).
    """

    kind: ClassVar[str] = "adjoint"
    carry: bool = True
    seminorm: bool = False
    rtol: float | Tensor | None = field(default=None, repr=False)
    atol: float | Tensor | None = field(default=None, repr=False)
    method: str | None = field(default=None, repr=False)
    options: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_bool("Adjoint: carry", self.carry)
        check_bool("Adjoint: seminorm", self.seminorm)
        if self.seminorm and self.options is not None and "norm" in self.options:
            raise ValueError(f"Adjoint: seminorm=True and options['norm']="
                             f"{self.options['norm']!r} both set the backward norm; give one")

    def backward_options(self, forward: dict[str, Any]) -> dict[str, Any]:
        """The options of the backward solve (torchdiffeq's ``adjoint_options``)."""
        options = ({k: v for k, v in forward.items() if k != "norm"} if self.options is None
                   else dict(self.options))
        if self.seminorm:
            options["norm"] = "seminorm"
        return options

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "carry": self.carry, "seminorm": self.seminorm}

    def solve(self, problem: Problem) -> Any:
        found = problem.params()
        adjoint_options = (self.backward_options(problem.options) if self.seminorm
                           else self.options)
        if self._carry_accepts(problem):
            return odeint_adjoint_carry(
                problem.func, problem.y0, problem.t, adjoint_params=found,
                adjoint_rtol=self.rtol, adjoint_atol=self.atol, adjoint_options=adjoint_options,
                **problem.tolerances_and_method())
        return tde.odeint_adjoint(
            problem.func, problem.y0, problem.t, event_fn=problem.event_fn, adjoint_params=found,
            adjoint_rtol=self.rtol, adjoint_atol=self.atol, adjoint_method=self.method,
            adjoint_options=adjoint_options, **problem.tolerances_and_method())

    def _carry_accepts(self, problem: Problem) -> bool:
        """Whether the restart-free adjoint honours every argument (else torchdiffeq's)."""
        method, options, y0 = problem.method, problem.options, problem.y0
        if (not self.carry or problem.event_fn is not None or method not in tde.ADAPTIVE_METHODS
                or self.method not in (None, method)):
            return False
        numbers = (problem.rtol, problem.atol) + tuple(
            x for x in (self.rtol, self.atol) if x is not None)
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in numbers):
            return False
        states = (y0,) if isinstance(y0, Tensor) else y0
        if len({y.dtype for y in states}) != 1:
            return False
        backward = self.options if self.options is not None else options
        if "step_t" in backward or "jump_t" in backward:
            return False
        # torchdiffeq hands a tensor state's norm the tensor, the carry adjoint a 1-tuple
        return not (isinstance(y0, Tensor) and callable(options.get("norm")))


@dataclass(frozen=True)
class StepCheckpoint(Backprop):
    """Backpropagate through one recomputed step at a time (Runge-Kutta, adaptive or fixed-grid)."""

    kind: ClassVar[str] = "checkpoint"

    def check(self, method: str, train_T: bool = False) -> None:
        if method not in RECOMPUTABLE:
            raise ValueError(f"StepCheckpoint redoes single Runge-Kutta steps: method {method!r}"
                             f" cannot be recomputed step by step (use {RECOMPUTABLE} or Direct())")
        if train_T:
            raise ValueError("StepCheckpoint cannot learn the end time (train_T=True): its step "
                             "sizes are fixed; use Direct(), Adjoint() or Auto()")

    def solve(self, problem: Problem) -> Any:
        found = problem.params()
        if problem.event_fn is not None:
            raise ValueError("StepCheckpoint cannot stop at events; use Direct() or Adjoint()")
        return checkpointed_solve(problem.func, problem.y0, problem.t, params=found,
                                  **problem.tolerances_and_method())


@dataclass
class AutoDecision:
    """What :class:`Auto` knows and decided about one place that solves (one ODE block).

    Plain mutable state, owned by the block (``ODEBlock.backprop_decision``); the strategy
    object holds settings only.

    Attributes:
        bytes_per_row: Bytes autograd keeps per evaluation and batch row (measured once).
        adjoint_heavy: Whether the adjoint's parameter state dwarfs the ODE state (see
            :data:`ADJOINT_HEAVY_RATIO`).
        choice: ``"direct"`` or ``"memory_bounded"``; None before the first decision.
        proposal: The choice this block's last solve proposed.
        checkpoint_fits: Whether one step's graph fits (then the step checkpoints bound memory).
        fell_back: Whether a direct solve ran out of memory (memory-bounded for good).
    """

    bytes_per_row: float | None = None
    adjoint_heavy: bool | None = None
    choice: str | None = None
    proposal: str | None = None
    checkpoint_fits: bool = False
    fell_back: bool = False

    def agree(self, choice: str, fell_back: bool) -> None:
        """Take the choice agreed for every block (after the ranks agreed, or restored from a
        checkpoint; the old name ``"adjoint"`` is read). A fallback is never undone."""
        self.choice = read_choice(choice)
        self.fell_back = self.fell_back or bool(fell_back)

    @property
    def wants_memory_bound(self) -> bool:
        """Whether this block proposed memory-bounded backprop (or fell back)."""
        return self.fell_back or self.proposal == MEMORY_BOUNDED


@dataclass(frozen=True)
class Auto(Backprop):
    """Direct backprop while it fits ``memory_share`` of the free memory, else memory-bounded.

    After every training solve the solving block proposes ``"direct"`` or ``"memory_bounded"``
    from its measured bytes per evaluation and row (:mod:`polyreg_cnf.engine.memory`), the
    solve's forward NFE and the free memory, and follows its own proposal until
    :meth:`AutoDecision.agree` sets one choice for every block. A block's first solve is
    memory-bounded while it measures. On CUDA a direct solve that runs out of memory is redone
    with the adjoint and the block stays memory-bounded. Memory-bounded means step checkpoints
    for a solve with interior output times when one step's graph fits, the adjoint otherwise;
    for a block whose parameters outnumber its state :data:`ADJOINT_HEAVY_RATIO` times, step
    checkpoints whenever one step's graph fits (its first solve included).

    Args:
        memory_share: Share of free memory direct backprop may use, in (0, 1]; default 0.25 on
            CPU (an overrun is the kernel's OOM killer) and 0.5 on CUDA.
        adjoint: The adjoint used when memory-bounded.
    """

    kind: ClassVar[str] = "auto"
    memory_share: float | None = None
    adjoint: Adjoint = field(default_factory=Adjoint)

    def __post_init__(self) -> None:
        share = self.memory_share
        if share is not None and check_number("Auto: memory_share", share, strict=True) > 1:
            raise ValueError(f"Auto: memory_share must be a number in (0, 1] or None, got "
                             f"{share!r}")
        if not isinstance(self.adjoint, Adjoint):
            raise TypeError(f"Auto: adjoint must be an Adjoint, got {self.adjoint!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "memory_share": self.memory_share,
                "adjoint": self.adjoint.to_dict()}

    def solve(self, problem: Problem) -> Any:
        decision = AutoDecision() if problem.decision is None else problem.decision
        states = (problem.y0,) if isinstance(problem.y0, Tensor) else problem.y0
        ref = states[0]
        self.measure(decision, problem.field, problem.t[0], problem.y0)
        self.weigh_adjoint(decision, states, problem.params, problem.method)
        chosen = self.strategy(decision, problem.t)
        out_of_memory = False
        try:
            solution = chosen.solve(problem)
        except torch.OutOfMemoryError:
            if not isinstance(chosen, Direct):
                raise
            out_of_memory = True
        # Outside the except block: there the traceback would still hold the failed direct
        # solve's frames, and with them its whole graph, while the adjoint runs.
        if out_of_memory:
            self.fall_back(decision, ref)
            solution = self.adjoint.solve(problem)
        self.propose(decision, problem.forward_nfe(), ref, problem.method)
        return solution

    def strategy(self, decision: AutoDecision, times: Tensor) -> Backprop:
        """The strategy of the block's next solve: direct, step checkpoints or the adjoint."""
        if not decision.fell_back and decision.choice == "direct":
            return Direct()
        # Undecided (the first training solve, while the block measures) means the adjoint: the
        # choice that cannot run out of memory (checkpoint_fits is still False), unless the
        # block is adjoint-heavy and one step's graph fits. The adjoint must stop at every
        # output time, so the step checkpoints are cheaper for a solve with interior times,
        # while on an ends-only solve the adjoint is (benchmarks/results/adjoint_overhead.md),
        # except where the parameters it integrates dwarf the state: then every backward stage
        # combines millions of numbers, and the step checkpoints are several times faster
        # (4.5x on the VAE at MNIST size, benchmarks/results/vae_size.md).
        if decision.checkpoint_fits and not times.requires_grad and (
                len(times) > 2 or decision.adjoint_heavy):
            return StepCheckpoint()
        return self.adjoint

    def weigh_adjoint(self, decision: AutoDecision, y0: tuple[Tensor, ...],
                      params: Callable[[], tuple[Tensor, ...]], method: str) -> None:
        """Whether the block's adjoint would carry a parameter state at least
        :data:`ADJOINT_HEAVY_RATIO` times its ODE state (once per block); if so, and before the
        first proposal, whether one step's graph fits (the step checkpoints then bound the
        memory of the first solve instead of the adjoint)."""
        if decision.adjoint_heavy is not None:
            return
        n_params = sum(p.numel() for p in params())
        decision.adjoint_heavy = n_params >= ADJOINT_HEAVY_RATIO * sum(y.numel() for y in y0)
        if decision.adjoint_heavy and decision.proposal is None \
                and method in tde.ADAPTIVE_METHODS and decision.bytes_per_row is not None:
            ref = y0[0]
            share = self.memory_share or default_memory_share(ref.device)
            need = int(decision.bytes_per_row * max(int(ref.shape[0]), 1))
            decision.checkpoint_fits = choose_backprop(
                need, evaluations_per_step(method), available_memory(ref.device),
                share) == "direct"

    def measure(self, decision: AutoDecision, field: Any, t: Tensor,
                y0: Tensor | tuple[Tensor, ...]) -> None:
        """Bytes autograd keeps per evaluation and batch row, once per block (one uncounted
        evaluation of ``field`` on ``y0``, a tensor or a tuple as the field takes it)."""
        if decision.bytes_per_row is not None:
            return
        with torch.enable_grad():
            y = tuple(x.detach().requires_grad_(x.is_floating_point())
                      for x in ((y0,) if isinstance(y0, Tensor) else y0))
            _, nbytes = saved_tensor_bytes(field, t.detach(), y[0] if isinstance(y0, Tensor) else y)
        decision.bytes_per_row = nbytes / max(int(y[0].shape[0]), 1)

    def propose(self, decision: AutoDecision, forward_nfe: int, ref: Tensor,
                method: str) -> None:
        """The block's proposal for its next solve, from this solve's NFE and the free memory."""
        share = self.memory_share or default_memory_share(ref.device)
        # Free memory is read after every training solve (about 40 us), so memory taken
        # meanwhile by other processes or other blocks counts in the next decision.
        need = int(decision.bytes_per_row * max(int(ref.shape[0]), 1))
        free = available_memory(ref.device)
        decision.proposal = (MEMORY_BOUNDED if decision.fell_back else
                             choose_backprop(need, forward_nfe, free, share))
        decision.choice = decision.proposal
        # The step checkpoints hold one step's graph at a time.
        decision.checkpoint_fits = method in tde.ADAPTIVE_METHODS and choose_backprop(
            need, evaluations_per_step(method), free, share) == "direct"

    @staticmethod
    def fall_back(decision: AutoDecision, ref: Tensor) -> None:
        """A direct solve of the block ran out of memory: memory-bounded from now on."""
        decision.fell_back = True
        decision.choice = decision.proposal = MEMORY_BOUNDED
        if ref.device.type == "cuda":
            torch.cuda.empty_cache()
        warnings.warn("backprop Auto(): a direct-backprop solve ran out of memory; this block "
                      "uses the adjoint for the rest of the run.", RuntimeWarning, stacklevel=5)


#: The adjoint integrates every parameter's gradient in its augmented state: when the
#: parameters number this many times the ODE state or more (the amortized VAE at every
#: published size, by its per-sample factors: about 4400x at MNIST; not the 8x8-digits VAE, at
#: about 80x), :class:`Auto`'s memory-bounded choice is the step checkpoints, which keep no such
#: state (4.5x faster than the adjoint at MNIST, benchmarks/results/vae_size.md).
ADJOINT_HEAVY_RATIO = 256

#: The strategy of each ``--backprop`` name.
BACKPROP_KINDS: dict[str, type[Backprop]] = {
    cls.kind: cls for cls in (Auto, Direct, Adjoint, StepCheckpoint)}


def make_backprop(kind: str | Backprop, **settings: Any) -> Backprop:
    """The strategy named ``kind`` with ``settings`` (a strategy object is returned as is).

    Raises:
        ValueError: An unknown name, or settings the strategy does not take.
    """
    if isinstance(kind, Backprop):
        if settings:
            raise ValueError(f"settings {sorted(settings)} given with a built strategy {kind!r}")
        return kind
    if kind not in BACKPROP_KINDS:
        raise ValueError(f"backprop must be one of {', '.join(BACKPROP_KINDS)} or a Backprop "
                         f"object, got {kind!r}")
    cls = BACKPROP_KINDS[kind]
    try:
        return cls(**settings)
    except TypeError:
        raise ValueError(f"{cls.__name__} takes no settings {sorted(settings)}") from None


def backprop_from_dict(data: dict[str, Any]) -> Backprop:
    """The inverse of :meth:`Backprop.to_dict`."""
    data = dict(data)
    if isinstance(data.get("adjoint"), dict):
        data["adjoint"] = backprop_from_dict(data["adjoint"])
    return make_backprop(data.pop("kind"), **data)
