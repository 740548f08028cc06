"""Counting function evaluations (NFE) of ODE solves, forward and backward apart."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from torch import nn

from polyreg_cnf.engine.errors import NFELimitError
from polyreg_cnf.engine.observers import Observer, observe

__all__ = ["NFECounter", "NFELimitError", "collect_nfe", "record_nfe", "reset_nfe"]


@dataclass
class NFECounter(Observer):
    """Running counts of function evaluations and steps: an observer of solves.

    Every ODE block owns one and makes it active for its own solves; :func:`record_nfe` makes
    one active around any code (the innermost active counter counts a solve). One evaluation
    is one call of the right-hand side f (whatever it computes alongside, e.g. the trace).
    ``forward`` counts the solves of the forward pass, ``backward`` the adjoint solves of the
    backward pass (zero when backpropagating through the solver). Step counts come from
    torchdiffeq's step callbacks (adaptive methods only).

    Example:
        dopri5 costs 2 evaluations to start (one of them choosing the first step) and 6 per
        step, accepted or rejected:

        >>> import torch
        >>> from polyreg_cnf import CNF, ODENet, SolverConfig
        >>> cnf = CNF(ODENet(2, (8,)), solver=SolverConfig(backprop="direct"))
        >>> _ = cnf(torch.randn(4, 2))
        >>> n = cnf.nfe
        >>> n.forward == 2 + 6 * (n.accepted + n.rejected), n.backward
        (True, 0)
    """

    forward: int = 0
    backward: int = 0
    accepted: int = 0
    rejected: int = 0
    accepted_backward: int = 0
    rejected_backward: int = 0
    solves: int = 0

    def reset(self) -> None:
        """Set every count to zero."""
        for name in self.__dataclass_fields__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        """The counts as a plain dict."""
        return asdict(self)

    def step(self, accepted: bool, backward: bool) -> None:
        """Count one step of an adaptive solver."""
        name = ("accepted" if accepted else "rejected") + ("_backward" if backward else "")
        setattr(self, name, getattr(self, name) + 1)


def _counters(module: nn.Module) -> list[NFECounter]:
    return [m.nfe for m in module.modules() if isinstance(getattr(m, "nfe", None), NFECounter)]


def collect_nfe(module: nn.Module, extra: Sequence[NFECounter] = ()
                ) -> dict[str, int | list[dict[str, int]]]:
    """Sum the NFE counters of every ODE block inside ``module`` (and of ``extra`` counters).

    Args:
        module: Searched for submodules whose ``nfe`` attribute is an :class:`NFECounter`
            (an integer ``nfe`` that a user keeps on a function object is ignored).
        extra: More counters to add, e.g. the one :func:`record_nfe`
            fills with the drop-in ``odeint`` solves; they are listed after the blocks.

    Returns:
        ``{"forward", "backward", "total", "accepted", "rejected", "accepted_backward",
        "rejected_backward", "solves", "blocks": [per-counter dicts in module order]}``.
    """
    blocks = [c.as_dict() for c in [*_counters(module), *extra]]
    totals: dict[str, int | list[dict[str, int]]] = {
        key: sum(b[key] for b in blocks) for key in NFECounter.__dataclass_fields__}
    totals["total"] = int(totals["forward"]) + int(totals["backward"])
    totals["blocks"] = blocks
    return totals


@contextmanager
def record_nfe(counter: NFECounter) -> Iterator[NFECounter]:
    """Count the function evaluations of the solves made inside into ``counter``.

    ODE blocks count into their own counters (the innermost active counter counts), so this
    sees the drop-in ``odeint`` solves. Evaluations made after a solve returned (the adjoint's
    backward pass) count as backward, even when backward runs after the block exits. The user's
    function object is never modified.

    Example:
        >>> import torch
        >>> from polyreg_cnf import odeint
        >>> counter = NFECounter()
        >>> with record_nfe(counter):
        ...     _ = odeint(lambda t, y: -y, torch.ones(3), torch.tensor([0.0, 1.0]))
        >>> counter.forward > 0 and counter.solves == 1
        True
    """
    if not isinstance(counter, NFECounter):
        raise TypeError(f"counter must be an NFECounter, got {type(counter).__name__}")
    with observe(counter):
        yield counter


def reset_nfe(module: nn.Module) -> None:
    """Reset the NFE counters of every ODE block inside ``module``."""
    for counter in _counters(module):
        counter.reset()
