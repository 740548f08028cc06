"""The base DataModule: a data set that is three float32 arrays (train, val, test)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

__all__ = ["ArrayDataModule", "EpochSampler", "ResumableDataLoader", "ShardSampler",
           "check_splits"]


def _world() -> tuple[int, int]:
    """(number of processes, this process's rank); (1, 0) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class EpochSampler(DistributedSampler):
    """Shuffled indices that depend only on (seed, epoch), shardable, resumable mid-epoch.

    The permutation of epoch e is drawn from a generator seeded with ``seed + e``, so it is the
    same however often it is recomputed and whatever else used the global RNG; each process takes
    every ``num_replicas``-th index (padded to equal shards, as DistributedSampler does).
    ``resume(epoch, batches_done, batch_size)`` skips the batches a checkpointed run already
    trained on in that epoch; ``len()`` stays the full epoch length, which is what Lightning's
    restored batch counters expect. Subclassing DistributedSampler keeps Lightning from
    replacing it under DDP.
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        replicas, rank = _world()
        super().__init__(dataset, num_replicas=replicas, rank=rank, shuffle=True, seed=seed)
        self.batches_done = 0
        self._skip: tuple[int, int] | None = None  # (epoch, samples to skip in it)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.batches_done = 0
        super().set_epoch(epoch)

    def resume(self, epoch: int, batches_done: int, batch_size: int) -> None:
        """Continue epoch ``epoch`` after its first ``batches_done`` batches."""
        self.set_epoch(epoch)
        self.batches_done = batches_done
        self._skip = (epoch, batches_done * batch_size)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self._skip is not None and self._skip[0] == self.epoch:
            indices = indices[self._skip[1]:]
        return iter(indices)


class ShardSampler(DistributedSampler):
    """Evaluation sharding without padding: every sample is scored exactly once over all ranks.

    DistributedSampler pads the shards to equal length by repeating samples, which would bias
    a mean over the evaluation set; here rank r takes indices r, r + W, r + 2W, ...
    """

    def __init__(self, dataset: Dataset) -> None:
        replicas, rank = _world()
        super().__init__(dataset, num_replicas=replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(self.rank, len(self.dataset), self.num_replicas))
        self.total_size = len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))


class ResumableDataLoader(DataLoader):
    """A training DataLoader whose position in the epoch is saved in Lightning checkpoints.

    Lightning stores ``state_dict()`` of stateful training loaders and calls ``load_state_dict``
    before iterating again, so a run resumed mid-epoch sees exactly the batches an uninterrupted
    run would have seen. The DataModule counts consumed batches (``sampler.batches_done``).
    """

    sampler: EpochSampler

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": int(self.sampler.epoch), "batches_done": int(self.sampler.batches_done)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sampler.resume(int(state_dict["epoch"]), int(state_dict["batches_done"]),
                            int(self.batch_size))

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

    Training batches come in an order fixed by ``shuffle_seed`` and the epoch (EpochSampler), and
    the position in the epoch is saved in checkpoints, so a resumed run continues with exactly
    the batches an uninterrupted run would see. Under DDP each process trains on its own shard,
    and validation/test shards cover every sample exactly once (no padding), so metric means are
    exact.

    Args:
        batch_size: Training batch size (per process).
        eval_batch_size: Batch size for validation and test; defaults to ``batch_size``.
        num_workers: DataLoader worker processes.
        shuffle_seed: Seed of the training order.
    """

    def __init__(self, batch_size: int = 512, eval_batch_size: int | None = None,
                 num_workers: int = 0, shuffle_seed: int = 0) -> None:
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
        self.shuffle_seed = int(shuffle_seed)
        self._splits: dict[str, np.ndarray] | None = None
        self._train_loader: ResumableDataLoader | None = None

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

    def _dataset(self, split: str) -> TensorDataset:
        return TensorDataset(torch.from_numpy(self.arrays()[split]))

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("train")
        # A private generator for worker seeds keeps the global RNG stream untouched by
        # iterator creation, so resumed runs replay the same probes and time samples.
        generator = torch.Generator().manual_seed(self.shuffle_seed)
        self._train_loader = ResumableDataLoader(
            dataset, batch_size=self.batch_size, sampler=EpochSampler(dataset, self.shuffle_seed),
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            generator=generator)
        return self._train_loader

    def _eval_loader(self, split: str) -> DataLoader:
        dataset = self._dataset(split)
        return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=ShardSampler(dataset),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Count training batches as they are used (not as they are prefetched), so the
        # checkpointed position is the number of batches actually trained on.
        trainer = self.trainer
        if trainer is not None and trainer.training and self._train_loader is not None:
            self._train_loader.sampler.batches_done += 1
        return batch
