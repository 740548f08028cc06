"""LightningModules: the systems that wire flows, losses, metrics and optimisers."""

from polyreg_cnf.models.density import CNFDensityEstimator
from polyreg_cnf.models.vae import CNFVAE

__all__ = ["CNFDensityEstimator", "CNFVAE"]
