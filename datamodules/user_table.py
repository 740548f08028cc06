"""The user's own table (.npy, .npz, .csv, .h5/.hdf5) as a standardised density-estimation set.

The rows are split with a seeded permutation and standardised with the training split's mean and
standard deviation. The statistics travel in the Lightning checkpoint (``state_dict``), and
:meth:`UserTableDataModule.log_det_jacobian` gives the term that turns a log-density learnt on the
standardised data into one on the raw data:

.. math:: \\log p_{raw}(x) = \\log p_{std}\\big((x - \\mu) / \\sigma\\big) - \\sum_j \\log \\sigma_j
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from polyreg_cnf.datamodules._files import require_file
from polyreg_cnf.datamodules.base import ArrayDataModule
from polyreg_cnf.datamodules.table_files import TABLE_FORMATS, Column, read_table

from polyreg_cnf.engine._checks import check_int

__all__ = ["EVAL_ROWS", "EVAL_SHARE_BOUNDS", "TABLE_FORMATS", "VALIDATION_INTERVAL_BOUNDS",
           "UserTableDataModule", "eval_share", "read_table", "validation_interval"]

#: Bounds of a table's validation interval in training steps: often enough to see the minimum of
#: a few-hundred-row table (reached within a few hundred steps), and at most FFJORD's tabular
#: cadence.
VALIDATION_INTERVAL_BOUNDS = (10, 200)


def validation_interval(n_train: int, batch_size: int) -> int:
    """Training steps between validations of a table with ``n_train`` training rows.

    Once per epoch (``ceil(n_train / batch_size)`` steps), within
    :data:`VALIDATION_INTERVAL_BOUNDS`: a table of a few hundred rows is one step per epoch and
    overfits within a few hundred steps, so it validates every 10 steps; a large one every 200
    (the cadence of FFJORD's tabular script).

    Example:
        >>> validation_interval(400, 512), validation_interval(20_000, 512)
        (10, 40)
        >>> validation_interval(2_000_000, 512)
        200
    """
    check_int("n_train", n_train)
    check_int("batch_size", batch_size)
    low, high = VALIDATION_INTERVAL_BOUNDS
    return min(high, max(low, -(-n_train // batch_size)))

#: Validation and test each get :data:`EVAL_ROWS` rows, as a share of the table within these
#: bounds (:func:`eval_share`).
EVAL_SHARE_BOUNDS = (0.1, 0.2)
EVAL_ROWS = 100


def eval_share(n_rows: int) -> float:
    """The share of a table's rows that validation, and again test, get by default.

    10 % of a large table (the tabular sets' validation share), but at least
    :data:`EVAL_ROWS` rows where 20 % of the table allows it: a few hundred rows would leave
    30 validation rows, too few to pick the best of a run's checkpoints (their mean NLL differs
    by chance from the test rows' by more than neighbouring checkpoints differ), and 30 test
    rows too few to tell how good that pick is.

    .. math:: \\min\\big(0.2,\\ \\max(0.1,\\ 100 / n)\\big)

    Example:
        >>> eval_share(300), eval_share(500), eval_share(5000)
        (0.2, 0.2, 0.1)
        >>> round(eval_share(800), 3)
        0.125
    """
    check_int("n_rows", n_rows)
    low, high = EVAL_SHARE_BOUNDS
    return min(high, max(low, EVAL_ROWS / n_rows))


class UserTableDataModule(ArrayDataModule):
    """A numeric table of the user's, split with a seed and standardised with train statistics.

    Rows holding NaN or inf are refused (with their count) unless ``drop_nonfinite`` is set. The
    rows are shuffled by ``numpy.random.default_rng(seed).permutation``; the first
    ``int(test_fraction N)`` permuted rows are the test split, the next ``int(val_fraction N)`` the
    validation split, the rest train. By default each fraction is :func:`eval_share` of the
    usable rows: 10 %, but 100 rows up to 20 % (a 300-row table: 60 validation, 60 test rows).
    Every split is standardised with the mean and standard
    deviation (ddof 0) of train. A column that is constant in train has no density to learn, so
    it is an error that names it (drop it with ``columns``) rather than silently kept with
    std = 1.

    Args:
        path: A .npy, .npz, .csv or .h5/.hdf5 file.
        columns: Names (CSV with a header) or indices of the columns to model; ``None`` = all.
        drop_nonfinite: Drop rows holding NaN or inf instead of refusing the file.
        val_fraction: Fraction of rows for validation, in (0, 1); None: :func:`eval_share`.
        test_fraction: Fraction of rows for test, in (0, 1); the two sum to less than 1;
            None: :func:`eval_share`.
        seed: Seed of the row permutation.
        batch_size: Training batch size (per process).
        eval_batch_size: Batch size for validation and test; defaults to ``batch_size``.
        num_workers: DataLoader worker processes.
        h5_key: HDF5 dataset to read; by default the only 2-D one.
        npz_key: .npz array to read; by default the only (or first) one.

    Example:
        A CSV with a header, two of its three columns modelled; a density learnt on the
        standardised rows scores raw rows with ``log_det_jacobian``:

        >>> import tempfile
        >>> rows = np.random.default_rng(0).normal([1.0, 5.0, 0.0], [2.0, 0.5, 1.0], (200, 3))
        >>> folder = tempfile.TemporaryDirectory()
        >>> path = Path(folder.name) / "measurements.csv"
        >>> np.savetxt(path, rows, delimiter=",", header="x,y,z", comments="")
        >>> dm = UserTableDataModule(path, columns=["x", "y"], batch_size=32)
        >>> dm.setup()
        >>> {split: a.shape for split, a in dm.arrays().items()}
        {'train': (120, 2), 'val': (40, 2), 'test': (40, 2)}
        >>> bool(np.abs(dm.arrays()["train"].mean(0)).max() < 1e-6)
        True
        >>> bool(dm.log_det_jacobian() == -np.log(dm.std.astype(np.float64)).sum())
        True
        >>> folder.cleanup()
    """

    def __init__(self, path: str | os.PathLike, columns: Sequence[Column] | None = None,
                 drop_nonfinite: bool = False, val_fraction: float | None = None,
                 test_fraction: float | None = None, seed: int = 0, batch_size: int = 512,
                 eval_batch_size: int | None = None, num_workers: int = 0,
                 h5_key: str | None = None, npz_key: str | None = None) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed=seed)
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a file path, got {type(path).__name__}")
        self.path = Path(path).expanduser()
        if self.path.suffix.lower() not in TABLE_FORMATS:
            raise ValueError(f"unsupported table format {self.path.suffix!r} ({self.path}); "
                             f"use one of {list(TABLE_FORMATS)}")
        if columns is not None:
            if isinstance(columns, (str, bytes)) or not isinstance(columns, Sequence):
                raise TypeError(f"columns must be a list of names or indices, got {columns!r}")
            if len(columns) == 0:
                raise ValueError("columns must name at least one column, got []")
            # Plain str/int so the checkpoint holds no numpy scalars (weights_only loading).
            columns = [c if isinstance(c, (str, bool)) or not isinstance(c, (int, np.integer))
                       else int(c) for c in columns]
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, (int, float)) or not 0 < value < 1):
                raise ValueError(f"{name} must be a number in (0, 1) or None, got {value!r}")
        if None not in (val_fraction, test_fraction) and val_fraction + test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction must be < 1, got "
                             f"{val_fraction} + {test_fraction}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.columns = columns
        self.drop_nonfinite = bool(drop_nonfinite)
        self.val_fraction = None if val_fraction is None else float(val_fraction)
        self.test_fraction = None if test_fraction is None else float(test_fraction)
        self.seed = int(seed)
        self.h5_key = h5_key
        self.npz_key = npz_key
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None
        self.column_names: list[str] | None = None
        self.n_dropped = 0
        # Statistics restored from a checkpoint win over the ones the file would give.
        self._restored = False

    @property
    def source(self) -> str:
        return self.path.name

    def prepare_data(self) -> None:
        """Check that the file exists (nothing to download or cache)."""
        require_file(self.path, "the table", "Pass the path of an existing .npy, .npz, .csv, "
                                             ".h5 or .hdf5 file.")

    def load_splits(self) -> dict[str, np.ndarray]:
        data, names = read_table(self.path, self.columns, self.h5_key, self.npz_key)
        self.column_names = names
        n = data.shape[0]
        bad = ~np.isfinite(data).all(axis=1)
        n_bad = int(bad.sum())
        if n_bad:
            if not self.drop_nonfinite:
                raise ValueError(f"{self.path}: {n_bad} of {n} rows contain NaN or inf; pass "
                                 f"drop_nonfinite=True (train.py --drop-nonfinite) to drop them")
            warnings.warn(f"{self.path}: dropped {n_bad} of {n} rows that contain NaN or inf",
                          UserWarning, stacklevel=3)
            data = data[~bad]
            n = data.shape[0]
        self.n_dropped = n_bad
        share = eval_share(n) if n else EVAL_SHARE_BOUNDS[0]
        val_fraction = share if self.val_fraction is None else self.val_fraction
        test_fraction = share if self.test_fraction is None else self.test_fraction
        n_test, n_val = int(test_fraction * n), int(val_fraction * n)
        if n_test < 1 or n_val < 1 or n - n_test - n_val < 2:
            raise ValueError(f"{self.path}: {n} usable rows are too few to split with "
                             f"val_fraction={val_fraction:g}, test_fraction="
                             f"{test_fraction:g} (each split needs rows, train at least 2)")
        order = np.random.default_rng(self.seed).permutation(n)
        test = data[order[:n_test]]
        val = data[order[n_test:n_test + n_val]]
        train = data[order[n_test + n_val:]]
        if self._restored:
            if self.mean.shape[0] != data.shape[1]:
                raise ValueError(f"{self.path}: the checkpoint's statistics are for "
                                 f"{self.mean.shape[0]} columns, the table has {data.shape[1]}")
        else:
            mean = train.mean(axis=0).astype(np.float32)
            std = train.std(axis=0).astype(np.float32)
            constant = [names[j] for j in np.flatnonzero(~(std > 0) | ~np.isfinite(std))]
            if constant:
                raise ValueError(f"{self.path}: columns {constant} are constant in the training "
                                 f"split (std 0), so they have no density; leave them out with "
                                 f"columns=[...]")
            self.mean, self.std = mean, std
        return {"train": self.standardize(train), "val": self.standardize(val),
                "test": self.standardize(test)}

    def _stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self.mean is None or self.std is None:
            raise RuntimeError(f"{self.source}: statistics unknown; call setup() or "
                               f"load_state_dict() first")
        return self.mean, self.std

    def standardize(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Map raw rows to the standardised space the model sees: ``(x - mean) / std``.

        Args:
            x: Raw rows ``(..., D)``, a numpy array or a torch tensor.

        Returns:
            float32 numpy array for numpy input (computed in float64, so it equals the arrays
            from ``setup()`` exactly); for a tensor, a tensor of its floating dtype and device.
        """
        mean, std = self._stats()
        if x.shape[-1] != mean.shape[0]:
            raise ValueError(f"expected rows of {mean.shape[0]} columns, got shape "
                             f"{tuple(x.shape)}")
        if isinstance(x, torch.Tensor):
            dtype = x.dtype if x.is_floating_point() else torch.float32
            return (x.to(dtype) - torch.as_tensor(mean, dtype=dtype, device=x.device)) \
                / torch.as_tensor(std, dtype=dtype, device=x.device)
        z = (np.asarray(x, dtype=np.float64) - mean.astype(np.float64)) / std.astype(np.float64)
        return z.astype(np.float32)

    def log_det_jacobian(self) -> float:
        """``log |det d standardize(x) / dx| = -sum(log std)``.

        Add it to a log-density learnt on standardised data to score raw data:
        ``log p_raw(x) = log p_std(standardize(x)) + log_det_jacobian()``.
        """
        _, std = self._stats()
        return float(-np.sum(np.log(std.astype(np.float64))))

    def state_dict(self) -> dict[str, Any]:
        """The statistics and the choices that produced them, as plain Python values.

        Plain lists (not arrays) so the checkpoint loads with ``torch.load(weights_only=True)``.
        """
        return {
            "path": str(self.path),
            "columns": self.columns,
            "column_names": self.column_names,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "drop_nonfinite": self.drop_nonfinite,
            "mean": None if self.mean is None else self.mean.tolist(),
            "std": None if self.std is None else self.std.tolist(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the statistics of a checkpoint; they then standardise every split."""
        if state_dict.get("mean") is None or state_dict.get("std") is None:
            return
        mean = np.asarray(state_dict["mean"], dtype=np.float32)
        std = np.asarray(state_dict["std"], dtype=np.float32)
        if mean.shape != std.shape or mean.ndim != 1 or not (std > 0).all():
            raise ValueError(f"checkpoint statistics are malformed: mean shape {mean.shape}, "
                             f"std shape {std.shape}, std must be > 0")
        changed = {key: (state_dict.get(key), getattr(self, key))
                   for key in ("columns", "seed", "val_fraction", "test_fraction")
                   if key in state_dict and state_dict[key] != getattr(self, key)}
        if state_dict.get("path") not in (None, str(self.path)):
            changed["path"] = (state_dict["path"], str(self.path))
        if changed:
            warnings.warn(f"{self.source}: the checkpoint was made with other settings "
                          f"(checkpoint, now): {changed}; its statistics are used",
                          UserWarning, stacklevel=2)
        had_splits = self._splits is not None
        differ = self.mean is None or not (np.array_equal(mean, self.mean)
                                           and np.array_equal(std, self.std))
        self.mean, self.std, self._restored = mean, std, True
        if had_splits and differ:
            # Lightning restores after setup(): standardise again with the checkpoint's numbers.
            self._splits = None
            self.setup()
