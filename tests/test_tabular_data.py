"""TabularDataModule: published preprocessing, cache, download and bad-file errors.

Every file is generated here in the exact format of the MAF archive; each set is compared with a
reference written straight from DATA.md ("Tabular"), kept deliberately plain.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from polyreg_cnf.datamodules import tabular
from polyreg_cnf.datamodules._files import DataFileError
from polyreg_cnf.datamodules.tabular import (
    PUBLISHED_DIMS,
    TabularDataModule,
    preprocess_bsds300,
    preprocess_gas,
    preprocess_hepmass,
    preprocess_miniboone,
    preprocess_power,
)

# ---------------------------------------------------------------------------------------------
# References, straight from DATA.md.


def split_tail3(data):
    n_test = int(0.1 * len(data))
    test = data[-n_test:]
    rest = data[:-n_test]
    n_val = int(0.1 * len(rest))
    return rest[:-n_val], rest[-n_val:], test


def as32(train, val, test):
    return {"train": train.astype(np.float32), "val": val.astype(np.float32),
            "test": test.astype(np.float32)}


def ref_power(raw, draw=("voltage", "gap", "sm"), shuffle_first=True, ddof=0):
    data = raw.copy()
    rng = np.random.RandomState(42)
    n = len(data)
    if shuffle_first:
        rng.shuffle(data)
    data = np.delete(data, 3, axis=1)
    data = np.delete(data, 1, axis=1)
    noise = {}
    for key in draw:
        noise[key] = {"voltage": lambda: 0.01 * rng.rand(n, 1),
                      "gap": lambda: 0.001 * rng.rand(n, 1),
                      "sm": lambda: rng.rand(n, 3)}[key]()
    if not shuffle_first:
        rng.shuffle(data)
    data = data + np.hstack([noise["gap"], noise["voltage"], noise["sm"], np.zeros((n, 1))])
    train, val, test = split_tail3(data)
    both = np.vstack([train, val])
    mu, s = both.mean(axis=0), both.std(axis=0, ddof=ddof)
    return as32((train - mu) / s, (val - mu) / s, (test - mu) / s)


def ref_gas(frame, ddof=1):
    data = frame.drop(["Meth", "Eth", "Time"], axis=1)
    while True:
        corr = data.corr().values
        counts = (corr > 0.98).sum(axis=1)
        if not (counts > 1).any():
            break
        first = [i for i, c in enumerate(counts) if c > 1][0]
        data = data.drop(data.columns[first], axis=1)
    data = (data - data.mean()) / data.std(ddof=ddof)
    return as32(*split_tail3(data.values))


def ref_hepmass(train_csv, test_csv):
    train = pd.read_csv(train_csv, index_col=False)
    test = pd.read_csv(test_csv, index_col=False)
    train = train[train[train.columns[0]] == 1].drop(train.columns[0], axis=1)
    test = test[test[test.columns[0]] == 1].drop(test.columns[0], axis=1)
    test = test.drop(test.columns[-1], axis=1)
    mu, s = train.mean(), train.std()
    train = ((train - mu) / s).values
    test = ((test - mu) / s).values
    drop = []
    for j in range(train.shape[1]):
        counter = Counter(train[:, j])
        if counter[min(counter)] > 5:
            drop.append(j)
    keep = [j for j in range(train.shape[1]) if j not in drop]
    train, test = train[:, keep], test[:, keep]
    n_val = int(0.1 * len(train))
    return as32(train[:-n_val], train[-n_val:], test), drop


def ref_miniboone(raw):
    train, val, test = split_tail3(raw)
    both = np.vstack([train, val])
    mu, s = both.mean(axis=0), both.std(axis=0)
    return as32((train - mu) / s, (val - mu) / s, (test - mu) / s)


def assert_splits_equal(got, want):
    assert set(got) == {"train", "val", "test"}
    for key in ("train", "val", "test"):
        assert got[key].dtype == np.float32
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


# ---------------------------------------------------------------------------------------------
# Generators of standard-format files.


def power_raw(n=400, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8)) * np.arange(1, 9) + np.arange(8)


def write_power(root, raw=None):
    path = Path(root) / "power" / "data.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, power_raw() if raw is None else raw)
    return path


GAS_KEPT = ["s0", "s1", "s2", "c_b", "s4", "c_d", "s6", "n6"]


def gas_frame(n=300, seed=1):
    rng = np.random.default_rng(seed)
    s = {f"s{i}": rng.normal(size=n) * (i + 1) + i for i in range(7)}
    small = lambda: 0.01 * rng.normal(size=n)  # noqa: E731
    cols = {
        "Time": np.arange(n, dtype=float),
        "Meth": rng.normal(size=n),
        "Eth": rng.normal(size=n),
        "c_a": s["s0"] + small(),          # before s0: c_a is the first with count > 1
        "s0": s["s0"], "s1": s["s1"], "s2": s["s2"],
        "s3": s["s3"],                     # before c_b: s3 goes, c_b stays
        "c_b": 2 * s["s3"] + small(),
        "s4": s["s4"] + 0.5 * s["s1"],     # correlated ~0.5 with s1: kept
        "s5": s["s5"],                     # s5, c_c, c_d: s5 goes, then c_c, c_d stays
        "c_c": s["s5"] + 0.1 * small(),
        "c_d": s["s5"] + small(),
        "s6": s["s6"],
        "n6": -s["s6"] + small(),          # correlation -0.99: only > 0.98 counts, so kept
    }
    return pd.DataFrame(cols)


def write_gas(root, frame=None):
    path = Path(root) / "gas" / "ethylene_CO.pickle"
    path.parent.mkdir(parents=True, exist_ok=True)
    (gas_frame() if frame is None else frame).to_pickle(path)
    return path


HEP_FEATURES = [f"f{i}" for i in range(27)]
HEP_REMOVED = [3, 8, 10, 15, 20, 26]  # smallest value repeated 6+ times among signal rows


def hepmass_tables(n_train=300, n_test=120, seed=2):
    rng = np.random.default_rng(seed)

    def table(n, with_mass):
        x = rng.normal(size=(n, 27)).round(4)
        label = (rng.random(n) < 0.6).astype(float)
        label[:12] = 1.0
        for j in HEP_REMOVED:
            x[:6, j] = -9.0                 # min repeated 6 times in signal rows -> dropped
        x[:5, 1] = -9.0                     # min repeated exactly 5 times -> kept
        x[:20, 2] = 9.0                     # the MAX repeats, not the min -> kept
        label[12:18] = 0.0
        x[12:18, 5] = -20.0                 # background rows only -> kept after the label filter
        frame = pd.DataFrame(x, columns=HEP_FEATURES)
        frame.insert(0, "# label", label)
        if with_mass:
            frame["mass"] = 1000.0
        return frame

    return table(n_train, False), table(n_test, True)


def write_hepmass(root, tables=None):
    folder = Path(root) / "hepmass"
    folder.mkdir(parents=True, exist_ok=True)
    train, test = hepmass_tables() if tables is None else tables
    train.to_csv(folder / "1000_train.csv", index=False)
    test.to_csv(folder / "1000_test.csv", index=False)
    return folder / "1000_train.csv", folder / "1000_test.csv"


def miniboone_raw(n=250, seed=3):
    return np.random.default_rng(seed).normal(size=(n, 43)) * 3 + 1


def write_miniboone(root, raw=None):
    path = Path(root) / "miniboone" / "data.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, miniboone_raw() if raw is None else raw)
    return path


def bsds_arrays(seed=4):
    rng = np.random.default_rng(seed)
    return {"train": rng.random((50, 63)), "validation": rng.random((20, 63)),
            "test": rng.random((30, 63))}


def write_bsds(root, arrays=None):
    path = Path(root) / "BSDS300" / "BSDS300.hdf5"
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        for key, value in (bsds_arrays() if arrays is None else arrays).items():
            handle.create_dataset(key, data=value)
    return path


def loaded(name, root, **kwargs):
    dm = TabularDataModule(name, root, **kwargs)
    dm.prepare_data()
    dm.setup()
    return dm


# ---------------------------------------------------------------------------------------------
# Preprocessing equals the references.


def test_power_matches_reference_and_draw_order(tmp_path):
    raw = power_raw()
    want = ref_power(raw)
    got = preprocess_power(raw)
    assert_splits_equal(got, want)
    np.testing.assert_array_equal(raw, power_raw())  # input untouched
    assert got["train"].shape == (324, 6) and got["val"].shape == (36, 6)
    assert got["test"].shape == (40, 6)
    # Each wrong variant changes the values: the test would catch the mistake.
    for wrong in (ref_power(raw, draw=("gap", "voltage", "sm")),
                  ref_power(raw, draw=("sm", "voltage", "gap")),
                  ref_power(raw, shuffle_first=False),
                  ref_power(raw, ddof=1)):
        assert not np.allclose(got["train"], wrong["train"], rtol=1e-6, atol=0)
    write_power(tmp_path, raw)
    assert_splits_equal(loaded("POWER", tmp_path).arrays(), want)


def test_gas_correlation_removal_and_ddof1(tmp_path):
    frame = gas_frame()
    before = frame.copy()
    got = preprocess_gas(frame)
    pd.testing.assert_frame_equal(frame, before)
    assert_splits_equal(got, ref_gas(frame))
    # Which columns survive: exactly GAS_KEPT, in file order.
    kept = frame[GAS_KEPT]
    kept = (kept - kept.mean()) / kept.std()
    assert_splits_equal(got, as32(*split_tail3(kept.values)))
    assert not np.allclose(got["train"], ref_gas(frame, ddof=0)["train"], rtol=1e-6, atol=0)
    write_gas(tmp_path, frame)
    dm = loaded("gas", tmp_path)
    assert dm.dim == PUBLISHED_DIMS["gas"]
    assert_splits_equal(dm.arrays(), ref_gas(frame))


def test_hepmass_filter_last_column_and_feature_removal(tmp_path):
    train_csv, test_csv = write_hepmass(tmp_path)
    want, dropped = ref_hepmass(train_csv, test_csv)
    assert dropped == HEP_REMOVED
    got = preprocess_hepmass(pd.read_csv(train_csv, index_col=False),
                             pd.read_csv(test_csv, index_col=False))
    assert_splits_equal(got, want)
    n_signal = int((pd.read_csv(train_csv)["# label"] == 1).sum())
    assert got["train"].shape[0] + got["val"].shape[0] == n_signal
    assert got["val"].shape[0] == int(0.1 * n_signal)
    dm = loaded("hepmass", tmp_path)
    assert dm.dim == 21
    assert_splits_equal(dm.arrays(), want)


def test_miniboone_and_bsds300(tmp_path):
    raw = miniboone_raw()
    assert_splits_equal(preprocess_miniboone(raw), ref_miniboone(raw))
    write_miniboone(tmp_path, raw)
    assert_splits_equal(loaded("miniboone", tmp_path).arrays(), ref_miniboone(raw))
    arrays = bsds_arrays()
    write_bsds(tmp_path, arrays)
    want = {"train": arrays["train"].astype(np.float32),
            "val": arrays["validation"].astype(np.float32),
            "test": arrays["test"].astype(np.float32)}
    assert_splits_equal(preprocess_bsds300(arrays), want)
    dm = loaded("BSDS300", tmp_path)
    assert_splits_equal(dm.arrays(), want)
    (batch,) = next(iter(dm.train_dataloader()))
    assert batch.shape == (50, 63)  # published batch 10000 > rows


def test_constructor_checks(tmp_path):
    with pytest.raises(ValueError, match="'cifar'.*power.*gas.*hepmass.*miniboone.*bsds300"):
        TabularDataModule("cifar", tmp_path)
    with pytest.raises(ValueError, match="archive_sha256"):
        TabularDataModule("power", tmp_path, archive_sha256="abc")
    assert TabularDataModule("gas", tmp_path).batch_size == 1000
    assert TabularDataModule("gas", tmp_path, batch_size=7).batch_size == 7


# ---------------------------------------------------------------------------------------------
# Cache.


def test_cache_hit_does_not_read_source(tmp_path, monkeypatch):
    write_power(tmp_path)
    first = loaded("power", tmp_path).arrays()
    cache = tmp_path / "power" / ".polyreg_cache"
    assert sorted(p.name for p in cache.iterdir()) == ["manifest.json", "test.npy",
                                                      "train.npy", "val.npy"]
    assert sorted(p.name for p in (tmp_path / "power").iterdir()) == [".polyreg_cache",
                                                                      "data.npy"]

    def fail(*args, **kwargs):
        raise AssertionError("source read despite a valid cache")

    monkeypatch.setattr(tabular, "_load_raw", fail)
    assert_splits_equal(loaded("power", tmp_path).arrays(), first)
    # Large splits come back memory-mapped.
    monkeypatch.setattr(tabular, "MMAP_MIN_BYTES", 0)
    dm = TabularDataModule("power", tmp_path)
    assert isinstance(dm._read_cache(dm.paths)["train"], np.memmap)
    dm.setup()
    assert_splits_equal(dm.arrays(), first)


def counting_loader(monkeypatch):
    calls = []
    real = tabular._load_raw

    def load(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(tabular, "_load_raw", load)
    return calls


def test_half_written_cache_is_ignored(tmp_path, monkeypatch):
    raw = power_raw()
    write_power(tmp_path, raw)
    loaded("power", tmp_path)
    cache = tmp_path / "power" / ".polyreg_cache"
    (cache / "manifest.json").unlink()
    (cache / "train.npy").write_bytes(b"\x93NUMPY garbage")
    calls = counting_loader(monkeypatch)
    assert_splits_equal(loaded("power", tmp_path).arrays(), ref_power(raw))
    assert calls == ["power"] and (cache / "manifest.json").is_file()
    # A truncated manifest is no manifest.
    text = (cache / "manifest.json").read_text()
    (cache / "manifest.json").write_text(text[: len(text) // 2])
    assert_splits_equal(loaded("power", tmp_path).arrays(), ref_power(raw))
    assert calls == ["power", "power"]
    # A split file of the wrong size under a good manifest is ignored too.
    np.save(cache / "val.npy", np.zeros((3, 6), np.float32))
    assert_splits_equal(loaded("power", tmp_path).arrays(), ref_power(raw))
    assert calls == ["power"] * 3


def test_changed_source_invalidates_cache(tmp_path, monkeypatch):
    path = write_power(tmp_path)
    loaded("power", tmp_path)
    calls = counting_loader(monkeypatch)
    new = power_raw(seed=9)
    np.save(path, new)  # same size: only the mtime tells
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert_splits_equal(loaded("power", tmp_path).arrays(), ref_power(new))
    assert calls == ["power"]
    loaded("power", tmp_path)
    assert calls == ["power"]


def test_cache_false_writes_nothing(tmp_path):
    raw = power_raw()
    write_power(tmp_path, raw)
    assert_splits_equal(loaded("power", tmp_path, cache=False).arrays(), ref_power(raw))
    assert not (tmp_path / "power" / ".polyreg_cache").exists()


# ---------------------------------------------------------------------------------------------
# Download from a loopback server.


@pytest.fixture
def served(loopback_server):
    return loopback_server


def make_archive(path, members):
    """A data.tar.gz like the MAF one: every member under data/ (symlinks given as ('->', x))."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(payload, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, payload[1]
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    path.write_bytes(gzip.compress(buffer.getvalue()))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def npy_bytes(array):
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def test_download_verified_unpacks_only_needed(served, tmp_path):
    www, url = served
    raw = power_raw()
    sha = make_archive(www / "data.tar.gz", {
        "data/power/data.npy": npy_bytes(raw),
        "data/miniboone/data.npy": npy_bytes(miniboone_raw()),
        "../evil.txt": b"escape",
    })
    root = tmp_path / "root"
    dm = loaded("power", root, download=True, archive_url=f"{url}/data.tar.gz",
                archive_sha256=sha.upper())
    assert_splits_equal(dm.arrays(), ref_power(raw))
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if ".polyreg_cache" not in p.parts) == ["power", "power/data.npy"]
    assert not (tmp_path / "evil.txt").exists()


def test_download_bad_checksum_leaves_nothing(served, tmp_path):
    www, url = served
    make_archive(www / "data.tar.gz", {"data/power/data.npy": npy_bytes(power_raw())})
    root = tmp_path / "root"
    dm = TabularDataModule("power", root, download=True, archive_url=f"{url}/data.tar.gz",
                           archive_sha256="0" * 64)
    with pytest.raises(DataFileError, match="checksum mismatch"):
        dm.prepare_data()
    assert list(root.rglob("*")) == []


def test_download_unverified_warns_with_digest(served, tmp_path):
    www, url = served
    sha = make_archive(www / "data.tar.gz", {"power/data.npy": npy_bytes(power_raw())})
    with pytest.warns(UserWarning, match=f"not verified.*{sha}"):
        loaded("power", tmp_path / "root", download=True, archive_url=f"{url}/data.tar.gz")


def test_download_refuses_missing_and_symlink_members(served, tmp_path):
    www, url = served
    sha = make_archive(www / "data.tar.gz", {"data/gas/other.pickle": b"x",
                                             "data/power/data.npy": ("->", "/etc/passwd")})
    for name, pattern in (("gas", "no member\\(s\\) \\['data/gas/ethylene_CO.pickle'\\]"),
                          ("power", "not a regular file")):
        dm = TabularDataModule(name, tmp_path / "root", download=True,
                               archive_url=f"{url}/data.tar.gz", archive_sha256=sha)
        with pytest.raises(DataFileError, match=pattern):
            dm.prepare_data()
    assert [p for p in (tmp_path / "root").rglob("*") if p.is_file()] == []
    # Not a gzip archive at all (unverified, so it gets as far as unpacking).
    (www / "junk.tar.gz").write_bytes(b"this is not gzip" * 64)
    dm = TabularDataModule("power", tmp_path / "root", download=True,
                           archive_url=f"{url}/junk.tar.gz")
    with pytest.warns(UserWarning, match="not verified"), \
            pytest.raises(DataFileError, match="junk.tar.gz: not a readable .tar.gz"):
        dm.prepare_data()
    assert list((tmp_path / "root").iterdir()) == []
    # Unreachable server: a clear error, not a bare URLError.
    dm = TabularDataModule("power", tmp_path / "root", download=True,
                           archive_url=f"{url}/missing.tar.gz")
    with pytest.raises(DataFileError, match="could not download"):
        dm.prepare_data()


# ---------------------------------------------------------------------------------------------
# Bad files.


def test_missing_file_says_where_and_how(tmp_path):
    dm = TabularDataModule("hepmass", tmp_path)
    with pytest.raises(DataFileError) as info:
        dm.prepare_data()
    message = str(info.value)
    for part in ("hepmass/1000_train.csv", str((tmp_path / "hepmass/1000_train.csv").resolve()),
                 "data.tar.gz", "1161203", "download=True", "--download"):
        assert part in message
    with pytest.raises(DataFileError, match="1000_train.csv"):
        dm.setup()


def test_bad_npy_files(tmp_path):
    path = write_power(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataFileError, match=f"{path}.*truncated"):
        loaded("power", tmp_path)
    np.save(path, np.zeros((100, 7)))
    with pytest.raises(DataFileError, match="8 columns.*shape \\(100, 7\\)"):
        loaded("power", tmp_path)
    np.save(path, np.array([["a"] * 8] * 20))
    with pytest.raises(DataFileError, match="numeric"):
        loaded("power", tmp_path)
    write_miniboone(tmp_path, miniboone_raw()[:, :40])
    with pytest.raises(DataFileError, match="gave 40 columns.*MINIBOONE set has 43"):
        loaded("miniboone", tmp_path)


def test_bad_csv_files(tmp_path):
    train, test = hepmass_tables()
    bad = train.astype({"f4": object})
    bad.loc[7, "f4"] = "abc"
    write_hepmass(tmp_path, (bad, test))
    with pytest.raises(DataFileError, match="1000_train.csv.*\\['f4'\\].*not numeric"):
        loaded("hepmass", tmp_path)
    write_hepmass(tmp_path, (train, test.drop(columns="mass")))
    with pytest.raises(DataFileError, match="1000_test.csv.*do not match"):
        loaded("hepmass", tmp_path)
    write_hepmass(tmp_path, (train.drop(columns="f0"), test.drop(columns="f0")))
    with pytest.raises(DataFileError, match="gave 20 columns.*HEPMASS set has 21"):
        loaded("hepmass", tmp_path)
    (tmp_path / "hepmass" / "1000_train.csv").write_bytes(b"")
    with pytest.raises(DataFileError, match="1000_train.csv.*not a readable CSV"):
        loaded("hepmass", tmp_path)


def test_bad_pickle_files(tmp_path):
    path = write_gas(tmp_path)
    path.write_bytes(path.read_bytes()[: 200])
    with pytest.raises(DataFileError, match=f"{path}.*not a readable pickled"):
        loaded("gas", tmp_path)
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DataFileError, match="DataFrame, got list"):
        loaded("gas", tmp_path)
    write_gas(tmp_path, gas_frame().drop(columns="Meth"))
    with pytest.raises(DataFileError, match="lacks columns \\['Meth'\\]"):
        loaded("gas", tmp_path)


def test_bad_hdf5_files(tmp_path):
    path = write_bsds(tmp_path)
    path.write_bytes(b"not an hdf5 file at all" * 10)
    with pytest.raises(DataFileError, match=f"{path}.*not a readable HDF5"):
        loaded("bsds300", tmp_path)
    arrays = bsds_arrays()
    del arrays["validation"]
    write_bsds(tmp_path, arrays)
    with pytest.raises(DataFileError, match="\\['validation'\\] missing"):
        loaded("bsds300", tmp_path)
