"""Atomic, non-pickle saving and loading of a run's files.

A run directory holds:

- ``config.json``: everything that rebuilds model, guide, objective and data;
- ``weights.safetensors``: the model's and guide's weights and ``pyro.param`` s;
- ``checkpoint.safetensors``: the same plus optimizer, scheduler, epoch, RNG
  state and the history's last row (its rows are appended to ``history.csv``),
  so ``fit(..., resume=True)`` continues the same trajectory;
- ``history.csv``, ``metrics.json``, figures and ``report.md``.

Tensors are stored with safetensors and everything else as JSON (in the
safetensors header's metadata), so loading never runs code: there is no
pickle anywhere. Every write goes to a temporary file in the same directory
that is flushed, fsync'ed and ``os.replace`` d over the target, so a killed
process leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from pyro.distributions import constraints as pyro_constraints
from torch.distributions import constraints

from .errors import CheckpointError

__all__ = [
    "atomic_write",
    "umask",
    "write_json",
    "read_json",
    "read_run_file",
    "check_inside",
    "save_tensors",
    "load_tensors",
    "constraint_to_json",
    "constraint_from_json",
    "FORMAT_VERSION",
]

FORMAT_VERSION = 1
_META_KEY = "pyrovi"
MAX_FILE_BYTES = 1 << 34  # 16 GiB: refuse absurd sizes before reading


def umask() -> int:
    """The process's file-creation mask, read without changing it where the OS allows."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # elsewhere: set and put back (not thread-safe, hence the first way)
    os.umask(old)
    return old


def atomic_write(path: str, data: bytes | str) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + ``os.replace``).

    The file gets the mode a plain ``open(path, "w")`` would give (``0o666`` less the umask,
    0644 under the usual 022), not the 0600 of the temporary file, so colleagues can read a run.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    after_write()


#: files written by this process (counted only under the fault-injection variable below)
_WRITES = [0]
KILL_ENV = "PYROVI_KILL_AFTER_WRITE"


def after_write() -> None:
    """Fault injection for the kill tests: with ``PYROVI_KILL_AFTER_WRITE=n`` set, the process
    SIGKILLs itself right after its ``n``-th completed file write (a real kill: no cleanup runs)."""
    n = os.environ.get(KILL_ENV)
    if n:
        _WRITES[0] += 1
        if str(_WRITES[0]) == n.strip():
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


def write_json(path: str, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n")


#: largest JSON file of each kind a run directory holds (a genuine one is a few KB)
JSON_LIMITS = {"run config": 4 << 20, "prior config": 4 << 20, "metrics": 16 << 20}
MAX_JSON_BYTES = 16 << 20


def check_inside(path: str, error: type = CheckpointError) -> None:
    """Refuse ``path`` when it is a symlink that leads out of its own directory (e.g. to ``/etc/shadow``).

    A run directory may come from someone else; its files are read from the directory itself.
    """
    here = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    real = os.path.realpath(path)
    if os.path.commonpath([here, real]) != here:
        raise error(f"{path!r:.300} is a link to {real!r:.200}, outside its run directory; refusing to follow it")


def read_run_file(path: str, limit: int, what: str) -> bytes:
    """The bytes of a run-directory file: a regular file, inside its directory, at most ``limit`` bytes."""
    from .readers import read_regular

    check_inside(path)
    return read_regular(path, limit, what, CheckpointError)


def read_json(path: str, what: str = "file", limit: Optional[int] = None) -> Any:
    """Read JSON from ``path``; a missing, special, oversized or malformed file raises :class:`CheckpointError`.

    ``limit`` (bytes) defaults to :data:`JSON_LIMITS` for ``what``, else :data:`MAX_JSON_BYTES`.
    """
    if not os.path.lexists(path):
        raise CheckpointError(f"{what} not found: {path}")
    raw = read_run_file(path, limit or JSON_LIMITS.get(what, MAX_JSON_BYTES), what)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what} {path} is not valid JSON ({str(e)[:100]}); it may be corrupt") from None
    except (ValueError, RecursionError) as e:  # e.g. a 5000-digit integer, or nesting 100k deep
        raise CheckpointError(f"{what} {path} cannot be read safely ({type(e).__name__}: {str(e)[:100]})") from None


def save_tensors(path: str, tensors: dict, meta: Optional[dict] = None) -> None:
    """Atomically save ``{name: tensor}`` plus a JSON-able ``meta`` dict as one safetensors file."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    header = {_META_KEY: json.dumps({"format": FORMAT_VERSION, **(meta or {})}, allow_nan=True)}
    atomic_write(path, st_save(clean, metadata=header))


def load_tensors(path: str, device: str | torch.device = "cpu") -> tuple:
    """Load a file written by :func:`save_tensors`: ``(tensors, meta)``.

    Only safetensors' own format is accepted: a pickle (``torch.save``) file,
    a truncated file or garbage raises :class:`CheckpointError`; nothing in the
    file is ever executed.
    """
    if not os.path.lexists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    # one open, one read: the tensors and the metadata come from the same bytes
    raw = read_run_file(path, MAX_FILE_BYTES, "checkpoint")
    # A safetensors file starts with its JSON header's length (u64, little-endian) and then "{".
    # Check that structure first: a valid header length can itself begin with 0x80 or "PK".
    n = int.from_bytes(raw[:8], "little") if len(raw) >= 8 else -1
    structured = 0 < n <= len(raw) - 8 and raw[8:9] == b"{"
    if not structured and (raw[:1] == b"\x80" or raw[:2] == b"PK"):
        raise CheckpointError(
            f"{path} is a pickle/torch.save file, not safetensors; pyrovi never unpickles "
            "checkpoints because unpickling can run arbitrary code"
        )
    try:
        tensors = st_load(raw)
        header = json.loads(raw[8:8 + n]).get("__metadata__") or {}  # parsed and checked by st_load above
        if not isinstance(header, dict):
            raise ValueError("metadata is not a JSON object")
    except (SafetensorError, ValueError, OSError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({str(e)[:200]}); it may be truncated or "
                              "corrupt") from None
    del raw
    bad = [k for k in tensors if not _safe_name(k)]
    if bad:
        raise CheckpointError(f"{path} holds tensor names pyrovi never writes ({bad[:3]!r}): absolute, '..' "
                              "or control characters; refusing an untrusted or crafted file")
    if _META_KEY not in header:
        raise CheckpointError(f"{path} is a safetensors file but not one written by pyrovi (no metadata)")
    try:
        meta = json.loads(header[_META_KEY])
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path} has corrupt metadata: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} has malformed metadata")
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format')!r}; this pyrovi reads {FORMAT_VERSION}")
    if device != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, meta


def _safe_name(name: str) -> bool:
    """A tensor name as pyrovi writes it: ``/``-separated, non-empty parts, no ``.``/``..``, no control chars.

    Names are never used as paths, but a name that looks like a path traversal
    ("../x", "/etc/x") can only come from a crafted file, so it is refused early.
    """
    parts = name.split("/")
    return bool(name) and "\\" not in name and all(p not in ("", ".", "..") for p in parts) and all(
        c.isprintable() for c in name)


# --------------------------------------------------------------------------- constraints as JSON

_SIMPLE = {
    "real": constraints.real,
    "positive": constraints.positive,
    "nonnegative": constraints.nonnegative,
    "unit_interval": constraints.unit_interval,
    "simplex": constraints.simplex,
    "lower_cholesky": constraints.lower_cholesky,
    "corr_cholesky": constraints.corr_cholesky,
    "positive_definite": constraints.positive_definite,
    "real_vector": constraints.real_vector,
    "ordered_vector": getattr(constraints, "ordered_vector", constraints.real_vector),
    # Pyro's own constraints (autoguides and user pyro.params use them)
    "unit_lower_cholesky": pyro_constraints.unit_lower_cholesky,
    "softplus_positive": pyro_constraints.softplus_positive,
    "softplus_lower_cholesky": pyro_constraints.softplus_lower_cholesky,
    "positive_ordered_vector": pyro_constraints.positive_ordered_vector,
    "corr_matrix": pyro_constraints.corr_matrix,
    "sphere": pyro_constraints.sphere,
}


def constraint_to_json(c) -> dict:
    """A JSON description of a ``torch.distributions`` constraint (for ``pyro.param`` s)."""
    for name, known in _SIMPLE.items():
        if c is known:
            return {"name": name}
    if type(c) is type(constraints.real):  # Pyro's param store re-creates `real` on set_state
        return {"name": "real"}
    if isinstance(c, constraints.independent):
        return {"name": "independent", "base": constraint_to_json(c.base_constraint),
                "ndims": c.reinterpreted_batch_ndims}
    if isinstance(c, (constraints.interval, constraints.half_open_interval)):
        return {"name": type(c).__name__.lstrip("_").lower().replace("halfopeninterval", "half_open_interval"),
                "lower": float(c.lower_bound), "upper": float(c.upper_bound)}
    if isinstance(c, (constraints.greater_than, constraints.greater_than_eq)):
        eq = isinstance(c, constraints.greater_than_eq)
        return {"name": "greater_than_eq" if eq else "greater_than", "lower": float(c.lower_bound)}
    if isinstance(c, constraints.less_than):
        return {"name": "less_than", "upper": float(c.upper_bound)}
    raise CheckpointError(f"cannot store parameter constraint {c!r}; supported: {sorted(_SIMPLE)} and bounds")


def constraint_from_json(d) -> Any:
    """Inverse of :func:`constraint_to_json`; unknown names raise :class:`CheckpointError`."""
    if not isinstance(d, dict) or not isinstance(d.get("name"), str):
        raise CheckpointError(f"malformed constraint {d!r}")
    n = d["name"]
    try:
        if n in _SIMPLE:
            return _SIMPLE[n]
        if n == "independent":
            return constraints.independent(constraint_from_json(d["base"]), int(d["ndims"]))
        if n in ("interval", "half_open_interval"):
            return getattr(constraints, n)(float(d["lower"]), float(d["upper"]))
        if n in ("greater_than", "greater_than_eq"):
            return getattr(constraints, n)(float(d["lower"]))
        if n == "less_than":
            return constraints.less_than(float(d["upper"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"malformed constraint {d!r}: {e}") from None
    raise CheckpointError(f"unknown constraint {n!r} in checkpoint")
