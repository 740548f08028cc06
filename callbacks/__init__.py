"""Lightning callbacks: trajectory regularizers and NFE monitoring."""

from callbacks.kinetic import KineticRegularizer
from callbacks.loss_term import LossTermCallback
from callbacks.nfe_monitor import NFEMonitor
from callbacks.polynomial import PolynomialTrajectoryRegularizer

__all__ = [
    "KineticRegularizer",
    "LossTermCallback",
    "NFEMonitor",
    "PolynomialTrajectoryRegularizer",
]
