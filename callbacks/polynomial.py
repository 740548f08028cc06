"""The trajectory polynomial regularizer as a Lightning callback."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from polyreg_cnf.callbacks.loss_term import LossTermCallback
from torch import Tensor

from polyreg_cnf.engine.ode import ODEBlock

__all__ = ["PolynomialTrajectoryRegularizer"]


class PolynomialTrajectoryRegularizer(LossTermCallback):
    r"""Pulls every ODE trajectory toward its least-squares polynomial fit.

    On each training step every ODEBlock of the LightningModule (CNF blocks included) draws
    K = ``num_samples`` sorted uniform interior times, reads the state there from the solver's
    dense output (no extra forward steps), and the callback adds

    .. math:: \text{coef} \sum_{\text{blocks}} \frac{1}{nB} \|(I - P)Z\|^2

    to the loss (see :func:`polyreg_cnf.trajectory_polynomial_penalty`). Validation, test and
    predict are untouched. Reference: Huang & Yeh, "Accelerating Continuous Normalizing Flow with
    Trajectory Polynomial Regularization", AAAI 2021.

    Args:
        coef: Penalty weight (paper: 5).
        num_samples: Interior time points K per solve (paper: 2).
        order: Polynomial degree m (paper: 1); needs K >= m for a non-zero penalty.

    Example:
        >>> trainer = L.Trainer(callbacks=[PolynomialTrajectoryRegularizer()])  # doctest: +SKIP
    """

    metric = "reg/poly"

    def __init__(self, coef: float = 5.0, num_samples: int = 2, order: int = 1) -> None:
        super().__init__(coef)
        for name, value in (("num_samples", num_samples), ("order", order)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if num_samples < order:
            raise ValueError(
                f"num_samples must be >= order (a degree-{order} fit through num_samples + 2 "
                f"points is exact when num_samples < order, so the penalty would be zero); got "
                f"num_samples={num_samples}, order={order}")
        self.num_samples = num_samples
        self.order = order

    def _start(self, block: ODEBlock) -> None:
        block.start_trajectory_penalty(self.num_samples, self.order)

    def _stop(self, block: ODEBlock) -> None:
        block.stop_trajectory_penalty()

    def _block_penalty(self, block: ODEBlock) -> Tensor | None:
        return block.trajectory_penalty()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "num_samples": self.num_samples, "order": self.order}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = (state_dict.get("num_samples"), state_dict.get("order"))
        if saved != (None, None) and saved != (self.num_samples, self.order):
            rank_zero_warn(f"PolynomialTrajectoryRegularizer: checkpoint had (num_samples, "
                           f"order)={saved}, continuing with {(self.num_samples, self.order)}.")

    def __repr__(self) -> str:
        return (f"PolynomialTrajectoryRegularizer(coef={self.coef}, "
                f"num_samples={self.num_samples}, order={self.order})")
