"""RNODE's kinetic-energy and Jacobian-norm regularizer as a Lightning callback."""

from __future__ import annotations

from typing import Any

from polyreg_cnf.callbacks.loss_term import LossTermCallback
from torch import Tensor

from polyreg_cnf.engine.cnf import CNF
from polyreg_cnf.engine.ode import ODEBlock

__all__ = ["KineticRegularizer"]


class KineticRegularizer(LossTermCallback):
    r"""Adds RNODE's transport-cost penalty to the training loss of every CNF block.

    .. math:: \lambda_K \int_0^T \tfrac12 \|f(t, z)\|^2 dt
              + \lambda_J \int_0^T \|\partial f / \partial z\|_F^2 dt

    both integrated as extra ODE states (batch means), the Frobenius norm estimated with the
    block's Hutchinson probe. Reference: Finlay, Jacobsen, Nurbekyan & Oberman, "How to train
    your neural ODE: the world of Jacobian and kinetic regularization", ICML 2020.

    Args:
        kinetic_coef: Weight of the kinetic energy (RNODE: 0.01).
        jacobian_coef: Weight of the Jacobian Frobenius norm (RNODE: 0.01).
    """

    metric = "reg/kinetic"

    def __init__(self, kinetic_coef: float = 0.01, jacobian_coef: float = 0.01) -> None:
        super().__init__(coef=1.0)
        for name, value in (("kinetic_coef", kinetic_coef), ("jacobian_coef", jacobian_coef)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.kinetic_coef = float(kinetic_coef)
        self.jacobian_coef = float(jacobian_coef)

    def _start(self, block: ODEBlock) -> None:
        if isinstance(block, CNF):
            block.start_kinetic_penalty()

    def _stop(self, block: ODEBlock) -> None:
        if isinstance(block, CNF):
            block.stop_kinetic_penalty()

    def _block_penalty(self, block: ODEBlock) -> Tensor | None:
        if not isinstance(block, CNF):
            return None
        terms = block.kinetic_penalty()
        if terms is None:
            return None
        return self.kinetic_coef * terms[0] + self.jacobian_coef * terms[1]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "kinetic_coef": self.kinetic_coef,
                "jacobian_coef": self.jacobian_coef}

    def __repr__(self) -> str:
        return (f"KineticRegularizer(kinetic_coef={self.kinetic_coef}, "
                f"jacobian_coef={self.jacobian_coef})")
