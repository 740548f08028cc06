"""RNODE's kinetic-energy and Jacobian-norm regularizer as a Lightning callback."""

from __future__ import annotations

from typing import Any

import lightning as L
from polyreg_cnf.callbacks.loss_term import LossTermCallback
from torch import Tensor
from typing_extensions import override

from polyreg_cnf.engine._checks import check_number
from polyreg_cnf.engine.rnode import KineticRecorder

__all__ = ["KineticRegularizer"]


class KineticRegularizer(LossTermCallback):
    r"""Adds RNODE's transport-cost penalty to the training loss of every CNF solve.

    .. math:: \lambda_K \int_0^T \tfrac12 \|f(t, z)\|^2 dt
              + \lambda_J \int_0^T \|\partial f / \partial z\|_F^2 dt

    both integrated as extra ODE states (batch means) by a
    :class:`~polyreg_cnf.engine.rnode.KineticRecorder`, the Frobenius norm estimated with the
    solve's Hutchinson probe. ``reg/kinetic`` and ``reg/jacobian`` log the two integrals
    unweighted. Reference: Finlay, Jacobsen, Nurbekyan & Oberman, "How to train your neural ODE:
    the world of Jacobian and kinetic regularization", ICML 2020.

    Args:
        kinetic_coef: Weight of the kinetic energy (RNODE: 0.01).
        jacobian_coef: Weight of the Jacobian Frobenius norm (RNODE: 0.01).
    """

    metric = "reg/kinetic"

    def __init__(self, kinetic_coef: float = 0.01, jacobian_coef: float = 0.01) -> None:
        super().__init__(coef=1.0)
        self.kinetic_coef = check_number("kinetic_coef", kinetic_coef)
        self.jacobian_coef = check_number("jacobian_coef", jacobian_coef)

    def make_observer(self, pl_module: L.LightningModule) -> KineticRecorder:
        return KineticRecorder()

    def terms(self) -> dict[str, tuple[float, Tensor]]:
        if self.observer is None or not self.observer.solves:
            return {}
        return {"reg/kinetic": (self.kinetic_coef, self.observer.kinetic),
                "reg/jacobian": (self.jacobian_coef, self.observer.jacobian)}

    def settings(self) -> dict[str, float | int]:
        return {"kinetic_coef": self.kinetic_coef, "jacobian_coef": self.jacobian_coef}

    def _nothing_to_regularize(self, pl_module: L.LightningModule) -> str | None:
        if self.observer is not None and self.observer.solves:
            return None
        return (f"{type(self).__name__} found no CNF solve to regularize in the first training "
                f"step of {type(pl_module).__name__}: the kinetic terms are integrated along "
                f"polyreg_cnf.CNF solves; build the flow with polyreg_cnf.CNF.")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "kinetic_coef": self.kinetic_coef,
                "jacobian_coef": self.jacobian_coef}

    def __repr__(self) -> str:
        return (f"KineticRegularizer(kinetic_coef={self.kinetic_coef}, "
                f"jacobian_coef={self.jacobian_coef})")
