"""The base DataModule: a data set that is three float32 arrays (train, val, test)."""

from __future__ import annotations

from abc import abstractmethod

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["ArrayDataModule", "check_splits"]

SPLITS = ("train", "val", "test")


def check_splits(splits: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Validate preprocessed splits once, at the boundary, and return them as float32 arrays.

    Args:
        splits: Mapping with keys ``train``, ``val`` and ``test`` to 2-D arrays (rows x features).
        source: Where the data came from, quoted in error messages.

    Raises:
        ValueError: a split is missing, empty, not 2-D, of mismatched width, or holds NaN/inf.
    """
    missing = [name for name in SPLITS if name not in splits]
    if missing:
        raise ValueError(f"{source}: splits {missing} missing; got keys {sorted(splits)}")
    out = {}
    width = None
    for name in SPLITS:
        array = np.asarray(splits[name])
        if array.ndim != 2:
            raise ValueError(f"{source}: split '{name}' must be 2-D (rows x features), "
                             f"got shape {array.shape}")
        if array.shape[0] == 0:
            raise ValueError(f"{source}: split '{name}' is empty (shape {array.shape})")
        if width is not None and array.shape[1] != width:
            raise ValueError(f"{source}: split '{name}' has {array.shape[1]} columns, "
                             f"the others have {width}")
        width = array.shape[1]
        if not np.issubdtype(array.dtype, np.number):
            raise ValueError(f"{source}: split '{name}' is not numeric (dtype {array.dtype})")
        bad = ~np.isfinite(array).all(axis=1)
        if bad.any():
            raise ValueError(f"{source}: split '{name}' has {int(bad.sum())} rows with NaN or "
                             f"inf values (first at row {int(np.argmax(bad))})")
        out[name] = np.ascontiguousarray(array, dtype=np.float32)
    return out


class ArrayDataModule(L.LightningDataModule):
    """Serves float32 arrays as ``(x,)`` batches; subclasses only say how to load the splits.

    Lightning inserts a DistributedSampler under DDP, so each process sees its own shard; the
    training order comes from the global seed (``lightning.seed_everything``).

    Args:
        batch_size: Training batch size (per process).
        eval_batch_size: Batch size for validation and test; defaults to ``batch_size``.
        num_workers: DataLoader worker processes.
    """

    def __init__(self, batch_size: int = 512, eval_batch_size: int | None = None,
                 num_workers: int = 0) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if eval_batch_size is not None and (not isinstance(eval_batch_size, int)
                                            or eval_batch_size < 1):
            raise ValueError(f"eval_batch_size must be a positive int or None, "
                             f"got {eval_batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self._splits: dict[str, np.ndarray] | None = None

    @abstractmethod
    def load_splits(self) -> dict[str, np.ndarray]:
        """Return the preprocessed ``train``/``val``/``test`` arrays (rows x features)."""

    @property
    def source(self) -> str:
        """A short description of where the data comes from, for messages and run configs."""
        return type(self).__name__

    def setup(self, stage: str | None = None) -> None:
        if self._splits is None:
            self._splits = check_splits(self.load_splits(), self.source)

    def arrays(self) -> dict[str, np.ndarray]:
        """The preprocessed splits ``{"train", "val", "test"}`` as float32 arrays."""
        if self._splits is None:
            raise RuntimeError(f"{self.source}: call prepare_data() and setup() before arrays()")
        return dict(self._splits)

    @property
    def dim(self) -> int:
        """Number of features per row."""
        return int(self.arrays()["train"].shape[1])

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        data = torch.from_numpy(self.arrays()[split])
        batch = self.batch_size if split == "train" else self.eval_batch_size
        return DataLoader(TensorDataset(data), batch_size=batch, shuffle=shuffle,
                          num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
