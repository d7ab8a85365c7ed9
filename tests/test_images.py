"""``images:DIR``: folders of PNG/JPEG files, grey and RGB, class subfolders, resizing, streaming from disk."""

import numpy as np
import pytest
import torch
from PIL import Image

import pyrovi as pv
from pyrovi.images import LazyRows


def _folder(root, n, size=(6, 8), mode="L", classes=None, seed=0, ext="png"):
    """``n`` random images (per class) of ``size`` (W, H); returns {relative path: uint8 array}."""
    rng = np.random.default_rng(seed)
    out = {}
    for c in classes or [None]:
        d = root / c if c else root
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
            a = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(a, mode).save(d / f"{i:03d}.{ext}")
            out[f"{c}/{i:03d}" if c else f"{i:03d}"] = a
    return out


def _all_rows(ds):
    return torch.cat([ds.train.x[:], ds.val.x[:], ds.test.x[:]])  # LazyRows or tensors: [:] reads all


def test_grey_folder_without_labels(tmp_path):
    imgs = _folder(tmp_path, 20)
    ds = pv.data.load(f"images:{tmp_path}")
    assert ds.image_shape == (8, 6) and ds.shape == (48,) and ds.num_classes is None and ds.train.y is None
    assert len(ds.train) + len(ds.val) + len(ds.test) == 20
    want = torch.tensor(np.stack([imgs[k].reshape(-1) for k in sorted(imgs)]), dtype=torch.float32) / 255
    got = _all_rows(ds)
    # every image appears once, pixel for pixel (the split shuffles the order)
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist()))


def test_rgb_class_subfolders_give_labels_channel_first(tmp_path):
    imgs = _folder(tmp_path, 6, size=(5, 4), mode="RGB", classes=["cat", "dog"])
    ds = pv.data.load(f"images:{tmp_path}", split=(0.0, 0.0))
    assert ds.image_shape == (3, 4, 5) and ds.num_classes == 2 and ds.source["classes"] == ["cat", "dog"]
    for x, y in zip(ds.train.x, ds.train.y):
        img = (x.reshape(3, 4, 5).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()  # (H, W, C)
        owners = [k for k, a in imgs.items() if np.array_equal(a, img)]
        assert len(owners) == 1 and owners[0].split("/")[0] == ["cat", "dog"][int(y)]


def test_resize_crop_mode_and_errors(tmp_path):
    _folder(tmp_path / "a", 3, size=(10, 6), mode="RGB")
    _folder(tmp_path / "a", 2, size=(8, 8), mode="RGB", seed=1, ext="jpg")
    with pytest.raises(pv.DataError, match="different sizes.*size="):
        pv.data.load(f"images:{tmp_path / 'a'}")
    ds = pv.data.load(f"images:{tmp_path / 'a'}?size=4&mode=grey", split=(0.0, 0.0))
    assert ds.image_shape == (4, 4) and ds.train.x.shape == (5, 16)
    ds = pv.data.load(f"images:{tmp_path / 'a'}?size=3x5", split=(0.0, 0.0))
    assert ds.image_shape == (3, 3, 5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(pv.DataError, match="no images"):
        pv.data.load(f"images:{tmp_path / 'empty'}")
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(pv.DataError, match="broken.png"):
        pv.data.load(f"images:{tmp_path / 'a'}?size=4")
    with pytest.raises(pv.ConfigError, match="unknown option"):
        pv.data.load(f"images:{tmp_path / 'a'}?colour=1")
    with pytest.raises(pv.DataError, match="no such folder"):
        pv.data.load(f"images:{tmp_path / 'missing'}")


def test_streamed_split_reads_the_same_rows_as_memory(tmp_path):
    _folder(tmp_path, 12, classes=["a", "b"])
    mem = pv.data.load(f"images:{tmp_path}", seed=3)
    lazy = pv.data.load(f"images:{tmp_path}?stream=1&workers=0", seed=3)
    assert isinstance(lazy.train.x, LazyRows) and lazy.shape == mem.shape
    for part in ("train", "val", "test"):
        torch.testing.assert_close(getattr(lazy, part).x[:], getattr(mem, part).x, rtol=0, atol=0)
        assert torch.equal(getattr(lazy, part).y, getattr(mem, part).y)
    rows, x = next(lazy.train.x.batches(torch.tensor([3, 0, 5]), 2))
    torch.testing.assert_close(x, mem.train.x[[3, 0]], rtol=0, atol=0)


def test_fit_trains_from_a_streamed_folder_with_workers(tmp_path):
    """A run trains from disk through a DataLoader with a worker process; load_run finds the data again."""
    _folder(tmp_path / "imgs", 16, size=(8, 8), classes=["a", "b"])
    name = f"images:{tmp_path / 'imgs'}?stream=1&workers=1"
    ds = pv.data.load(name)
    torch.manual_seed(0)
    model = pv.models.ConditionalVAE(ds.shape, 2, num_classes=2, arch="conv", hidden=8, channels=4,
                                     image_shape=ds.image_shape, likelihood="logistic")
    run = pv.fit(model, None, ds, epochs=2, batch_size=8, progress=False, figures=False, out=str(tmp_path / "run"))
    assert len(run.history) == 2 and all(np.isfinite(h["train_loss"]) for h in run.history)
    assert run.metrics["steps"] == 2 * 4  # 26 training rows in batches of 8
    back = pv.load_run(str(tmp_path / "run"))
    assert back.config["data"]["name"] == name
    m = pv.evaluate(back, k=3)
    assert np.isfinite(m["log_likelihood"]) and m["n"] == len(ds.test)
