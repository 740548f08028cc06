"""LightningModules: the systems that wire flows, losses, metrics and optimisers."""

from polyreg_cnf.models.density import CNFDensityEstimator
from polyreg_cnf.models.vae import CNFVAE, VAE_PRESETS, build_vae

__all__ = ["VAE_PRESETS", "CNFDensityEstimator", "CNFVAE", "build_vae"]
