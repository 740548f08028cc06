"""polyreg-cnf: continuous normalizing flows with trajectory polynomial regularization."""

from polyreg_cnf.cnf import CNF, CNFStack, standard_normal_logprob
from polyreg_cnf.nets import ODENet
from polyreg_cnf.nfe import NFECounter, NFELimitError, collect_nfe, reset_nfe
from polyreg_cnf.ode import ODEBlock, ode_blocks
from polyreg_cnf.penalty import sample_penalty_times, trajectory_polynomial_penalty
from polyreg_cnf.solver import SolverConfig
from polyreg_cnf.trace import divergence_exact, divergence_hutchinson

__all__ = [
    "CNF",
    "CNFStack",
    "NFECounter",
    "NFELimitError",
    "ODEBlock",
    "ODENet",
    "SolverConfig",
    "collect_nfe",
    "divergence_exact",
    "divergence_hutchinson",
    "ode_blocks",
    "reset_nfe",
    "sample_penalty_times",
    "standard_normal_logprob",
    "trajectory_polynomial_penalty",
]
