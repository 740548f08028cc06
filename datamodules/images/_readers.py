"""Readers for the standard image files: amat text, IDX, MATLAB .mat and the Frey Faces pickle.

Each reader checks the file once, at the boundary, and raises a DataFileError naming the file and
the problem; the DataModules only reshape and split what the readers return.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from polyreg_cnf.datamodules._files import DataFileError

__all__ = [
    "IDX_IMAGE_MAGIC",
    "fortran_flatten",
    "read_amat",
    "read_frey_pickle",
    "read_idx_images",
    "read_mat_arrays",
]

IDX_IMAGE_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (images x rows x cols)


def fortran_flatten(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Flatten each image column by column, as the published Omniglot and Caltech pipelines do.

    Pixel ``(r, c)`` of an image (its rows read in C order from ``images``) lands at position
    ``r + height * c`` of the flattened row. This is exactly
    ``images.reshape(-1, height, width).reshape(-1, height * width, order="F")``.

    Args:
        images: Array with ``height * width`` values per image, any leading shape.
        height: Image height (rows).
        width: Image width (columns).

    Returns:
        Array of shape ``(N, height * width)``.

    Example:
        >>> image = np.arange(6).reshape(1, 6)  # rows [0 1 2] and [3 4 5]
        >>> fortran_flatten(image, 2, 3).tolist()
        [[0, 3, 1, 4, 2, 5]]
    """
    stack = np.asarray(images).reshape(-1, height, width)
    # Fortran order over the whole (N, H, W) stack keeps the image index N in place (it is the
    # fastest axis on both sides) and makes the row index r faster than the column index c.
    return stack.reshape(-1, height * width, order="F")


def read_amat(path: str | os.PathLike, width: int = 784) -> np.ndarray:
    """Read a binarized-MNIST ``.amat`` file: whitespace text, one image of ``width`` bits a line.

    Args:
        path: The ``.amat`` file.
        width: Values expected on every line.

    Returns:
        ``float32`` array of shape ``(lines, width)`` holding only 0 and 1.

    Raises:
        DataFileError: the file is not text, is empty, a line has the wrong number of values, or a
            value is not 0 or 1 (the message gives the 1-based line number).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError as err:
        raise DataFileError(f"{path}: not an ASCII .amat text file ({err})") from err
    lines = text.splitlines()
    while lines and not lines[-1].strip():  # a trailing newline or blank lines at the end
        lines.pop()
    if not lines:
        raise DataFileError(f"{path}: empty file; expected one line of {width} values per image")
    out = np.empty((len(lines), width), dtype=np.float32)
    for number, line in enumerate(lines, start=1):
        tokens = line.split()
        if len(tokens) != width:
            raise DataFileError(f"{path}: line {number} has {len(tokens)} values, expected "
                                f"{width} (one image per line)")
        if set(tokens) <= {"0", "1"}:
            # The usual spelling: the joined tokens are ASCII '0'/'1' bytes, read in one go
            # (a float parser is ~10x slower on the 39 million values of the training file).
            digits = np.frombuffer("".join(tokens).encode("ascii"), dtype=np.uint8)
            out[number - 1] = digits - ord("0")
            continue
        values = np.empty(width, dtype=np.float32)
        for column, token in enumerate(tokens):  # other spellings of 0 and 1 ("1.0") are fine
            try:
                value = float(token)
            except ValueError:
                value = None
            if value not in (0.0, 1.0):
                raise DataFileError(f"{path}: line {number} holds the value {token!r} (column "
                                    f"{column + 1}); a binarized image has only 0 and 1")
            values[column] = value
        out[number - 1] = values
    return out


def read_idx_images(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX image file (``*-images-idx3-ubyte``, gzipped when its name ends in ``.gz``).

    The format: a big-endian header of four 32-bit integers (magic 2051, count, rows, columns),
    then ``count * rows * columns`` unsigned bytes, row-major.

    Args:
        path: The IDX file, raw or gzipped.

    Returns:
        ``uint8`` array of shape ``(count, rows, columns)``.

    Raises:
        DataFileError: the gzip stream is corrupt, the magic number is not 2051, or the length of
            the file does not match its header (truncated or padded).
    """
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                data = handle.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise DataFileError(f"{path}: could not be read ({type(err).__name__}: {err}); the "
                            f"file is corrupt or truncated") from err
    if len(data) < 16:
        raise DataFileError(f"{path}: {len(data)} bytes, shorter than the 16-byte IDX header")
    magic, count, rows, cols = struct.unpack(">4I", data[:16])
    if magic != IDX_IMAGE_MAGIC:
        hint = " (that is an IDX label file)" if magic == 2049 else ""
        raise DataFileError(f"{path}: magic number {magic}{hint}, expected {IDX_IMAGE_MAGIC} "
                            f"(an IDX file of uint8 images)")
    expected = 16 + count * rows * cols
    if len(data) != expected:
        raise DataFileError(f"{path}: {len(data)} bytes, but its header ({count} images of "
                            f"{rows}x{cols}) implies {expected}; the file is truncated or corrupt")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, cols)


def read_mat_arrays(path: str | os.PathLike, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Load the named 2-D numeric arrays from a MATLAB ``.mat`` file (``scipy.io.loadmat``).

    Args:
        path: The ``.mat`` file (MATLAB v5 or older, the format of the published files).
        keys: Variables that must be present.

    Returns:
        ``{key: array}`` for each requested key.

    Raises:
        ImportError: scipy is not installed (it comes with the ``data`` extra).
        DataFileError: the file cannot be parsed, a key is missing, or an array is not 2-D numeric.
    """
    try:
        import scipy.io
    except ImportError as err:  # scipy is an optional dependency (the "data" extra)
        raise ImportError(f"reading {path} needs scipy: pip install 'polyreg-cnf[data]'") from err
    path = Path(path)
    try:
        contents = scipy.io.loadmat(path)
    except Exception as err:  # scipy raises many types (ValueError, TypeError, ...) on bad input
        raise DataFileError(f"{path}: not a readable MATLAB .mat file "
                            f"({type(err).__name__}: {err})") from err
    present = sorted(key for key in contents if not key.startswith("__"))
    out = {}
    for key in keys:
        if key not in contents:
            raise DataFileError(f"{path}: no variable {key!r}; the file holds {present}, "
                                f"expected {list(keys)}")
        array = np.asarray(contents[key])
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
            raise DataFileError(f"{path}: variable {key!r} must be a 2-D numeric array, got "
                                f"shape {array.shape} and dtype {array.dtype}")
        out[key] = array
    return out


def read_frey_pickle(path: str | os.PathLike, width: int = 560) -> np.ndarray:
    """Read the Frey Faces pickle: a sequence whose element ``[0]`` is N x 560 in 0..255.

    The file is a Python 2 pickle, hence ``encoding="latin1"``. Unpickling runs code chosen by the
    file's author: only load files from a source you trust.

    Args:
        path: ``freyfaces.pkl``.
        width: Values per image (28 x 20 = 560).

    Returns:
        The ``N x width`` array as stored (usually ``uint8``).

    Raises:
        DataFileError: the file is not a pickle, ``[0]`` is missing, or it is not an
            ``N x width`` numeric array with values in 0..255.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            contents = pickle.load(handle, encoding="latin1")
    except Exception as err:  # unpickling garbage raises anything from EOFError to KeyError
        raise DataFileError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from err
    if isinstance(contents, (dict, str, bytes)) or not isinstance(contents, Sequence | np.ndarray):
        raise DataFileError(f"{path}: expected a tuple or list whose element [0] is an N x {width} "
                            f"array, got a {type(contents).__name__}")
    if len(contents) == 0:
        raise DataFileError(f"{path}: the pickled {type(contents).__name__} is empty; expected "
                            f"element [0] to be an N x {width} array")
    array = np.asarray(contents[0])
    if array.ndim != 2 or array.shape[1] != width or not np.issubdtype(array.dtype, np.number):
        raise DataFileError(f"{path}: element [0] must be an N x {width} numeric array (28 x 20 "
                            f"images), got shape {array.shape} and dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise DataFileError(f"{path}: element [0] holds values in [{array.min()}, {array.max()}], "
                            f"expected grey levels in 0..255")
    return array
