r"""How the gradients of a solve are computed: small strategy objects, checked when built.

:func:`polyreg_cnf.engine.solving.solve` takes one of

- :class:`Direct`: backpropagate through the solver's operations (fastest; memory grows with
  the forward NFE);
- :class:`Adjoint`: solve the adjoint ODE backwards (memory independent of NFE, a second solve);
- :class:`StepCheckpoint`: keep the state at each accepted step and backpropagate through one
  recomputed step at a time (:mod:`polyreg_cnf.engine.step_checkpoint`);
- :class:`Auto`: direct while the step's activations fit a share of the free memory, else
  memory-bounded (step checkpoints for solves with interior output times, the adjoint for
  others). Its decision lives in the object; every block of a model shares one, and
  :class:`polyreg_cnf.callbacks.BackpropSelector` agrees it across DDP ranks.

An invalid combination cannot be built: each strategy checks its arguments in its constructor,
and :meth:`Backprop.check` checks it against the solver method.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from polyreg_cnf.engine._checks import check_bool, check_number
from polyreg_cnf.engine._torchdiffeq import ADAPTIVE_METHODS
from polyreg_cnf.engine.memory import (
    available_memory,
    choose_backprop,
    default_memory_share,
    saved_tensor_bytes,
)
from polyreg_cnf.engine.step_checkpoint import evaluations_per_step

__all__ = ["ADJOINT_HEAVY_RATIO", "BACKPROP_KINDS", "Adjoint", "Auto", "Backprop", "Direct",
           "StepCheckpoint", "backprop_from_dict", "make_backprop"]


@dataclass(frozen=True)
class Backprop:
    """Base of the strategies; ``kind`` is the name the command line and checkpoints use."""

    kind: ClassVar[str] = ""

    def check(self, method: str, train_T: bool = False) -> None:
        """Raise ValueError if this strategy cannot differentiate solves of ``method``."""

    def to_dict(self) -> dict[str, Any]:
        """The strategy's settings as plain values (``kind`` included)."""
        return {"kind": self.kind}


@dataclass(frozen=True)
class Direct(Backprop):
    """Backpropagate through the solver's operations."""

    kind: ClassVar[str] = "direct"


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


@dataclass(frozen=True)
class StepCheckpoint(Backprop):
    """Backpropagate through one recomputed step at a time (adaptive Runge-Kutta methods)."""

    kind: ClassVar[str] = "checkpoint"

    def check(self, method: str, train_T: bool = False) -> None:
        if method not in ADAPTIVE_METHODS:
            raise ValueError(f"StepCheckpoint recomputes adaptive Runge-Kutta steps; method "
                             f"{method!r} is fixed-grid (use one of "
                             f"{', '.join(ADAPTIVE_METHODS)}, or Direct())")
        if train_T:
            raise ValueError("StepCheckpoint cannot learn the end time (train_T=True): its step "
                             "sizes are fixed; use Direct(), Adjoint() or Auto()")


@dataclass
class _Site:
    """What :class:`Auto` knows about one place that solves (one ODE block)."""

    bytes_per_row: float | None = None
    #: Whether the adjoint's parameter state dwarfs the ODE state (see ADJOINT_HEAVY_RATIO).
    adjoint_heavy: bool | None = None
    choice: str | None = None
    proposal: str | None = None
    checkpoint_fits: bool = False
    fell_back: bool = False


@dataclass(frozen=True, eq=False)
class Auto(Backprop):
    """Direct backprop while it fits ``memory_share`` of the free memory, else memory-bounded.

    After every training solve the solving site (an ODE block) proposes ``"direct"`` or
    ``"adjoint"`` (memory-bounded) from its measured bytes per evaluation and row
    (:mod:`polyreg_cnf.engine.memory`), the solve's forward NFE and the free memory, and follows
    its own proposal until :meth:`agree` sets one choice for every site. A site's first solve
    uses the adjoint while it measures. On CUDA a direct solve that runs out of memory is redone
    with the adjoint and the site stays memory-bounded. Memory-bounded means step checkpoints
    for a solve with interior output times when one step's graph fits, the adjoint otherwise;
    for a site whose parameters outnumber its state :data:`ADJOINT_HEAVY_RATIO` times, step
    checkpoints whenever one step's graph fits (its first solve included).

    Args:
        memory_share: Share of free memory direct backprop may use, in (0, 1]; default 0.25 on
            CPU (an overrun is the kernel's OOM killer) and 0.5 on CUDA.
        adjoint: The adjoint used when memory-bounded.
    """

    kind: ClassVar[str] = "auto"
    memory_share: float | None = None
    adjoint: Adjoint = field(default_factory=Adjoint)
    _sites: dict[int, _Site] = field(default_factory=dict, init=False, repr=False)
    _agreed: list[Any] = field(default_factory=lambda: [None, False], init=False, repr=False)

    def __post_init__(self) -> None:
        share = self.memory_share
        if share is not None and check_number("Auto: memory_share", share, strict=True) > 1:
            raise ValueError(f"Auto: memory_share must be a number in (0, 1] or None, got "
                             f"{share!r}")
        if not isinstance(self.adjoint, Adjoint):
            raise TypeError(f"Auto: adjoint must be an Adjoint, got {self.adjoint!r}")

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Auto) and other.memory_share == self.memory_share
                and other.adjoint == self.adjoint)

    def __hash__(self) -> int:
        return hash(("auto", self.memory_share, self.adjoint))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "memory_share": self.memory_share,
                "adjoint": self.adjoint.to_dict()}

    def fresh(self) -> Auto:
        """A new Auto with the same settings and no decisions (one per model)."""
        return Auto(self.memory_share, self.adjoint)

    # ------------------------------------------------------------------ the decision
    @property
    def choice(self) -> str | None:
        """The agreed choice (``"direct"`` or ``"adjoint"``), None before the first agreement."""
        return self._agreed[0]

    @property
    def fell_back(self) -> bool:
        """Whether a direct solve ran out of memory (then memory-bounded for good)."""
        return bool(self._agreed[1]) or any(s.fell_back for s in self._sites.values())

    def wants_memory_bound(self) -> bool:
        """Whether any site proposed memory-bounded backprop (or fell back) since its last
        solve."""
        return self.fell_back or any(s.proposal == "adjoint" for s in self._sites.values())

    def agree(self, choice: str, fell_back: bool) -> None:
        """Set one choice for every site (after the ranks agreed; restored from a checkpoint)."""
        if choice not in ("direct", "adjoint"):
            raise ValueError(f"choice must be 'direct' or 'adjoint', got {choice!r}")
        self._agreed[:] = [choice, bool(fell_back)]
        for site in self._sites.values():
            site.choice = choice
            site.fell_back = site.fell_back or bool(fell_back)

    def site(self, key: object) -> _Site:
        """The state of the site ``key`` (made on first use, with the agreed choice)."""
        state = self._sites.get(id(key))
        if state is None:
            state = self._sites[id(key)] = _Site(choice=self._agreed[0],
                                                 fell_back=bool(self._agreed[1]))
        return state

    def mode(self, key: object, times: Tensor) -> str:
        """``"direct"``, ``"adjoint"`` or ``"checkpoint"`` for the next solve of site ``key``."""
        state = self.site(key)
        if not state.fell_back and state.choice == "direct":
            return "direct"
        # Undecided (the first training solve, while the site measures) means the adjoint: the
        # choice that cannot run out of memory (checkpoint_fits is still False), unless the
        # site is adjoint-heavy and one step's graph fits. The adjoint must stop at every
        # output time, so the step checkpoints are cheaper for a solve with interior times,
        # while on an ends-only solve the adjoint is (benchmarks/results/adjoint_overhead.md),
        # except where the parameters it integrates dwarf the state: then every backward stage
        # combines millions of numbers, and the step checkpoints are several times faster
        # (4.5x on the VAE at MNIST size, benchmarks/results/vae_size.md).
        if state.checkpoint_fits and not times.requires_grad and (
                len(times) > 2 or state.adjoint_heavy):
            return "checkpoint"
        return "adjoint"

    def weigh_adjoint(self, key: object, y0: tuple[Tensor, ...],
                      params: Callable[[], Sequence[Tensor]], method: str) -> None:
        """Whether the adjoint of site ``key`` would carry a parameter state at least
        :data:`ADJOINT_HEAVY_RATIO` times its ODE state (once per site); if so, and before the
        first proposal, whether one step's graph fits (the step checkpoints then bound the
        memory of the first solve instead of the adjoint)."""
        state = self.site(key)
        if state.adjoint_heavy is not None:
            return
        n_params = sum(p.numel() for p in params())
        state.adjoint_heavy = n_params >= ADJOINT_HEAVY_RATIO * sum(y.numel() for y in y0)
        if state.adjoint_heavy and state.proposal is None and method in ADAPTIVE_METHODS \
                and state.bytes_per_row is not None:
            ref = y0[0]
            share = self.memory_share or default_memory_share(ref.device)
            need = int(state.bytes_per_row * max(int(ref.shape[0]), 1))
            state.checkpoint_fits = choose_backprop(
                need, evaluations_per_step(method), available_memory(ref.device),
                share) == "direct"

    def measure(self, key: object, field: Any, t: Tensor, y0: tuple[Tensor, ...]) -> None:
        """Bytes autograd keeps per evaluation and batch row, once per site (one uncounted
        evaluation)."""
        state = self.site(key)
        if state.bytes_per_row is not None:
            return
        with torch.enable_grad():
            y = tuple(x.detach().requires_grad_(x.is_floating_point()) for x in y0)
            _, nbytes = saved_tensor_bytes(field, t.detach(), y)
        state.bytes_per_row = nbytes / max(int(y0[0].shape[0]), 1)

    def propose(self, key: object, forward_nfe: int, ref: Tensor, method: str) -> None:
        """The site's proposal for its next solve, from this solve's NFE and the free memory."""
        state = self.site(key)
        share = self.memory_share or default_memory_share(ref.device)
        # Free memory is read after every training solve (about 40 us), so memory taken
        # meanwhile by other processes or other blocks counts in the next decision.
        need = int(state.bytes_per_row * max(int(ref.shape[0]), 1))
        free = available_memory(ref.device)
        state.proposal = ("adjoint" if state.fell_back else
                          choose_backprop(need, forward_nfe, free, share))
        state.choice = state.proposal
        # The step checkpoints hold one step's graph at a time.
        state.checkpoint_fits = method in ADAPTIVE_METHODS and choose_backprop(
            need, evaluations_per_step(method), free, share) == "direct"

    def fall_back(self, key: object, ref: Tensor) -> None:
        """A direct solve of site ``key`` ran out of memory: memory-bounded from now on."""
        state = self.site(key)
        state.fell_back = True
        state.choice = state.proposal = "adjoint"
        if ref.device.type == "cuda":
            torch.cuda.empty_cache()
        warnings.warn("backprop Auto(): a direct-backprop solve ran out of memory; this block "
                      "uses the adjoint for the rest of the run.", RuntimeWarning, stacklevel=4)

    def __getstate__(self) -> dict[str, Any]:
        # A copy (deepcopy, a spawned DDP process) measures again: the sites are keyed by id.
        return {"memory_share": self.memory_share, "adjoint": self.adjoint,
                "_agreed": list(self._agreed)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "memory_share", state["memory_share"])
        object.__setattr__(self, "adjoint", state["adjoint"])
        object.__setattr__(self, "_sites", {})
        object.__setattr__(self, "_agreed", list(state["_agreed"]))


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
