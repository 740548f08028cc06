"""The engine: ODE solves, CNFs, traces, NFE counting and the polynomial penalty.

Depends on torch and torchdiffeq only (no Lightning): everything here works in a plain PyTorch
training loop. ``polyreg_cnf`` re-exports the public names.
"""

from polyreg_cnf.engine._torchdiffeq import solver_failure
from polyreg_cnf.engine.cnf import CNF, CNFStack, standard_normal_logprob
from polyreg_cnf.engine.dropin import (
    odeint,
    odeint_adjoint,
    odeint_checkpoint,
    redirect_torchdiffeq,
)
from polyreg_cnf.engine.errors import PolyregCNFError, SolverError
from polyreg_cnf.engine.flow_config import FlowConfig
from polyreg_cnf.engine.nets import ODENet
from polyreg_cnf.engine.nfe import NFECounter, NFELimitError, collect_nfe, record_nfe, reset_nfe
from polyreg_cnf.engine.observers import observe
from polyreg_cnf.engine.ode import ODEBlock, ode_blocks
from polyreg_cnf.engine.penalty import sample_penalty_times, trajectory_polynomial_penalty
from polyreg_cnf.engine.recording import TrajectoryRecorder
from polyreg_cnf.engine.rnode import KineticRecorder
from polyreg_cnf.engine.solver_config import SolverConfig
from polyreg_cnf.engine.solving import solve
from polyreg_cnf.engine.strategies import Adjoint, Auto, Backprop, Direct, StepCheckpoint
from polyreg_cnf.engine.trace import divergence_exact, divergence_hutchinson

__all__ = [
    "CNF",
    "Adjoint",
    "Auto",
    "Backprop",
    "CNFStack",
    "Direct",
    "FlowConfig",
    "KineticRecorder",
    "NFECounter",
    "NFELimitError",
    "ODEBlock",
    "ODENet",
    "PolyregCNFError",
    "SolverConfig",
    "SolverError",
    "StepCheckpoint",
    "TrajectoryRecorder",
    "collect_nfe",
    "divergence_exact",
    "divergence_hutchinson",
    "observe",
    "ode_blocks",
    "odeint",
    "odeint_adjoint",
    "odeint_checkpoint",
    "record_nfe",
    "redirect_torchdiffeq",
    "reset_nfe",
    "sample_penalty_times",
    "solve",
    "solver_failure",
    "standard_normal_logprob",
    "trajectory_polynomial_penalty",
]
