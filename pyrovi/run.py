"""A trained run: model, guide, objective, config and history, and its directory.

(Over 500 lines on purpose: one module owns the run directory, its file names, how it is
written and how a directory from anyone is checked and loaded; split, the checks would
drift from the writer they mirror.)

Parameters live in two places in Pyro code: ``nn.Module`` s (``state_dict``)
and Pyro's param store (``pyro.param``, ``pyro.module`` in plain functions,
autoguides). Each run keeps its own param-store state and enters it with
:meth:`Run.scope`, so two runs in one process, or a run and the user's own
SVI code, never see each other's parameters.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import warnings
from typing import Any, Iterator, Optional

import pyro
import torch
from pyro import poutine

from . import inputs
from ._version import __version__
from .checkpoint import (
    constraint_from_json,
    constraint_to_json,
    load_tensors,
    read_json,
    read_run_file,
    save_tensors,
    write_json,
)
from .errors import CheckpointError, ConfigError, PyroviError
from .guides.base import parameter_probe
from .traces import trace_pair

__all__ = ["Run", "RunSetWarning", "load_run", "resolve_device", "default_device", "empty_param_state", "discover_params"]

CONFIG = "config.json"
WEIGHTS = "weights.safetensors"
CHECKPOINT = "checkpoint.safetensors"
HISTORY = "history.csv"
METRICS = "metrics.json"
#: top-level keys of config.json; anything else marks a file pyrovi did not write (refused on load).
#: A feature that stores a new top-level section adds its key here.
CONFIG_KEYS = ("pyrovi_version", "model", "guide", "objective", "train", "data", "distributed")
#: largest item (numbers per datapoint) load_run will allocate a probe batch for
MAX_PROBE_NUMEL = 1 << 26
#: largest history.csv load_run reads (a row is ~150 bytes: over 400 000 epochs)
MAX_HISTORY_BYTES = 64 << 20
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(device: Any = "auto") -> torch.device:
    """``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' was asked for but no CUDA device is available; use device='auto' or 'cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device type {dev.type!r} is not supported; use 'cpu' or 'cuda'")
    return dev


def default_device(device: torch.device):
    """Context in which new tensors default to ``device`` (a no-op for the CPU).

    Wraps the first call of the user's code, where ``pyro.param(name, torch.zeros(3))``
    and lazily built autoguides create their parameters, so they land on the
    device of the batches without the user writing ``device=`` everywhere.
    """
    if torch.device(device).type == "cpu":
        return contextlib.nullcontext()
    return torch.device(device)


def empty_param_state() -> dict:
    """A fresh, empty param-store state for :meth:`pyro.params.param_store.ParamStoreDict.scope`."""
    return {"params": {}, "constraints": {}}


def discover_params(model, guide, loss_fn) -> list:
    """All trainable tensors of a (model, guide) pair, found the way Pyro's SVI finds them.

    ``loss_fn()`` is run once under a parameter-only trace; every ``pyro.param``
    it touches (``pyro.module``, PyroModule attributes, autoguides) is collected
    as its unconstrained tensor, together with the ``parameters()`` of model and
    guide when they are ``nn.Module`` s. Call inside the run's param scope.
    """
    seen: dict[int, torch.Tensor] = {}
    with parameter_probe(), poutine.trace(param_only=True) as cap:  # guides with side effects skip them
        loss_fn()
    for site in cap.trace.nodes.values():
        if site["type"] == "param":
            p = site["value"].unconstrained()
            if p.requires_grad:
                seen.setdefault(id(p), p)
    # Read modules' parameters after the trace: autoguides create theirs lazily on the first call.
    for m in (model, guide):
        if isinstance(m, torch.nn.Module):
            for p in m.parameters():
                if p.requires_grad:
                    seen.setdefault(id(p), p)
    return list(seen.values())


class Run:
    """The result of :func:`pyrovi.fit` or :func:`load_run`.

    Attributes:
        model, guide: the trained Pyro model and guide.
        objective: the :class:`pyrovi.objectives.Objective` trained with.
        config: JSON-able dict that rebuilds model, guide, objective and data.
        history: list of per-epoch dicts (``epoch``, ``train_loss``, ``val_loss``
            in nats/datapoint, loss = -bound; ``lr``, ``beta``, ``seconds``).
        directory: the run directory, or None for an in-memory run.
        param_state: this run's own Pyro param-store state (see :meth:`scope`).
        device: where model and guide live.
        data: the dataset trained on, when known (not saved).
        model_kwargs: extra keyword arguments of every model/guide call (not saved).
        pass_y: whether model and guide are called with ``y`` (see :mod:`pyrovi.inputs`).
    """

    def __init__(self, model, guide, objective, config, history=None, directory=None, param_state=None,
                 device="cpu", data=None, metrics=None, model_kwargs=None):
        self.model = model
        self.guide = guide
        self.objective = objective
        self.config = config
        self.history = list(history or [])
        self.directory = directory
        self.param_state = param_state if param_state is not None else empty_param_state()
        self.device = torch.device(device)
        self.data = data
        self.metrics = dict(metrics or {})
        self.model_kwargs = dict(model_kwargs or {})
        self.pass_y = inputs.takes_y(model)

    @property
    def data_plate(self) -> str:
        """Name of the model's plate over datapoints (``"data"`` unless fit was told otherwise)."""
        return self.config.get("train", {}).get("data_plate") or "data"

    def call_args(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> tuple:
        """``(args, kwargs)`` to call this run's model and guide on a batch (``model(*args, **kwargs)``).

        The one calling rule of fit, evaluate and diagnose: ``y`` is passed when the
        model takes it, ``model_kwargs`` always (see :mod:`pyrovi.inputs`).
        """
        if y is not None and (self.config or {}).get("train", {}).get("semi_supervised") and \
                not bool(inputs.labelled_rows(y).all()):
            y = None  # a semi-supervised run's rows with missing labels: model(x), the model infers y
        return inputs.call_args(self.model, x, y, self.model_kwargs, self.pass_y)

    def check_items(self, x: torch.Tensor, what: str = "data") -> None:
        """Refuse data ``x`` ``(N, *item)`` whose items are not shaped like the training data's.

        The expected shape is the model's ``obs_shape`` (pyrovi's models) or the shape
        ``config.json`` recorded at training; without either, nothing is checked.
        A wrong shape would otherwise fail deep in the network with a matrix-size error.
        """
        want = getattr(self.model, "obs_shape", None)
        if want is None:
            want = (self.config.get("data") or {}).get("shape") if isinstance(self.config, dict) else None
        if want is not None and torch.is_tensor(x) and tuple(x.shape[1:]) != tuple(want):
            from .errors import DataError

            raise DataError(f"{what} items have shape {tuple(x.shape[1:])} but the run was trained on items of "
                            f"shape {tuple(want)}; use data shaped like the training data (or the run's own)")

    def check_rows(self, option: str, rows: int, fix: str = "") -> None:
        """Refuse (:class:`ConfigError`) ``rows`` datapoints through the networks at once when they exceed
        the memory budget (:mod:`pyrovi.budget`): ``rows`` x the widest layer or datapoint, in this run's dtype.

        ``option`` names the size as the user gave it (``"n=64"``), ``fix`` says how to lower it.
        """
        from . import budget

        shape = (self.config.get("data") or {}).get("shape") if isinstance(self.config, dict) else None
        D = math.prod(shape) if _is_dims(shape) else 1
        budget.check_rows(option, rows, max(D, budget.widest(self.model, self.guide)),
                          fix or f"use a smaller {option.split('=')[0]}", itemsize=self.dtype.itemsize,
                          what=f"{rows} datapoints through the networks at once")

    def __repr__(self) -> str:
        last = self.history[-1] if self.history else {}
        return (f"Run(model={type(self.model).__name__}, guide={type(self.guide).__name__}, "
                f"objective={self.objective!r}, epochs={len(self.history)}, "
                f"val_loss={last.get('val_loss')}, directory={self.directory!r})")

    def to(self, device: Any) -> "Run":
        """Move model, guide and this run's param-store tensors to ``device`` (in place; tensors keep identity)."""
        dev = resolve_device(device)
        for m in (self.model, self.guide):
            if isinstance(m, torch.nn.Module):
                m.to(dev)
        with torch.no_grad():
            for p in self.param_state["params"].values():
                if p.device != dev:
                    p.data = p.data.to(dev)  # same tensor object, so the user's code keeps finding it
        self.device = dev
        return self

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point precision of model, guide and data (``config["train"]["dtype"]``, float32 if unset)."""
        name = self.config.get("train", {}).get("dtype") if isinstance(self.config.get("train"), dict) else None
        return _DTYPES.get(name, torch.float32) if isinstance(name, str) else torch.float32

    @contextlib.contextmanager
    def scope(self) -> Iterator[dict]:
        """Enter this run's param-store state (restoring the global store on exit)."""
        with pyro.get_param_store().scope(self.param_state) as state:
            yield state

    # ------------------------------------------------------------------ tensors
    def state_tensors(self) -> dict:
        """``{name: tensor}`` of everything learned: module state dicts and param-store params."""
        out, module_ids = {}, set()
        for prefix, m in (("model", self.model), ("guide", self.guide)):
            if isinstance(m, torch.nn.Module):
                for k, v in m.state_dict(keep_vars=True).items():
                    out[f"{prefix}/{k}"] = v.detach()
                    module_ids.add(id(v))
        for k, v in self.param_state["params"].items():
            if id(v) not in module_ids:
                out[f"param/{k}"] = v.detach()
        return out

    def param_constraints(self) -> dict:
        """JSON description of the param-store constraints of the ``param/`` tensors.

        Parameters owned by a module (``PyroModule``/autoguide attributes) are saved in its
        state dict, where the unconstrained value is all that is needed.
        """
        saved = {k[len("param/"):] for k in self.state_tensors() if k.startswith("param/")}
        return {k: constraint_to_json(c) for k, c in self.param_state["constraints"].items() if k in saved}

    def load_state_tensors(self, tensors: dict, constraints: dict, args: tuple = (), kwargs=None) -> None:
        """Put saved tensors back into model, guide and param store (in place, shapes checked).

        With ``args``, guide and model are first run once on them (no gradients) in this
        run's scope, so that parameters the user's code creates on its first call
        (``pyro.module``, ``pyro.param``, autoguides) exist and the saved values are
        copied into the very tensors that code uses.
        """
        params = {k[len("param/"):]: v for k, v in tensors.items() if k.startswith("param/")}
        if args and (params or self._lazy_modules(tensors)):
            with self.scope(), default_device(self.device):
                _touch(self.model, self.guide, args, kwargs or {})
        for prefix, m in (("model", self.model), ("guide", self.guide)):
            if isinstance(m, torch.nn.Module):
                sd = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + "/")}
                _load_module(m, sd, prefix)
        if params:
            self._load_params(params, constraints)

    def _lazy_modules(self, tensors: dict) -> bool:
        """Whether a saved module weight has no counterpart yet (an autoguide before its first call)."""
        for prefix, m in (("model", self.model), ("guide", self.guide)):
            if isinstance(m, torch.nn.Module):
                own = m.state_dict()
                if any(k.startswith(prefix + "/") and k[len(prefix) + 1:] not in own for k in tensors):
                    return True
        return False

    def _load_params(self, params: dict, constraints: dict) -> None:
        # Bind saved values to the live tensors the user's code registered in this run's
        # scope (load_state_tensors ran it once): overwrite those in place. Names the code
        # did not register yet are stored as they are, so a later pyro.param(name, init)
        # returns the saved value, as Pyro's own param-store loading does.
        with self.scope():
            store = pyro.get_param_store()
            for name, value in params.items():
                if not value.is_floating_point():
                    raise CheckpointError(f"saved parameter {name!r} has dtype {value.dtype}; parameters are "
                                          "floating point, so the file is corrupt or crafted")
                c = constraint_from_json(constraints.get(name, {"name": "real"}))
                if name in store._params:
                    live = store._params[name]
                    if live.shape != value.shape:
                        raise CheckpointError(f"saved parameter {name!r} has shape {tuple(value.shape)}, "
                                              f"the code's has {tuple(live.shape)}")
                    with torch.no_grad():
                        live.copy_(value.to(live.device, live.dtype))
                else:
                    store._params[name] = value.to(self.device).requires_grad_(True)
                    store._param_to_name[store._params[name]] = name
                    store._constraints[name] = c

    # ------------------------------------------------------------------ files
    def save(self, directory: Optional[str] = None) -> str:
        """Write ``config.json``, ``weights.safetensors``, ``history.csv`` and ``metrics.json``."""
        directory = directory or self.directory
        if directory is None:
            raise ConfigError("Run.save needs a directory (this run was trained without out=)")
        os.makedirs(directory, exist_ok=True)
        lock_run(directory, "saving a run")  # held already when fit trains into it; released when saved
        try:
            # weights last: they mark a complete set (without them load_run falls back to the
            # checkpoint and says so), and they name the config and history they belong to
            write_json(os.path.join(directory, CONFIG), self.config)
            history_sha = write_history(os.path.join(directory, HISTORY), self.history)
            write_json(os.path.join(directory, METRICS), self.metrics)
            save_tensors(os.path.join(directory, WEIGHTS), self.state_tensors(),
                         {"constraints": self.param_constraints(), "pyrovi_version": __version__,
                          "config_sha256": config_digest(self.config), "epochs": len(self.history),
                          "history_sha256": history_sha})
        finally:
            release_run(directory)
        self.directory = directory
        return directory

    def sample(self, n: int = 64, *, label=None, seed=None) -> torch.Tensor:
        """``n`` prior samples decoded to data space, ``(n, D)``: :func:`pyrovi.uses.sample_prior` on this run."""
        from .generate import sample_prior

        return sample_prior(self, n, label=label, seed=seed)


def _touch(model, guide, args, kwargs) -> None:
    """Run guide then model once (no gradients) so their params register in the current store."""
    try:
        with torch.no_grad(), poutine.trace(param_only=True):
            trace_pair(model, guide, args, kwargs)
    except Exception as e:  # the user's code; say what pyrovi was doing when it failed
        shapes = [tuple(a.shape) for a in args if torch.is_tensor(a)]
        raise CheckpointError(
            f"to load the saved weights pyrovi runs your guide and model once on a batch of zeros of shapes "
            f"{shapes} (so their parameters exist), and that raised {type(e).__name__}: {e}. Pass the "
            "model_kwargs= the run was trained with, or make the code accept such a batch") from e


def _load_module(m: torch.nn.Module, sd: dict, prefix: str) -> None:
    own = m.state_dict()
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    if missing or extra:
        raise CheckpointError(
            f"saved {prefix} weights do not fit this {type(m).__name__}: missing {missing[:5]}, "
            f"unexpected {extra[:5]}; was the run trained with a different architecture?")
    for k, v in sd.items():
        if own[k].shape != v.shape:
            raise CheckpointError(f"saved {prefix} weight {k!r} has shape {tuple(v.shape)}, "
                                  f"this {type(m).__name__} has {tuple(own[k].shape)}")
    m.load_state_dict(sd)


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


def load_run(directory: str, *, model=None, guide=None, device: Any = "cpu", model_kwargs=None) -> Run:
    """Load a run directory written by :func:`pyrovi.fit`.

    pyrovi's own models and guides are rebuilt from ``config.json``. A run of
    your own Pyro code needs the same callables again: ``load_run(dir,
    model=my_model, guide=my_guide)``, built as for training (fresh modules
    are fine; their weights are overwritten). Code is never stored in or
    executed from a run directory, only tensors (safetensors) and JSON: a
    pickled function would run whatever its author wrote the moment it is
    loaded, and would break as soon as your code changes anyway. To find the
    live tensors of ``pyro.module``/``pyro.param``/autoguide parameters,
    guide and model are run once on a batch of zeros of the training data's
    shapes (no gradients), then the saved values are copied into them.

    Args:
        directory: the run directory.
        model: your own model (required when the run used one).
        guide: your own guide (required when the run used one).
        device: where to put the weights (``"cpu"`` default, ``"auto"``, ``"cuda"``);
            a run trained on a GPU loads on a CPU-only machine.
        model_kwargs: the extra keyword arguments the run was trained with.

    A run being saved while it is read (its writer holds the lock) can show files of two
    saves; such a mixed set is read again (for up to ~5 s) until it is whole, and otherwise
    loaded with a :class:`RunSetWarning`.
    """
    return _whole_set(directory, lambda: _load_once(directory, model, guide, device, model_kwargs))


def _whole_set(directory, read):
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


def _load_once(directory, model, guide, device, model_kwargs) -> Run:
    """One read of a run directory (see :func:`load_run`)."""
    from . import guides as guides_mod
    from . import models as models_mod
    from . import objectives as objectives_mod

    if not isinstance(directory, (str, os.PathLike)) or not os.path.isdir(directory):
        raise CheckpointError(f"run directory not found: {directory!r}")
    directory = os.fspath(directory)
    dev = resolve_device(device)
    config = read_json(os.path.join(directory, CONFIG), "run config")
    _check_config(config, os.path.join(directory, CONFIG))
    version = config.get("pyrovi_version")
    if version != __version__:
        warnings.warn(f"run was written by pyrovi {version}, this is {__version__}", stacklevel=2)
    if model is None and config["model"].get("name") == "user":
        raise ConfigError(f"{directory} was trained on your own Pyro model: pass model= and guide= to load_run")
    if guide is None and config["guide"].get("name") == "user":
        raise ConfigError(f"{directory} was trained with your own guide: pass guide= to load_run")
    weights = os.path.join(directory, WEIGHTS)
    from_checkpoint = not os.path.isfile(weights) and os.path.isfile(os.path.join(directory, CHECKPOINT))
    if from_checkpoint:  # training was killed or interrupted before it wrote the final weights
        weights = os.path.join(directory, CHECKPOINT)
    if not os.path.isfile(weights):
        raise CheckpointError(f"{directory} holds neither {WEIGHTS} nor {CHECKPOINT}: nothing to load")
    tensors, meta = load_tensors(weights, "cpu")  # refuses pickles and corrupt files before anything is built
    if from_checkpoint:
        tensors = {k: v for k, v in tensors.items() if k.split("/")[0] in ("model", "guide", "param")}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        warnings.warn(f"{weights} holds NaN/inf values in {len(bad)} tensor(s) ({bad[:3]}); every metric of this "
                      "run will be NaN. Retrain (lower lr, clip_norm) or load an earlier checkpoint", stacklevel=2)
    _check_sizes(config, model, guide, sum(t.numel() * t.element_size() for t in tensors.values()), weights)
    if model is None:
        model = models_mod.build(config["model"])
    if guide is None:
        guide = guides_mod.build(model, config["guide"])
    dtype_name = config.get("train", {}).get("dtype")  # checked by _check_config
    for m in (model, guide):
        if isinstance(m, torch.nn.Module):
            m.to(dev) if dtype_name is None else m.to(dev, _DTYPES[dtype_name])
    objective = objectives_mod.get(config["objective"])
    if dev.type != "cpu":
        tensors = {k: v.to(dev) for k, v in tensors.items()}
    if from_checkpoint:
        loop = meta.get("loop") if isinstance(meta.get("loop"), dict) else {}
        warnings.warn(f"{directory} has no {WEIGHTS} (training did not finish); loaded the last checkpoint, "
                      f"epoch {loop.get('epoch')}; continue it with fit(..., out=..., resume=True)", stacklevel=2)
    history, history_sha = ([], None) if from_checkpoint else _read_history(os.path.join(directory, HISTORY))
    if not from_checkpoint:
        _check_set(directory, config, meta, history, history_sha)
    metrics = {}
    if os.path.isfile(os.path.join(directory, METRICS)):
        metrics = read_json(os.path.join(directory, METRICS), "metrics")
    from .inputs import check_model_kwargs

    if from_checkpoint:  # history.csv may hold a row past the checkpoint (killed between the two writes)
        try:
            history = [h for h in checkpoint_history(weights, meta) if isinstance(h, dict)]
        except CheckpointError as e:
            warnings.warn(f"{e}; loaded without a history", stacklevel=2)
            history = []
    run = Run(model, guide, objective, config, history=history,
              directory=directory, device=dev, metrics=metrics if isinstance(metrics, dict) else {},
              model_kwargs=check_model_kwargs(model_kwargs))
    saved_kw = config.get("data", {}).get("model_kwargs") or []
    if sorted(run.model_kwargs) != sorted(saved_kw):
        warnings.warn(f"the run was trained with model_kwargs {sorted(saved_kw)}, load_run got "
                      f"{sorted(run.model_kwargs)}", stacklevel=2)
    constraints = meta.get("constraints") if isinstance(meta.get("constraints"), dict) else {}
    x, y = _probe_batch(config, dev, model, run.dtype)
    if x is not None:
        args, kw = run.call_args(x, y)
        run.load_state_tensors(tensors, constraints, args, kw)
        if objective.max_plate_nesting is None:  # as fit set it; forked RNG keeps seeded evaluations reproducible
            from .weights import guess_max_plate_nesting

            with run.scope(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                objective.max_plate_nesting = guess_max_plate_nesting(model, guide, args, kw)
    else:
        run.load_state_tensors(tensors, constraints)
    for m in (model, guide):
        if isinstance(m, torch.nn.Module):
            m.eval()
    return run


def config_digest(config: dict) -> str:
    """SHA-256 of ``config`` as :func:`write_json` writes it (stored in the weights it belongs to)."""
    import hashlib
    import json

    return hashlib.sha256((json.dumps(config, indent=2, sort_keys=True, allow_nan=True) + "\n").encode()).hexdigest()


def _check_set(directory: str, config: dict, meta: dict, history: list, history_sha=None) -> None:
    """Warn when config.json or history.csv are not the ones the weights were saved with.

    A run directory is written file by file; a process killed while resuming or overwriting
    a finished run could otherwise leave one run's weights beside another's config.
    """
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


def _probe_batch(config: dict, dev, model=None, dtype=torch.float32) -> tuple:
    """Zeros shaped like a training batch ``(x, y)`` (``y`` None without targets), from config.json."""
    d = config.get("data", {})
    shape = d.get("shape")
    if shape is None:
        return None, None
    obs = getattr(model, "obs_shape", None)
    if obs is not None and tuple(shape) != tuple(obs):
        raise CheckpointError(f"run config says the data has shape {shape} but the model expects {list(obs)}")
    # Full-data mode hands the model every row (it may size its plate from them); else 2 rows do.
    rows = int(d.get("n_train") or 2) if config.get("train", {}).get("batch_size", 1) is None else 2
    if rows * math.prod(shape) > MAX_PROBE_NUMEL:
        raise CheckpointError(f"run config has data shape {shape} x {rows} rows, larger than pyrovi will "
                              "allocate to load it")
    y_items = rows * math.prod(d.get("y_shape") or [])
    if y_items > MAX_PROBE_NUMEL:
        raise CheckpointError(f"run config has target shape {d.get('y_shape')!r:.80} x {rows} rows, larger than "
                              "pyrovi will allocate to load it")
    x = torch.zeros(rows, *shape, device=dev, dtype=dtype)
    y = None
    if d.get("y_dtype") is not None:
        ydt = getattr(torch, str(d["y_dtype"]), None)
        if not isinstance(ydt, torch.dtype):
            raise CheckpointError(f"config.json names an unknown y dtype {d['y_dtype']!r}")
        y = torch.zeros(rows, *(d.get("y_shape") or []), dtype=ydt, device=dev)
    elif d.get("num_classes"):
        y = torch.zeros(rows, dtype=torch.long, device=dev)
    return x, y


def _is_dims(v) -> bool:
    return isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in v)


def _check_config(config, path: str) -> None:
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
    if dtype_name is not None and (not isinstance(dtype_name, str) or dtype_name not in _DTYPES):
        raise CheckpointError(f"{path}: train.dtype={dtype_name!r:.40}; expected one of {sorted(_DTYPES)}")
    data = config.get("data", {})
    if data.get("shape") is not None and not _is_dims(data["shape"]):
        raise CheckpointError(f"{path}: data.shape must be a list of positive integers, got {data['shape']!r:.80}")
    if data.get("image_shape") is not None and not _is_dims(data["image_shape"]):
        raise CheckpointError(f"{path}: data.image_shape must be a list of positive integers or null, "
                              f"got {data['image_shape']!r:.80}")
    if data.get("y_shape") is not None and not (data["y_shape"] == [] or _is_dims(data["y_shape"])):
        raise CheckpointError(f"{path}: data.y_shape must be a list of positive integers, got {data['y_shape']!r:.80}")
    if data.get("y_dtype") is not None and not isinstance(data["y_dtype"], str):
        raise CheckpointError(f"{path}: data.y_dtype must be a dtype name, got {data['y_dtype']!r:.80}")
    n_train = data.get("n_train")
    if n_train is not None and (isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1):
        raise CheckpointError(f"{path}: data.n_train must be a positive integer, got {n_train!r:.80}")
    kw = data.get("model_kwargs")
    if kw is not None and not (isinstance(kw, list) and all(isinstance(k, str) for k in kw)):
        raise CheckpointError(f"{path}: data.model_kwargs must be a list of names, got {kw!r:.80}")


def _check_sizes(config: dict, model, guide, nbytes: int, path: str) -> None:
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
    return _read_history(path)[0]


def _read_history(path: str) -> tuple:
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
    return _whole_set(directory, lambda: _read_summary_once(directory))


def _read_summary_once(directory: str) -> tuple:
    path = os.path.join(directory, CONFIG)
    config = read_json(path, "run config")
    _check_config(config, path)
    obj = config["objective"]
    for k in ("particles", "alpha"):
        if obj.get(k) is not None and not _is_number(obj[k]):
            raise CheckpointError(f"{path}: objective.{k} must be a number, got {obj[k]!r:.60}")
    path = os.path.join(directory, METRICS)
    metrics = read_json(path, "metrics") if os.path.lexists(path) else {}
    check_metrics(metrics, path)
    history, history_sha = _read_history(os.path.join(directory, HISTORY))
    if os.path.lexists(os.path.join(directory, WEIGHTS)):  # a finished run: the files its weights name
        _check_set(directory, config, weights_meta(os.path.join(directory, WEIGHTS)), history, history_sha)
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
