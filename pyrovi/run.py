"""A trained run: model, guide, objective, config and history, and its directory.

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
import os
import warnings
from typing import Any, Iterator, Optional

import pyro
import torch
from pyro import poutine

from . import __version__, inputs
from .checkpoint import (
    constraint_from_json,
    constraint_to_json,
    load_tensors,
    read_json,
    save_tensors,
    write_json,
)
from .errors import CheckpointError, ConfigError

__all__ = ["Run", "load_run", "resolve_device", "default_device", "empty_param_state", "discover_params"]

CONFIG = "config.json"
WEIGHTS = "weights.safetensors"
CHECKPOINT = "checkpoint.safetensors"
HISTORY = "history.csv"
METRICS = "metrics.json"


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
    with poutine.trace(param_only=True) as cap:
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
        return inputs.call_args(self.model, x, y, self.model_kwargs, self.pass_y)

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
        write_json(os.path.join(directory, CONFIG), self.config)
        save_tensors(os.path.join(directory, WEIGHTS), self.state_tensors(),
                     {"constraints": self.param_constraints(), "pyrovi_version": __version__})
        write_history(os.path.join(directory, HISTORY), self.history)
        write_json(os.path.join(directory, METRICS), self.metrics)
        self.directory = directory
        return directory

    @torch.no_grad()
    def sample(self, n: int = 64) -> torch.Tensor:
        """``n`` prior samples decoded to data space, ``(n, D)`` (pyrovi's models)."""
        if not hasattr(self.model, "sample"):
            raise ConfigError(f"{type(self.model).__name__} has no sample(n) method")
        with self.scope():
            return self.model.sample(n)


def _touch(model, guide, args, kwargs) -> None:
    """Run guide then model once (no gradients) so their params register in the current store."""
    try:
        with torch.no_grad(), poutine.trace(param_only=True):
            tr = poutine.trace(guide).get_trace(*args, **kwargs)
            poutine.replay(model, trace=tr)(*args, **kwargs)
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


def write_history(path: str, history: list) -> None:
    """Atomically write the per-epoch history as CSV."""
    from .checkpoint import atomic_write

    buf = io.StringIO()
    keys: list = []
    for row in history:
        keys += [k for k in row if k not in keys]
    w = csv.DictWriter(buf, fieldnames=keys or ["epoch"])
    w.writeheader()
    for row in history:
        w.writerow(row)
    atomic_write(path, buf.getvalue())


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
    """
    from . import guides as guides_mod
    from . import models as models_mod
    from . import objectives as objectives_mod

    if not isinstance(directory, (str, os.PathLike)) or not os.path.isdir(directory):
        raise CheckpointError(f"run directory not found: {directory!r}")
    directory = os.fspath(directory)
    dev = resolve_device(device)
    config = read_json(os.path.join(directory, CONFIG), "run config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{directory}/{CONFIG} must hold a JSON object")
    for key in ("model", "guide", "objective"):
        if not isinstance(config.get(key), dict):
            raise CheckpointError(f"{directory}/{CONFIG} has no valid {key!r} section")
    version = config.get("pyrovi_version")
    if version != __version__:
        warnings.warn(f"run was written by pyrovi {version}, this is {__version__}", stacklevel=2)
    if model is None:
        if config["model"].get("name") == "user":
            raise ConfigError(f"{directory} was trained on your own Pyro model: pass model= and guide= to load_run")
        model = models_mod.build(config["model"])
    if guide is None:
        if config["guide"].get("name") == "user":
            raise ConfigError(f"{directory} was trained with your own guide: pass guide= to load_run")
        guide = guides_mod.build(model, config["guide"])
    for m in (model, guide):
        if isinstance(m, torch.nn.Module):
            m.to(dev)
    objective = objectives_mod.get(config["objective"])
    tensors, meta = load_tensors(os.path.join(directory, WEIGHTS), dev)
    metrics = {}
    if os.path.isfile(os.path.join(directory, METRICS)):
        metrics = read_json(os.path.join(directory, METRICS), "metrics")
    from .inputs import check_model_kwargs

    run = Run(model, guide, objective, config, history=read_history(os.path.join(directory, HISTORY)),
              directory=directory, device=dev, metrics=metrics if isinstance(metrics, dict) else {},
              model_kwargs=check_model_kwargs(model_kwargs))
    saved_kw = config.get("data", {}).get("model_kwargs") or []
    if sorted(run.model_kwargs) != sorted(saved_kw):
        warnings.warn(f"the run was trained with model_kwargs {sorted(saved_kw)}, load_run got "
                      f"{sorted(run.model_kwargs)}", stacklevel=2)
    x, y = _probe_batch(config, dev)
    if x is not None:
        args, kw = run.call_args(x, y)
        run.load_state_tensors(tensors, meta.get("constraints", {}), args, kw)
        if objective.max_plate_nesting is None:  # as fit set it; forked RNG keeps seeded evaluations reproducible
            from .weights import guess_max_plate_nesting

            with run.scope(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                objective.max_plate_nesting = guess_max_plate_nesting(model, guide, args, kw)
    else:
        run.load_state_tensors(tensors, meta.get("constraints", {}))
    for m in (model, guide):
        if isinstance(m, torch.nn.Module):
            m.eval()
    return run


def _probe_batch(config: dict, dev) -> tuple:
    """Zeros shaped like a training batch ``(x, y)`` (``y`` None without targets), from config.json."""
    d = config.get("data", {})
    shape = d.get("shape")
    if shape is None:
        return None, None
    # Full-data mode hands the model every row (it may size its plate from them); else 2 rows do.
    rows = int(d.get("n_train") or 2) if config.get("train", {}).get("batch_size", 1) is None else 2
    x = torch.zeros(rows, *shape, device=dev)
    y = None
    if d.get("y_dtype") is not None:
        dtype = getattr(torch, str(d["y_dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"config.json names an unknown y dtype {d['y_dtype']!r}")
        y = torch.zeros(rows, *(d.get("y_shape") or []), dtype=dtype, device=dev)
    elif d.get("num_classes"):
        y = torch.zeros(rows, dtype=torch.long, device=dev)
    return x, y


def read_history(path: str) -> list:
    """Read ``history.csv`` back into a list of dicts of floats (missing file: empty list)."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        row = {}
        for k, v in r.items():
            try:
                row[k] = int(v) if k == "epoch" else float(v)
            except (TypeError, ValueError):
                row[k] = v
        out.append(row)
    return out
