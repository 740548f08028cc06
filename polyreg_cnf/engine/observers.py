"""Observers: what watches an ODE solve, plugged in by context instead of by hooks.

Every solve of the engine (:func:`polyreg_cnf.engine.solving.solve`, which ``ODEBlock``, ``CNF``
and the drop-in ``odeint`` all call) asks the active observers what to do. Three kinds exist:

- :class:`~polyreg_cnf.engine.nfe.NFECounter` counts function evaluations and steps;
- :class:`~polyreg_cnf.engine.recording.TrajectoryRecorder` adds interior output times and
  records the trajectory polynomial penalty;
- :class:`~polyreg_cnf.engine.rnode.KineticRecorder` integrates RNODE's kinetic terms as extra
  states of CNF solves (an :class:`IntegrandObserver`).

An observer is active inside ``with observe(obs):`` (recorders are context managers themselves).
Of each kind only the innermost active one acts, so an ``ODEBlock``'s own counter shadows a
counter the user opened around the whole model. The context is a ``ContextVar``: threads and
asyncio tasks each see their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

from torch import Tensor

__all__ = ["IntegrandObserver", "Observer", "active", "observe"]


class Observer:
    """Base of everything :func:`observe` accepts; the kind of an observer is its base class.

    ``with observer:`` is ``with observe(observer):`` (re-entrant).
    """

    def __enter__(self) -> Any:
        context = observe(self)
        context.__enter__()
        self.__dict__.setdefault("_observe_contexts", []).append(context)
        return self

    def __exit__(self, *exc: object) -> None:
        self.__dict__["_observe_contexts"].pop().__exit__(None, None, None)


class IntegrandObserver(Observer):
    r"""Integrates quantities of each evaluation along CNF solves, as extra ODE states.

    A CNF solve made while one is active appends ``size`` states with initial value 0 and
    derivative :meth:`integrands`, and hands their values at the end time to :meth:`record`.
    """

    #: Number of extra states.
    size: int = 0
    #: Whether :meth:`integrands` needs the vector-Jacobian product with the Hutchinson probe.
    needs_vjp: bool = False

    def integrands(self, f: Tensor, vjp: Tensor | None) -> tuple[Tensor, ...]:
        r"""Per-sample derivatives of the extra states, each of shape (B,).

        Args:
            f: The vector field's value, shape (B, D).
            vjp: :math:`\epsilon^\top \partial f / \partial z` with the solve's probe, or None
                when :attr:`needs_vjp` is False.
        """
        raise NotImplementedError

    def record(self, finals: tuple[Tensor, ...]) -> None:
        """Take the extra states' values at the end of a solve, each of shape (B,)."""
        raise NotImplementedError


_ACTIVE: ContextVar[tuple[Observer, ...]] = ContextVar("polyreg_cnf_observers", default=())

ObserverT = TypeVar("ObserverT", bound=Observer)


@contextmanager
def observe(*observers: Observer) -> Iterator[None]:
    """Make ``observers`` active for the solves made inside the block.

    Scopes need not nest: a Lightning callback may open one in one hook and close it in
    another while other callbacks open and close theirs in between, so leaving a scope removes
    exactly its own entries (the latest of each observer) whatever was added meanwhile.
    """
    for obs in observers:
        if not isinstance(obs, Observer):
            raise TypeError(f"observe() takes Observer objects (NFECounter, TrajectoryRecorder, "
                            f"KineticRecorder, ...), got {type(obs).__name__}")
    _ACTIVE.set(_ACTIVE.get() + observers)
    try:
        yield
    finally:
        current = list(_ACTIVE.get())
        for obs in observers:
            for i in range(len(current) - 1, -1, -1):
                if current[i] is obs:
                    del current[i]
                    break
        _ACTIVE.set(tuple(current))


def active(kind: type[ObserverT]) -> ObserverT | None:
    """The innermost active observer of ``kind``, or None."""
    for obs in reversed(_ACTIVE.get()):
        if isinstance(obs, kind):
            return obs
    return None
