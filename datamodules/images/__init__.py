"""Image DataModules for VAEs: static/dynamic MNIST, Omniglot, Caltech Silhouettes, Frey, digits."""

from polyreg_cnf.datamodules.images._readers import fortran_flatten
from polyreg_cnf.datamodules.images._remote import IMAGE_URLS
from polyreg_cnf.datamodules.images.base import ImageDataModule
from polyreg_cnf.datamodules.images.factory import IMAGE_DATASETS, make_datamodule
from polyreg_cnf.datamodules.images.sets import (
    CaltechSilhouettesDataModule,
    DigitsDataModule,
    FreyFacesDataModule,
    MNISTDataModule,
    OmniglotDataModule,
    StaticMNISTDataModule,
)

__all__ = [
    "IMAGE_DATASETS",
    "IMAGE_URLS",
    "CaltechSilhouettesDataModule",
    "DigitsDataModule",
    "FreyFacesDataModule",
    "ImageDataModule",
    "MNISTDataModule",
    "OmniglotDataModule",
    "StaticMNISTDataModule",
    "fortran_flatten",
    "make_datamodule",
]
