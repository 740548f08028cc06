"""The image DataModule: flattened images, their shape and likelihood, and dynamic binarization."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from polyreg_cnf.datamodules._files import DataFileError, require_file
from polyreg_cnf.datamodules.base import ArrayDataModule
from polyreg_cnf.datamodules.images._remote import fetch, resolve_url

from polyreg_cnf.engine._checks import check_bool, check_int

__all__ = ["EVAL_BINARIZATION_SEED", "LIKELIHOODS", "ImageDataModule", "binarize_once"]

LIKELIHOODS = ("bernoulli", "categorical256")

# The published pipelines binarize validation then test with np.random.seed(777) followed by
# np.random.binomial; a RandomState(777) used in the same order draws exactly the same bits.
EVAL_BINARIZATION_SEED = 777


def binarize_once(rng: np.random.RandomState, probs: np.ndarray) -> np.ndarray:
    """One Bernoulli draw per pixel, ``x ~ Bernoulli(probs)``, from a numpy RandomState.

    Args:
        rng: The generator; successive calls continue its stream.
        probs: Grey levels in [0, 1].

    Returns:
        ``float32`` array of 0 and 1 with the shape of ``probs``.
    """
    return rng.binomial(1, probs).astype(np.float32)


@dataclass(frozen=True)
class DataFile:
    """A data set stored as one file: its standard name, the folder under ``data_dir`` that
    holds it, and what it is (for the message when it is missing)."""

    name: str
    folder: str
    title: str
    content: str


class ImageDataModule(ArrayDataModule):
    """Images as flattened float32 rows in ``(x,)`` batches, with optional dynamic binarization.

    Subclasses set ``image_shape`` (C, H, W) and ``likelihood``, implement ``load_splits()`` and,
    when their training split holds grey levels to be binarized afresh at every batch, pass
    ``dynamic_binarization=True``.

    Dynamic binarization replaces each training batch ``x`` (grey levels in [0, 1]) by
    ``(u < x)`` with ``u`` uniform, drawn from a dedicated ``torch.Generator`` seeded with
    ``seed``. Its state is part of ``state_dict()``, which Lightning stores in checkpoints, so two
    runs with the same seed see the same bits and a resumed run continues the same stream. The
    uniforms are drawn on the CPU whatever the device of the batch, so the stream does not depend
    on the hardware. Validation and test batches, and any batch seen without a trainer or outside
    the training loop, pass unchanged; ``arrays()["train"]`` therefore holds the grey levels of
    such a set, and its validation and test splits are binarized once. Under DDP every process
    draws from the same stream (the checkpoint holds one state); their data shards differ.

    Args:
        data_dir: Data root holding the standard folders (``MNIST_static/``, ``OMNIGLOT/``, ...).
        seed: Seeds the dynamic-binarization generator and any seeded split of the subclass.
        download: Fetch missing files in ``prepare_data()`` from the standard URLs.
        base_url: Mirror folder serving the files under their standard names (overrides the table).
        urls: Per-file URL overrides, ``{filename: url}``.
        checksums: Per-file sha256 digests, ``{filename: hex digest}``, overriding the table.
        dynamic_binarization: Binarize training batches afresh (see above).
        batch_size: Training batch size (100 in the published VAE runs).
        eval_batch_size: Validation/test batch size; defaults to ``batch_size``.
        num_workers: DataLoader worker processes.
    """

    image_shape: ClassVar[tuple[int, int, int]] = (1, 28, 28)
    likelihood: ClassVar[str] = "bernoulli"

    def __init__(self, data_dir: str | os.PathLike | None, *, seed: int = 0,
                 download: bool = False, base_url: str | None = None,
                 urls: Mapping[str, str] | None = None,
                 checksums: Mapping[str, str] | None = None,
                 dynamic_binarization: bool = False, batch_size: int = 100,
                 eval_batch_size: int | None = None, num_workers: int = 0) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers,
                         shuffle_seed=seed if isinstance(seed, int) else 0)
        if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
            raise TypeError(f"data_dir must be a path (str or os.PathLike), got "
                            f"{type(data_dir).__name__}: {data_dir!r}")
        check_int("seed", seed, minimum=0)
        check_bool("download", download)
        check_bool("dynamic_binarization", dynamic_binarization)
        if base_url is not None and not isinstance(base_url, str):
            raise TypeError(f"base_url must be a str or None, got {type(base_url).__name__}: "
                            f"{base_url!r}")
        for name, value in (("urls", urls), ("checksums", checksums)):
            if value is not None and not isinstance(value, Mapping):
                raise TypeError(f"{name} must be a mapping filename -> str or None, got "
                                f"{type(value).__name__}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"{type(self).__name__}.likelihood is {self.likelihood!r}; allowed: "
                             f"{LIKELIHOODS}")
        self.data_dir = None if data_dir is None else Path(data_dir)
        self.seed = seed
        self.download = download
        self.base_url = base_url
        self.urls = dict(urls) if urls is not None else None
        self.checksums = dict(checksums) if checksums is not None else None
        self.dynamic_binarization = dynamic_binarization
        self._generator = torch.Generator().manual_seed(seed)

    # ---------------------------------------------------------------- files

    @property
    def source(self) -> str:
        where = "" if self.data_dir is None else f"({self.data_dir})"
        return f"{type(self).__name__}{where}"

    #: The file of a data set stored as one (None: several files).
    FILE: ClassVar[DataFile | None] = None

    def remote_files(self) -> dict[str, Path]:
        """Files this module can download: ``{standard filename: destination path}``."""
        if self.FILE is None:
            return {}
        return {self.FILE.name: self._root() / self.FILE.folder / self.FILE.name}

    def _single_file(self) -> Path:
        """The path of :attr:`FILE`, checked to exist."""
        return self._require(self.remote_files()[self.FILE.name],
                             f"{self.FILE.title} {self.FILE.name!r} ({self.FILE.content})")

    def _root(self) -> Path:
        if self.data_dir is None:
            raise ValueError(f"{type(self).__name__} reads files: pass data_dir, the folder that "
                             f"holds its data set")
        return self.data_dir

    def _require(self, path: Path, what: str) -> Path:
        """``path`` if it exists, else a DataFileError with what it is and where to get it."""
        url = resolve_url(path.name, self.base_url, self.urls)
        return require_file(path, what,
                            f"Download it from {url} and place it at {path.resolve()}, or pass "
                            f"download=True to fetch it in prepare_data().")

    def prepare_data(self) -> None:
        """Download missing files when ``download=True`` (Lightning runs this on one process)."""
        if not self.download:
            return
        for filename, dest in self.remote_files().items():
            if not self._present(dest):
                fetch(filename, dest, base_url=self.base_url, urls=self.urls,
                      checksums=self.checksums)

    def _present(self, dest: Path) -> bool:
        return dest.is_file()

    # ---------------------------------------------------------------- dynamic binarization

    def binarize(self, x: torch.Tensor) -> torch.Tensor:
        """Draw ``Bernoulli(x)`` per pixel from the module's generator (advancing its state).

        Args:
            x: Grey levels in [0, 1], any shape, any device.

        Returns:
            0/1 tensor with the dtype, shape and device of ``x``.
        """
        uniform = torch.rand(x.shape, generator=self._generator, dtype=torch.float32)
        return (uniform.to(x.device) < x).to(x.dtype)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Binarize training batches dynamically; leave every other batch as it is."""
        trainer = self.trainer
        if not self.dynamic_binarization or trainer is None or not trainer.training:
            return batch
        if not isinstance(batch, (tuple, list)) or not batch or not torch.is_tensor(batch[0]):
            raise TypeError(f"{type(self).__name__} expects (x,) batches with a tensor x, got "
                            f"{type(batch).__name__}")
        return type(batch)([self.binarize(batch[0]), *batch[1:]])

    def state_dict(self) -> dict[str, Any]:
        """The binarization stream's position; in checkpoints, so a resumed run continues it."""
        return {"seed": self.seed, "binarization_generator": self._generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the binarization stream saved by ``state_dict()``."""
        if "binarization_generator" not in state_dict:
            raise ValueError(f"{type(self).__name__}.load_state_dict: no "
                             f"'binarization_generator' entry; got keys {sorted(state_dict)}")
        state = state_dict["binarization_generator"]
        if not torch.is_tensor(state) or state.dtype != torch.uint8:
            raise TypeError(f"binarization_generator must be the uint8 tensor of "
                            f"torch.Generator.get_state(), got {type(state).__name__}")
        self._generator.set_state(state.cpu())

    # ---------------------------------------------------------------- checks shared by subclasses

    def _check_range(self, array: np.ndarray, path: Path, what: str, binary: bool) -> None:
        """Raise a DataFileError if ``array`` is not in [0, 1] (or not only 0 and 1)."""
        if binary:
            bad = ~np.isin(array, (0, 1))
            if bad.any():
                row = int(np.argmax(bad.any(axis=tuple(range(1, array.ndim)))))
                raise DataFileError(f"{path}: {what} must hold only 0 and 1; image {row} holds "
                                    f"{array[row][bad[row]].flat[0]!r}")
        elif array.size and (array.min() < 0 or array.max() > 1):
            raise DataFileError(f"{path}: {what} must hold grey levels in [0, 1], got values in "
                                f"[{array.min()}, {array.max()}]")
