"""The MNIST-style image sets of the VAE experiments, one DataModule each (see spec DATA.md)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from polyreg_cnf.datamodules._files import DataFileError
from polyreg_cnf.datamodules.images._readers import (
    fortran_flatten,
    read_amat,
    read_frey_pickle,
    read_idx_images,
    read_mat_arrays,
)
from polyreg_cnf.datamodules.images._remote import resolve_url
from polyreg_cnf.datamodules.images.base import (
    EVAL_BINARIZATION_SEED,
    DataFile,
    ImageDataModule,
    binarize_once,
)

from polyreg_cnf.engine._checks import check_int, check_ints

__all__ = [
    "CaltechSilhouettesDataModule",
    "DigitsDataModule",
    "FreyFacesDataModule",
    "MNISTDataModule",
    "OmniglotDataModule",
    "StaticMNISTDataModule",
]


class StaticMNISTDataModule(ImageDataModule):
    """Static binarized MNIST (Larochelle & Murray 2011): fixed bits, splits 50000/10000/10000.

    Reads ``MNIST_static/binarized_mnist_{train,valid,test}.amat`` under ``data_dir``: whitespace
    text, one 28 x 28 image per line, 784 values in {0, 1}. Rows are kept in file order, flattened
    row-major; the split sizes are those of the files.

    Args:
        data_dir: Data root holding ``MNIST_static/``.
        **kwargs: ``download``, ``base_url``, ``urls``, ``checksums``, ``batch_size``, ... as in
            ``ImageDataModule``.

    References:
        Salakhutdinov & Murray, "On the quantitative analysis of deep belief networks", ICML 2008.
    """

    image_shape: ClassVar[tuple[int, int, int]] = (1, 28, 28)
    likelihood: ClassVar[str] = "bernoulli"
    FILES: ClassVar[dict[str, str]] = {"train": "binarized_mnist_train.amat",
                                       "val": "binarized_mnist_valid.amat",
                                       "test": "binarized_mnist_test.amat"}

    def __init__(self, data_dir: str | os.PathLike, **kwargs: object) -> None:
        super().__init__(data_dir, **kwargs)

    def remote_files(self) -> dict[str, Path]:
        folder = self._root() / "MNIST_static"
        return {name: folder / name for name in self.FILES.values()}

    def load_splits(self) -> dict[str, np.ndarray]:
        paths = self.remote_files()
        out = {}
        for split, name in self.FILES.items():
            path = self._require(paths[name], f"static binarized MNIST {split} split {name!r} "
                                 f"(whitespace text, one image per line, 784 values in {{0, 1}})")
            out[split] = read_amat(path, width=784)
        return out


class MNISTDataModule(ImageDataModule):
    """MNIST from the raw IDX files, grey levels binarized dynamically during training.

    Reads ``train-images-idx3-ubyte`` and ``t10k-images-idx3-ubyte`` (each raw or ``.gz``) from
    ``data_dir`` or ``data_dir/MNIST/raw`` (torchvision's layout), parsed with numpy. Grey levels
    are ``pixel / 255`` (float32), flattened row-major. Validation is the LAST ``n_val`` (10000)
    of the 60000 training images, as in the published pipelines (no shuffle); train is the rest and
    is binarized afresh for every batch. Validation then test are binarized once with
    ``numpy.random.RandomState(777)``, the published draws.

    Args:
        data_dir: Folder holding the IDX files (directly or under ``MNIST/raw``).
        n_val: Training images held out, from the end, for validation.
        seed: Seeds the dynamic-binarization stream.
        **kwargs: ``download``, ``base_url``, ``urls``, ``checksums``, ``batch_size``, ... as in
            ``ImageDataModule``.
    """

    image_shape: ClassVar[tuple[int, int, int]] = (1, 28, 28)
    likelihood: ClassVar[str] = "bernoulli"
    FILES: ClassVar[dict[str, str]] = {"train": "train-images-idx3-ubyte",
                                       "test": "t10k-images-idx3-ubyte"}

    def __init__(self, data_dir: str | os.PathLike, n_val: int = 10000, seed: int = 0,
                 **kwargs: object) -> None:
        super().__init__(data_dir, seed=seed, dynamic_binarization=True, **kwargs)
        self.n_val = check_int("n_val", n_val)

    def candidates(self, name: str) -> list[Path]:
        """Where ``name`` is looked for, in order: raw then gzipped, root then ``MNIST/raw``."""
        root = self._root()
        return [folder / f"{name}{suffix}" for folder in (root, root / "MNIST" / "raw")
                for suffix in ("", ".gz")]

    def remote_files(self) -> dict[str, Path]:
        raw = self._root() / "MNIST" / "raw"
        return {f"{name}.gz": raw / f"{name}.gz" for name in self.FILES.values()}

    def _present(self, dest: Path) -> bool:
        # Any of the four accepted locations will do, not only the download destination.
        return any(path.is_file() for path in self.candidates(dest.name.removesuffix(".gz")))

    def _find(self, name: str) -> Path:
        paths = self.candidates(name)
        for path in paths:
            if path.is_file():
                return path
        looked = ", ".join(str(path.resolve()) for path in paths)
        url = self._url(f"{name}.gz")
        raise DataFileError(f"MNIST image file {name!r} (IDX, magic 2051, 28x28 uint8 images; raw "
                            f"or .gz) not found: looked for {looked}. Download it from {url} "
                            f"into {self._root().resolve()}, or pass download=True to fetch it "
                            f"in prepare_data().")

    def _url(self, filename: str) -> str:
        return resolve_url(filename, self.base_url, self.urls)

    def _images(self, name: str) -> np.ndarray:
        path = self._find(name)
        images = read_idx_images(path)
        if images.shape[1:] != (28, 28):
            raise DataFileError(f"{path}: images are {images.shape[1]}x{images.shape[2]}, "
                                f"expected 28x28 (MNIST)")
        # float32 / 255 in float32, as the published pipelines computed it (torch .float() / 255.)
        return images.reshape(len(images), 784).astype(np.float32) / np.float32(255)

    def load_splits(self) -> dict[str, np.ndarray]:
        train = self._images(self.FILES["train"])
        test = self._images(self.FILES["test"])
        if len(train) <= self.n_val:
            raise DataFileError(f"{self._find(self.FILES['train'])}: {len(train)} training "
                                f"images, not enough to hold out n_val={self.n_val} for "
                                f"validation")
        rng = np.random.RandomState(EVAL_BINARIZATION_SEED)
        val = binarize_once(rng, train[-self.n_val:])
        test = binarize_once(rng, test)
        return {"train": train[:-self.n_val], "val": val, "test": test}


class OmniglotDataModule(ImageDataModule):
    """Omniglot 28 x 28 (Burda et al. 2016), binarized dynamically during training.

    Reads ``OMNIGLOT/chardata.mat`` (keys ``data`` and ``testdata``, each 784 x N, grey levels in
    [0, 1]). Images: transpose, reshape to (-1, 28, 28), flatten in Fortran order
    (``fortran_flatten``). The training rows are shuffled with ``numpy.random.default_rng(seed)``
    and the last ``n_val`` (1345) of them form the validation set. Validation then test are
    binarized once with ``numpy.random.RandomState(777)``; train is binarized afresh per batch.

    Args:
        data_dir: Data root holding ``OMNIGLOT/``.
        n_val: Shuffled training rows held out for validation.
        seed: Seeds the training-row shuffle and the dynamic-binarization stream.
        **kwargs: ``download``, ``base_url``, ``urls``, ``checksums``, ``batch_size``, ... as in
            ``ImageDataModule``.

    References:
        Burda, Grosse & Salakhutdinov, "Importance weighted autoencoders", ICLR 2016.
    """

    image_shape: ClassVar[tuple[int, int, int]] = (1, 28, 28)
    likelihood: ClassVar[str] = "bernoulli"
    FILE = DataFile("chardata.mat", "OMNIGLOT", "Omniglot",
                    "MATLAB .mat with keys 'data' and 'testdata', each 784 x N")

    def __init__(self, data_dir: str | os.PathLike, n_val: int = 1345, seed: int = 0,
                 **kwargs: object) -> None:
        super().__init__(data_dir, seed=seed, dynamic_binarization=True, **kwargs)
        self.n_val = check_int("n_val", n_val)

    def load_splits(self) -> dict[str, np.ndarray]:
        path = self._single_file()
        arrays = read_mat_arrays(path, ("data", "testdata"))
        images = {}
        for key, array in arrays.items():
            if array.shape[0] != 784:
                raise DataFileError(f"{path}: {key!r} has shape {array.shape}, expected 784 x N "
                                    f"(one 28x28 image per column)")
            self._check_range(array, path, repr(key), binary=False)
            images[key] = fortran_flatten(array.T.astype(np.float32), 28, 28)
        train = images["data"]
        if len(train) <= self.n_val:
            raise DataFileError(f"{path}: {len(train)} training images, not enough to hold out "
                                f"n_val={self.n_val} for validation")
        train = train[np.random.default_rng(self.seed).permutation(len(train))]
        rng = np.random.RandomState(EVAL_BINARIZATION_SEED)
        val = binarize_once(rng, train[-self.n_val:])
        test = binarize_once(rng, images["testdata"])
        return {"train": train[:-self.n_val], "val": val, "test": test}


class CaltechSilhouettesDataModule(ImageDataModule):
    """Caltech 101 Silhouettes 28 x 28 (Marlin et al. 2010), static binary, the file's own splits.

    Reads ``Caltech101Silhouettes/caltech101_silhouettes_28_split1.mat`` (keys ``train_data``,
    ``val_data``, ``test_data``, each N x 784 in {0, 1}). Image = ``1 - data``, flattened in
    Fortran order (``fortran_flatten``); rows in file order.

    Args:
        data_dir: Data root holding ``Caltech101Silhouettes/``.
        **kwargs: ``download``, ``base_url``, ``urls``, ``checksums``, ``batch_size``, ... as in
            ``ImageDataModule``.

    References:
        Marlin, Swersky, Chen & de Freitas, "Inductive principles for restricted Boltzmann
        machine learning", AISTATS 2010.
    """

    image_shape: ClassVar[tuple[int, int, int]] = (1, 28, 28)
    likelihood: ClassVar[str] = "bernoulli"
    FILE = DataFile("caltech101_silhouettes_28_split1.mat", "Caltech101Silhouettes",
                    "Caltech 101 Silhouettes", "MATLAB .mat with keys train_data, val_data, "
                    "test_data, each N x 784 in {0, 1}")
    KEYS: ClassVar[dict[str, str]] = {"train": "train_data", "val": "val_data",
                                      "test": "test_data"}

    def __init__(self, data_dir: str | os.PathLike, **kwargs: object) -> None:
        super().__init__(data_dir, **kwargs)

    def load_splits(self) -> dict[str, np.ndarray]:
        path = self._single_file()
        arrays = read_mat_arrays(path, tuple(self.KEYS.values()))
        out = {}
        for split, key in self.KEYS.items():
            array = arrays[key]
            if array.shape[1] != 784:
                raise DataFileError(f"{path}: {key!r} has shape {array.shape}, expected N x 784 "
                                    f"(one 28x28 image per row)")
            self._check_range(array, path, repr(key), binary=True)
            out[split] = 1.0 - fortran_flatten(array.astype(np.float32), 28, 28)
        return out


class FreyFacesDataModule(ImageDataModule):
    """Frey Faces, 28 x 20 grey images modelled with a 256-way categorical per pixel.

    Reads ``Freyfaces/freyfaces.pkl`` (a Python 2 pickle, loaded with ``encoding="latin1"``,
    whose element ``[0]`` is N x 560 in 0..255). Divides by 255, then calls
    ``numpy.random.seed(shuffle_seed)`` and ``numpy.random.shuffle`` on the rows, exactly as the
    published pipeline (the legacy global RNG, whose state is restored afterwards so callers are
    not disturbed), and splits train / validation / test = first 1565, next 200, next 200 rows.
    Values stay the grey levels ``k / 255``; a categorical likelihood recovers ``k`` as
    ``round(255 * x)``. Report bits/dim as well as nats.

    Args:
        data_dir: Data root holding ``Freyfaces/``.
        sizes: Rows for (train, val, test), taken in that order after the shuffle.
        shuffle_seed: The published global-seed value (123).
        **kwargs: ``download``, ``base_url``, ``urls``, ``checksums``, ``batch_size``, ... as in
            ``ImageDataModule``.

    Warning:
        Unpickling runs code chosen by the file's author: only load a trusted ``freyfaces.pkl``.
    """

    image_shape: ClassVar[tuple[int, int, int]] = (1, 28, 20)
    likelihood: ClassVar[str] = "categorical256"
    FILE = DataFile("freyfaces.pkl", "Freyfaces", "Frey Faces",
                    "pickle, latin1, whose element [0] is an N x 560 array in 0..255")

    def __init__(self, data_dir: str | os.PathLike, sizes: tuple[int, int, int] = (1565, 200, 200),
                 shuffle_seed: int = 123, **kwargs: object) -> None:
        super().__init__(data_dir, **kwargs)
        if not isinstance(sizes, (tuple, list)) or len(sizes) != 3:
            raise ValueError(f"sizes must be three positive ints (train, val, test), got {sizes!r}")
        check_ints("sizes", sizes)
        if not isinstance(shuffle_seed, int) or not 0 <= shuffle_seed < 2**32:
            raise ValueError(f"shuffle_seed must be an int in [0, 2**32), got {shuffle_seed!r}")
        self.sizes = tuple(sizes)
        # Not ``shuffle_seed``: that attribute of the base class seeds the training order.
        self.split_seed = shuffle_seed

    def load_splits(self) -> dict[str, np.ndarray]:
        path = self._single_file()
        data = read_frey_pickle(path, width=560) / 255.0
        n_train, n_val, n_test = self.sizes
        if len(data) < n_train + n_val + n_test:
            raise DataFileError(f"{path}: {len(data)} images, fewer than the "
                                f"{n_train} + {n_val} + {n_test} the splits need")
        # The published split is defined by the legacy global RNG; use it exactly, then put the
        # caller's global state back.
        saved = np.random.get_state()
        try:
            np.random.seed(self.split_seed)
            np.random.shuffle(data)
        finally:
            np.random.set_state(saved)
        return {"train": data[:n_train], "val": data[n_train:n_train + n_val],
                "test": data[n_train + n_val:n_train + n_val + n_test]}


class DigitsDataModule(ImageDataModule):
    """scikit-learn's bundled 8 x 8 digits, binarized: the MNIST-style set every offline run uses.

    ``sklearn.datasets.load_digits`` gives 1797 images with values 0..16 (no file, no download).
    With ``rng = numpy.random.default_rng(seed)``: the splits come from ``rng.permutation(1797)``
    (train = first 1397, validation = next ``n_val`` = 200, test = last ``n_test`` = 200), then the
    grey levels ``x = value / 16`` of all 1797 images are binarized by ``rng.random(x.shape) < x``,
    drawn once in the original image order, so the set is fixed for a given seed.

    ``binarization`` selects:
        - ``"static"`` (default): the fixed seeded Bernoulli draw above for all three splits.
        - ``"dynamic"``: train keeps the grey levels and is binarized afresh per batch;
          validation and test use the static draw.
        - ``"threshold"``: a pixel is 1 where ``value >= 8`` (``x >= 0.5``), no randomness.

    Args:
        n_val: Validation images.
        n_test: Test images.
        seed: Seeds the split permutation, the static draw and the dynamic stream.
        binarization: ``"static"``, ``"dynamic"`` or ``"threshold"``.
        batch_size: Training batch size.
        eval_batch_size: Validation/test batch size; defaults to ``batch_size``.
        num_workers: DataLoader worker processes.
    """

    image_shape: ClassVar[tuple[int, int, int]] = (1, 8, 8)
    likelihood: ClassVar[str] = "bernoulli"
    BINARIZATIONS: ClassVar[tuple[str, ...]] = ("static", "dynamic", "threshold")
    N_IMAGES: ClassVar[int] = 1797

    def __init__(self, n_val: int = 200, n_test: int = 200, seed: int = 0,
                 binarization: Literal["static", "dynamic", "threshold"] = "static",
                 batch_size: int = 100, eval_batch_size: int | None = None,
                 num_workers: int = 0) -> None:
        if binarization not in self.BINARIZATIONS:
            raise ValueError(f"binarization must be one of {self.BINARIZATIONS}, got "
                             f"{binarization!r}")
        super().__init__(None, seed=seed, dynamic_binarization=binarization == "dynamic",
                         batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers)
        check_int("n_val", n_val)
        check_int("n_test", n_test)
        if n_val + n_test >= self.N_IMAGES:
            raise ValueError(f"n_val + n_test must leave training images out of "
                             f"{self.N_IMAGES}, got n_val={n_val}, n_test={n_test}")
        self.n_val = n_val
        self.n_test = n_test
        self.binarization = binarization

    def load_splits(self) -> dict[str, np.ndarray]:
        from sklearn.datasets import load_digits

        values = load_digits().data  # (1797, 64), integers 0..16, row-major 8x8
        if values.shape != (self.N_IMAGES, 64):
            raise RuntimeError(f"sklearn load_digits returned shape {values.shape}, expected "
                               f"({self.N_IMAGES}, 64)")
        grey = (values / 16.0).astype(np.float32)
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(self.N_IMAGES)
        bits = (rng.random(grey.shape) < grey).astype(np.float32)
        if self.binarization == "threshold":
            bits = (values >= 8).astype(np.float32)
        n_train = self.N_IMAGES - self.n_val - self.n_test
        train_rows = order[:n_train]
        val_rows = order[n_train:n_train + self.n_val]
        test_rows = order[n_train + self.n_val:]
        train = grey[train_rows] if self.binarization == "dynamic" else bits[train_rows]
        return {"train": train, "val": bits[val_rows], "test": bits[test_rows]}

