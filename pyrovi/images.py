"""Folders of PNG/JPEG images (``pyrovi.data.load("images:DIR")``), in memory or streamed from disk.

``DIR`` holds the images directly (no labels), or one subfolder per class
(``DIR/cat/*.png``, ``DIR/dog/*.png``: labels are the sorted folder names'
indices). Options follow a ``?`` in the name, so the name alone reloads the
same data for a run (``load_run``)::

    images:DIR?size=32            resize the shorter side to 32, then crop the centre 32x32
    images:DIR?size=24x32         resize to 24 (height) x 32 (width), no crop
    images:DIR?mode=grey          grey (1 channel) or rgb (3); default: rgb if any image has colour
    images:DIR?stream=1           read batches from disk through a DataLoader (default: auto)
    images:DIR?workers=4          DataLoader worker processes when streaming

Pixels become float32 in [0, 1] (``uint8 / 255``), channel-first and flattened:
an item is ``(C*H*W,)`` and the dataset's ``image_shape`` is ``(H, W)`` for grey,
``(3, H, W)`` for RGB. Every file's header is read up front (cheap: no pixels are
decoded), so mixed sizes without ``size=``, an empty folder or an unreadable
file is a :class:`~pyrovi.errors.DataError` naming the file before any training.

Streaming (``stream=1``, or ``auto`` when the float32 pixels would pass
:data:`MAX_IN_MEMORY`): a split's ``x`` is a :class:`LazyRows`, which reads the
rows it is indexed with; ``fit`` trains from it through a ``DataLoader`` with
worker processes (:meth:`LazyRows.batches`), one batch ahead of the step.
"""

from __future__ import annotations

import math
import os
from urllib.parse import parse_qsl

import numpy as np
import torch

from .errors import ConfigError, DataError

__all__ = ["read_folder", "ImageFiles", "LazyRows", "parse_spec", "MAX_IN_MEMORY", "EXTENSIONS"]

#: image files recognised in a folder (case-insensitive)
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: float32 bytes above which ``stream=auto`` reads from disk instead of holding the data in memory
MAX_IN_MEMORY = 1 << 31
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
_OPTIONS = ("size", "mode", "stream", "workers")


def parse_spec(spec: str) -> tuple:
    """``"DIR?size=32&mode=grey"`` -> ``(DIR, {"size": (32, None), "mode": "grey", "stream": ..., "workers": ...})``."""
    path, _, query = spec.partition("?")
    opts = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(opts) - set(_OPTIONS))
    if unknown:
        raise ConfigError(f"images:{spec}: unknown option(s) {unknown}; valid: {', '.join(_OPTIONS)} "
                          "(e.g. images:DIR?size=32&mode=grey)")
    out = {"size": None, "mode": "auto", "stream": "auto", "workers": min(4, max(1, (os.cpu_count() or 2) - 1))}
    if "size" in opts:
        h, _, w = opts["size"].lower().partition("x")
        try:
            out["size"] = (int(h), int(w) if w else None)
        except ValueError:
            raise ConfigError(f"images: size must be N (shorter side, centre crop NxN) or HxW, "
                              f"got {opts['size']!r}") from None
        if out["size"][0] < 1 or (out["size"][1] is not None and out["size"][1] < 1):
            raise ConfigError(f"images: size must be positive, got {opts['size']!r}")
    if "mode" in opts:
        mode = opts["mode"].lower().replace("gray", "grey")
        if mode not in ("grey", "rgb", "auto"):
            raise ConfigError(f"images: mode must be grey, rgb or auto, got {opts['mode']!r}")
        out["mode"] = mode
    if "stream" in opts:
        flag = opts["stream"].lower()
        if flag not in ("0", "1", "true", "false", "auto", "yes", "no"):
            raise ConfigError(f"images: stream must be 1, 0 or auto, got {opts['stream']!r}")
        out["stream"] = "auto" if flag == "auto" else flag in ("1", "true", "yes")
    if "workers" in opts:
        try:
            out["workers"] = int(opts["workers"])
        except ValueError:
            raise ConfigError(f"images: workers must be an integer >= 0, got {opts['workers']!r}") from None
        if out["workers"] < 0:
            raise ConfigError(f"images: workers must be >= 0, got {out['workers']}")
    if not path:
        raise ConfigError("images: needs a folder, e.g. images:path/to/folder")
    return path, out


def _is_image(name: str) -> bool:
    return name.lower().endswith(EXTENSIONS) and not name.startswith(".")


def _scan(root: str) -> tuple:
    """``(paths, labels or None, class names or None)``: images in ``root``, or in one subfolder per class."""
    if not os.path.isdir(root):
        raise DataError(f"images:{root}: no such folder")
    entries = sorted(os.listdir(root))
    top = [os.path.join(root, e) for e in entries if _is_image(e) and os.path.isfile(os.path.join(root, e))]
    classes = [e for e in entries if os.path.isdir(os.path.join(root, e)) and not e.startswith(".")]
    sub = {}
    for c in classes:
        files = []
        for dirpath, dirnames, names in os.walk(os.path.join(root, c)):
            dirnames.sort()
            files += [os.path.join(dirpath, n) for n in sorted(names) if _is_image(n)]
        if files:
            sub[c] = files
    if top and sub:
        raise DataError(f"images:{root}: holds images ({os.path.basename(top[0])}, ...) and class subfolders "
                        f"({', '.join(sub)}); put every image in a class folder, or none")
    if top:
        return top, None, None
    if not sub:
        raise DataError(f"images:{root}: found no images ({', '.join(EXTENSIONS)}) in the folder or its "
                        "subfolders")
    names = sorted(sub)
    paths = [p for c in names for p in sub[c]]
    labels = np.concatenate([np.full(len(sub[c]), i, dtype=np.int64) for i, c in enumerate(names)])
    return paths, labels, names


def _header(path: str) -> tuple:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size, im.mode  # (W, H)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot read image {path!r}: {e}; remove or replace the file") from None


def _target(size, w: int, h: int) -> tuple:
    """Final ``(H, W)`` of an image of ``w x h`` under option ``size``."""
    if size is None:
        return h, w
    return (size[0], size[0]) if size[1] is None else size


class ImageFiles(torch.utils.data.Dataset):
    """``paths[i]`` decoded to a flat float32 tensor ``(C*H*W,)`` in [0, 1], channel-first.

    ``mode`` is ``"grey"`` or ``"rgb"``; ``size`` is None (keep, all images must share one
    size), ``(S, None)`` (shorter side to S, centre crop SxS) or ``(H, W)`` (resize).
    """

    def __init__(self, paths: list, mode: str, size, shape: tuple):
        self.paths, self.mode, self.size, self.shape = list(paths), mode, size, tuple(shape)  # shape (H, W)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> np.ndarray:
        """Item ``i`` as uint8 ``(C, H, W)``."""
        from PIL import Image, UnidentifiedImageError

        path = self.paths[i]
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.mode == "grey" else "RGB")
                if self.size is not None:
                    im = _resize(im, self.size)
                a = np.array(im, dtype=np.uint8)  # a writable copy: torch.from_numpy below
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"cannot read image {path!r}: {e}; remove or replace the file") from None
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # (C, H, W)
        if a.shape[1:] != self.shape:
            raise DataError(f"image {path!r} has size {a.shape[2]}x{a.shape[1]} (WxH) but the folder's images are "
                            f"{self.shape[1]}x{self.shape[0]}; pass ?size=N to resize them all")
        return a

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.read(int(i)).reshape(-1)).float().div_(255.0)  # (C*H*W,)


def _resize(im, size):
    from PIL import Image

    if size[1] is not None:
        return im.resize((size[1], size[0]), Image.BILINEAR)
    s = size[0]
    w, h = im.size
    scale = s / min(w, h)
    nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
    im = im.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - s) // 2, (nh - s) // 2
    return im.crop((left, top, left + s, top + s))


def _collate(items: list) -> torch.Tensor:
    return torch.stack(items)


class LazyRows:
    """The ``x`` of a streamed split: ``(N, D)`` float32 rows read from disk when indexed.

    Looks like a tensor to the code that slices it (``shape``, ``dtype``, ``device``,
    ``len``, ``x[idx]`` for an int, slice or index tensor); ``to(device, dtype)`` returns
    a view whose rows arrive on that device. :meth:`batches` reads a whole epoch through a
    ``DataLoader`` with ``workers`` processes.
    """

    def __init__(self, files: ImageFiles, index: torch.Tensor, *, workers: int = 0,
                 device=torch.device("cpu"), dtype=torch.float32):
        self.files, self.index, self.workers = files, index.long().cpu(), int(workers)
        self.device, self.dtype = torch.device(device), dtype
        c = 1 if files.mode == "grey" else 3
        self.shape = torch.Size((len(self.index), c * files.shape[0] * files.shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyRows({len(self)} images from disk, item shape {tuple(self.shape[1:])}, {self.device})"

    def dim(self) -> int:
        return 2

    def is_floating_point(self) -> bool:
        return True

    def to(self, device=None, dtype=None, **_) -> "LazyRows":
        """The same rows, delivered on ``device`` in ``dtype`` (nothing is read now)."""
        return LazyRows(self.files, self.index, workers=self.workers, device=device or self.device,
                        dtype=dtype or self.dtype)

    def _ids(self, k) -> torch.Tensor:
        if isinstance(k, int):
            return self.index[k:k + 1]
        if torch.is_tensor(k):
            k = k.cpu()
        return self.index[k]

    def __getitem__(self, k) -> torch.Tensor:
        """Rows ``k`` as a tensor ``(n, D)`` on this view's device (an int gives ``(D,)``)."""
        ids = self._ids(k)
        if self.workers and len(ids) >= 256:  # a big read (a validation pass): parallel, in order
            x = torch.cat(list(self._loader([ids[i:i + 64].tolist() for i in range(0, len(ids), 64)])))
        else:
            x = torch.stack([self.files[i] for i in ids.tolist()]) if len(ids) else torch.zeros(0, self.shape[1])
        x = x.to(self.device, self.dtype, non_blocking=True)
        return x[0] if isinstance(k, int) else x

    def _loader(self, chunks: list):
        return torch.utils.data.DataLoader(self.files, batch_sampler=chunks, num_workers=self.workers,
                                           collate_fn=_collate, pin_memory=self.device.type == "cuda")

    def batches(self, order: torch.Tensor, batch_size: int):
        """Yield ``(rows of order's chunk, x)`` for each ``batch_size`` chunk of ``order``, x on this view's device.

        Read by a ``DataLoader`` with :attr:`workers` worker processes (prefetching ahead of the step).
        """
        order = order.cpu()
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for rows, x in zip(chunks, self._loader([self.index[c].tolist() for c in chunks])):
            yield rows, x.to(self.device, self.dtype, non_blocking=True)


def read_folder(spec: str, *, seed: int, split: tuple, split_indices) -> dict:
    """Scan ``images:`` ``spec`` and read it: ``{"x": uint8 (N, D) or None, "y", "image_shape", "classes", "lazy"}``.

    In memory, ``x`` holds every image; streamed, ``lazy`` is ``(train, val, test)`` :class:`LazyRows`
    over the seeded split ``split_indices(N, split, seed)``.
    """
    root, opts = parse_spec(spec)
    paths, labels, classes = _scan(root)
    heads = [_header(p) for p in paths]
    mode = opts["mode"]
    if mode == "auto":
        mode = "grey" if all(m in _GREY_MODES for _, m in heads) else "rgb"
    sizes = {}
    for p, ((w, h), _) in zip(paths, heads):
        sizes.setdefault(_target(opts["size"], w, h), p)
    if len(sizes) > 1:
        (s1, p1), (s2, p2) = list(sizes.items())[:2]
        raise DataError(f"images:{root}: images have different sizes ({s1[1]}x{s1[0]} {os.path.basename(p1)!r}, "
                        f"{s2[1]}x{s2[0]} {os.path.basename(p2)!r}, WxH); pass ?size=N (shorter side, centre crop) "
                        "or ?size=HxW to resize them all")
    shape = next(iter(sizes))  # (H, W)
    files = ImageFiles(paths, mode, opts["size"], shape)
    c = 1 if mode == "grey" else 3
    image_shape = shape if c == 1 else (c, *shape)
    stream = opts["stream"]
    if stream == "auto":
        stream = len(paths) * c * math.prod(shape) * 4 > MAX_IN_MEMORY
    out = {"y": labels, "image_shape": tuple(image_shape), "classes": classes, "x": None, "lazy": None}
    if stream:
        parts = split_indices(len(paths), split, seed)
        out["lazy"] = tuple(LazyRows(files, idx, workers=opts["workers"]) for idx in parts)
    else:
        x = np.empty((len(paths), c * math.prod(shape)), dtype=np.uint8)
        for i in range(len(paths)):
            x[i] = files.read(i).reshape(-1)
        out["x"] = x
    return out
