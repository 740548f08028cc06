"""UserTableDataModule: formats, column choice, NaN handling, seeded split, train statistics,
checkpoint round trip and the raw-data log-density correction."""

from __future__ import annotations

import warnings

import h5py
import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from polyreg_cnf.datamodules._files import DataFileError
from polyreg_cnf.datamodules.user_table import UserTableDataModule, read_table
from scipy.stats import multivariate_normal, norm


def table(n=200, d=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) * np.arange(1, d + 1) + 10 * np.arange(d)


def loaded(path, **kwargs):
    dm = UserTableDataModule(path, **kwargs)
    dm.prepare_data()
    dm.setup()
    return dm


def reference_splits(data, seed=0, val_fraction=None, test_fraction=None):
    """The documented split: permuted rows, test first, then validation, then train; each
    fraction by default min(0.2, max(0.1, 100 / rows))."""
    n = len(data)
    share = min(0.2, max(0.1, 100 / n))
    val_fraction, test_fraction = val_fraction or share, test_fraction or share
    n_test, n_val = int(test_fraction * n), int(val_fraction * n)
    order = np.random.default_rng(seed).permutation(n)
    test = data[order[:n_test]]
    val = data[order[n_test:n_test + n_val]]
    train = data[order[n_test + n_val:]]
    mean = train.mean(axis=0).astype(np.float32).astype(np.float64)
    std = train.std(axis=0).astype(np.float32).astype(np.float64)
    return {k: ((v - mean) / std).astype(np.float32)
            for k, v in (("train", train), ("val", val), ("test", test))}


def assert_same(got, want):
    for key in ("train", "val", "test"):
        assert got[key].dtype == np.float32
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_every_format_gives_the_same_splits(tmp_path):
    data = table()
    want = reference_splits(data)
    np.save(tmp_path / "t.npy", data)
    np.savez(tmp_path / "one.npz", values=data)
    np.savez(tmp_path / "two.npz", a=data, b=data[:, :2])
    pd.DataFrame(data, columns=["x", "y", "z"]).to_csv(tmp_path / "head.csv", index=False)
    np.savetxt(tmp_path / "bare.csv", data, delimiter=",", fmt="%.17g")
    with h5py.File(tmp_path / "one.h5", "w") as handle:
        handle.create_dataset("group/values", data=data)
        handle.create_dataset("labels", data=np.arange(200))  # 1-D: not a candidate
    with h5py.File(tmp_path / "two.hdf5", "w") as handle:
        handle["a"] = data
        handle["b"] = data[:, :2]
    for name, kwargs in (("t.npy", {}), ("one.npz", {}), ("two.npz", {"npz_key": "a"}),
                         ("head.csv", {}), ("bare.csv", {}), ("one.h5", {}),
                         ("two.hdf5", {"h5_key": "a"}), ("one.h5", {"h5_key": "/group/values"})):
        dm = loaded(tmp_path / name, **kwargs)
        assert_same(dm.arrays(), want)
        assert dm.source == name
    assert loaded(tmp_path / "head.csv").column_names == ["x", "y", "z"]
    assert loaded(tmp_path / "bare.csv").column_names == ["0", "1", "2"]
    with pytest.warns(UserWarning, match="using the first, 'a'"):
        assert_same(loaded(tmp_path / "two.npz").arrays(), want)
    with pytest.raises(ValueError, match="found 2 2-D datasets.*h5_key"):
        loaded(tmp_path / "two.hdf5")
    with pytest.raises(ValueError, match="no dataset 'c'"):
        loaded(tmp_path / "two.hdf5", h5_key="c")
    with pytest.raises(ValueError, match="no array 'c'.*\\['a', 'b'\\]"):
        loaded(tmp_path / "two.npz", npz_key="c")
    with pytest.raises(ValueError, match="unsupported table format '.txt'.*'.npy'"):
        UserTableDataModule(tmp_path / "t.txt")


def test_column_choice(tmp_path):
    data = table(d=4)
    frame = pd.DataFrame(data, columns=["a", "b", "c", "d"])
    frame.insert(1, "city", ["Paris", "Oslo"] * 100)
    frame.to_csv(tmp_path / "t.csv", index=False)
    np.save(tmp_path / "t.npy", data)
    want = reference_splits(data[:, [3, 0]])
    assert_same(loaded(tmp_path / "t.csv", columns=["d", "a"]).arrays(), want)
    assert_same(loaded(tmp_path / "t.csv", columns=[4, "a"]).arrays(), want)
    assert_same(loaded(tmp_path / "t.npy", columns=[-1, 0]).arrays(), want)
    with pytest.raises(ValueError, match="\\['city'\\] are not numeric.*'Paris'"):
        loaded(tmp_path / "t.csv")
    with pytest.raises(ValueError, match="no column named 'e'.*'city'"):
        loaded(tmp_path / "t.csv", columns=["e"])
    with pytest.raises(ValueError, match="index 9 out of range for 4"):
        loaded(tmp_path / "t.npy", columns=[9])
    with pytest.raises(ValueError, match="no column names.*by index"):
        loaded(tmp_path / "t.npy", columns=["a"])
    with pytest.raises(ValueError, match="chosen twice"):
        loaded(tmp_path / "t.npy", columns=[0, -4])
    with pytest.raises(TypeError, match="list of names"):
        UserTableDataModule(tmp_path / "t.csv", columns="a")


def test_nonfinite_rows_refused_with_count_or_dropped(tmp_path):
    data = table(n=1000)
    bad_rows = np.arange(0, 1000, 83)[:12]
    data[bad_rows[:6], 0] = np.nan
    data[bad_rows[6:], 2] = np.inf
    np.save(tmp_path / "t.npy", data)
    with pytest.raises(ValueError, match="12 of 1000 rows contain NaN or inf; pass "
                                         "drop_nonfinite=True \\(train.py --drop-nonfinite\\)"):
        loaded(tmp_path / "t.npy")
    with pytest.warns(UserWarning, match="dropped 12 of 1000 rows"):
        dm = loaded(tmp_path / "t.npy", drop_nonfinite=True)
    assert dm.n_dropped == 12
    assert_same(dm.arrays(), reference_splits(np.delete(data, bad_rows, axis=0)))
    # The same in a CSV with empty cells and "inf".
    frame = pd.DataFrame(table(n=50), columns=["a", "b", "c"])
    frame.loc[[3, 7], "b"] = np.nan
    frame.loc[9, "c"] = np.inf
    frame.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ValueError, match="3 of 50 rows"):
        loaded(tmp_path / "t.csv")


def test_split_is_seeded_and_statistics_come_from_train(tmp_path):
    data = table(n=500)
    np.save(tmp_path / "t.npy", data)
    a = loaded(tmp_path / "t.npy", seed=3, val_fraction=0.2, test_fraction=0.1)
    b = loaded(tmp_path / "t.npy", seed=3, val_fraction=0.2, test_fraction=0.1)
    assert_same(a.arrays(), b.arrays())
    assert_same(a.arrays(), reference_splits(data, seed=3, val_fraction=0.2, test_fraction=0.1))
    c = loaded(tmp_path / "t.npy", seed=4, val_fraction=0.2, test_fraction=0.1)
    assert not np.array_equal(a.arrays()["test"], c.arrays()["test"])
    sizes = {k: len(v) for k, v in a.arrays().items()}
    assert sizes == {"train": 350, "val": 100, "test": 50}
    # Train statistics only: train is exactly standardised, the others are not.
    order = np.random.default_rng(3).permutation(500)
    train_raw = data[order[150:]]
    np.testing.assert_allclose(a.mean, train_raw.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(a.std, train_raw.std(axis=0), rtol=1e-6)
    assert a.mean.dtype == np.float32 and a.std.dtype == np.float32
    np.testing.assert_allclose(a.arrays()["train"].mean(axis=0), 0, atol=1e-5)
    assert np.abs(a.arrays()["test"].mean(axis=0)).max() > 1e-3
    np.testing.assert_array_equal(a.standardize(train_raw), a.arrays()["train"])
    torch.testing.assert_close(a.standardize(torch.from_numpy(train_raw).float()),
                               torch.from_numpy(a.arrays()["train"]), rtol=1e-5, atol=1e-5)


def test_constant_column_and_bad_arguments(tmp_path):
    data = table()
    data[:, 1] = 4.0
    np.save(tmp_path / "t.npy", data)
    with pytest.raises(ValueError, match="columns \\['1'\\] are constant"):
        loaded(tmp_path / "t.npy")
    assert loaded(tmp_path / "t.npy", columns=[0, 2]).dim == 2
    for kwargs, pattern in (({"val_fraction": 0}, "val_fraction"),
                            ({"test_fraction": 1.5}, "test_fraction"),
                            ({"val_fraction": 0.6, "test_fraction": 0.5}, "< 1"),
                            ({"seed": 1.5}, "seed")):
        with pytest.raises((ValueError, TypeError), match=pattern):
            UserTableDataModule(tmp_path / "t.npy", **kwargs)
    np.save(tmp_path / "small.npy", table(n=4))  # 20 %: no validation row
    with pytest.raises(ValueError, match="4 usable rows are too few"):
        loaded(tmp_path / "small.npy")


def test_bad_files(tmp_path):
    with pytest.raises(DataFileError, match="the table not found.*missing.npy"):
        loaded(tmp_path / "missing.npy")
    for name in ("t.npy", "t.npz", "t.h5"):
        (tmp_path / name).write_bytes(b"garbage" * 20)
        with pytest.raises(DataFileError, match=f"{name}: not a readable"):
            loaded(tmp_path / name)
    np.save(tmp_path / "cube.npy", np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="2-D table.*\\(4, 4, 4\\)"):
        loaded(tmp_path / "cube.npy")
    np.save(tmp_path / "text.npy", np.array([["a", "b"]] * 20))
    with pytest.raises(ValueError, match="numeric"):
        loaded(tmp_path / "text.npy")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataFileError, match="empty"):
        loaded(tmp_path / "empty.csv")


class TinyGaussian(L.LightningModule):
    """log p_std(z) = standard normal; one parameter so the trainer has something to step."""

    def __init__(self):
        super().__init__()
        self.shift = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        (z,) = batch
        return ((z - self.shift) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`",
                            "ignore:.*LeafSpec.*")
def test_state_dict_round_trip_through_a_checkpoint(tmp_path):
    data = table()
    np.save(tmp_path / "t.npy", data)
    dm = UserTableDataModule(tmp_path / "t.npy", columns=[0, 2], seed=5, batch_size=32)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TinyGaussian(), datamodule=dm)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    checkpoint = torch.load(tmp_path / "c.ckpt", weights_only=True)
    state = checkpoint["UserTableDataModule"]
    assert state["columns"] == [0, 2] and state["seed"] == 5
    assert state["path"] == str(tmp_path / "t.npy")

    restored = UserTableDataModule(tmp_path / "t.npy", columns=[0, 2], seed=5)
    restored.load_state_dict(state)
    np.testing.assert_array_equal(restored.mean, dm.mean)
    np.testing.assert_array_equal(restored.std, dm.std)
    assert restored.mean.dtype == np.float32
    x = data[:7, [0, 2]]
    np.testing.assert_array_equal(restored.standardize(x), dm.standardize(x))
    assert restored.log_det_jacobian() == dm.log_det_jacobian()

    # The checkpoint's statistics win even when the file has changed since.
    np.save(tmp_path / "t.npy", data * 3)
    later = UserTableDataModule(tmp_path / "t.npy", columns=[0, 2], seed=5)
    later.setup()
    assert not np.array_equal(later.mean, dm.mean)
    later.load_state_dict(state)  # after setup, as Lightning does on resume
    np.testing.assert_array_equal(later.mean, dm.mean)
    np.testing.assert_allclose(later.arrays()["train"], 3 * dm.arrays()["train"]
                               + 2 * dm.mean / dm.std, rtol=1e-4, atol=1e-4)
    with pytest.warns(UserWarning, match="other settings.*seed"):
        UserTableDataModule(tmp_path / "t.npy", columns=[0, 2], seed=6).load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        UserTableDataModule(tmp_path / "t.npy").load_state_dict({"mean": None, "std": None})


def test_raw_log_density_correction(tmp_path):
    data = table(n=400)
    np.save(tmp_path / "t.npy", data)
    dm = loaded(tmp_path / "t.npy")
    assert dm.log_det_jacobian() == pytest.approx(-np.log(dm.std.astype(np.float64)).sum())
    # A model that is exactly N(0, I) on standardised data is N(mean, diag(std^2)) on raw data.
    x = data[:25]
    z = dm.standardize(x).astype(np.float64)
    log_p_std = norm.logpdf(z).sum(axis=1)
    log_p_raw = log_p_std + dm.log_det_jacobian()
    mean, std = dm.mean.astype(np.float64), dm.std.astype(np.float64)
    want = multivariate_normal(mean, np.diag(std**2)).logpdf(x)
    np.testing.assert_allclose(log_p_raw, want, rtol=1e-5)
    with pytest.raises(RuntimeError, match="statistics unknown"):
        UserTableDataModule(tmp_path / "t.npy").log_det_jacobian()
    with pytest.raises(ValueError, match="3 columns"):
        dm.standardize(np.zeros((2, 4)))


def test_read_table_directly(tmp_path):
    (tmp_path / "t.csv").write_text("nan,1,2\n3,4,5\n")  # nan in row 1 is data, not a header
    values, names = read_table(tmp_path / "t.csv")
    assert values.shape == (2, 3) and names == ["0", "1", "2"] and np.isnan(values[0, 0])
