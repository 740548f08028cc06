"""LightningModules: the systems that wire flows, losses, metrics and optimisers."""

from polyreg_cnf.models.density import CNFDensityEstimator

__all__ = ["CNFDensityEstimator"]
