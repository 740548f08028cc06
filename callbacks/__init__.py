"""Lightning callbacks: trajectory regularizers and NFE monitoring."""

from callbacks.loss_term import LossTermCallback
from callbacks.nfe_monitor import NFEMonitor
from callbacks.polynomial import PolynomialTrajectoryRegularizer

__all__ = ["LossTermCallback", "NFEMonitor", "PolynomialTrajectoryRegularizer"]
