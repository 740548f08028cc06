"""Reading the user's table from .npy, .npz, .csv or .h5/.hdf5 into a float64 rows x columns array.

:func:`read_table` is the one entry;
:class:`~polyreg_cnf.datamodules.user_table.UserTableDataModule` splits and standardises what it
returns.
"""

from __future__ import annotations

import csv
import os
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from polyreg_cnf.datamodules._files import DataFileError, require_file

__all__ = ["TABLE_FORMATS", "Column", "read_table"]

TABLE_FORMATS = (".npy", ".npz", ".csv", ".h5", ".hdf5")

Column = str | int


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _as_matrix(array: np.ndarray, where: str) -> np.ndarray:
    """A numeric 2-D float64 matrix from an array; a 1-D array is one column."""
    array = np.asarray(array)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{where}: values must be numeric, got dtype {array.dtype}")
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(f"{where}: expected a 2-D table (rows x columns), got shape {array.shape}")
    return array.astype(np.float64)


def _select_positions(columns: Sequence[Column] | None, names: list[str], has_names: bool,
                      where: str) -> list[int]:
    """Positions of the chosen columns; names need a header, integers may be negative."""
    if columns is None:
        return list(range(len(names)))
    positions = []
    for column in columns:
        if isinstance(column, bool) or not isinstance(column, (str, int, np.integer)):
            raise TypeError(f"{where}: a column is a name (str) or an index (int), "
                            f"got {column!r} of type {type(column).__name__}")
        if isinstance(column, str):
            if not has_names:
                raise ValueError(f"{where}: has no column names, so choose columns by index "
                                 f"(0..{len(names) - 1}), got {column!r}")
            if column not in names:
                raise ValueError(f"{where}: no column named {column!r}; columns are {names}")
            positions.append(names.index(column))
        else:
            if not -len(names) <= column < len(names):
                raise ValueError(f"{where}: column index {column} out of range for "
                                 f"{len(names)} columns")
            positions.append(int(column) % len(names))
    if len(set(positions)) != len(positions):
        raise ValueError(f"{where}: columns chosen twice in {list(columns)}")
    return positions


def _read_csv(path: Path, columns: Sequence[Column] | None) -> tuple[np.ndarray, list[str]]:
    import pandas as pd

    # Header detection: the first row is a header when any non-empty cell is not a number
    # ("nan" and "inf" count as numbers, so a first data row with missing values stays data).
    try:
        with open(path, newline="") as handle:
            first = next(csv.reader(handle), None)
        if first is None:
            raise DataFileError(f"{path}: the CSV file is empty")
        header = any(cell.strip() and not _is_number(cell) for cell in first)
        frame = pd.read_csv(path, header=0 if header else None)
    except (UnicodeDecodeError, csv.Error, pd.errors.ParserError,
            pd.errors.EmptyDataError) as err:
        raise DataFileError(f"{path}: not a readable CSV table ({type(err).__name__}: {err})"
                            ) from err
    if frame.shape[0] == 0:
        raise DataFileError(f"{path}: the CSV file has a header but no data rows; expected one "
                            f"row per sample")
    names = [str(c) for c in frame.columns]
    positions = _select_positions(columns, names, header, str(path))
    frame = frame.iloc[:, positions]
    bad = {}
    for name, values in frame.items():
        if not (pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)):
            numbers = pd.to_numeric(values, errors="coerce")
            row = int(np.flatnonzero(numbers.isna() & values.notna())[0])
            bad[str(name)] = (row, values.iloc[row])
    if bad:
        examples = ", ".join(f"{n!r} row {r}: {v!r}" for n, (r, v) in bad.items())
        raise ValueError(f"{path}: columns {list(bad)} are not numeric (e.g. {examples}); "
                         f"choose numeric columns with columns=[...]")
    return frame.to_numpy(dtype=np.float64), [names[p] for p in positions]


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataFileError(f"{path}: not a readable .npy array ({type(err).__name__}: {err})"
                            ) from err


def _read_npz(path: Path, key: str | None) -> np.ndarray:
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise DataFileError(f"{path}: not a readable .npz archive ({type(err).__name__}: {err})"
                            ) from err
    if isinstance(archive, np.ndarray):  # a plain .npy saved under an .npz name
        return archive
    with archive:
        keys = list(archive.files)
        if not keys:
            raise DataFileError(f"{path}: the .npz archive holds no arrays")
        if key is None:
            key = keys[0]
            if len(keys) > 1:
                warnings.warn(f"{path}: holds arrays {keys}; using the first, {key!r} "
                              f"(choose another with npz_key)", UserWarning, stacklevel=4)
        elif key not in keys:
            raise ValueError(f"{path}: no array {key!r}; the archive holds {keys}")
        try:
            return archive[key]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
            raise DataFileError(f"{path}: array {key!r} is unreadable "
                                f"({type(err).__name__}: {err})") from err


def _read_hdf5(path: Path, key: str | None) -> np.ndarray:
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            datasets: dict[str, tuple[int, ...]] = {}

            def collect(name: str, obj: object) -> None:
                if isinstance(obj, h5py.Dataset):
                    datasets[name] = obj.shape

            handle.visititems(collect)
            if key is None:
                matrices = [name for name, shape in datasets.items() if len(shape) == 2]
                if len(matrices) != 1:
                    raise ValueError(f"{path}: found {len(matrices)} 2-D datasets among "
                                     f"{datasets}; choose one with h5_key")
                key = matrices[0]
            elif key.strip("/") not in datasets:
                raise ValueError(f"{path}: no dataset {key!r}; datasets are {datasets}")
            return handle[key][()]
    except (OSError, RuntimeError, KeyError) as err:
        raise DataFileError(f"{path}: not a readable HDF5 file ({type(err).__name__}: {err})"
                            ) from err


def read_table(path: str | os.PathLike, columns: Sequence[Column] | None = None,
               h5_key: str | None = None, npz_key: str | None = None
               ) -> tuple[np.ndarray, list[str]]:
    """Read a numeric table from .npy, .npz, .csv or .h5/.hdf5 as float64 rows x columns.

    Args:
        path: The file; its suffix picks the reader.
        columns: Column names (CSV with a header) or indices to keep, in that order; ``None``
            keeps all.
        h5_key: HDF5 dataset to read; by default the only 2-D dataset in the file.
        npz_key: .npz array to read; by default the only (or first) one.

    Returns:
        The table and its column names (the header for CSV, else the indices as strings).

    Raises:
        DataFileError: the file is missing or unreadable.
        ValueError: unknown format, column or key, non-numeric columns, or not a 2-D table.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_FORMATS:
        raise ValueError(f"{path}: unsupported table format {suffix!r}; use one of "
                         f"{list(TABLE_FORMATS)}")
    require_file(path, "the table", "Pass the path of an existing .npy, .npz, .csv, .h5 or "
                                    ".hdf5 file.")
    if suffix == ".csv":
        return _read_csv(path, columns)
    if suffix == ".npy":
        array = _read_npy(path)
    elif suffix == ".npz":
        array = _read_npz(path, npz_key)
    else:
        array = _read_hdf5(path, h5_key)
    matrix = _as_matrix(array, str(path))
    names = [str(i) for i in range(matrix.shape[1])]
    positions = _select_positions(columns, names, False, str(path))
    return matrix[:, positions], [names[p] for p in positions]
