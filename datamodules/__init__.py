"""DataModules: toy densities, tabular sets, the user's own table and image sets.

Every DataModule serves float32 arrays as ``(x,)`` batches and exposes ``arrays()`` with the
preprocessed ``{"train", "val", "test"}`` splits.
"""

from polyreg_cnf._layout import refuse_top_level

refuse_top_level(__name__, "from polyreg_cnf.datamodules import ToyDataModule")

from polyreg_cnf.datamodules._files import DataFileError
from polyreg_cnf.datamodules.base import ArrayDataModule
from polyreg_cnf.datamodules.images import (
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
from polyreg_cnf.datamodules.tabular import PUBLISHED_DIMS, TABULAR_SETS, TabularDataModule
from polyreg_cnf.datamodules.toy import TOY_DENSITIES, ToyDataModule
from polyreg_cnf.datamodules.user_table import UserTableDataModule

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
