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
from collections.abc import Callable
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
from polyreg_cnf.datamodules.tabular_preprocess import (
    preprocess_bsds300,
    preprocess_gas,
    preprocess_hepmass,
    preprocess_miniboone,
    preprocess_power,
)

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
