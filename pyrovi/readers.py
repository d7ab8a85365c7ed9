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
import itertools
import math
import os
import stat
import struct
import zipfile
import zlib
from typing import Callable, Optional

import numpy as np

from .errors import DataError

__all__ = ["open_regular", "read_regular", "read_bytes", "read_idx", "read_idx_pair", "read_npz", "read_csv", "read_text", "default_corpus",
           "FILE_READERS", "MAX_DECOMPRESSED", "MAX_CSV_BYTES"]


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
#: decompressed text a CSV may hold (MNIST's 60 000 training images are ~110 MB as CSV); larger data: .npz
MAX_CSV_BYTES = 1 << 28
_CHUNK = 1 << 20


def open_regular(path: str, what: str = "file", error: type = DataError):
    """Open ``path`` for reading if it is a regular file on disk: ``(binary file, size in bytes)``.

    FIFOs, devices, sockets and directories are refused (reading them may block or never
    end), and so are pseudo-files (``/proc``, ``/sys``) that report 0 bytes but stream data.
    The checks are made on the opened descriptor, so the file cannot be swapped in between.
    """
    try:  # O_NONBLOCK: opening a FIFO without a writer must not hang; reads below are on regular files
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{what} not found: {path!r:.300}") from None
    except OSError as e:
        raise error(f"cannot open {what} {path!r:.300}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} {path!r:.300} is not a regular file (a FIFO, device, socket or directory); "
                        "refusing to read it")
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    if st.st_size == 0 and f.read(1):
        f.close()
        raise error(f"{what} {path!r:.300} says it is empty but streams data (a /proc or /sys file?); "
                    "refusing to read it")
    f.seek(0)
    return f, st.st_size


def read_regular(path: str, limit: int, what: str = "file", error: type = DataError) -> bytes:
    """The bytes of the regular file ``path`` (see :func:`open_regular`), refused above ``limit`` bytes."""
    f, size = open_regular(path, what, error)
    with f:
        if size > limit:
            raise error(f"{what} {path!r:.300} is {size} bytes, more than the {limit} pyrovi reads for it")
        data = f.read(size + 1)
    if len(data) != size:  # it changed while being read
        raise error(f"{what} {path!r:.300} changed size while it was read ({size} -> {len(data)} bytes)")
    return data


class _Stream:
    """A data file, gunzipped on the fly when it starts with the gzip magic; reads at most ``limit`` bytes.

    Nothing is inflated in one piece, so a tiny gzip "bomb" costs at most ``limit`` bytes
    (and the callers below stop before that, at the size the file's own header announces).
    """

    def __init__(self, path: str, limit: int = MAX_DECOMPRESSED):
        self.path, self.limit, self.count = path, limit, 0
        self.raw, _ = open_regular(path, "data file")
        self.gzip = self.raw.read(2) == b"\x1f\x8b"
        self.raw.seek(0)
        self.f = gzip.GzipFile(fileobj=self.raw, mode="rb") if self.gzip else self.raw

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()
        self.raw.close()

    def _guard(self, fn, *a):
        try:
            return fn(*a)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            raise DataError(f"{self.path!r} is a corrupt or truncated gzip file: {e}") from None

    def _count(self, n: int) -> None:
        self.count += n
        if self.count > self.limit:
            raise DataError(f"{self.path!r} {'decompresses' if self.gzip else 'runs'} to more than {self.limit} "
                            "bytes; refusing it")

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at the end of the data)."""
        out = bytearray()
        while len(out) < n:
            b = self._guard(self.f.read, min(n - len(out), _CHUNK))
            if not b:
                break
            self._count(len(b))
            out += b
        return bytes(out)

    def readinto(self, buf: memoryview) -> int:
        """Fill ``buf`` in chunks (no second copy); the number of bytes read (fewer only at the end)."""
        got = 0
        while got < len(buf):
            n = self._guard(self.f.readinto, buf[got:got + _CHUNK])
            if not n:
                break
            self._count(n)
            got += n
        return got


def read_bytes(path: str, limit: int = MAX_DECOMPRESSED) -> bytes:
    """The bytes of ``path``, gunzipped when they start with the gzip magic (at most ``limit``, streamed).

    A gzip file is inflated twice: once only to count (nothing kept), so a bomb is refused
    before memory is spent on it, then for real.
    """
    with _Stream(path, limit) as s:
        while s.gzip and s.read(_CHUNK):
            pass
    with _Stream(path, limit) as s:
        out = bytearray()
        while True:
            b = s.read(_CHUNK)
            if not b:
                return bytes(out) if len(out) < (1 << 26) else out  # large: no second copy
            out += b


def _native(a: np.ndarray) -> np.ndarray:
    """``a`` in the machine's byte order, swapped in place (no second copy of a large array)."""
    if a.dtype.isnative:
        return a
    a.byteswap(inplace=True)
    return a.view(a.dtype.newbyteorder("="))


def read_idx(path: str, float32: bool = False) -> np.ndarray:
    """Read one MNIST-format IDX file (plain or gzip) into a NumPy array.

    Layout: two zero bytes, a type byte, a rank byte, ``rank`` big-endian
    uint32 sizes, then the data, big-endian. Any mismatch raises :class:`DataError`.
    The data is streamed into an array of the size the header announces (at most
    :data:`MAX_DECOMPRESSED` bytes), so peak memory is that array, whatever the file.
    ``float32``: wider numbers (int16, int32, float64) are converted to float32 as they stream in.
    """
    with _Stream(path, MAX_DECOMPRESSED + (1 << 16)) as s:
        raw = s.read(4)
        if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
            raise DataError(f"{path!r} is not an IDX file (bad magic number {raw[:4]!r})")
        code, rank = raw[2], raw[3]
        if code not in _IDX_TYPES:
            raise DataError(f"{path!r}: unknown IDX data type 0x{code:02x}")
        if rank == 0 or rank > MAX_IDX_RANK:
            raise DataError(f"{path!r}: IDX file of rank {rank}; pyrovi reads ranks 1..{MAX_IDX_RANK} (items need "
                            "a row dimension, and NumPy arrays have at most 64)")
        sizes = s.read(4 * rank)
        head = 4 + 4 * rank
        if len(sizes) < 4 * rank:
            raise DataError(f"{path!r} is truncated: header needs {head} bytes, file has {4 + len(sizes)}")
        dims = struct.unpack(">" + "I" * rank, sizes)
        dtype = _IDX_TYPES[code]
        nbytes = math.prod(dims) * dtype.itemsize
        if nbytes > MAX_DECOMPRESSED:
            raise DataError(f"{path!r}: header announces dims {dims} ({nbytes} bytes), more than the "
                            f"{MAX_DECOMPRESSED} pyrovi loads into memory")
        if _as_float32(dtype, float32):
            arr = np.empty(dims, dtype=np.float32)
            got = _read_converted(s.readinto, arr.reshape(-1), dtype)
        else:
            arr = np.empty(dims, dtype=dtype)
            got = s.readinto(memoryview(arr.reshape(-1).view(np.uint8)))
        extra = s.read(1) if got == nbytes else b""
    if got != nbytes or extra:
        what = "truncated" if got < nbytes else "longer than its header says"
        have = head + got + len(extra)
        raise DataError(f"{path!r} is {what}: dims {dims} need {head + nbytes} bytes, file has "
                        f"{have}{'+' if extra else ''}")
    return _native(arr)


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


def read_idx_pair(spec: str, float32: bool = False):
    """``"IMAGES[,LABELS]"`` -> ``(x, y, image_shape)``; the labels file is guessed when not given.
    ``float32``: as for :func:`read_idx`, images only."""
    images, _, labels = spec.partition(",")
    x = read_idx(images, float32)
    labels = labels or guess_labels(images)
    y = None
    if labels:
        y = read_idx(labels)
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"labels file {labels!r} has shape {y.shape}; expected ({x.shape[0]},)")
    image_shape = tuple(x.shape[1:]) if x.ndim == 3 else None
    return x, y, image_shape


# --- npz / npy -------------------------------------------------------------------------


def _as_float32(dtype: np.dtype, float32: bool) -> bool:
    """Whether a reader asked for ``float32`` items converts ``dtype`` while streaming: float16/float64 and
    int16..int64, the types :func:`pyrovi.data.from_arrays` converts with ``.float()`` (uint8 stays: it is
    scaled by 1/255; int8/bool stay small; unsigned wider types stay, refused as before)."""
    return float32 and dtype.kind in "fi" and dtype.itemsize > 1 and not (dtype.kind == "f" and dtype.itemsize == 4)


def _read_converted(readinto, out: np.ndarray, dtype: np.dtype) -> int:
    """Fill the flat float32 ``out`` from a stream of ``dtype`` items, converted a chunk at a time (a float64 file
    never exists in memory whole); the number of bytes read (fewer than ``out.size`` items' only at the end)."""
    step = max(1, _CHUNK // dtype.itemsize)
    buf = np.empty(step * dtype.itemsize, dtype=np.uint8)
    got = 0
    for i in range(0, out.size, step):
        m = min(step, out.size - i)
        n = readinto(memoryview(buf)[: m * dtype.itemsize])
        got += n
        if n < m * dtype.itemsize:
            break
        with np.errstate(over="ignore", invalid="ignore"):  # 1e300 -> inf: refused later by validation
            out[i:i + m] = buf[:n].view(dtype)  # byte order handled; rounds to nearest, as torch's .float()
    return got


def _npy(f, path: str, limit: int, float32: bool = False) -> np.ndarray:
    """One ``.npy`` stream (inside an ``.npz`` or alone) into an array of the size its header announces
    (``float32``: numbers converted to float32 while streaming, see :func:`_as_float32`)."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(f)
    else:
        raise DataError(f"{path!r} could not be read as .npz/.npy: .npy format version {version} is not supported")
    if dtype.hasobject:  # object arrays are stored as pickles, which would run code on load
        raise DataError(f"{path!r} could not be read as .npz/.npy: it holds an object array (a pickle); "
                        "pyrovi never unpickles. Save plain numeric arrays")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > limit:
        raise DataError(f"{path!r}: an array of shape {shape} and dtype {dtype} ({nbytes} bytes) is more than the "
                        f"{limit} bytes pyrovi loads into memory")

    def readinto(view) -> int:  # fill view, fewer bytes only at the end of the stream
        k = 0
        while k < len(view):
            n = f.readinto(view[k:k + _CHUNK])
            if not n:
                break
            k += n
        return k

    if _as_float32(dtype, float32):
        buf = np.empty(math.prod(shape), dtype=np.float32)
        got = _read_converted(readinto, buf, dtype)
        dtype = buf.dtype
    else:
        buf = np.empty(nbytes, dtype=np.uint8)
        got = readinto(memoryview(buf))
    if got < nbytes:
        raise DataError(f"{path!r} could not be read as .npz/.npy: an array is truncated ({got} of {nbytes} bytes)")
    if f.read(1):
        raise DataError(f"{path!r} could not be read as .npz/.npy: an array is longer than its header says")
    arr = np.ndarray(shape, dtype=dtype, buffer=buf, order="F" if fortran else "C")
    return _native(arr)


def read_npz(path: str, float32: bool = False):
    """A ``.npz`` (arrays ``x`` and optional ``y``, or ``X``/``images``/``data`` and ``Y``/``labels``/``targets``) or a ``.npy`` -> ``(x, y, image_shape)``.

    ``float32``: ``x`` of wider numbers (float64, int16..int64, float16) is converted to float32
    while it streams in, so a float64 file costs the float32 array, not both (uint8 is kept).

    Arrays are streamed (decompressed on the fly) into arrays of the size their headers
    announce, at most :data:`MAX_DECOMPRESSED` bytes each, so a small file that inflates to
    gigabytes is refused before it is inflated, and peak memory is the arrays themselves.
    No pickle is ever loaded.
    """
    f, _ = open_regular(path, "data file")
    try:
        with f:
            magic = f.read(6)
            f.seek(0)
            if magic == b"\x93NUMPY":
                x, y = _npy(f, path, MAX_DECOMPRESSED, float32), None
            else:
                with zipfile.ZipFile(f) as zf:
                    members = {n[:-4] if n.endswith(".npy") else n: n for n in zf.namelist()}
                    keys = list(members)
                    xk = next((k for k in ("x", "X", "images", "data") if k in keys), None)
                    if xk is None:
                        raise DataError(f"{path!r} has arrays {keys[:10]}; expected one named 'x' (and optionally 'y')")
                    yk = next((k for k in ("y", "Y", "labels", "targets") if k in keys), None)
                    with zf.open(members[xk]) as m:
                        x = _npy(m, path, MAX_DECOMPRESSED, float32)
                    y = None
                    if yk:
                        with zf.open(members[yk]) as m:
                            y = _npy(m, path, MAX_DECOMPRESSED)
    except DataError:
        raise
    except Exception as e:  # zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, ...
        raise DataError(f"{path!r} could not be read as .npz/.npy: {str(e)[:200]}") from None
    image_shape = tuple(x.shape[1:]) if x.ndim == 3 else None
    return x, y, image_shape


# --- csv -------------------------------------------------------------------------------


class _Counted(io.RawIOBase):
    """A :class:`_Stream` as a raw binary file (for :class:`io.TextIOWrapper`), still counted and capped."""

    def __init__(self, stream: "_Stream"):
        self.s = stream

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        return self.s.readinto(memoryview(b).cast("B"))


def read_csv(path: str, float32: bool = True):
    """Numeric CSV, one row per item -> ``(x, y, None)``; a ``label``/``y``/``target``/``class`` header column is ``y``.

    At most :data:`MAX_CSV_BYTES` of text (after gunzip; a gzip file is first inflated and
    counted without being kept); rows are parsed one at a time into a float32 array, so
    peak memory is within about twice the array returned. A UTF-8 byte-order mark is skipped.
    ``x`` is always float32 (``float32`` is accepted so every reader is called alike).
    """
    with _Stream(path, MAX_CSV_BYTES) as s:  # the size first: a gzip bomb is refused before any parsing
        while s.read(_CHUNK):
            pass
    with _Stream(path, MAX_CSV_BYTES) as s:
        text = io.TextIOWrapper(io.BufferedReader(_Counted(s), _CHUNK), encoding="utf-8-sig", newline="")
        try:
            return _parse_csv(path, csv.reader(text))
        except UnicodeDecodeError as e:
            raise DataError(f"{path!r} is not UTF-8 text: {e}") from None
        except csv.Error as e:  # e.g. a stray carriage return inside a field, a field over csv's limit
            raise DataError(f"{path!r} is not a well-formed CSV file: {e}") from None


def _parse_csv(path: str, reader):
    rows = (r for r in reader if r and any(c.strip() for c in r))
    first = next(rows, None)
    if first is None:
        raise DataError(f"{path!r} has no rows")
    header = None
    try:
        [float(c) for c in first]
    except ValueError:
        header, first = [c.strip().lower() for c in first], next(rows, None)
    if first is None:
        raise DataError(f"{path!r} has a header but no data rows")
    width = len(first)
    if header is not None and len(header) != width:
        raise DataError(f"{path!r}: the header has {len(header)} columns but the rows have {width}")
    buf = np.empty((1024, width), dtype=np.float32)  # grown by doubling (realloc, no second copy)
    n = 0
    with np.errstate(over="ignore"):  # 1e999 -> inf, refused by validation with a clear message
        for i, r in enumerate(itertools.chain([first], rows)):
            if len(r) != width:
                raise DataError(f"{path!r}: row {i + 1} has {len(r)} columns, expected {width}")
            if n == buf.shape[0]:
                buf.resize((2 * n, width), refcheck=False)
            try:
                buf[n] = [float(c) for c in r]
            except ValueError as e:
                raise DataError(f"{path!r} has a non-numeric value: {str(e)[:100]}") from None
            n += 1
    buf.resize((n, width), refcheck=False)
    y = None
    if header is not None:
        lab = next((header.index(k) for k in ("label", "y", "target", "class") if k in header), None)
        if lab is not None:
            y = buf[:, lab].astype(np.float64)
            buf = np.delete(buf, lab, axis=1)
    return buf, y, None


FILE_READERS: dict[str, Callable] = {"idx": read_idx_pair, "npz": read_npz, "npy": read_npz, "csv": read_csv}


# --- text ------------------------------------------------------------------------------


def default_corpus() -> str:
    """The default text corpus: Python's own ``pydoc_data.topics``, in sorted-key order."""
    # Python's own help topics: ~465 KB of English prose and code that ships with CPython.
    # Sorted keys, so the corpus does not depend on dict insertion order.
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def read_text(path: str) -> str:
    """A UTF-8 text file (plain or gzip, at most :data:`MAX_CSV_BYTES` after gunzip) as a string."""
    raw = read_bytes(path, MAX_CSV_BYTES)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path!r} is not UTF-8 text ({e}); convert it, e.g. with iconv -t utf-8") from None
