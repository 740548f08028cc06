"""Where the standard image files come from, and the opt-in download of a missing one."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

from polyreg_cnf.datamodules._files import download, sha256sum

__all__ = ["IMAGE_URLS", "fetch", "resolve_url"]

# File name -> (usual URL, sha256 or None). The MNIST and static-MNIST digests are those recorded by
# TensorFlow Datasets (tensorflow_datasets/url_checksums/{mnist,binarized_mnist}.txt) for these
# very URLs. No reliable digest was found for the other three files, so they stay None: their
# download warns that it was not verified and reports the digest it got (pass `checksums` to pin).
IMAGE_URLS: dict[str, tuple[str, str | None]] = {
    "binarized_mnist_train.amat": (
        "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
        "binarized_mnist_train.amat",
        "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
    ),
    "binarized_mnist_valid.amat": (
        "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
        "binarized_mnist_valid.amat",
        "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
    ),
    "binarized_mnist_test.amat": (
        "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
        "binarized_mnist_test.amat",
        "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
    ),
    "train-images-idx3-ubyte.gz": (
        "https://storage.googleapis.com/cvdf-datasets/mnist/train-images-idx3-ubyte.gz",
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    ),
    "t10k-images-idx3-ubyte.gz": (
        "https://storage.googleapis.com/cvdf-datasets/mnist/t10k-images-idx3-ubyte.gz",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    ),
    "chardata.mat": (
        "https://raw.githubusercontent.com/yburda/iwae/master/datasets/OMNIGLOT/chardata.mat",
        None,
    ),
    "caltech101_silhouettes_28_split1.mat": (
        "https://people.cs.umass.edu/~marlin/data/caltech101_silhouettes_28_split1.mat",
        None,
    ),
    "freyfaces.pkl": (
        "https://raw.githubusercontent.com/y0ast/Variational-Autoencoder/master/freyfaces.pkl",
        None,
    ),
}


def resolve_url(filename: str, base_url: str | None = None,
                urls: Mapping[str, str] | None = None) -> str:
    """Return the URL to fetch ``filename`` from.

    Precedence: an entry of ``urls``, then ``base_url + "/" + filename`` (a mirror holding the
    files under their usual names), then the standard URL of ``IMAGE_URLS``.

    Raises:
        ValueError: no URL is known for ``filename``.
    """
    if urls is not None and filename in urls:
        return urls[filename]
    if base_url is not None:
        return f"{base_url.rstrip('/')}/{filename}"
    if filename not in IMAGE_URLS:
        raise ValueError(f"no URL known for {filename!r}; known files: {sorted(IMAGE_URLS)}; "
                         f"pass urls={{{filename!r}: ...}} or base_url")
    return IMAGE_URLS[filename][0]


def fetch(filename: str, dest: str | os.PathLike, base_url: str | None = None,
          urls: Mapping[str, str] | None = None,
          checksums: Mapping[str, str] | None = None) -> Path:
    """Download ``filename`` to ``dest`` (atomically), verifying its sha256 when one is known.

    The digest comes from ``checksums`` if it names the file, else from ``IMAGE_URLS``. Without
    one the file is kept, but a warning says it was not verified and gives the digest obtained, so
    the user can compare it with a trusted copy and pin it through ``checksums``.

    Args:
        filename: The file's standard name (a key of ``IMAGE_URLS`` unless ``urls`` names it).
        dest: Where the file goes.
        base_url: Mirror folder serving the files under their standard names.
        urls: Per-file URL overrides.
        checksums: Per-file sha256 digests (hex), overriding the table.

    Returns:
        ``dest`` as a Path.

    Raises:
        DataFileError: the download failed (HTTP error, no network) or the checksum differs; in
            both cases nothing is left at ``dest``.
    """
    url = resolve_url(filename, base_url, urls)
    if checksums is not None and filename in checksums:
        sha256 = checksums[filename]
    else:
        sha256 = IMAGE_URLS.get(filename, (url, None))[1]
    path = download(url, dest, sha256=sha256)
    if sha256 is None:
        warnings.warn(f"downloaded {url} to {path} WITHOUT checksum verification (no sha256 is "
                      f"known for {filename}); its sha256 is {sha256sum(path)}. Compare it with a "
                      f"trusted copy and pass checksums={{{filename!r}: '<sha256>'}} to pin it.",
                      UserWarning, stacklevel=2)
    return path
