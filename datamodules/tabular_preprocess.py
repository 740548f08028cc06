"""Pure preprocessing of the five MAF tabular sets, one function per set (DATA.md, "Tabular").

Each function maps the raw loaded object of its set (the standard files' contents) to float32
train/validation/test arrays exactly as the published pipelines did: same rows, same order, same
columns. :class:`~polyreg_cnf.datamodules.tabular.TabularDataModule` reads the files and calls
these; they are importable from :mod:`polyreg_cnf.datamodules.tabular` as before.

References:
    Papamakarios, Pavlakou and Murray, "Masked Autoregressive Flow for Density Estimation",
    NeurIPS 2017.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from polyreg_cnf.datamodules.base import SPLITS

__all__ = [
    "preprocess_bsds300",
    "preprocess_gas",
    "preprocess_hepmass",
    "preprocess_miniboone",
    "preprocess_power",
]


def _split_tail(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Test = last int(0.1 N) rows; validation = last int(0.1 rest) of the rest; train = remainder.

    The published code slices ``data[-n:]``, which returns everything when ``n == 0``; we refuse
    such tiny inputs instead of silently reproducing that corner case.
    """
    n_test = int(0.1 * data.shape[0])
    n_val = int(0.1 * (data.shape[0] - n_test))
    if n_test < 1 or n_val < 1:
        raise ValueError(f"too few rows ({data.shape[0]}) to split 80/10/10 as published: "
                         f"the test or validation split would be empty")
    test = data[-n_test:]
    rest = data[:-n_test]
    return rest[:-n_val], rest[-n_val:], test


def _as_float32(train: np.ndarray, val: np.ndarray, test: np.ndarray) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(array, dtype=np.float32)
            for name, array in zip(SPLITS, (train, val, test), strict=True)}


def _check_numeric_matrix(data: np.ndarray, what: str, width: int | None = None) -> None:
    if not isinstance(data, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, got {type(data).__name__}")
    if data.ndim != 2:
        raise ValueError(f"{what} must be 2-D (rows x columns), got shape {data.shape}")
    if width is not None and data.shape[1] != width:
        raise ValueError(f"{what} must have {width} columns, got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.number):
        raise ValueError(f"{what} must be numeric, got dtype {data.dtype}")


def _check_numeric_frame(frame: object, what: str) -> None:
    import pandas as pd

    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"{what} must be a pandas DataFrame, got {type(frame).__name__}")
    bad = [str(c) for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if bad:
        raise ValueError(f"{what} has non-numeric columns {bad}; the standard file is all numbers")


def preprocess_power(data: np.ndarray) -> dict[str, np.ndarray]:
    """POWER: seeded shuffle, drop two columns, add the published noise, split, standardise.

    Steps (in this order, all random draws from one ``RandomState(42)``):
    shuffle the rows; delete column 3 then column 1; draw ``voltage = 0.01 U(N, 1)``, then
    ``gap = 0.001 U(N, 1)``, then ``sm = U(N, 3)`` and add ``[gap, voltage, sm, 0]``; split
    80/10/10 from the tail; standardise with the mean and std (ddof 0) of train + validation.

    Args:
        data: The contents of ``power/data.npy``, shape ``(N, 8)``. Not modified.

    Returns:
        ``{"train", "val", "test"}`` float32 arrays of width 6.
    """
    _check_numeric_matrix(data, "POWER data", width=8)
    rng = np.random.RandomState(42)
    data = np.array(data)  # a copy: the shuffle below is in place
    rng.shuffle(data)
    n = data.shape[0]
    data = np.delete(data, 3, axis=1)
    data = np.delete(data, 1, axis=1)
    # The draw order (voltage, gap, sm) differs from the column order (gap, voltage, ...);
    # both are part of the published pipeline and change every value if swapped.
    voltage = 0.01 * rng.rand(n, 1)
    gap = 0.001 * rng.rand(n, 1)
    sm = rng.rand(n, 3)
    data = data + np.hstack((gap, voltage, sm, np.zeros((n, 1))))
    train, val, test = _split_tail(data)
    fit = np.vstack((train, val))
    mean, std = fit.mean(axis=0), fit.std(axis=0)
    return _as_float32((train - mean) / std, (val - mean) / std, (test - mean) / std)


def preprocess_gas(frame: object) -> dict[str, np.ndarray]:
    """GAS: drop three columns, remove highly correlated ones, standardise, split.

    Drops ``Meth``, ``Eth`` and ``Time``; then, while some column has more than one entry > 0.98
    in its row of the Pearson correlation matrix (its own 1.0 counts), drops the first such column
    and recomputes. Standardises with the pandas mean and std (ddof 1) of all rows, then splits
    80/10/10 from the tail.

    Args:
        frame: The pandas DataFrame pickled in ``gas/ethylene_CO.pickle``. Not modified.

    Returns:
        ``{"train", "val", "test"}`` float32 arrays (width 8 for the standard file).
    """
    import pandas as pd

    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"GAS data must be a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in ("Meth", "Eth", "Time") if c not in frame.columns]
    if missing:
        have = [str(c) for c in frame.columns]
        raise ValueError(f"GAS data lacks columns {missing}; it has {have}")
    data = frame.drop(columns=["Meth", "Eth", "Time"])
    _check_numeric_frame(data, "GAS data")

    def counts(table: pd.DataFrame) -> np.ndarray:
        return (table.corr() > 0.98).to_numpy().sum(axis=1)

    count = counts(data)
    while np.any(count > 1):
        data = data.drop(columns=data.columns[int(np.flatnonzero(count > 1)[0])])
        count = counts(data)
    data = (data - data.mean()) / data.std()
    return _as_float32(*_split_tail(data.to_numpy(dtype=np.float64)))


def preprocess_hepmass(train: object, test: object) -> dict[str, np.ndarray]:
    """HEPMASS: keep the signal rows, standardise on train, drop near-discrete features, split.

    In both tables keep the rows whose first column is 1 and drop that column; in test also drop
    the last column. Standardise both with the pandas mean and std (ddof 1) of train. Drop every
    feature whose smallest value occurs more than 5 times in train (from both tables). The last
    int(0.1 N_train) rows of train become the validation split.

    Args:
        train: ``hepmass/1000_train.csv`` as read by ``pandas.read_csv(index_col=False)``.
        test: ``hepmass/1000_test.csv``, read the same way. Neither is modified.

    Returns:
        ``{"train", "val", "test"}`` float32 arrays (width 21 for the standard files).
    """
    _check_numeric_frame(train, "HEPMASS train table")
    _check_numeric_frame(test, "HEPMASS test table")
    train = train[train[train.columns[0]] == 1]
    train = train.drop(columns=train.columns[0])
    test = test[test[test.columns[0]] == 1]
    test = test.drop(columns=test.columns[0])
    test = test.drop(columns=test.columns[-1])
    # pandas aligns the test table to the train statistics by column name; the published files
    # line up exactly, so anything else is a wrong file, not something to silently realign.
    if list(test.columns) != list(train.columns):
        raise ValueError(
            f"HEPMASS test columns {[str(c) for c in test.columns]} (after dropping the label and "
            f"the last column) do not match train columns {[str(c) for c in train.columns]}")
    mean, std = train.mean(), train.std()
    train = ((train - mean) / std).to_numpy(dtype=np.float64)
    test = ((test - mean) / std).to_numpy(dtype=np.float64)
    keep = []
    for j in range(train.shape[1]):
        # np.unique sorts, so counts[0] is the count of the smallest value.
        _, value_counts = np.unique(train[:, j], return_counts=True)
        keep.append(value_counts[0] <= 5)
    keep = np.asarray(keep, dtype=bool)
    train, test = train[:, keep], test[:, keep]
    n_val = int(0.1 * train.shape[0])
    if n_val < 1:
        raise ValueError(f"need at least 10 signal rows in HEPMASS train, got {train.shape[0]}")
    return _as_float32(train[:-n_val], train[-n_val:], test)


def preprocess_miniboone(data: np.ndarray) -> dict[str, np.ndarray]:
    """MINIBOONE: split 80/10/10 from the tail (no shuffle), standardise on train + validation.

    Args:
        data: The contents of ``miniboone/data.npy``, already cleaned. Not modified.

    Returns:
        ``{"train", "val", "test"}`` float32 arrays (width 43 for the standard file).
    """
    _check_numeric_matrix(data, "MINIBOONE data")
    train, val, test = _split_tail(data)
    fit = np.vstack((train, val))
    mean, std = fit.mean(axis=0), fit.std(axis=0)
    return _as_float32((train - mean) / std, (val - mean) / std, (test - mean) / std)


def preprocess_bsds300(datasets: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """BSDS300: the ``train``, ``validation`` and ``test`` datasets, used as they are.

    Args:
        datasets: Mapping with keys ``train``, ``validation``, ``test`` to 2-D arrays.

    Returns:
        ``{"train", "val", "test"}`` float32 arrays (width 63 for the standard file).
    """
    missing = [k for k in ("train", "validation", "test") if k not in datasets]
    if missing:
        raise ValueError(f"BSDS300 lacks datasets {missing}; it has {sorted(datasets)}")
    arrays = []
    for key in ("train", "validation", "test"):
        array = np.asarray(datasets[key])
        _check_numeric_matrix(array, f"BSDS300 dataset '{key}'")
        arrays.append(array)
    return _as_float32(*arrays)
