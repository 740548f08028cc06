"""polyreg-cnf: continuous normalizing flows with trajectory polynomial regularization.

Layout (every part is reached through this namespace):

- ``polyreg_cnf`` / ``polyreg_cnf.engine``: ODE solves, CNFs, traces, NFE and the penalty maths
  (torch and torchdiffeq only); ``polyreg_cnf.odeint`` / ``polyreg_cnf.odeint_adjoint`` are
  drop-in replacements for torchdiffeq's that the regularizer callback can see.
- ``polyreg_cnf.models``: the LightningModules (density estimation, CNF-VAE).
- ``polyreg_cnf.callbacks``: Lightning callbacks (``PolynomialTrajectoryRegularizer``, ...).
- ``polyreg_cnf.datamodules``: DataModules (toy, tabular, the user's table, images).
- ``polyreg_cnf.app``: the application: run config, presets, ``build``, logging, reports.
"""

# The package's public names are the engine's: one list, kept in polyreg_cnf/engine/__init__.py.
from polyreg_cnf.engine import *  # noqa: F403
from polyreg_cnf.engine import __all__  # noqa: F401
