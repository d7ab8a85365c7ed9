"""A trained run: model, guide, objective, config and history, and its directory.

The directory's files (names, lock, history, metrics, the checks a directory from anyone
must pass) are :mod:`pyrovi.run_files`; this module builds a run from them.

Parameters live in two places in Pyro code: ``nn.Module`` s (``state_dict``)
and Pyro's param store (``pyro.param``, ``pyro.module`` in plain functions,
autoguides). Each run keeps its own param-store state and enters it with
:meth:`Run.scope`, so two runs in one process, or a run and the user's own
SVI code, never see each other's parameters.
"""

from __future__ import annotations

import contextlib
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
    save_tensors,
    write_json,
)
from .errors import CheckpointError, ConfigError
from .run_files import (
    CHECKPOINT,
    CONFIG,
    HISTORY,
    METRICS,
    RUN_DTYPES,
    WEIGHTS,
    check_config,
    check_set,
    check_sizes,
    checkpoint_history,
    config_digest,
    is_dims,
    lock_run,
    metrics_digest,
    read_history_digest,
    release_run,
    whole_set,
    write_history,
)
from .guides.base import parameter_probe
from .traces import trace_pair

__all__ = ["Run", "load_run", "resolve_device", "default_device", "empty_param_state", "discover_params"]

#: largest item (numbers per datapoint) load_run will allocate a probe batch for
MAX_PROBE_NUMEL = 1 << 26
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
        D = math.prod(shape) if is_dims(shape) else 1
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
        return RUN_DTYPES.get(name, torch.float32) if isinstance(name, str) else torch.float32

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
            written = read_json(os.path.join(directory, METRICS), "metrics")  # the digest of what readers will read
            save_tensors(os.path.join(directory, WEIGHTS), self.state_tensors(),
                         {"constraints": self.param_constraints(), "pyrovi_version": __version__,
                          "config_sha256": config_digest(self.config), "epochs": len(self.history),
                          "history_sha256": history_sha, "metrics_sha256": metrics_digest(written)})
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
    loaded with a :class:`~pyrovi.run_files.RunSetWarning`.
    """
    return whole_set(directory, lambda: _load_once(directory, model, guide, device, model_kwargs))


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
    check_config(config, os.path.join(directory, CONFIG))
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
    check_sizes(config, model, guide, sum(t.numel() * t.element_size() for t in tensors.values()), weights)
    if model is None:
        model = models_mod.build(config["model"])
    if guide is None:
        guide = guides_mod.build(model, config["guide"])
    dtype_name = config.get("train", {}).get("dtype")  # checked by check_config
    for m in (model, guide):
        if isinstance(m, torch.nn.Module):
            m.to(dev) if dtype_name is None else m.to(dev, RUN_DTYPES[dtype_name])
    objective = objectives_mod.get(config["objective"])
    if dev.type != "cpu":
        tensors = {k: v.to(dev) for k, v in tensors.items()}
    if from_checkpoint:
        loop = meta.get("loop") if isinstance(meta.get("loop"), dict) else {}
        warnings.warn(f"{directory} has no {WEIGHTS} (training did not finish); loaded the last checkpoint, "
                      f"epoch {loop.get('epoch')}; continue it with fit(..., out=..., resume=True)", stacklevel=2)
    history, history_sha = ([], None) if from_checkpoint else read_history_digest(os.path.join(directory, HISTORY))
    metrics = None
    if os.path.isfile(os.path.join(directory, METRICS)):
        metrics = read_json(os.path.join(directory, METRICS), "metrics")
    if not from_checkpoint:
        check_set(directory, config, meta, history, history_sha, metrics)
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


