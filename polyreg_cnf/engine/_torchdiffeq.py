"""Everything the engine takes from torchdiffeq, in one place.

The solver functions, the method registry, the names of the step callbacks and the error norm
come from here and nowhere else, so a torchdiffeq upgrade is checked in one file (and by
``tests/test_torchdiffeq_contract.py``, which names the private parts used here and in
:mod:`polyreg_cnf.engine.step_checkpoint`).
"""

from __future__ import annotations

import torchdiffeq
from torchdiffeq._impl.adjoint import find_parameters
from torchdiffeq._impl.misc import _mixed_norm
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.solvers import AdaptiveStepsizeODESolver, FixedGridODESolver

__all__ = ["ADAPTIVE_METHODS", "CALLBACKS", "FIXED_METHODS", "METHODS", "STEP_COUNTS",
           "find_parameters", "mixed_norm", "odeint", "odeint_adjoint"]

#: torchdiffeq's own solver functions: the only references to them in the engine.
odeint = torchdiffeq.odeint
odeint_adjoint = torchdiffeq.odeint_adjoint
#: torchdiffeq's error norm of a tuple state: the largest RMS norm of its tensors.
mixed_norm = _mixed_norm

#: Adaptive-step methods (their NFE grows with stiffness: what the regularizer targets), read from
#: torchdiffeq's registry. Their steps never depend on the output times (dense output).
ADAPTIVE_METHODS: tuple[str, ...] = tuple(sorted(
    (name for name, cls in SOLVERS.items() if issubclass(cls, AdaptiveStepsizeODESolver)),
    key=lambda name: name != "dopri5"))  # torchdiffeq's default first
#: Fixed-grid methods (they need ``step_size``, or they step on the output times themselves).
FIXED_METHODS: tuple[str, ...] = tuple(
    name for name, cls in SOLVERS.items() if issubclass(cls, FixedGridODESolver))
#: Every method this project solves with (torchdiffeq's ``scipy_solver`` is left out: it has no
#: autograd path).
METHODS: tuple[str, ...] = ADAPTIVE_METHODS + FIXED_METHODS

#: The step callbacks torchdiffeq calls on the function it solves, forward and under the adjoint.
CALLBACKS: tuple[str, ...] = ("callback_step", "callback_accept_step", "callback_reject_step")
ADJOINT_CALLBACKS: tuple[str, ...] = tuple(name + "_adjoint" for name in CALLBACKS)
#: The callbacks that say whether a step was accepted, and whether it was a backward step.
STEP_COUNTS: dict[str, tuple[bool, bool]] = {
    "callback_accept_step": (True, False), "callback_reject_step": (False, False),
    "callback_accept_step_adjoint": (True, True),
    "callback_reject_step_adjoint": (False, True)}
