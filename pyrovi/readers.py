"""Readers of the data files a user already has: IDX (MNIST format), ``.npz``/``.npy``, CSV, UTF-8 text.

Each reader turns one path into NumPy arrays, ``(x, y or None, image_shape or None)``
(text: a string), and raises :class:`~pyrovi.errors.DataError` naming the file and what
is wrong with it. They know nothing of splits or binarization: :mod:`pyrovi.data` turns
their arrays into a :class:`~pyrovi.data.Dataset`. Files may come from anyone, so no
reader executes code (no pickle) or inflates a small gzip file without bound.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import os
import struct
import zlib
from typing import Callable, Optional

import numpy as np

from .errors import DataError

__all__ = ["read_bytes", "read_idx", "read_idx_pair", "read_npz", "read_csv", "read_text", "default_corpus",
           "FILE_READERS", "MAX_DECOMPRESSED"]


# --- IDX (MNIST format) --------------------------------------------------------------

_IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


MAX_IDX_RANK = 32  # NumPy's limit is 64 dimensions; real IDX files have 1..4
MAX_DECOMPRESSED = 1 << 31  # 2 GiB: far above any dataset pyrovi trains on in memory


def read_bytes(path: str) -> bytes:
    """The bytes of ``path``, gunzipped when they start with the gzip magic (at most :data:`MAX_DECOMPRESSED`)."""
    if not os.path.isfile(path):
        raise DataError(f"file not found: {path!r}")
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            # read at most MAX_DECOMPRESSED + 1 bytes: a small "gzip bomb" must not exhaust memory
            with gzip.GzipFile(fileobj=io.BytesIO(raw)) as g:
                raw = g.read(MAX_DECOMPRESSED + 1)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            raise DataError(f"{path!r} is a corrupt or truncated gzip file: {e}") from None
        if len(raw) > MAX_DECOMPRESSED:
            raise DataError(f"{path!r} decompresses to more than {MAX_DECOMPRESSED} bytes; refusing it")
    return raw


def read_idx(path: str) -> np.ndarray:
    """Read one MNIST-format IDX file (plain or gzip) into a NumPy array.

    Layout: two zero bytes, a type byte, a rank byte, ``rank`` big-endian
    uint32 sizes, then the data, big-endian. Any mismatch raises :class:`DataError`.
    """
    raw = read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path!r} is not an IDX file (bad magic number {raw[:4]!r})")
    code, rank = raw[2], raw[3]
    if code not in _IDX_TYPES:
        raise DataError(f"{path!r}: unknown IDX data type 0x{code:02x}")
    if rank == 0 or rank > MAX_IDX_RANK:
        raise DataError(f"{path!r}: IDX file of rank {rank}; pyrovi reads ranks 1..{MAX_IDX_RANK} (items need a row "
                        "dimension, and NumPy arrays have at most 64)")
    head = 4 + 4 * rank
    if len(raw) < head:
        raise DataError(f"{path!r} is truncated: header needs {head} bytes, file has {len(raw)}")
    dims = struct.unpack(">" + "I" * rank, raw[4:head])
    dtype = _IDX_TYPES[code]
    need = head + math.prod(dims) * dtype.itemsize
    if len(raw) != need:
        what = "truncated" if len(raw) < need else "longer than its header says"
        raise DataError(f"{path!r} is {what}: dims {dims} need {need} bytes, file has {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, offset=head).reshape(dims).astype(dtype.newbyteorder("="))


def guess_labels(images: str) -> Optional[str]:
    """The labels file beside an IDX images file (``*images*`` -> ``*labels*``, ``-idx3-`` -> ``-idx1-``), if present."""
    base = os.path.basename(images)
    for a, b in (("images", "labels"), ("-idx3-", "-idx1-")):
        if a in base:
            cand = os.path.join(os.path.dirname(images), base.replace(a, b))
            if a == "images":
                cand = cand.replace("-idx3-", "-idx1-")
            if os.path.isfile(cand):
                return cand
    return None


def read_idx_pair(spec: str):
    """``"IMAGES[,LABELS]"`` -> ``(x, y, image_shape)``; the labels file is guessed when not given."""
    images, _, labels = spec.partition(",")
    x = read_idx(images)
    labels = labels or guess_labels(images)
    y = None
    if labels:
        y = read_idx(labels)
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"labels file {labels!r} has shape {y.shape}; expected ({x.shape[0]},)")
    image_shape = tuple(x.shape[1:]) if x.ndim == 3 else None
    return x, y, image_shape


# --- npz / npy -------------------------------------------------------------------------


def read_npz(path: str):
    """A ``.npz`` (arrays ``x`` and optional ``y``, or ``X``/``images``/``data`` and ``Y``/``labels``/``targets``) or a ``.npy`` -> ``(x, y, image_shape)``."""
    if not os.path.isfile(path):
        raise DataError(f"file not found: {path!r}")
    try:
        # allow_pickle=False: an .npz/.npy holding object arrays would run code on load.
        obj = np.load(path, allow_pickle=False)
        if isinstance(obj, np.ndarray):
            x, y = obj, None
        else:
            with obj:
                keys = list(obj.keys())
                xk = next((k for k in ("x", "X", "images", "data") if k in keys), None)
                if xk is None:
                    raise DataError(f"{path!r} has arrays {keys}; expected one named 'x' (and optionally 'y')")
                yk = next((k for k in ("y", "Y", "labels", "targets") if k in keys), None)
                x, y = obj[xk], (obj[yk] if yk else None)
    except DataError:
        raise
    except Exception as e:  # numpy raises ValueError, OSError, EOFError, BadZipFile, ...
        raise DataError(f"{path!r} could not be read as .npz/.npy: {e}") from None
    image_shape = tuple(x.shape[1:]) if x.ndim == 3 else None
    return x, y, image_shape


# --- csv -------------------------------------------------------------------------------


def read_csv(path: str):
    """Numeric CSV, one row per item -> ``(x, y, None)``; a ``label``/``y``/``target``/``class`` header column is ``y``."""
    raw = read_bytes(path)
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Excel writes one) is not part of the first cell
    except UnicodeDecodeError as e:
        raise DataError(f"{path!r} is not UTF-8 text: {e}") from None
    try:
        rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    except csv.Error as e:  # e.g. a stray carriage return inside a field
        raise DataError(f"{path!r} is not a well-formed CSV file: {e}") from None
    if not rows:
        raise DataError(f"{path!r} has no rows")
    header = None
    try:
        [float(c) for c in rows[0]]
    except ValueError:
        header, rows = [c.strip().lower() for c in rows[0]], rows[1:]
    if not rows:
        raise DataError(f"{path!r} has a header but no data rows")
    width = len(rows[0])
    if header is not None and len(header) != width:
        raise DataError(f"{path!r}: the header has {len(header)} columns but the rows have {width}")
    for i, r in enumerate(rows):
        if len(r) != width:
            raise DataError(f"{path!r}: row {i + 1} has {len(r)} columns, expected {width}")
    try:
        arr = np.array([[float(c) for c in r] for r in rows], dtype=np.float64)
    except ValueError as e:
        raise DataError(f"{path!r} has a non-numeric value: {e}") from None
    y = None
    if header is not None:
        lab = next((header.index(k) for k in ("label", "y", "target", "class") if k in header), None)
        if lab is not None:
            y = arr[:, lab]
            arr = np.delete(arr, lab, axis=1)
    return arr.astype(np.float32), y, None


FILE_READERS: dict[str, Callable] = {"idx": read_idx_pair, "npz": read_npz, "npy": read_npz, "csv": read_csv}


# --- text ------------------------------------------------------------------------------


def default_corpus() -> str:
    """The default text corpus: Python's own ``pydoc_data.topics``, in sorted-key order."""
    # Python's own help topics: ~465 KB of English prose and code that ships with CPython.
    # Sorted keys, so the corpus does not depend on dict insertion order.
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def read_text(path: str) -> str:
    """A UTF-8 text file (plain or gzip) as a string."""
    raw = read_bytes(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path!r} is not UTF-8 text ({e}); convert it, e.g. with iconv -t utf-8") from None
