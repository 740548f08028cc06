r"""RNODE's transport costs as an observer of CNF solves: :class:`KineticRecorder`.

Reference: Finlay, Jacobsen, Nurbekyan & Oberman, "How to train your neural ODE: the world of
Jacobian and kinetic regularization", ICML 2020.
"""

from __future__ import annotations

import torch
from torch import Tensor

from polyreg_cnf.engine.observers import IntegrandObserver

__all__ = ["KineticRecorder", "kinetic_integrands"]


def kinetic_integrands(f: Tensor, vjp: Tensor) -> tuple[Tensor, Tensor]:
    r"""Per-sample :math:`\tfrac12\|f\|^2` and :math:`\|\epsilon^\top \partial f/\partial z\|^2`.

    The second is Hutchinson's unbiased estimate of the Jacobian's squared Frobenius norm for a
    probe with :math:`E[\epsilon\epsilon^\top] = I`.

    Example:
        >>> kinetic_integrands(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 2.0]]))
        (tensor([12.5000]), tensor([5.]))
    """
    flat_f = f.reshape(f.shape[0], -1)
    flat_v = vjp.reshape(vjp.shape[0], -1)
    return 0.5 * flat_f.square().sum(dim=1), flat_v.square().sum(dim=1)


class KineticRecorder(IntegrandObserver):
    r"""Integrates RNODE's two terms along every training CNF solve made inside it.

    .. math:: K = \int_0^T \tfrac12 \|f(t, z)\|^2 dt, \qquad
              J = \int_0^T \|\epsilon^\top \partial f / \partial z\|^2 dt

    as two extra ODE states (the probe is the solve's Hutchinson probe); each solve adds its
    batch means to :attr:`kinetic` and :attr:`jacobian`.

    Example:
        >>> from polyreg_cnf import CNF, ODENet, SolverConfig
        >>> cnf = CNF(ODENet(2, (8,)), solver=SolverConfig(backprop="direct"))
        >>> with KineticRecorder() as recorder:
        ...     _ = cnf(torch.randn(4, 2))
        >>> recorder.solves, bool(recorder.kinetic > 0), bool(recorder.jacobian > 0)
        (1, True, True)
    """

    size = 2
    needs_vjp = True

    def __init__(self) -> None:
        #: Batch means of (K, J), one pair per recorded solve.
        self.terms: list[tuple[Tensor, Tensor]] = []

    def integrands(self, f: Tensor, vjp: Tensor | None) -> tuple[Tensor, ...]:
        return kinetic_integrands(f, vjp)

    def record(self, finals: tuple[Tensor, ...]) -> None:
        self.terms.append((finals[0].mean(), finals[1].mean()))

    @property
    def solves(self) -> int:
        """Solves recorded since the last :meth:`clear`."""
        return len(self.terms)

    @property
    def kinetic(self) -> Tensor | None:
        """K summed over the recorded solves (batch means), or None."""
        return torch.stack([k for k, _ in self.terms]).sum() if self.terms else None

    @property
    def jacobian(self) -> Tensor | None:
        """J summed over the recorded solves (batch means), or None."""
        return torch.stack([j for _, j in self.terms]).sum() if self.terms else None

    def clear(self) -> None:
        """Drop what was recorded."""
        self.terms = []

    def __repr__(self) -> str:
        return "KineticRecorder()"

