"""The files of a run directory: their names, the writer's lock, history and metrics, and the checks.

Each file's writer and reader live side by side here (history.csv: :func:`write_history`,
:func:`append_history`, :func:`read_history`; metrics.json: :func:`update_metrics`,
:func:`check_metrics`; config.json: :func:`check_config`), so a check cannot drift from
the writer it mirrors. :mod:`pyrovi.run` holds the in-memory :class:`~pyrovi.run.Run` and
``load_run``, which read a directory through these functions.

A directory is one transaction: one writer holds its lock (:func:`lock_run`), the final
weights name the config and history they were saved with (:func:`config_digest`,
:func:`check_set`), and readers that meet a set of two saves read again while the writer
is saving (:func:`whole_set`), then warn (:class:`RunSetWarning`).
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from typing import Any

import torch

from .checkpoint import read_json, read_run_file, write_json
from .errors import CheckpointError, ConfigError, PyroviError

__all__ = ["CONFIG", "WEIGHTS", "CHECKPOINT", "HISTORY", "METRICS", "RunSetWarning", "lock_run", "release_run",
           "writer_active", "update_metrics", "write_history", "append_history", "read_history",
           "read_history_digest", "checkpoint_history", "read_summary", "weights_meta", "check_metrics", "HELD_OUT_KEYS",
           "metrics_digest",
           "check_config", "check_sizes", "check_set", "config_digest", "whole_set"]

CONFIG = "config.json"
WEIGHTS = "weights.safetensors"
CHECKPOINT = "checkpoint.safetensors"
HISTORY = "history.csv"
METRICS = "metrics.json"
#: top-level keys of config.json; anything else marks a file pyrovi did not write (refused on load).
#: A feature that stores a new top-level section adds its key here.
CONFIG_KEYS = ("pyrovi_version", "model", "guide", "objective", "train", "data", "distributed")

#: largest history.csv load_run reads (a row is ~150 bytes: over 400 000 epochs)
MAX_HISTORY_BYTES = 64 << 20
RUN_DTYPES = {"float32": torch.float32, "float64": torch.float64}



# --------------------------------------------------------------------------- the writer's lock

LOCK = ".pyrovi.lock"
LOCK_HOLDER = ".pyrovi.lock.json"
#: run directories whose lock this process holds: realpath -> FileLock (re-entrant within a process)
_HELD: dict = {}


def lock_run(directory: str, what: str = "training", wait: float = 0.0) -> bool:
    """Take the writer's lock of a run directory; True when this call took it (False: already held here).

    One writer at a time: a second ``fit``/``pyrovi train`` on the same ``out`` fails at once
    with a :class:`ConfigError` naming the holder (pid, host, what it does, since when). The
    lock is an OS file lock (``filelock``, ``flock`` on POSIX), so the kernel drops it when
    its holder dies: a killed trainer leaves no stale lock. ``wait``: seconds to wait for it
    (short metric updates wait; trainers do not). Released by :func:`release_run` (or at exit).
    """
    import filelock

    key = os.path.realpath(directory)
    if key in _HELD:
        return False
    lock = filelock.FileLock(os.path.join(directory, LOCK), timeout=wait)
    try:
        lock.acquire()
    except filelock.Timeout:
        holder = _holder(directory)
        raise ConfigError(f"run directory {directory!r:.300} is in use by {holder}; wait until it finishes, "
                          "or choose another out=") from None
    _HELD[key] = lock
    import socket
    import time

    try:
        write_json(os.path.join(directory, LOCK_HOLDER), {"pid": os.getpid(), "host": socket.gethostname(),
                                                          "what": what, "since": time.time()})
    except OSError:
        pass  # the lock holds without the note; only the message to a second writer is poorer
    return True


def release_run(directory: str) -> None:
    """Release the writer's lock :func:`lock_run` took on ``directory`` (no-op when not held here)."""
    lock = _HELD.pop(os.path.realpath(directory), None)
    if lock is not None:
        try:
            os.unlink(os.path.join(directory, LOCK_HOLDER))
        except OSError:
            pass
        lock.release()


def _holder(directory: str) -> str:
    import time

    try:
        h = read_json(os.path.join(directory, LOCK_HOLDER), "lock note", limit=4096)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(h["since"])))
        return f"pid {int(h['pid'])} on host {str(h['host'])[:100]!r} ({str(h['what'])[:40]}, since {since})"
    except (PyroviError, KeyError, TypeError, ValueError, OverflowError):
        return "another process (it has not said which yet)"


def update_metrics(directory: str, key: str, value: Any) -> dict:
    """Set ``metrics.json[key] = value`` under the run's lock, on the file's current content; the new metrics.

    Read-modify-write of a fresh copy, so ``evaluate`` and ``diagnose`` running at once keep
    both results (each used to write back its own stale copy). Waits up to 60 s for a writer.
    """
    took = lock_run(directory, f"updating metrics.json ({key})", wait=60.0)
    try:
        path = os.path.join(directory, METRICS)
        metrics = read_json(path, "metrics") if os.path.lexists(path) else {}
        if not isinstance(metrics, dict):
            raise CheckpointError(f"{path} does not hold a JSON object")
        metrics[key] = value
        write_json(path, metrics)
        return metrics
    finally:
        if took:
            release_run(directory)


def write_history(path: str, history: list) -> str:
    """Atomically write the per-epoch history as CSV; the SHA-256 of the bytes written."""
    from .checkpoint import atomic_write

    buf = io.StringIO()
    keys: list = []
    for row in history:
        keys += [k for k in row if k not in keys]
    w = csv.DictWriter(buf, fieldnames=keys or ["epoch"])
    w.writeheader()
    for row in history:
        w.writerow(row)
    data = buf.getvalue().encode("utf-8")
    atomic_write(path, data)
    _APPENDED[os.path.realpath(path)] = (len(history), keys, len(data))
    import hashlib

    return hashlib.sha256(data).hexdigest()


#: history.csv files this process wrote: realpath -> (rows, columns, size in bytes) after its last write
_APPENDED: dict = {}


def append_history(path: str, history: list) -> None:
    """Bring ``history.csv`` up to ``history`` by appending its last row (linear I/O over a run).

    Called after every epoch, before the checkpoint that counts the row is written: a process
    killed in between leaves a row (or part of one) past the checkpoint's count, which readers
    ignore and a resume rewrites. The row is appended only when this process wrote the file's
    previous rows and the file is still as it left it (same size); otherwise (the first epoch
    of a process, a resume, a file changed by someone else) the whole file is rewritten atomically.
    """
    key = os.path.realpath(path)
    known = _APPENDED.pop(key, None)
    last = history[-1] if history else None
    try:
        same = known is not None and known[0] == len(history) - 1 and list(last) == known[1] and \
            os.stat(path).st_size == known[2]
    except OSError:
        same = False
    if not same:
        return write_history(path, history)
    buf = io.StringIO()
    csv.DictWriter(buf, fieldnames=known[1]).writerow(last)
    data = buf.getvalue().encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        view = memoryview(data)
        while view:  # one write of ~150 bytes in practice; a kill leaves at most a partial last line
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    _APPENDED[key] = (len(history), known[1], known[2] + len(data))
    from .checkpoint import after_write

    after_write()



def whole_set(directory, read):
    """``read()`` of a run directory, again while it meets a mixed set and a writer is saving.

    Warnings of the last read are passed on (as the caller's); so is its CheckpointError.
    """
    import time

    for attempt in range(_SET_RETRIES):
        caught, error = [], None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = read()
            except CheckpointError as e:  # e.g. new weights beside the old config, mid-save
                error = e
        mixed = error is not None or any(issubclass(w.category, RunSetWarning) for w in caught)
        if not mixed or attempt == _SET_RETRIES - 1 or not writer_active(directory):
            break
        time.sleep(0.2)
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=3)
    if error is not None:
        raise error
    return result


#: reads of a run directory that a writer is saving, before load_run gives up waiting for a whole set
_SET_RETRIES = 25


class RunSetWarning(UserWarning):
    """The files of a run directory are not one save's: config, history and weights disagree."""


def writer_active(directory) -> bool:
    """Whether a live process (on this host) holds the writer's lock of ``directory``, by its lock note."""
    import socket

    try:
        h = read_json(os.path.join(directory, LOCK_HOLDER), "lock note", limit=4096)
        pid = int(h["pid"])
        if str(h.get("host")) != socket.gethostname():
            return True  # another machine: cannot check, assume it is alive
        if os.path.realpath(directory) in _HELD and pid == os.getpid():
            return False  # this process: it is not saving while it reads
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False  # the note of a killed writer
    except PermissionError:
        return True  # alive, another user's
    except (PyroviError, KeyError, TypeError, ValueError, OverflowError, OSError):
        return False



def config_digest(config: dict) -> str:
    """SHA-256 of ``config`` as :func:`write_json` writes it (stored in the weights it belongs to)."""
    import hashlib
    import json

    return hashlib.sha256((json.dumps(config, indent=2, sort_keys=True, allow_nan=True) + "\n").encode()).hexdigest()


#: results of evaluate/diagnose/vq_metrics/fit_prior kept in metrics.json beside fit's own numbers; written
#: later than the weights (under the lock, :func:`update_metrics`), so :func:`metrics_digest` leaves them out
HELD_OUT_KEYS = ("test", "diagnostics", "vq", "prior")


def metrics_digest(metrics) -> "str | None":
    """SHA-256 of fit's own part of ``metrics.json`` (everything but :data:`HELD_OUT_KEYS`), as read back
    from the file; None for anything but a JSON object. Stored in the weights beside the config's digest."""
    if not isinstance(metrics, dict):
        return None
    return config_digest({k: v for k, v in metrics.items() if k not in HELD_OUT_KEYS})


def check_set(directory: str, config: dict, meta: dict, history: list, history_sha=None, metrics=None) -> None:
    """Warn when config.json, history.csv or fit's part of metrics.json are not the ones the weights were
    saved with.

    A run directory is written file by file; a process killed while resuming or overwriting
    a finished run could otherwise leave one run's weights beside another's config.
    ``metrics``: metrics.json as read (None: absent, not checked).
    """
    saved = meta.get("metrics_sha256")
    if isinstance(saved, str) and metrics is not None and saved != metrics_digest(metrics):
        warnings.warn(f"{directory}: metrics.json is not the one {WEIGHTS} was saved with (its training numbers "
                      "are another save's: an interrupted save, resume or overwrite?)", RunSetWarning, stacklevel=3)
    digest, epochs = meta.get("config_sha256"), meta.get("epochs")
    if isinstance(digest, str) and digest != config_digest(config):
        warnings.warn(f"{directory}: config.json is not the one {WEIGHTS} was saved with (an interrupted "
                      "resume or overwrite?); the model is built from config.json, so check it, or train again",
                      RunSetWarning, stacklevel=3)
    if isinstance(epochs, int) and not isinstance(epochs, bool) and epochs != len(history):
        warnings.warn(f"{directory}: history.csv has {len(history)} epochs, {WEIGHTS} was saved after {epochs} "
                      "(an interrupted save or resume?)", RunSetWarning, stacklevel=3)
    elif isinstance(meta.get("history_sha256"), str) and meta["history_sha256"] != history_sha:
        warnings.warn(f"{directory}: history.csv is not the one {WEIGHTS} was saved with (same number of epochs, "
                      "other rows: an interrupted save, or an edited file)", RunSetWarning, stacklevel=3)



def is_dims(v) -> bool:
    return isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in v)


def check_config(config, path: str) -> None:
    """Refuse a ``config.json`` that pyrovi did not write: wrong types, unknown sections, bad shapes.

    Only the structure is checked here; each section's options are checked by the
    constructor it is handed to (``models.build``, ``guides.build``, ``objectives.get``),
    which refuse unknown keys.
    """
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}")
    unknown = sorted(str(k) for k in config if k not in CONFIG_KEYS)
    if unknown:
        raise CheckpointError(f"{path} has unexpected key(s) {unknown[:5]}; pyrovi writes only "
                              f"{list(CONFIG_KEYS)}. Refusing a file it did not write")
    for key in ("model", "guide", "objective"):
        if not isinstance(config.get(key), dict) or not isinstance(config[key].get("name"), str):
            raise CheckpointError(f"{path} has no valid {key!r} section (a JSON object with a string 'name')")
    for key in ("train", "data"):
        if key in config and not isinstance(config[key], dict):
            raise CheckpointError(f"{path}: {key!r} must be a JSON object, got {type(config[key]).__name__}")
    if "pyrovi_version" in config and not isinstance(config["pyrovi_version"], str):
        raise CheckpointError(f"{path}: 'pyrovi_version' must be a string")
    dtype_name = config.get("train", {}).get("dtype")
    if dtype_name is not None and (not isinstance(dtype_name, str) or dtype_name not in RUN_DTYPES):
        raise CheckpointError(f"{path}: train.dtype={dtype_name!r:.40}; expected one of {sorted(RUN_DTYPES)}")
    data = config.get("data", {})
    if data.get("shape") is not None and not is_dims(data["shape"]):
        raise CheckpointError(f"{path}: data.shape must be a list of positive integers, got {data['shape']!r:.80}")
    if data.get("image_shape") is not None and not is_dims(data["image_shape"]):
        raise CheckpointError(f"{path}: data.image_shape must be a list of positive integers or null, "
                              f"got {data['image_shape']!r:.80}")
    if data.get("y_shape") is not None and not (data["y_shape"] == [] or is_dims(data["y_shape"])):
        raise CheckpointError(f"{path}: data.y_shape must be a list of positive integers, got {data['y_shape']!r:.80}")
    if data.get("y_dtype") is not None and not isinstance(data["y_dtype"], str):
        raise CheckpointError(f"{path}: data.y_dtype must be a dtype name, got {data['y_dtype']!r:.80}")
    n_train = data.get("n_train")
    if n_train is not None and (isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1):
        raise CheckpointError(f"{path}: data.n_train must be a positive integer, got {n_train!r:.80}")
    kw = data.get("model_kwargs")
    if kw is not None and not (isinstance(kw, list) and all(isinstance(k, str) for k in kw)):
        raise CheckpointError(f"{path}: data.model_kwargs must be a list of names, got {kw!r:.80}")


def check_sizes(config: dict, model, guide, nbytes: int, path: str) -> None:
    """Refuse model/guide configs that need more memory than the saved tensors fill.

    Every learned tensor is in the weights file, so a genuine config never needs
    more bytes than the file's tensors hold. Sizes are counted on the ``meta`` device
    (shapes without memory) before anything real is allocated, so a crafted
    ``"hidden": [10**9]`` costs nothing.
    """
    from . import guides as guides_mod
    from . import models as models_mod

    if model is not None and guide is not None:
        return  # the caller's own objects: nothing is built from the config
    try:
        with torch.device("meta"):
            m = model if model is not None else models_mod.build(config["model"])
            g = guide if guide is not None else guides_mod.build(m, config["guide"])
    except PyroviError as e:
        if "meta" in str(e.__cause__ or e.__context__ or ""):
            return _check_numbers(config, nbytes, path)  # the guide traced the model: needs real values
        raise
    except NotImplementedError:
        return _check_numbers(config, nbytes, path)  # construction needs real values (e.g. some flows)
    except RuntimeError as e:
        if "meta" in str(e):
            return _check_numbers(config, nbytes, path)  # same: construction reads values (``.item()``)
        raise CheckpointError(f"the run config describes a model/guide that cannot be built: {str(e)[:200]}") from None
    except (OverflowError, MemoryError, ValueError) as e:
        raise CheckpointError(f"the run config describes a model/guide that cannot be built: {str(e)[:200]}") from None
    need = 0
    for built, given in ((m, model), (g, guide)):
        if given is None and isinstance(built, torch.nn.Module):
            need += sum(t.numel() * t.element_size() for t in built.state_dict().values())
    if need > nbytes:
        raise CheckpointError(f"the run config describes a model and guide of {need} bytes but {path} holds "
                              f"only {nbytes} bytes of tensors; the config does not belong to these weights")


def _check_numbers(config: dict, nbytes: int, path: str) -> None:
    """Where a model/guide cannot be sized on the meta device: no size in its config may exceed the weights.

    Every width, depth, count or dimension of a pyrovi model or guide owns at least one
    learned number, so none can be larger than the number of values the weights file holds
    (``flow_hidden: [1e9]`` or ``depth: 1e6`` against a file of kilobytes is refused).
    """
    limit = max(nbytes // 2, 1)  # values of at least 2 bytes each

    def walk(v, where):
        if isinstance(v, bool):
            return
        if isinstance(v, (int, float)) and v == v and abs(v) > limit:
            raise CheckpointError(f"the run config sets {where}={v!r:.40}, more than the {limit} values {path} "
                                  "holds; the config does not belong to these weights")
        if isinstance(v, dict):
            for k, x in v.items():
                if "seed" not in str(k):  # a seed is no size
                    walk(x, f"{where}.{k}")
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x, where)

    for key in ("model", "guide"):
        if config[key].get("name") != "user":
            walk(config[key], key)


#: columns of history.csv, numbers in every row (the epoch an integer); val_loss may be empty (an
#: epoch without validation, ``val_every``)
HISTORY_NUMBERS = ("epoch", "train_loss", "val_loss")
_ALWAYS_NUMBERS = ("epoch", "train_loss")


def read_history(path: str) -> list:
    """Read ``history.csv`` back into a list of dicts of floats (missing file: empty list).

    Every row must have a whole ``epoch`` and a numeric ``train_loss`` and a ``val_loss``
    column (else :class:`CheckpointError`); an empty cell of another column (e.g. ``val_loss``
    of an epoch without validation) reads as None. A last
    line without its line end is a row a killed trainer was appending (past its checkpoint's
    count, see :func:`append_history`) and is left out.
    """
    return read_history_digest(path)[0]


def read_history_digest(path: str) -> tuple:
    """:func:`read_history` and the SHA-256 of the bytes it read (None: no file)."""
    if not os.path.lexists(path):
        return [], None
    raw = read_run_file(path, MAX_HISTORY_BYTES, "history")
    import hashlib

    digest = hashlib.sha256(raw).hexdigest()
    if b"\n" in raw and not raw.endswith(b"\n"):
        raw = raw[:raw.rfind(b"\n") + 1]
    try:
        reader = csv.DictReader(io.StringIO(raw.decode("utf-8"), newline=""))
        rows = list(reader)
        header = reader.fieldnames
    except (UnicodeDecodeError, csv.Error) as e:  # e.g. a field over csv's size limit, or binary junk
        raise CheckpointError(f"{path} is not a readable history CSV ({str(e)[:100]}); it may be corrupt") from None
    if header is not None and header != ["epoch"] and not set(HISTORY_NUMBERS) <= set(header):
        raise CheckpointError(f"{path} has the columns {header[:8]!r:.200}, not those of a pyrovi history "
                              f"({', '.join(HISTORY_NUMBERS)}, ...); it is corrupt or another file")
    out = []
    for i, r in enumerate(rows):
        row = {}
        for k, v in r.items():
            try:
                row[k] = int(v) if k == "epoch" else None if v == "" and k not in _ALWAYS_NUMBERS else float(v)
            except (TypeError, ValueError):
                if k in _ALWAYS_NUMBERS or v != "" and k in HISTORY_NUMBERS or not isinstance(k, str):
                    # (a key None: a row longer than the header)
                    raise CheckpointError(f"{path} row {i + 1} has {k}={v!r:.40}; pyrovi writes a number there, "
                                          "so the file is corrupt or not a pyrovi history") from None
                row[k] = v
        lacks = [k for k in HISTORY_NUMBERS if k not in row]
        if lacks:
            raise CheckpointError(f"{path} has no column {lacks[0]!r}; it is not a pyrovi history (columns "
                                  f"{list(row)[:8]!r:.200})")
        out.append(row)
    return out, digest


def checkpoint_history(path, meta: dict) -> list:
    """The history rows the checkpoint at ``path`` (metadata ``meta``) was written after.

    The rows live in the run's ``history.csv``, appended epoch by epoch before each checkpoint;
    the checkpoint records how many (``loop["epoch"]``) and the last one, so the file is
    authoritative up to that count (rows past it are from an epoch whose checkpoint was never
    written). A checkpoint written before this change carries its rows itself (``"history"``).
    Raises :class:`CheckpointError` when the file has fewer rows or another last row.
    """
    if "history" in meta:
        return meta["history"]  # checked row by row by pyrovi.train_state.check_history
    loop = meta.get("loop")
    n = loop.get("epoch") if isinstance(loop, dict) else None
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise CheckpointError(f"checkpoint {path!r}: its loop counters are {loop!r:.100}; edited, crafted or from "
                              "another run: start again with overwrite=True")
    if n == 0:
        return []
    rows = read_history(os.path.join(os.path.dirname(path), HISTORY))
    if len(rows) < n or rows[n - 1] != meta.get("history_last"):
        why = f"has {len(rows)} rows" if len(rows) < n else f"row {n} is not the one it recorded"
        raise CheckpointError(f"checkpoint {path!r} was written after epoch {n} but {HISTORY} {why} (edited, or "
                              "copied from another run); start again with overwrite=True")
    return rows[:n]


def read_summary(directory: str) -> tuple:
    """``(config, metrics, history)`` of a run directory, checked as data, for tables (``pyrovi compare``).

    Nothing is built or loaded: ``config.json`` has pyrovi's structure, ``metrics.json`` is a JSON
    object whose numbers are numbers, ``history.csv`` is as :func:`read_history` reads it.
    Anything else raises :class:`CheckpointError` naming the file and the entry.
    """
    if not os.path.isdir(directory):
        raise CheckpointError(f"run directory not found: {directory!r:.300}")
    return whole_set(directory, lambda: _read_summary_once(directory))


def _read_summary_once(directory: str) -> tuple:
    path = os.path.join(directory, CONFIG)
    config = read_json(path, "run config")
    check_config(config, path)
    obj = config["objective"]
    for k in ("particles", "alpha"):
        if obj.get(k) is not None and not _is_number(obj[k]):
            raise CheckpointError(f"{path}: objective.{k} must be a number, got {obj[k]!r:.60}")
    path = os.path.join(directory, METRICS)
    metrics = read_json(path, "metrics") if os.path.lexists(path) else {}
    check_metrics(metrics, path)
    history, history_sha = read_history_digest(os.path.join(directory, HISTORY))
    if os.path.lexists(os.path.join(directory, WEIGHTS)):  # a finished run: the files its weights name
        check_set(directory, config, weights_meta(os.path.join(directory, WEIGHTS)), history, history_sha,
                  metrics if os.path.lexists(path) else None)
    return config, metrics, history


def weights_meta(path: str) -> dict:
    """pyrovi's metadata in the header of a safetensors file, read without its tensors (``{}`` if none)."""
    import json

    from .checkpoint import check_inside
    from .readers import open_regular

    check_inside(path)
    f, size = open_regular(path, "weights", CheckpointError)
    with f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= min(size - 8, 16 << 20):
            raise CheckpointError(f"{path} is not a valid safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
            meta = json.loads(header.get("__metadata__", {}).get("pyrovi", "{}"))
        except (ValueError, RecursionError, AttributeError, TypeError) as e:
            raise CheckpointError(f"{path} has a corrupt header ({type(e).__name__})") from None
    return meta if isinstance(meta, dict) else {}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


#: entries of metrics.json that pyrovi writes as numbers (or null): top level, and in its sections
_METRIC_NUMBERS = ("epochs", "best_epoch", "train_loss", "val_loss", "train_seconds", "steps")


def check_metrics(metrics, path: str) -> None:
    """Refuse a ``metrics.json`` that is no JSON object, or has a non-number where pyrovi writes a number."""
    if not isinstance(metrics, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(metrics).__name__}")
    for k in _METRIC_NUMBERS:
        if metrics.get(k) is not None and not _is_number(metrics[k]):
            raise CheckpointError(f"{path}: {k} must be a number, got {metrics[k]!r:.60}")
    for sec in ("test", "diagnostics", "vq", "prior"):
        if metrics.get(sec) is not None and not isinstance(metrics[sec], dict):
            raise CheckpointError(f"{path}: {sec!r} must be a JSON object, got {type(metrics[sec]).__name__}")
    test = metrics.get("test") or {}
    for k in ("elbo", "log_likelihood", "k", "bits_per_dim", "active_units", "latent_units"):
        if test.get(k) is not None and not _is_number(test[k]):
            raise CheckpointError(f"{path}: test.{k} must be a number, got {test[k]!r:.60}")
    bands = (metrics.get("diagnostics") or {}).get("khat_bands")
    if bands is not None and not (isinstance(bands, dict) and all(
            _is_number(bands.get(k)) for k in ("good", "fair", "bad"))):
        raise CheckpointError(f"{path}: diagnostics.khat_bands must hold the numbers good, fair and bad, got "
                              f"{bands!r:.80}")
