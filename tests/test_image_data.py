"""Image DataModules on small files generated here in the exact standard formats (spec DATA.md).

The reference computations below are written from DATA.md, independently of datamodules.images.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import scipy.io
import torch
from polyreg_cnf.datamodules._files import DataFileError
from polyreg_cnf.datamodules.images import (
    IMAGE_DATASETS,
    IMAGE_URLS,
    CaltechSilhouettesDataModule,
    DigitsDataModule,
    FreyFacesDataModule,
    ImageDataModule,
    MNISTDataModule,
    OmniglotDataModule,
    StaticMNISTDataModule,
    fortran_flatten,
    make_datamodule,
)

# ----------------------------------------------------------------------------- file writers


def write_amat(path: Path, bits: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(" ".join(str(int(v)) for v in row) + "\n" for row in bits))
    return path


def idx_bytes(images: np.ndarray, magic: int = 2051) -> bytes:
    count, rows, cols = images.shape
    return struct.pack(">IIII", magic, count, rows, cols) + images.astype(np.uint8).tobytes()


def write_idx(path: Path, images: np.ndarray, magic: int = 2051) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(images, magic)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)
    return path


def write_mat(path: Path, **arrays: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, arrays)
    return path


def write_pickle(path: Path, obj: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=2)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reference_eval_bits(val: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DATA.md / published: np.random.seed(777); binomial(1, val); binomial(1, test)."""
    saved = np.random.get_state()
    np.random.seed(777)
    out = np.random.binomial(1, val), np.random.binomial(1, test)
    np.random.set_state(saved)
    return out


def single_pixel(row: int, col: int, height: int = 28, width: int = 28) -> np.ndarray:
    image = np.zeros((height, width))
    image[row, col] = 1
    return image.reshape(-1)  # the file's row-major layout


# ----------------------------------------------------------------------------- generated data sets

RNG = np.random.default_rng(1234)
MNIST_TRAIN = RNG.integers(0, 256, size=(40, 28, 28), dtype=np.uint8)
MNIST_TEST = RNG.integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
AMAT = {"train": RNG.integers(0, 2, size=(30, 784)), "valid": RNG.integers(0, 2, size=(7, 784)),
        "test": RNG.integers(0, 2, size=(9, 784))}
OMNI_TRAIN = RNG.random((40, 784))  # rows = images (C-order 28x28); the file stores the transpose
OMNI_TEST = np.stack([single_pixel(3, 17), single_pixel(27, 0), single_pixel(0, 5)])
CALTECH = {"train_data": RNG.integers(0, 2, size=(15, 784)).astype(float),
           "val_data": 1 - np.stack([single_pixel(2, 9), single_pixel(20, 1)]),
           "test_data": RNG.integers(0, 2, size=(6, 784)).astype(float)}
FREY = RNG.integers(0, 256, size=(1965, 560), dtype=np.uint8)


def make_files(root: Path, name: str) -> dict:
    """Write the files of one set under root; return constructor kwargs for a small instance."""
    if name == "static_mnist":
        for split, bits in AMAT.items():
            write_amat(root / "MNIST_static" / f"binarized_mnist_{split}.amat", bits)
        return {}
    if name == "mnist":
        write_idx(root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz", MNIST_TRAIN)
        write_idx(root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz", MNIST_TEST)
        return {"n_val": 10}
    if name == "omniglot":
        write_mat(root / "OMNIGLOT" / "chardata.mat", data=OMNI_TRAIN.T, testdata=OMNI_TEST.T)
        return {"n_val": 10}
    if name == "caltech":
        write_mat(root / "Caltech101Silhouettes" / "caltech101_silhouettes_28_split1.mat",
                  **CALTECH)
        return {}
    if name == "freyfaces":
        write_pickle(root / "Freyfaces" / "freyfaces.pkl", (FREY, np.zeros(len(FREY))))
        return {}
    return {}


def build(name: str, root: Path, **kwargs):
    kwargs = {**make_files(root, name), **kwargs}
    dm = make_datamodule(name, None if name == "digits" else root, **kwargs)
    dm.prepare_data()
    dm.setup()
    return dm


# ----------------------------------------------------------------------------- shared properties


@pytest.mark.parametrize("name", IMAGE_DATASETS)
def test_every_set_has_the_same_properties(name, tmp_path):
    dm = build(name, tmp_path, batch_size=8)
    assert isinstance(dm, ImageDataModule)
    assert dm.likelihood in ("bernoulli", "categorical256")
    arrays = dm.arrays()
    assert sorted(arrays) == ["test", "train", "val"]
    for split, array in arrays.items():
        assert array.dtype == np.float32 and array.ndim == 2
        assert array.shape[1] == int(np.prod(dm.image_shape)) == dm.dim
        assert array.min() >= 0 and array.max() <= 1
        if dm.likelihood == "bernoulli" and (split != "train" or not dm.dynamic_binarization):
            assert set(np.unique(array)) <= {0.0, 1.0}, split
    # A second instance reads the very same arrays (static binarization and splits are fixed).
    again = build(name, tmp_path, batch_size=8).arrays()
    for split in arrays:
        np.testing.assert_array_equal(arrays[split], again[split])
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == 1 and batch[0].shape == (8, dm.dim) and batch[0].dtype == torch.float32


def test_image_shapes_and_likelihoods():
    assert StaticMNISTDataModule.image_shape == MNISTDataModule.image_shape == (1, 28, 28)
    assert OmniglotDataModule.image_shape == CaltechSilhouettesDataModule.image_shape
    assert FreyFacesDataModule.image_shape == (1, 28, 20)
    assert DigitsDataModule.image_shape == (1, 8, 8)
    assert FreyFacesDataModule.likelihood == "categorical256"
    for cls in (StaticMNISTDataModule, MNISTDataModule, OmniglotDataModule,
                CaltechSilhouettesDataModule, DigitsDataModule):
        assert cls.likelihood == "bernoulli"


def test_make_datamodule_names_and_errors(tmp_path):
    assert IMAGE_DATASETS == ("digits", "mnist", "static_mnist", "omniglot", "caltech",
                              "freyfaces")
    classes = {"digits": DigitsDataModule, "mnist": MNISTDataModule,
               "static_mnist": StaticMNISTDataModule, "omniglot": OmniglotDataModule,
               "caltech": CaltechSilhouettesDataModule, "freyfaces": FreyFacesDataModule}
    for name, cls in classes.items():
        dm = make_datamodule(name, None if name == "digits" else tmp_path)
        assert type(dm) is cls
    with pytest.raises(ValueError, match="valid names.*digits.*freyfaces"):
        make_datamodule("cifar10", tmp_path)
    with pytest.raises(ValueError, match="data_dir"):
        make_datamodule("mnist", None)
    with pytest.raises(ValueError, match="digits"):
        make_datamodule("digits", tmp_path)


# ----------------------------------------------------------------------------- Fortran order


def test_fortran_flatten_puts_pixel_r_c_at_r_plus_28c():
    image = np.array([[r * 100 + c for c in range(28)] for r in range(28)])
    flat = fortran_flatten(image.reshape(1, 784), 28, 28)[0]
    for r in range(28):
        for c in range(28):
            assert flat[r + 28 * c] == r * 100 + c
    # Non-square images (Frey's 28 x 20) and a batch: each image is flattened column by column.
    batch = np.arange(3 * 28 * 20).reshape(3, 28 * 20)
    expected = np.stack([row.reshape(28, 20).T.reshape(-1) for row in batch])
    np.testing.assert_array_equal(fortran_flatten(batch, 28, 20), expected)


# ----------------------------------------------------------------------------- static MNIST


def test_static_mnist_reads_files_in_order(tmp_path):
    arrays = build("static_mnist", tmp_path).arrays()
    for split, file_split in (("train", "train"), ("val", "valid"), ("test", "test")):
        np.testing.assert_array_equal(arrays[split], AMAT[file_split].astype(np.float32))


def test_static_mnist_missing_file_says_where_and_how(tmp_path):
    make_files(tmp_path, "static_mnist")
    (tmp_path / "MNIST_static" / "binarized_mnist_valid.amat").unlink()
    dm = StaticMNISTDataModule(tmp_path)
    with pytest.raises(DataFileError) as info:
        dm.setup()
    message = str(info.value)
    assert "binarized_mnist_valid.amat" in message
    assert str((tmp_path / "MNIST_static" / "binarized_mnist_valid.amat").resolve()) in message
    assert "784 values" in message
    assert IMAGE_URLS["binarized_mnist_valid.amat"][0] in message
    assert "download=True" in message


def test_static_mnist_accepts_other_spellings_of_0_and_1(tmp_path):
    make_files(tmp_path, "static_mnist")
    path = tmp_path / "MNIST_static" / "binarized_mnist_test.amat"
    lines = path.read_text().splitlines()
    lines[0] = "\t".join("1.0" if v else "0.0" for v in AMAT["test"][0])
    path.write_text("\n".join(lines) + "\n\n")  # tab separators and a trailing blank line
    np.testing.assert_array_equal(build("static_mnist", tmp_path).arrays()["test"], AMAT["test"])


@pytest.mark.parametrize("problem", ["783 columns", "value 2", "not a number"])
def test_static_mnist_bad_lines_name_file_and_line(tmp_path, problem):
    make_files(tmp_path, "static_mnist")
    path = tmp_path / "MNIST_static" / "binarized_mnist_test.amat"
    lines = path.read_text().splitlines()
    tokens = lines[2].split()
    if problem == "783 columns":
        tokens = tokens[:-1]
    elif problem == "value 2":
        tokens[5] = "2"
    else:
        tokens[5] = "x"
    lines[2] = " ".join(tokens)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=r"binarized_mnist_test\.amat.*line 3"):
        StaticMNISTDataModule(tmp_path).setup()


# ----------------------------------------------------------------------------- raw MNIST


@pytest.mark.parametrize("layout", ["MNIST/raw/{}.gz", "{}", "{}.gz", "MNIST/raw/{}"])
def test_mnist_idx_layouts_grey_levels_and_eval_bits(tmp_path, layout):
    write_idx(tmp_path / layout.format("train-images-idx3-ubyte"), MNIST_TRAIN)
    write_idx(tmp_path / layout.format("t10k-images-idx3-ubyte"), MNIST_TEST)
    dm = MNISTDataModule(tmp_path, n_val=10)
    dm.setup()
    arrays = dm.arrays()
    grey = MNIST_TRAIN.reshape(40, 784) / 255.0
    np.testing.assert_allclose(arrays["train"], grey[:30], rtol=1e-6)
    val_bits, test_bits = reference_eval_bits(grey[30:].astype(np.float32),
                                              (MNIST_TEST.reshape(12, 784) / 255.0)
                                              .astype(np.float32))
    np.testing.assert_array_equal(arrays["val"], val_bits)
    np.testing.assert_array_equal(arrays["test"], test_bits)
    assert dm.dynamic_binarization


def test_mnist_missing_lists_every_place_looked(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", MNIST_TRAIN)
    with pytest.raises(DataFileError) as info:
        MNISTDataModule(tmp_path, n_val=10).setup()
    message = str(info.value)
    assert "t10k-images-idx3-ubyte" in message
    assert str((tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").resolve()) in message
    assert str((tmp_path / "t10k-images-idx3-ubyte").resolve()) in message
    assert IMAGE_URLS["t10k-images-idx3-ubyte.gz"][0] in message


@pytest.mark.parametrize("problem", ["truncated", "truncated gz", "corrupt gz", "label magic",
                                     "short header", "not 28x28"])
def test_mnist_corrupt_idx_is_a_data_file_error(tmp_path, problem):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", MNIST_TEST)
    train = tmp_path / ("train-images-idx3-ubyte.gz" if "gz" in problem
                        else "train-images-idx3-ubyte")
    data = idx_bytes(MNIST_TRAIN)
    if problem == "truncated":
        train.write_bytes(data[:-100])
        match = "truncated"
    elif problem == "truncated gz":
        train.write_bytes(gzip.compress(data)[:-500])
        match = "corrupt or truncated"
    elif problem == "corrupt gz":
        train.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
        match = "corrupt or truncated"
    elif problem == "label magic":
        write_idx(train, MNIST_TRAIN, magic=2049)
        match = "magic number 2049.*label"
    elif problem == "short header":
        train.write_bytes(data[:10])
        match = "header"
    else:
        write_idx(train, np.zeros((5, 28, 27), dtype=np.uint8))
        match = "28x27"
    with pytest.raises(DataFileError, match=match) as info:
        MNISTDataModule(tmp_path, n_val=2).setup()
    assert train.name in str(info.value)


# ----------------------------------------------------------------------------- Omniglot


def test_omniglot_fortran_order_seeded_split_and_eval_bits(tmp_path):
    dm = build("omniglot", tmp_path, seed=5)
    arrays = dm.arrays()
    # Reference from DATA.md: transpose, reshape(-1, 28, 28), flatten order="F".
    stored = OMNI_TRAIN.T  # the file's 784 x N layout
    flat_train = stored.T.reshape(-1, 28, 28).reshape(-1, 784, order="F")
    shuffled = flat_train[np.random.default_rng(5).permutation(40)]
    np.testing.assert_allclose(arrays["train"], shuffled[:30], rtol=1e-6)
    flat_test = OMNI_TEST.reshape(-1, 28, 28).reshape(-1, 784, order="F")
    val_bits, test_bits = reference_eval_bits(shuffled[30:].astype(np.float32),
                                              flat_test.astype(np.float32))
    np.testing.assert_array_equal(arrays["val"], val_bits)
    np.testing.assert_array_equal(arrays["test"], test_bits)
    # The single lit pixel at (row r, col c) lands at r + 28 c.
    for image, (r, c) in zip(arrays["test"], [(3, 17), (27, 0), (0, 5)], strict=True):
        assert np.flatnonzero(image).tolist() == [r + 28 * c]
    # Another seed, another split of the same rows.
    other = build("omniglot", tmp_path, seed=6).arrays()["train"]
    assert not np.array_equal(other, arrays["train"])


@pytest.mark.parametrize("problem", ["missing key", "wrong orientation", "not a mat",
                                     "grey out of range"])
def test_omniglot_bad_file(tmp_path, problem):
    path = tmp_path / "OMNIGLOT" / "chardata.mat"
    if problem == "missing key":
        write_mat(path, data=OMNI_TRAIN.T)
        match = "testdata"
    elif problem == "wrong orientation":
        write_mat(path, data=OMNI_TRAIN, testdata=OMNI_TEST)
        match = r"784 x N"
    elif problem == "not a mat":
        path.parent.mkdir(parents=True)
        path.write_bytes(b"this is not a MATLAB file" * 20)
        match = "MATLAB"
    else:
        write_mat(path, data=OMNI_TRAIN.T * 3, testdata=OMNI_TEST.T)
        match = r"\[0, 1\]"
    with pytest.raises(DataFileError, match=match) as info:
        OmniglotDataModule(tmp_path, n_val=10).setup()
    assert "chardata.mat" in str(info.value)


def test_omniglot_missing_file_message(tmp_path):
    with pytest.raises(DataFileError) as info:
        OmniglotDataModule(tmp_path).setup()
    message = str(info.value)
    assert str((tmp_path / "OMNIGLOT" / "chardata.mat").resolve()) in message
    assert "'data'" in message and "'testdata'" in message
    assert IMAGE_URLS["chardata.mat"][0] in message


# ----------------------------------------------------------------------------- Caltech


def test_caltech_one_minus_data_in_fortran_order(tmp_path):
    arrays = build("caltech", tmp_path).arrays()
    for split, key in (("train", "train_data"), ("val", "val_data"), ("test", "test_data")):
        expected = 1.0 - CALTECH[key].reshape(-1, 28, 28).reshape(-1, 784, order="F")
        np.testing.assert_array_equal(arrays[split], expected.astype(np.float32))
    # val_data is 1 everywhere but one pixel; after 1 - x only that pixel is lit, at r + 28 c.
    assert np.flatnonzero(arrays["val"][0]).tolist() == [2 + 28 * 9]
    assert np.flatnonzero(arrays["val"][1]).tolist() == [20 + 28 * 1]


@pytest.mark.parametrize("problem", ["missing key", "non-binary", "783 columns"])
def test_caltech_bad_file(tmp_path, problem):
    arrays = dict(CALTECH)
    if problem == "missing key":
        del arrays["val_data"]
        match = "val_data"
    elif problem == "non-binary":
        arrays["test_data"] = arrays["test_data"] * 0.5
        match = "only 0 and 1"
    else:
        arrays["train_data"] = arrays["train_data"][:, :783]
        match = "N x 784"
    write_mat(tmp_path / "Caltech101Silhouettes" / "caltech101_silhouettes_28_split1.mat",
              **arrays)
    with pytest.raises(DataFileError, match=match) as info:
        CaltechSilhouettesDataModule(tmp_path).setup()
    assert "caltech101_silhouettes_28_split1.mat" in str(info.value)


# ----------------------------------------------------------------------------- Frey Faces


def test_frey_seeded_legacy_shuffle_and_split(tmp_path):
    np.random.seed(99)
    before = np.random.get_state()
    arrays = build("freyfaces", tmp_path).arrays()
    after = np.random.get_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2] == after[2]
    reference = FREY / 255.0
    saved = np.random.get_state()
    np.random.seed(123)
    np.random.shuffle(reference)
    np.random.set_state(saved)
    np.testing.assert_allclose(arrays["train"], reference[:1565], rtol=1e-6)
    np.testing.assert_allclose(arrays["val"], reference[1565:1765], rtol=1e-6)
    np.testing.assert_allclose(arrays["test"], reference[1765:1965], rtol=1e-6)
    assert {k: v.shape for k, v in arrays.items()} == {"train": (1565, 560), "val": (200, 560),
                                                      "test": (200, 560)}
    # Categorical likelihood: the grey levels are exactly k / 255.
    np.testing.assert_allclose(np.round(arrays["test"] * 255) / 255, arrays["test"], atol=1e-6)


@pytest.mark.parametrize("content, match", [
    ({"images": FREY}, "tuple or list"),
    ((np.zeros((10, 28, 20)),), "N x 560"),
    ((FREY.astype(float) * 2,), "0..255"),
    ((FREY[:100],), "fewer than"),
    ((), "empty"),
])
def test_frey_bad_pickle(tmp_path, content, match):
    write_pickle(tmp_path / "Freyfaces" / "freyfaces.pkl", content)
    with pytest.raises(DataFileError, match=match) as info:
        FreyFacesDataModule(tmp_path).setup()
    assert "freyfaces.pkl" in str(info.value)


def test_frey_not_a_pickle(tmp_path):
    path = tmp_path / "Freyfaces" / "freyfaces.pkl"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00\x01 not a pickle")
    with pytest.raises(DataFileError, match="not a readable pickle"):
        FreyFacesDataModule(tmp_path).setup()


# ----------------------------------------------------------------------------- digits


def test_digits_fixed_splits_and_modes():
    from sklearn.datasets import load_digits

    dm = DigitsDataModule()
    dm.setup()
    arrays = dm.arrays()
    assert {k: v.shape for k, v in arrays.items()} == {"train": (1397, 64), "val": (200, 64),
                                                      "test": (200, 64)}
    again = DigitsDataModule(seed=0)
    again.setup()
    for split in arrays:
        np.testing.assert_array_equal(arrays[split], again.arrays()[split])
    other = DigitsDataModule(seed=1)
    other.setup()
    assert not np.array_equal(arrays["test"], other.arrays()["test"])
    # Reference: permutation then one static draw, both from default_rng(seed).
    values = load_digits().data
    rng = np.random.default_rng(0)
    order = rng.permutation(1797)
    bits = (rng.random(values.shape) < values / 16).astype(np.float32)
    np.testing.assert_array_equal(arrays["train"], bits[order[:1397]])
    np.testing.assert_array_equal(arrays["test"], bits[order[1597:]])
    threshold = DigitsDataModule(binarization="threshold")
    threshold.setup()
    np.testing.assert_array_equal(threshold.arrays()["val"],
                                  (values[order[1397:1597]] >= 8).astype(np.float32))
    dynamic = DigitsDataModule(binarization="dynamic")
    dynamic.setup()
    np.testing.assert_allclose(dynamic.arrays()["train"], values[order[:1397]] / 16, rtol=1e-6)
    np.testing.assert_array_equal(dynamic.arrays()["val"], arrays["val"])
    assert dynamic.dynamic_binarization and not dm.dynamic_binarization


@pytest.mark.parametrize("kwargs, error", [
    ({"binarization": "otsu"}, "static.*dynamic.*threshold"),
    ({"n_val": 0}, "n_val"),
    ({"n_val": 1000, "n_test": 900}, "n_val \\+ n_test"),
    ({"seed": -1}, "seed"),
    ({"batch_size": 0}, "batch_size"),
])
def test_digits_bad_arguments(kwargs, error):
    with pytest.raises(ValueError, match=error):
        DigitsDataModule(**kwargs)


# ----------------------------------------------------------------------------- dynamic binarization


def training(dm, flag=True):
    dm.trainer = SimpleNamespace(training=flag)
    return dm


def test_dynamic_binarization_stream_is_seeded_and_resumable():
    x = torch.full((64, 64), 0.5)
    one = training(DigitsDataModule(binarization="dynamic", seed=3))
    two = training(DigitsDataModule(binarization="dynamic", seed=3))
    first = [one.on_after_batch_transfer((x,), 0)[0] for _ in range(4)]
    assert all(set(batch.unique().tolist()) <= {0.0, 1.0} for batch in first)
    assert not torch.equal(first[0], first[1])  # a fresh draw per batch
    assert all(torch.equal(a, two.on_after_batch_transfer((x,), 0)[0]) for a in first)
    # Resume: a new module given the state after 2 batches continues with batches 3 and 4.
    replay = training(DigitsDataModule(binarization="dynamic", seed=3))
    for _ in range(2):
        replay.on_after_batch_transfer((x,), 0)
    state = replay.state_dict()
    resumed = training(DigitsDataModule(binarization="dynamic", seed=3))
    resumed.load_state_dict(state)
    assert torch.equal(resumed.on_after_batch_transfer((x,), 0)[0], first[2])
    assert torch.equal(resumed.on_after_batch_transfer([x], 0)[0], first[3])
    other = training(DigitsDataModule(binarization="dynamic", seed=4))
    assert not torch.equal(other.on_after_batch_transfer((x,), 0)[0], first[0])


def test_dynamic_binarization_is_bernoulli_of_the_grey_level():
    dm = training(DigitsDataModule(binarization="dynamic"))
    x = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]).repeat(20000, 1)
    mean = dm.on_after_batch_transfer((x,), 0)[0].mean(0)
    torch.testing.assert_close(mean, x[0], atol=0.015, rtol=0)


def test_only_training_batches_are_binarized():
    x = torch.full((4, 64), 0.5)
    dm = DigitsDataModule(binarization="dynamic")
    assert dm.on_after_batch_transfer((x,), 0)[0] is x  # no trainer attached
    assert training(dm, False).on_after_batch_transfer((x,), 0)[0] is x  # validation, test
    static = training(DigitsDataModule())  # static sets never draw
    assert static.on_after_batch_transfer((x,), 0)[0] is x


def test_load_state_dict_rejects_foreign_state():
    dm = DigitsDataModule(binarization="dynamic")
    with pytest.raises(ValueError, match="binarization_generator"):
        dm.load_state_dict({"seed": 0})
    with pytest.raises(TypeError, match="uint8"):
        dm.load_state_dict({"binarization_generator": [1, 2, 3]})


class _Recorder(L.LightningModule):
    """A one-parameter model that records the batches Lightning hands it."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.train_batches, self.val_batches = [], []

    def training_step(self, batch, batch_idx):
        self.train_batches.append(batch[0].clone())
        return (self.weight * batch[0].mean()).sum() + self.weight.square().sum()

    def validation_step(self, batch, batch_idx):
        self.val_batches.append(batch[0].clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path, max_steps):
    return L.Trainer(max_steps=max_steps, limit_val_batches=1, val_check_interval=3,
                     logger=False, enable_progress_bar=False, enable_model_summary=False,
                     accelerator="cpu", devices=1, default_root_dir=tmp_path,
                     enable_checkpointing=False)


@pytest.mark.filterwarnings("ignore:.*resuming from a checkpoint that ended before the epoch")
def test_dynamic_binarization_inside_a_trainer_and_resume_from_checkpoint(tmp_path):
    full_dm = DigitsDataModule(binarization="dynamic", seed=7, batch_size=50)
    model = _Recorder()
    _trainer(tmp_path, 6).fit(model, datamodule=full_dm)
    grey = torch.from_numpy(full_dm.arrays()["train"])
    assert len(model.train_batches) == 6
    for batch in model.train_batches:
        assert set(batch.unique().tolist()) <= {0.0, 1.0}
    assert not set(grey.unique().tolist()) <= {0.0, 1.0}  # so the batches were binarized
    val = torch.from_numpy(full_dm.arrays()["val"][:50])
    assert model.val_batches  # the sanity check and the step-3 and step-6 validations
    assert all(torch.equal(batch, val) for batch in model.val_batches)  # untouched

    # Stop after 3 steps, save, resume to 6: the stream ends where the uninterrupted run's did.
    first_dm = DigitsDataModule(binarization="dynamic", seed=7, batch_size=50)
    trainer = _trainer(tmp_path, 3)
    trainer.fit(_Recorder(), datamodule=first_dm)
    ckpt = tmp_path / "step3.ckpt"
    trainer.save_checkpoint(ckpt)
    assert "DigitsDataModule" in torch.load(ckpt, weights_only=False)
    resumed_dm = DigitsDataModule(binarization="dynamic", seed=7, batch_size=50)
    _trainer(tmp_path, 6).fit(_Recorder(), datamodule=resumed_dm, ckpt_path=ckpt)
    assert torch.equal(resumed_dm.state_dict()["binarization_generator"],
                       full_dm.state_dict()["binarization_generator"])


# ----------------------------------------------------------------------------- downloads


@pytest.fixture
def server(loopback_server):
    return loopback_server


def _serve(served: Path, name: str, tmp: Path) -> dict[str, str]:
    """Generate the set's files, move them into the served folder; return {filename: sha256}."""
    make_files(tmp, name)
    digests = {}
    for path in tmp.rglob("*"):
        if path.is_file():
            digests[path.name] = sha256(path)
            path.rename(served / path.name)
    return digests


def test_download_success_with_supplied_checksums(server, tmp_path):
    served, url = server
    digests = _serve(served, "caltech", tmp_path / "gen")
    root = tmp_path / "data"
    dm = CaltechSilhouettesDataModule(root, download=True, base_url=url, checksums=digests)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # verified: no warning
        dm.prepare_data()
    dm.setup()
    assert (root / "Caltech101Silhouettes" / "caltech101_silhouettes_28_split1.mat").is_file()
    assert dm.arrays()["train"].shape == (15, 784)


def test_download_mnist_gz_into_mnist_raw_with_url_overrides(server, tmp_path):
    served, url = server
    digests = _serve(served, "mnist", tmp_path / "gen")
    urls = {name: f"{url}/{name}" for name in digests}
    root = tmp_path / "data"
    dm = MNISTDataModule(root, n_val=10, download=True, urls=urls, checksums=digests)
    dm.prepare_data()
    dm.setup()
    assert (root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file()
    assert dm.arrays()["train"].shape == (30, 784)


def test_download_without_checksum_warns_with_digest(server, tmp_path):
    served, url = server
    digests = _serve(served, "omniglot", tmp_path / "gen")
    dm = OmniglotDataModule(tmp_path / "data", n_val=10, download=True, base_url=url)
    with pytest.warns(UserWarning, match=digests["chardata.mat"]):
        dm.prepare_data()
    dm.setup()


def test_download_checksum_mismatch_leaves_nothing(server, tmp_path):
    served, url = server
    _serve(served, "freyfaces", tmp_path / "gen")
    root = tmp_path / "data"
    dm = FreyFacesDataModule(root, download=True, base_url=url,
                             checksums={"freyfaces.pkl": "0" * 64})
    with pytest.raises(DataFileError, match="checksum mismatch"):
        dm.prepare_data()
    folder = root / "Freyfaces"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_download_applies_the_tables_checksum_to_a_mirror(server, tmp_path):
    # The generated static-MNIST files are not the real ones, so the real digest must reject them.
    served, url = server
    _serve(served, "static_mnist", tmp_path / "gen")
    dm = StaticMNISTDataModule(tmp_path / "data", download=True, base_url=url)
    with pytest.raises(DataFileError, match=IMAGE_URLS["binarized_mnist_train.amat"][1]):
        dm.prepare_data()
    assert not list((tmp_path / "data").rglob("*.amat*"))


def test_download_404(server, tmp_path):
    _, url = server  # serves an empty folder
    dm = OmniglotDataModule(tmp_path / "data", download=True, base_url=url)
    with pytest.raises(DataFileError, match="404") as info:
        dm.prepare_data()
    assert f"{url}/chardata.mat" in str(info.value)
    assert not (tmp_path / "data" / "OMNIGLOT" / "chardata.mat").exists()


def test_download_skips_files_already_present(tmp_path):
    make_files(tmp_path, "caltech")
    path = tmp_path / "Caltech101Silhouettes" / "caltech101_silhouettes_28_split1.mat"
    before = path.read_bytes()
    # An unreachable URL proves nothing is fetched when the file is there.
    dm = CaltechSilhouettesDataModule(tmp_path, download=True, base_url="http://127.0.0.1:9")
    dm.prepare_data()
    dm.setup()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    expected = 1.0 - CALTECH["test_data"].reshape(-1, 28, 28).reshape(-1, 784, order="F")
    np.testing.assert_array_equal(dm.arrays()["test"], expected.astype(np.float32))


def test_constructor_argument_errors(tmp_path):
    with pytest.raises(TypeError, match="download"):
        OmniglotDataModule(tmp_path, download="yes")
    with pytest.raises(TypeError, match="data_dir"):
        OmniglotDataModule(42)
    with pytest.raises(ValueError, match="n_val"):
        MNISTDataModule(tmp_path, n_val=0)
    with pytest.raises(ValueError, match="sizes"):
        FreyFacesDataModule(tmp_path, sizes=(1565, 200))
    with pytest.raises(TypeError, match="base_url"):
        FreyFacesDataModule(tmp_path, base_url=8000)
    with pytest.raises(TypeError, match="checksums"):
        FreyFacesDataModule(tmp_path, checksums=["abc"])
