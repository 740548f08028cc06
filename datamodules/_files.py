"""File helpers shared by the DataModules: checksums, verified downloads, atomic writes."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from polyreg_cnf.engine.errors import PolyregCNFError

__all__ = ["DataFileError", "atomic_path", "download", "require_file", "sha256sum"]


class DataFileError(PolyregCNFError, FileNotFoundError):
    """A data file is missing, truncated, corrupt or of the wrong shape.

    Subclasses ``FileNotFoundError`` so callers that only know the standard library can still
    catch it; the message always names the file and says what was expected.
    """


def sha256sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Return the hex SHA-256 digest of a file, read in chunks so large archives fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it is renamed onto ``dest`` at once.

    A reader therefore sees either no file or a complete one, never a half-written one, even if
    the writer is killed. On error the temporary file is removed and ``dest`` is left untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def download(url: str, dest: str | os.PathLike, sha256: str | None = None,
             timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` atomically and verify its SHA-256 checksum.

    Args:
        url: Source address (http, https or file).
        dest: Where the file ends up; its folder is created.
        sha256: Expected hex digest; ``None`` skips verification (not recommended).
        timeout: Seconds to wait on the network before giving up.

    Returns:
        ``dest`` as a Path.

    Raises:
        DataFileError: the download failed or the checksum does not match (nothing is left at
            ``dest`` in either case).
    """
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                shutil.copyfileobj(response, out, length=1 << 20)
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            raise DataFileError(
                f"could not download {url} to {dest}: {err}. Without network access, fetch the "
                f"file elsewhere and place it at {dest}."
            ) from err
        if sha256 is not None:
            got = sha256sum(tmp)
            if got != sha256.lower():
                raise DataFileError(
                    f"checksum mismatch for {url}: expected sha256 {sha256}, got {got}; the "
                    f"download is corrupt or the source changed, so it was not kept."
                )
    return dest


def require_file(path: str | os.PathLike, what: str, how_to_get: str) -> Path:
    """Return ``path`` if it is a file, else raise a DataFileError that says how to get it.

    Args:
        path: Where the file is expected.
        what: A short description ("the POWER data set (power/data.npy)").
        how_to_get: One sentence on where the file comes from.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(
            f"{what} not found: looked for {path.resolve()}. {how_to_get}"
        )
    return path
