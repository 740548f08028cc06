"""DataModules: toy densities, tabular sets, the user's own table and image sets.

Every DataModule serves float32 arrays as ``(x,)`` batches and exposes ``arrays()`` with the
preprocessed ``{"train", "val", "test"}`` splits.
"""

from datamodules._files import DataFileError
from datamodules.base import ArrayDataModule
from datamodules.images import (
    IMAGE_DATASETS,
    CaltechSilhouettesDataModule,
    DigitsDataModule,
    FreyFacesDataModule,
    ImageDataModule,
    MNISTDataModule,
    OmniglotDataModule,
    StaticMNISTDataModule,
    make_datamodule,
)
from datamodules.tabular import PUBLISHED_DIMS, TABULAR_SETS, TabularDataModule
from datamodules.toy import TOY_DENSITIES, ToyDataModule
from datamodules.user_table import UserTableDataModule

__all__ = [
    "IMAGE_DATASETS",
    "PUBLISHED_DIMS",
    "TABULAR_SETS",
    "TOY_DENSITIES",
    "ArrayDataModule",
    "CaltechSilhouettesDataModule",
    "DataFileError",
    "DigitsDataModule",
    "FreyFacesDataModule",
    "ImageDataModule",
    "MNISTDataModule",
    "OmniglotDataModule",
    "StaticMNISTDataModule",
    "TabularDataModule",
    "ToyDataModule",
    "UserTableDataModule",
    "make_datamodule",
]
