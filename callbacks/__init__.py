"""Lightning callbacks: trajectory regularizers, NFE monitoring, the backprop choice."""

from polyreg_cnf._layout import refuse_top_level

refuse_top_level(__name__, "from polyreg_cnf.callbacks import PolynomialTrajectoryRegularizer")

from polyreg_cnf.callbacks.backprop import BackpropSelector
from polyreg_cnf.callbacks.kinetic import KineticRegularizer
from polyreg_cnf.callbacks.loss_term import LossTermCallback
from polyreg_cnf.callbacks.nfe_monitor import NFEMonitor
from polyreg_cnf.callbacks.polynomial import PolynomialTrajectoryRegularizer

__all__ = [
    "BackpropSelector",
    "KineticRegularizer",
    "LossTermCallback",
    "NFEMonitor",
    "PolynomialTrajectoryRegularizer",
]
