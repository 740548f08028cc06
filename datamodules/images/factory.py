"""Build an image DataModule from its name (the CLI's strings stop here)."""

from __future__ import annotations

import os
from typing import Any

from polyreg_cnf.datamodules.images.base import ImageDataModule
from polyreg_cnf.datamodules.images.sets import (
    CaltechSilhouettesDataModule,
    DigitsDataModule,
    FreyFacesDataModule,
    MNISTDataModule,
    OmniglotDataModule,
    StaticMNISTDataModule,
)

__all__ = ["IMAGE_DATASETS", "make_datamodule"]

_CLASSES: dict[str, type[ImageDataModule]] = {
    "digits": DigitsDataModule,
    "mnist": MNISTDataModule,
    "static_mnist": StaticMNISTDataModule,
    "omniglot": OmniglotDataModule,
    "caltech": CaltechSilhouettesDataModule,
    "freyfaces": FreyFacesDataModule,
}

IMAGE_DATASETS: tuple[str, ...] = tuple(_CLASSES)


def make_datamodule(name: str, data_dir: str | os.PathLike | None = None,
                    **kwargs: Any) -> ImageDataModule:
    """Return the image DataModule called ``name``, built with ``data_dir`` and ``kwargs``.

    Args:
        name: One of ``IMAGE_DATASETS``.
        data_dir: Data root; required by every set but ``"digits"``, which has no files and
            rejects one (so a misplaced path is not silently ignored).
        **kwargs: Passed on to the DataModule's constructor.

    Raises:
        ValueError: unknown ``name``, or ``data_dir`` missing/given where it does not apply.

    Example:
        >>> make_datamodule("digits", batch_size=64).image_shape
        (1, 8, 8)
    """
    if name not in _CLASSES:
        raise ValueError(f"unknown image data set {name!r}; valid names: {IMAGE_DATASETS}")
    cls = _CLASSES[name]
    if cls is DigitsDataModule:
        if data_dir is not None:
            raise ValueError(f"'digits' is bundled with scikit-learn and reads no files; got "
                             f"data_dir={data_dir!r}, pass None")
        return cls(**kwargs)
    if data_dir is None:
        raise ValueError(f"{name!r} reads files: pass data_dir, the data root (got None)")
    return cls(data_dir, **kwargs)
