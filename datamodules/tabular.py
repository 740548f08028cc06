"""The five tabular sets of the MAF paper (POWER, GAS, HEPMASS, MINIBOONE, BSDS300).

Each set is read from the standard files of the MAF data archive and preprocessed exactly as the
published pipelines did (``shared/spec/DATA.md``, section "Tabular"): same rows, same order, same
columns, float32. The preprocessing of each set is a pure function of the raw loaded object
(:func:`preprocess_power` and so on), so it can be tested on its own; :class:`TabularDataModule`
adds file checks, an optional verified download and an on-disk cache of the splits.

References:
    Papamakarios, Pavlakou and Murray, "Masked Autoregressive Flow for Density Estimation",
    NeurIPS 2017. Data archive: https://zenodo.org/record/1161203 (data.tar.gz).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from polyreg_cnf.datamodules._files import (
    DataFileError,
    atomic_path,
    download,
    require_file,
    sha256sum,
)
from polyreg_cnf.datamodules.base import SPLITS, ArrayDataModule

__all__ = [
    "ARCHIVE_URL",
    "PUBLISHED_DIMS",
    "TABULAR_SETS",
    "TabularDataModule",
    "preprocess_bsds300",
    "preprocess_gas",
    "preprocess_hepmass",
    "preprocess_miniboone",
    "preprocess_power",
]

ARCHIVE_URL = "https://zenodo.org/record/1161203/files/data.tar.gz"
"""The MAF data archive (Zenodo record 1161203); its members live under ``data/``."""

PUBLISHED_DIMS = {"power": 6, "gas": 8, "hepmass": 21, "miniboone": 43, "bsds300": 63}
"""Width of each set after preprocessing, as published; any other width means a wrong file."""

TABULAR_SETS = tuple(PUBLISHED_DIMS)

# The batch sizes of the published run scripts (DATA.md), used when batch_size is not given.
_PUBLISHED_BATCH = {"power": 10000, "gas": 1000, "hepmass": 10000, "miniboone": 1000,
                    "bsds300": 10000}

CACHE_DIR = ".polyreg_cache"
# Bump whenever the preprocessing or the cache layout changes, so old caches are rebuilt.
CACHE_VERSION = "tabular-cache-1"
MANIFEST = "manifest.json"
# Splits at least this large are memory-mapped: every DDP process on a node then shares the
# page cache instead of holding its own copy, and starts without reading the file up front.
MMAP_MIN_BYTES = 16 * 2**20

_HOW_TO_GET = (
    "It comes from the MAF data archive data.tar.gz (Zenodo record 1161203, "
    f"{ARCHIVE_URL}); unpack it so that its data/ folder's contents lie under {{root}} "
    "(e.g. tar -xzf data.tar.gz --strip-components=1 -C {root}), or pass download=True "
    "(train.py --download) to fetch and unpack it."
)


# ---------------------------------------------------------------------------------------------
# Pure preprocessing, one function per set (DATA.md, "Tabular").


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


# ---------------------------------------------------------------------------------------------
# Reading the standard files, with errors that name the file and the problem.


def _read_npy(path: Path) -> np.ndarray:
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataFileError(f"{path}: not a readable .npy array ({type(err).__name__}: {err}); "
                            f"the file is truncated or corrupt, fetch it again") from err
    if not isinstance(data, np.ndarray):
        raise DataFileError(f"{path}: expected a single .npy array, got {type(data).__name__}")
    return data


def _read_pickle(path: Path) -> object:
    import pandas as pd

    # Unpickling runs code from the file: only ever done on the standard archive's file.
    try:
        return pd.read_pickle(path)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError,
            TypeError, ValueError, OSError) as err:
        raise DataFileError(f"{path}: not a readable pickled pandas DataFrame "
                            f"({type(err).__name__}: {err}); the file is truncated or corrupt, "
                            f"fetch it again") from err


def _read_csv(path: Path) -> object:
    import pandas as pd

    try:
        frame = pd.read_csv(path, index_col=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError,
            ValueError, OSError) as err:
        raise DataFileError(f"{path}: not a readable CSV table ({type(err).__name__}: {err})"
                            ) from err
    bad = [str(c) for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if bad:
        raise DataFileError(f"{path}: columns {bad} are not numeric; the standard HEPMASS "
                            f"CSV holds only numbers below its header")
    return frame


def _read_hdf5(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            missing = [k for k in keys if not isinstance(handle.get(k), h5py.Dataset)]
            if missing:
                raise DataFileError(f"{path}: HDF5 datasets {missing} missing; expected "
                                    f"{list(keys)}, found {sorted(handle.keys())}")
            return {k: handle[k][()] for k in keys}
    except DataFileError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise DataFileError(f"{path}: not a readable HDF5 file ({type(err).__name__}: {err}); "
                            f"the file is truncated or corrupt, fetch it again") from err


@dataclass(frozen=True)
class _SetFiles:
    """Where a set lives under the data root and how its raw files become splits."""

    label: str
    folder: str
    files: tuple[str, ...]  # relative to the data root, as in the archive (minus "data/")
    preprocess: Callable[[list[Path]], dict[str, np.ndarray]]


def _power(paths: list[Path]) -> dict[str, np.ndarray]:
    return preprocess_power(_read_npy(paths[0]))


def _gas(paths: list[Path]) -> dict[str, np.ndarray]:
    return preprocess_gas(_read_pickle(paths[0]))


def _hepmass(paths: list[Path]) -> dict[str, np.ndarray]:
    return preprocess_hepmass(_read_csv(paths[0]), _read_csv(paths[1]))


def _miniboone(paths: list[Path]) -> dict[str, np.ndarray]:
    return preprocess_miniboone(_read_npy(paths[0]))


def _bsds300(paths: list[Path]) -> dict[str, np.ndarray]:
    return preprocess_bsds300(_read_hdf5(paths[0], ("train", "validation", "test")))


_SETS = {
    "power": _SetFiles("POWER", "power", ("power/data.npy",), _power),
    "gas": _SetFiles("GAS", "gas", ("gas/ethylene_CO.pickle",), _gas),
    "hepmass": _SetFiles("HEPMASS", "hepmass",
                         ("hepmass/1000_train.csv", "hepmass/1000_test.csv"), _hepmass),
    "miniboone": _SetFiles("MINIBOONE", "miniboone", ("miniboone/data.npy",), _miniboone),
    "bsds300": _SetFiles("BSDS300", "BSDS300", ("BSDS300/BSDS300.hdf5",), _bsds300),
}


def _load_raw(name: str, paths: list[Path]) -> dict[str, np.ndarray]:
    """Read and preprocess one set from its files (the only place source files are read)."""
    spec = _SETS[name]
    try:
        return spec.preprocess(paths)
    except (ValueError, TypeError) as err:
        raise DataFileError(f"{', '.join(map(str, paths))}: {err}") from err


def _member_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


# ---------------------------------------------------------------------------------------------


class TabularDataModule(ArrayDataModule):
    """One of the MAF tabular sets, preprocessed as published and cached on disk.

    Expects the layout of the MAF archive under ``data_dir``: ``power/data.npy``,
    ``gas/ethylene_CO.pickle``, ``hepmass/1000_train.csv`` and ``1000_test.csv``,
    ``miniboone/data.npy``, ``BSDS300/BSDS300.hdf5``. ``prepare_data()`` checks the files (and
    downloads them when asked), preprocesses once and writes the splits as ``.npy`` files under
    ``<data_dir>/<set folder>/.polyreg_cache/`` with a manifest written last; ``setup()`` loads
    that cache (memory-mapped when large) as long as the manifest is complete and the source files
    keep their size and modification time, and rebuilds it otherwise.

    Args:
        name: ``power``, ``gas``, ``hepmass``, ``miniboone`` or ``bsds300`` (any case).
        data_dir: The data root that holds one folder per set.
        batch_size: Training batch size; ``None`` uses the published one for the set
            (POWER 10000, GAS 1000, HEPMASS 10000, MINIBOONE 1000, BSDS300 10000).
        eval_batch_size: Batch size for validation and test; defaults to ``batch_size``.
        num_workers: DataLoader worker processes.
        download: Fetch and unpack the archive when files are missing.
        cache: Keep the preprocessed splits on disk; ``False`` preprocesses on every setup and
            writes nothing.
        archive_url: Where to download the archive from (tests point it at a local server).
        archive_sha256: Expected SHA-256 of the archive. ``None`` verifies nothing and warns
            with the digest it got, so it can be pinned on the next run.

    Example:
        The files are looked up under ``data_dir`` as the archive unpacks them; here a small
        stand-in for ``power/data.npy`` (1,000 rows of the raw width 8):

        >>> import tempfile
        >>> folder = tempfile.TemporaryDirectory()
        >>> dm = TabularDataModule("power", folder.name, cache=False)
        >>> [p.relative_to(folder.name).as_posix() for p in dm.paths]
        ['power/data.npy']
        >>> dm.paths[0].parent.mkdir(parents=True)
        >>> np.save(dm.paths[0], np.random.default_rng(0).normal(size=(1000, 8)))
        >>> dm.prepare_data()
        >>> dm.setup()
        >>> {split: a.shape for split, a in dm.arrays().items()}
        {'train': (810, 6), 'val': (90, 6), 'test': (100, 6)}
        >>> folder.cleanup()
    """

    def __init__(self, name: str, data_dir: str | os.PathLike, batch_size: int | None = None,
                 eval_batch_size: int | None = None, num_workers: int = 0,
                 download: bool = False, cache: bool = True, archive_url: str = ARCHIVE_URL,
                 archive_sha256: str | None = None) -> None:
        if not isinstance(name, str) or name.lower() not in _SETS:
            raise ValueError(f"unknown tabular set {name!r}; valid: {list(TABULAR_SETS)}")
        self.name = name.lower()
        super().__init__(_PUBLISHED_BATCH[self.name] if batch_size is None else batch_size,
                         eval_batch_size, num_workers)
        if not isinstance(data_dir, (str, os.PathLike)):
            raise TypeError(f"data_dir must be a path, got {type(data_dir).__name__}")
        if archive_sha256 is not None and (
                not isinstance(archive_sha256, str) or len(archive_sha256) != 64
                or any(c not in "0123456789abcdefABCDEF" for c in archive_sha256)):
            raise ValueError(f"archive_sha256 must be 64 hex digits or None, "
                             f"got {archive_sha256!r}")
        self.data_dir = Path(data_dir).expanduser()
        self.download = bool(download)
        self.cache = bool(cache)
        self.archive_url = archive_url
        self.archive_sha256 = archive_sha256
        self._set = _SETS[self.name]

    @property
    def source(self) -> str:
        return f"{self._set.label} ({self.data_dir / self._set.folder})"

    @property
    def paths(self) -> list[Path]:
        """The source files of this set, in the order the preprocessing reads them."""
        return [self.data_dir / rel for rel in self._set.files]

    @property
    def cache_dir(self) -> Path:
        """Where the preprocessed splits are cached: ``<data_dir>/<set folder>/.polyreg_cache``."""
        return self.data_dir / self._set.folder / CACHE_DIR

    # -- files -------------------------------------------------------------------------------

    def _require_files(self) -> list[Path]:
        how = _HOW_TO_GET.format(root=self.data_dir.resolve())
        for rel, path in zip(self._set.files, self.paths, strict=True):
            require_file(path, f"the {self._set.label} file {rel}", how)
        return self.paths

    def _download(self, rels: list[str]) -> None:
        """Fetch the archive into a temporary folder and unpack only ``rels`` from it."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # The temporary folder sits in data_dir so the final renames stay on one file system;
        # it is removed whatever happens, so a failed download leaves nothing behind.
        tmp_dir = Path(tempfile.mkdtemp(prefix=".polyreg_download.", dir=self.data_dir))
        try:
            archive = download(self.archive_url, tmp_dir / "data.tar.gz", self.archive_sha256)
            if self.archive_sha256 is None:
                warnings.warn(
                    f"the archive from {self.archive_url} was not verified (no archive_sha256 "
                    f"given); its sha256 is {sha256sum(archive)}. Pass archive_sha256=<that "
                    f"digest> to verify future downloads.", UserWarning, stacklevel=3)
            self._extract(archive, rels, tmp_dir)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)

    def _extract(self, archive: Path, rels: list[str], staging: Path) -> None:
        """Unpack the members for ``rels`` in one pass into ``staging``, then move them in.

        Files are moved into ``data_dir`` only once every needed member was found and read, so a
        bad archive leaves the data folder as it was.
        """
        wanted = {f"data/{rel}": rel for rel in rels}
        wanted.update({rel: rel for rel in rels})  # accept an archive without the data/ prefix
        found: dict[str, Path] = {}
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar:
                    rel = wanted.get(_member_name(member.name))
                    if rel is None or rel in found:
                        continue
                    if not member.isfile():
                        raise DataFileError(f"{self.archive_url}: member {member.name} is not a "
                                            f"regular file; refusing to unpack it")
                    source = tar.extractfile(member)
                    if source is None:
                        raise DataFileError(f"{self.archive_url}: cannot read {member.name}")
                    # The destination comes from our own table of names, never from the
                    # archive, so a crafted member name cannot write outside data_dir.
                    found[rel] = staging / "unpacked" / rel
                    found[rel].parent.mkdir(parents=True, exist_ok=True)
                    with open(found[rel], "wb") as out:
                        shutil.copyfileobj(source, out, length=1 << 20)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
            if isinstance(err, DataFileError):
                raise
            raise DataFileError(f"{self.archive_url}: not a readable .tar.gz archive "
                                f"({type(err).__name__}: {err})") from err
        missing = [f"data/{rel}" for rel in rels if rel not in found]
        if missing:
            raise DataFileError(f"{self.archive_url}: archive has no member(s) {missing}; "
                                f"is it the MAF data.tar.gz?")
        for rel, path in found.items():
            (self.data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, self.data_dir / rel)

    # -- cache -------------------------------------------------------------------------------

    def _source_stats(self, paths: list[Path]) -> dict[str, dict[str, int]]:
        stats = {}
        for rel, path in zip(self._set.files, paths, strict=True):
            st = path.stat()
            stats[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return stats

    def _read_cache(self, paths: list[Path]) -> dict[str, np.ndarray] | None:
        """Return the cached splits, or ``None`` when the cache is absent, partial or stale."""
        try:
            manifest = json.loads((self.cache_dir / MANIFEST).read_text())
            if (manifest.get("version") != CACHE_VERSION or manifest.get("set") != self.name
                    or manifest.get("sources") != self._source_stats(paths)):
                return None
            splits = {}
            for split in SPLITS:
                path = self.cache_dir / f"{split}.npy"
                entry = manifest["splits"][split]
                if path.stat().st_size != entry["bytes"]:
                    return None
                # Copy-on-write mapping: shares the file's pages like a read-only map, but the
                # array is writable, so torch.from_numpy accepts it; writes never reach the file.
                mode = "c" if entry["bytes"] >= MMAP_MIN_BYTES else None
                array = np.load(path, mmap_mode=mode, allow_pickle=False)
                if list(array.shape) != entry["shape"] or array.dtype != np.float32:
                    return None
                splits[split] = array
            return splits
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _write_cache(self, stats: dict[str, dict[str, int]],
                     splits: dict[str, np.ndarray]) -> None:
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            # Remove the old manifest first: until the new one is written the cache is invalid,
            # so a crash half way never pairs an old manifest with new split files.
            (self.cache_dir / MANIFEST).unlink(missing_ok=True)
            entries = {}
            for split in SPLITS:
                array = np.ascontiguousarray(splits[split], dtype=np.float32)
                path = self.cache_dir / f"{split}.npy"
                with atomic_path(path) as tmp, open(tmp, "wb") as handle:
                    np.save(handle, array)
                entries[split] = {"shape": list(array.shape), "bytes": path.stat().st_size}
            manifest = {"version": CACHE_VERSION, "set": self.name, "sources": stats,
                        "splits": entries}
            with atomic_path(self.cache_dir / MANIFEST) as tmp:
                tmp.write_text(json.dumps(manifest, indent=1))
        except OSError as err:
            # A read-only data folder is fine: we simply preprocess on every run.
            warnings.warn(f"could not write the cache in {self.cache_dir} ({err}); "
                          f"continuing without it", UserWarning, stacklevel=3)

    def _preprocess(self, paths: list[Path]) -> dict[str, np.ndarray]:
        # Stat before reading: if a file changes while we read it, the manifest will not match.
        stats = self._source_stats(paths)
        splits = _load_raw(self.name, paths)
        width = splits["train"].shape[1]
        if width != PUBLISHED_DIMS[self.name]:
            raise DataFileError(
                f"{', '.join(map(str, paths))}: preprocessing gave {width} columns, the published "
                f"{self._set.label} set has {PUBLISHED_DIMS[self.name]}; this is not the standard "
                f"file from the MAF archive")
        if self.cache:
            self._write_cache(stats, splits)
        return splits

    # -- Lightning hooks -----------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Check the files (download them if asked), then build the cache once."""
        missing = [rel for rel, path in zip(self._set.files, self.paths, strict=True)
                   if not path.is_file()]
        if missing and self.download:
            self._download(missing)
        paths = self._require_files()
        if self.cache and self._read_cache(paths) is None:
            self._preprocess(paths)

    def load_splits(self) -> dict[str, np.ndarray]:
        paths = self._require_files()
        if self.cache:
            cached = self._read_cache(paths)
            if cached is not None:
                return cached
        return self._preprocess(paths)
