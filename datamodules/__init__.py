"""DataModules: toy densities, tabular sets and image sets, all served as float32 arrays."""

from datamodules._files import DataFileError
from datamodules.base import ArrayDataModule

__all__ = ["ArrayDataModule", "DataFileError"]
