"""``fit``: train a Pyro model and guide with an objective, checkpointing as it goes.

The loss is the objective called on (model, guide, batch), divided by the
batch size (nats per datapoint), minimized with a plain ``torch.optim``
optimizer over the parameters found the way Pyro's SVI finds them. Each fit
runs in its own Pyro param-store scope, so the global store neither leaks
into it nor is clobbered by it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from tqdm.auto import tqdm

from . import __version__
from . import data as data_mod
from . import guides as guides_mod
from . import inputs
from . import objectives as objectives_mod
from .checkpoint import load_tensors, save_tensors, write_json
from .errors import (CheckpointError, ConfigError, DataError, PyroviError, TrainingError, check_positive,
                     check_seed, lookup)
from .run import CHECKPOINT, CONFIG, Run, default_device, discover_params, empty_param_state, resolve_device
from .weights import guess_max_plate_nesting

__all__ = ["fit", "train_step", "TrainConfig", "LR_SCHEDULES", "BatchLoss", "DTYPES", "adam"]

LR_SCHEDULES = ("constant", "cosine", "exponential")
#: floating-point precisions fit trains in (``dtype=``)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class TrainConfig:
    """Training options of :func:`fit` (stored under ``"train"`` in ``config.json``)."""

    epochs: int = 20  # passes over the training split
    batch_size: Optional[int] = 128  # datapoints per step; None = the whole training set every step
    lr: float = 1e-3  # Adam learning rate
    seed: int = 0  # seeds parameters' draws, particles, shuffling
    patience: Optional[int] = None  # early stopping: epochs without val improvement; None = off
    beta: float = 1.0  # weight of the latent (KL) terms; beta-VAE when != 1
    warmup: int = 0  # epochs of linear KL warm-up of beta from 0
    clip_norm: Optional[float] = None  # gradient-norm clipping; None = off
    lr_schedule: str = "constant"  # "constant" | "cosine" | "exponential" (per epoch)
    weight_decay: float = 0.0
    val_fraction: float = 0.1  # held out of raw arrays that come without a validation split
    data_plate: str = "data"  # name of the model's plate over datapoints (minibatch scaling N/B)
    dtype: Optional[str] = None  # "float32" | "float64"; None: the model's own parameter dtype

    def validate(self) -> None:
        """Raise :class:`~pyrovi.ConfigError` naming the first option that is out of range."""
        check_positive("epochs", self.epochs, integer=True)
        if self.batch_size is not None:
            check_positive("batch_size", self.batch_size, integer=True)
        check_positive("lr", self.lr)
        check_seed("seed", self.seed)
        if self.patience is not None:
            check_positive("patience", self.patience, integer=True)
        check_positive("beta", self.beta, allow_zero=True)
        check_positive("warmup", self.warmup, integer=True, allow_zero=True)
        if self.clip_norm is not None:
            check_positive("clip_norm", self.clip_norm)
        lookup({s: s for s in LR_SCHEDULES}, self.lr_schedule, "lr_schedule")
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        if not (isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1):
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if not isinstance(self.data_plate, str) or not self.data_plate:
            raise ConfigError(f"data_plate must be the name of the model's plate over datapoints, "
                              f"got {self.data_plate!r}")
        if self.dtype is not None:
            lookup(DTYPES, self.dtype, "dtype")


def _dtype_name(dtype) -> Optional[str]:
    """``torch.float64`` / ``"float64"`` / None -> ``"float64"`` / None; other dtypes raise :class:`ConfigError`."""
    if dtype is None or isinstance(dtype, str):
        return dtype
    for name, dt in DTYPES.items():
        if dtype is dt:
            return name
    raise ConfigError(f"dtype must be torch.float32 or torch.float64 (or their names), got {dtype!r}")


def _module_dtype(*objs) -> torch.dtype:
    """Dtype of the first floating-point parameter of ``objs`` (``nn.Module`` s), else torch's default."""
    for m in objs:
        if isinstance(m, torch.nn.Module):
            for t in list(m.parameters()) + list(m.buffers()):
                if t.is_floating_point():
                    return t.dtype
    return torch.get_default_dtype()


class _ScaleLatents(Messenger):
    """Multiply the log-density of every latent (non-observed) site by ``beta`` (β-VAE, KL warm-up)."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def _process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg):
            msg["scale"] = self.beta * msg["scale"]


# --------------------------------------------------------------------------- data


def _resolve_data(data, cfg: TrainConfig):
    """-> (train Split, val Split, Dataset or None, JSON description)."""
    if isinstance(data, str):
        data = data_mod.load(data, seed=cfg.seed)
    if isinstance(data, data_mod.Dataset):
        ds = data
        if len(ds.val) == 0:
            raise DataError(f"dataset {ds.name!r} has an empty validation split; load it with split=(0.1, ...)")
        desc = dict(ds.source)
        return ds.train, ds.val, ds, desc
    whole = inputs.as_split(data)
    data_mod.validate(whole.x, name="data", min_rows=2)
    inputs.check_targets(whole, "data")
    n = whole.x.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    n_val = max(1, int(round(n * cfg.val_fraction)))
    tr, va = perm[n_val:], perm[:n_val]
    pick = lambda idx: data_mod.Split(whole.x[idx], None if whole.y is None else whole.y[idx])  # noqa: E731
    return pick(tr), pick(va), None, {"name": "arrays", "rows": n, "val_fraction": cfg.val_fraction}


def _check_data(model, split: data_mod.Split, name: str, cfg: TrainConfig, binarize: Optional[str]) -> None:
    likelihood = getattr(getattr(model, "cfg", None), "likelihood", None)
    labels = getattr(model, "uses_labels", False)  # pyrovi's conditional models: y are class labels
    nc = getattr(model, "num_classes", None) if labels else None
    data_mod.validate(split.x, name=name, likelihood=likelihood if binarize is None else "bernoulli",
                      y=split.y if labels else None, num_classes=nc)
    inputs.check_targets(split, name)
    obs = getattr(model, "obs_shape", None)
    if obs is not None and tuple(split.x.shape[1:]) != tuple(obs):
        raise DataError(f"{name} items have shape {tuple(split.x.shape[1:])} but the model expects {tuple(obs)}; "
                        "build the model with the data's shape (e.g. VAE(data.shape, ...))")
    if labels and split.y is None:
        raise DataError(f"{type(model).__name__} conditions on labels but {name} has none; pass (x, y)")


def _describe(obj, kind: str) -> dict:
    cfg = getattr(obj, "config", None)
    if callable(cfg):
        try:
            d = cfg()
            if isinstance(d, dict) and "name" in d:
                return d
        except TypeError:
            pass
    return {"name": "user", "type": getattr(obj, "__qualname__", type(obj).__qualname__)}


def _default_guide(model, example: tuple = ()):
    """DiagNormal for pyrovi's models; ``Auto`` (traced on ``example``, a few training rows) for any other."""
    if getattr(model, "latent_sites", None):
        return guides_mod.DiagNormal(model)
    auto = getattr(guides_mod, "Auto", None)
    if auto is None:
        raise ConfigError("guide=None needs a model that declares latent_sites; pass a guide")
    return auto(model, example=example or None)


class _ScalePlate(Messenger):
    """Weight every site inside plate ``name`` by ``factor`` = N / B (minibatch of B rows out of N).

    The same estimator of the whole data set's ELBO that ``pyro.plate(name, N, subsample=idx)``
    gives: local terms scaled up by N/B, global terms (outside the plate) counted once.
    """

    def __init__(self, name: str, factor: float):
        super().__init__()
        self.name = name
        self.factor = factor

    def _process_message(self, msg):
        # The model's plate is entered inside this handler, so it has already added its frame.
        if msg["type"] == "sample" and not site_is_subsample(msg) and \
                any(f.name == self.name for f in msg["cond_indep_stack"]):
            msg["scale"] = self.factor * msg["scale"]


class BatchLoss:
    """The loss ``fit`` minimizes and reports: minus the bound of a whole data set, per datapoint.

    .. math::

        \\ell(x_{1:B}) = -\\frac{1}{N}\\,\\hat{\\mathcal L}(x_{1:N}), \\qquad
        \\hat{\\mathcal L} = \\sum_{\\text{global sites}} (\\cdot)
            + \\frac{N}{B} \\sum_{\\text{sites in the data plate}} (\\cdot)

    in nats per datapoint, where the bound is the objective's (ELBO, IWAE, ...)
    and N is the size of the data set the batch of B rows was drawn from.
    This is Pyro's subsampling estimator (``pyro.plate("data", N,
    subsample=idx)``), so global latents (outside the data plate) get the
    right weight against the likelihood. When every site lies in the data
    plate, N/B is a factor common to all terms and
    :math:`\\ell = -\\mathcal L(x_{1:B}) / B` exactly; the scaling handler
    is then skipped (it costs time at every site).

    Full-data mode (``full=True``, ``fit(batch_size=None)``): the batch is the
    whole data set; pyrovi adds no scaling, the model may subsample itself
    with ``pyro.plate("data", len(x), subsample_size=B)`` (Pyro then scales
    by N/B), and :math:`\\ell = -\\hat{\\mathcal L} / N`.

    Args:
        objective: a :class:`pyrovi.objectives.Objective` (returns -bound, nats).
        model, guide: Pyro callables.
        global_sites: whether model or guide has sample sites outside the data plate.
        data_plate: name of the plate over datapoints.
        full: full-data mode.
        pass_y, model_kwargs: the calling rule of :mod:`pyrovi.inputs`.
    """

    def __init__(self, objective, model, guide, *, global_sites: bool, data_plate: str = "data",
                 full: bool = False, pass_y: bool = False, model_kwargs: Optional[dict] = None):
        self.objective, self.model, self.guide = objective, model, guide
        self.global_sites, self.data_plate, self.full = global_sites, data_plate, full
        self.pass_y, self.model_kwargs = pass_y, dict(model_kwargs or {})

    def __call__(self, x, y=None, n: Optional[int] = None, beta: float = 1.0) -> torch.Tensor:
        """Loss of the batch ``x`` (B rows) drawn from ``n`` rows (default B): a scalar, nats per datapoint."""
        b = x.shape[0]
        n = b if n is None else n
        model, guide = self.model, self.guide
        if beta != 1.0:
            model, guide = _ScaleLatents(beta)(model), _ScaleLatents(beta)(guide)
        scaled = self.global_sites and not self.full and n != b
        if scaled:
            model, guide = _ScalePlate(self.data_plate, n / b)(model), _ScalePlate(self.data_plate, n / b)(guide)
        args = (x, y) if (self.pass_y and y is not None) else (x,)
        loss = self.objective(model, guide, *args, **self.model_kwargs)
        return loss / (n if (scaled or self.full) else b)


def _structure(model, guide, args, kwargs, data_plate: str) -> dict:
    """One trace of guide and model: where the sites lie relative to the data plate.

    Returns ``{"data_plate": bool, "global_sites": bool, "local_latents": [names],
    "subsample_size": int or None}``.
    """
    with poutine.block(), torch.no_grad():
        guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
    info = {"data_plate": False, "global_sites": False, "local_latents": [], "subsample_size": None}
    for tr in (guide_tr, model_tr):
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            frame = next((f for f in site["cond_indep_stack"] if f.name == data_plate), None)
            if frame is None:
                info["global_sites"] = True
                continue
            info["data_plate"] = True
            if frame.full_size is not None and frame.size < frame.full_size:
                info["subsample_size"] = int(frame.size)
            if tr is model_tr and not site["is_observed"] and name not in info["local_latents"]:
                info["local_latents"].append(name)
    return info


def _run_config(model, guide, obj, cfg: TrainConfig, train, val, ds, data_desc: dict, pass_y: bool,
                model_kwargs: dict) -> dict:
    """The JSON form of a run's ``config.json`` (also stored in checkpoints); shared with :mod:`pyrovi.distributed`."""
    config = {
        "pyrovi_version": __version__,
        "model": _describe(model, "model"),
        "guide": _describe(guide, "guide"),
        "objective": obj.config(),
        "train": asdict(cfg),
        "data": {**data_desc, "shape": list(train.x.shape[1:]),
                 "image_shape": list(ds.image_shape) if ds is not None and ds.image_shape else None,
                 "num_classes": ds.num_classes if ds is not None else None,
                 "n_train": len(train), "n_val": len(val),
                 # what load_run needs to call the user's code once (zeros of these shapes)
                 "y_shape": None if train.y is None else list(train.y.shape[1:]),
                 "y_dtype": None if train.y is None else str(train.y.dtype).replace("torch.", ""),
                 "passes_y": bool(pass_y and train.y is not None),
                 "model_kwargs": sorted(model_kwargs)},
    }
    return json.loads(json.dumps(config))  # the JSON form, as config.json and checkpoints store it


# --------------------------------------------------------------------------- checkpoints


def _optim_tensors(opt: torch.optim.Optimizer) -> tuple:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim/{idx}/{k}"] = v
            else:
                scalars[f"{idx}/{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optim_state(tensors: dict, meta: dict, device) -> dict:
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, idx, name = k.split("/", 2)
            state.setdefault(int(idx), {})[name] = v
    for k, v in meta.get("scalars", {}).items():
        idx, name = k.split("/", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _save_checkpoint(path, run, opt, sched, shuffle_gen, loop: dict, best: dict) -> None:
    tensors = run.state_tensors()
    tensors.update({f"best/{k}": v for k, v in best.items()})
    ot, ometa = _optim_tensors(opt)
    tensors.update(ot)
    tensors["rng/torch"] = torch.get_rng_state()
    tensors["rng/shuffle"] = shuffle_gen.get_state()
    if run.device.type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(run.device)
    meta = {
        "pyrovi_version": __version__,
        "constraints": run.param_constraints(),
        "optimizer": ometa,
        "scheduler": sched.state_dict(),
        "history": run.history,
        "loop": loop,
        "config": {k: run.config[k] for k in ("model", "guide", "objective", "train")},
    }
    try:
        save_tensors(path, tensors, meta)
    except OSError as e:  # full disk, directory made read-only, ...: atomic_write kept the previous file
        raise TrainingError(f"could not write the checkpoint {path!r} after epoch {loop['epoch']}: "
                            f"{e.strerror or e}; the previous checkpoint is kept. Free disk space and "
                            "continue with resume=True") from None


def _same(a: dict, b: dict, keys) -> list:
    return [k for k in keys if a.get(k) != b.get(k)]


# --------------------------------------------------------------------------- fit


def fit(
    model,
    guide=None,
    data: Any = "digits",
    *,
    objective: Any = "elbo",
    particles: Optional[int] = None,
    alpha: Optional[float] = None,
    epochs: int = 20,
    batch_size: Optional[int] = 128,
    lr: float = 1e-3,
    seed: int = 0,
    out: Optional[str] = None,
    resume: bool = False,
    overwrite: bool = False,
    patience: Optional[int] = None,
    beta: float = 1.0,
    warmup: int = 0,
    clip_norm: Optional[float] = None,
    lr_schedule: str = "constant",
    weight_decay: float = 0.0,
    val_fraction: float = 0.1,
    device: Any = "auto",
    progress: bool = True,
    figures: bool = True,
    model_kwargs: Optional[dict] = None,
    data_plate: str = "data",
    strategy: Optional[str] = None,
    devices: int = 1,
    num_nodes: int = 1,
    accelerator: str = "auto",
    dtype: Any = None,
) -> Run:
    """Train ``guide`` and ``model`` on ``data`` by maximizing ``objective``.

    Args:
        model: a Pyro model: pyrovi's, your own ``PyroModule``, or a plain
            function using ``pyro.module``/``pyro.param`` (see docs "Bring your
            own Pyro model"). Its parameters are found as SVI finds them and
            trained in a param-store scope of this fit's own.
        guide: a Pyro guide of any of those styles, or one of Pyro's
            autoguides; None picks ``DiagNormal`` for pyrovi's models and
            :class:`pyrovi.guides.Auto` (traced on two training rows) for any other model.
        data: a :class:`pyrovi.data.Dataset` or dataset name (uses its train
            and validation splits; the test split is never touched), a tensor
            or array ``(N, D)``, an ``(x, y)`` pair, or a torch ``Dataset``/``DataLoader``
            (then ``val_fraction`` of it is held out for validation).
            Model and guide are called ``model(x_batch[, y_batch], **model_kwargs)``:
            ``y`` is passed when the model takes a second argument (rule in
            :mod:`pyrovi.inputs`).
        objective: ``"elbo"``, ``"meanfield"``, ``"iwae"``, ``"renyi"``, ``"stl"``,
            ``"dreg"`` (see :mod:`pyrovi.objectives`) or an Objective instance.
        particles: S, vectorized particles per datapoint (objective default if None).
        alpha: Rényi order for ``objective="renyi"``.
        epochs: passes over the training split.
        batch_size: datapoints per optimizer step. ``batch_size=B`` slices B rows per step and
            weights the sites in ``data_plate`` by N/B (:class:`BatchLoss`); ``batch_size=None``
            passes the whole training set every step (full-data mode), for models that subsample
            themselves with ``pyro.plate("data", len(x), subsample_size=B)`` (then an epoch is
            N/B steps) or full-batch training.
        lr: Adam learning rate.
        seed: seeds particles, shuffling and the validation hold-out (not the
            nets' initial weights, which are drawn when they are built).
        patience: early stopping after this many epochs without a better
            validation loss (None: off); the best weights are handed back.
        beta: weight of the latent sites' log-density terms (the KL; beta-VAE when != 1).
        warmup: epochs of linear KL warm-up of beta from 0.
        clip_norm: gradient-norm clipping (None: off).
        lr_schedule: ``"constant"``, ``"cosine"`` or ``"exponential"`` (stepped per epoch).
        weight_decay: Adam weight decay.
        val_fraction: share of raw arrays held out for validation (datasets bring their own split).
        model_kwargs: extra keyword arguments passed to every model and guide call.
        data_plate: name of the model's plate over datapoints (default ``"data"``).
        out: run directory; checkpoints are written there after every epoch.
        resume: continue from ``out/checkpoint.safetensors`` (same trajectory:
            weights, optimizer moments, scheduler, RNG and history restored).
        overwrite: allow replacing an existing run in ``out``.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        progress: show a tqdm progress bar.
        figures: write figures and ``report.md`` into ``out`` at the end.
        strategy: None (one process, the default) or ``"ddp"`` / ``"ddp_spawn"``:
            data-parallel training through PyTorch Lightning (``pip install
            "pyrovi[distributed]"``); see :func:`pyrovi.distributed.fit`.
            ``batch_size`` stays the *global* batch per optimizer step.
        devices: processes per node, with ``strategy`` (world size = devices x num_nodes).
        num_nodes: machines, with ``strategy``.
        accelerator: ``"auto"``, ``"cpu"`` or ``"cuda"``/``"gpu"``, with ``strategy``.
        dtype: ``torch.float64`` (or ``"float64"``) trains model, guide and data in
            double precision; ``torch.float32`` in single; None (default) keeps the
            model's own parameter dtype (``torch.set_default_dtype`` before building
            the model has the same effect). Stored in ``config.json``; ``load_run``
            restores it.

    Returns:
        :class:`pyrovi.run.Run`. Losses in its history are in nats per
        datapoint: minus the bound of the whole split divided by its size
        (global latents' terms counted once per split), loss = -bound.

    Raises:
        ConfigError / DataError: bad arguments or data, before any training.
        TrainingError: a non-finite loss; the last good checkpoint is kept.
    """
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, patience=patience, beta=beta,
                      warmup=warmup, clip_norm=clip_norm, lr_schedule=lr_schedule, weight_decay=weight_decay,
                      val_fraction=val_fraction, data_plate=data_plate, dtype=_dtype_name(dtype))
    cfg.validate()
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise ConfigError(f"out must be a directory path (str), got {type(out).__name__} {out!r}")
    for flag, value in (("resume", resume), ("overwrite", overwrite)):
        if not isinstance(value, bool):
            raise ConfigError(f"{flag} must be True or False, got {value!r}")
    model_kwargs = inputs.check_model_kwargs(model_kwargs)
    if strategy is not None or devices != 1 or num_nodes != 1 or accelerator != "auto":
        from . import distributed  # imports Lightning only when it trains

        distributed.check_options(strategy, devices, num_nodes, accelerator)
        if cfg.dtype is not None:
            raise ConfigError("dtype= is not supported with a distributed strategy yet; build the model in the "
                              "precision you want (torch.set_default_dtype) instead")
        return distributed.fit(
            model, guide, data, objective=objective, particles=particles, alpha=alpha, epochs=epochs,
            batch_size=batch_size, lr=lr, seed=seed, out=out, resume=resume, overwrite=overwrite, patience=patience,
            beta=beta, warmup=warmup, clip_norm=clip_norm, lr_schedule=lr_schedule, weight_decay=weight_decay,
            val_fraction=val_fraction, device=device, progress=progress, figures=figures, strategy=strategy,
            devices=devices, num_nodes=num_nodes, accelerator=accelerator, model_kwargs=model_kwargs,
            data_plate=data_plate)
    if not callable(model):
        raise ConfigError(f"model must be a Pyro model (a callable), got {type(model).__name__}")
    obj = objectives_mod.get(objective, particles=particles, alpha=alpha)
    dev = resolve_device(device)
    train, val, ds, data_desc = _resolve_data(data, cfg)
    binarize = ds.binarize if ds is not None else None
    _check_data(model, train, "training data", cfg, binarize)
    _check_data(model, val, "validation data", cfg, binarize)
    if guide is None:
        guide = _default_guide(model, inputs.call_args(model, train.x[:2], None if train.y is None else train.y[:2],
                                                       model_kwargs)[0])
    if not callable(guide):
        raise ConfigError(f"guide must be a Pyro guide (a callable), got {type(guide).__name__}")
    if cfg.batch_size is not None and cfg.batch_size > len(train):
        raise ConfigError(f"batch_size={cfg.batch_size} is larger than the {len(train)} training rows; "
                          f"use batch_size <= {len(train)}")

    # Precision: the one asked for, else the model's own (e.g. after torch.set_default_dtype(torch.float64)).
    dt = lookup(DTYPES, cfg.dtype, "dtype") if cfg.dtype else _module_dtype(model, guide)
    if dt not in DTYPES.values():
        raise ConfigError(f"model/guide parameters are {dt}; pass dtype=torch.float32 or dtype=torch.float64")
    cfg.dtype = str(dt).replace("torch.", "")
    ckpt_path = None
    if out is not None:
        out = os.fspath(out)
        ckpt_path = os.path.join(out, CHECKPOINT)
        _prepare_out(out, resume, overwrite)

    for m in (model, guide):
        if isinstance(m, torch.nn.Module):
            m.to(dev, dt)
    train = data_mod.Split(train.x.to(dev, dt), None if train.y is None else train.y.to(dev))
    val = data_mod.Split(val.x.to(dev, dt), None if val.y is None else val.y.to(dev))
    if binarize == "dynamic":  # validation is scored on one fixed binarization
        g = torch.Generator().manual_seed(cfg.seed + 2)
        val = data_mod.Split((torch.rand(val.x.shape, generator=g).to(dev) < val.x).to(dt), val.y)

    pass_y = inputs.takes_y(model)
    config = _run_config(model, guide, obj, cfg, train, val, ds, data_desc, pass_y, model_kwargs)
    run = Run(model, guide, obj, config, directory=out, param_state=empty_param_state(), device=dev, data=ds,
              model_kwargs=model_kwargs)

    pyro.set_rng_seed(cfg.seed)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)
    with run.scope():
        rows = len(train) if cfg.batch_size is None else min(cfg.batch_size, len(train))
        probe, kw = run.call_args(train.x[:rows], None if train.y is None else train.y[:rows])
        with default_device(dev):  # pyro.param inits and lazy autoguide params land on `dev`
            obj.max_plate_nesting = guess_max_plate_nesting(model, guide, probe, kw)
            shape = _structure(model, guide, probe, kw, cfg.data_plate)
            params = discover_params(model, guide, lambda: obj(model, guide, *probe, **kw))
        if not params:
            raise ConfigError("found no trainable parameters in model or guide")
        _check_structure(shape, guide, cfg, len(train))
        loss_fn = BatchLoss(obj, model, guide, global_sites=shape["global_sites"], data_plate=cfg.data_plate,
                            full=cfg.batch_size is None, pass_y=run.pass_y, model_kwargs=model_kwargs)
        steps = math.ceil(len(train) / (cfg.batch_size or shape["subsample_size"] or len(train)))
        opt = adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = _scheduler(opt, cfg)
        loop = {"epoch": 0, "step": 0, "best": math.inf, "best_epoch": 0, "bad_epochs": 0, "seconds": 0.0}
        if resume and ckpt_path and os.path.isfile(ckpt_path):
            loop = _restore(ckpt_path, run, opt, sched, shuffle_gen, config, dev)
        if out is not None:
            write_json(os.path.join(out, CONFIG), config)
        best = {}  # best-validation weights, kept when early stopping is on
        if resume and ckpt_path and os.path.isfile(ckpt_path) and cfg.patience is not None:
            best = _best_from_checkpoint(ckpt_path, dev)
        _train_loop(run, loss_fn, steps, train, val, cfg, opt, sched, shuffle_gen, loop, ckpt_path, binarize,
                    progress, best)
        if best and loop["best_epoch"] != loop["epoch"]:
            run.load_state_tensors(best, {})  # early stopping hands back the best-validation weights
    run.metrics = finish(run, loop, steps=loop["step"])
    if out is not None:
        run.save(out)
        if figures:
            from .report import write_training_report

            write_training_report(run)
    return run


def _prepare_out(out: str, resume: bool, overwrite: bool) -> None:
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create run directory out={out!r}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise ConfigError(f"run directory out={out!r} is not writable; choose another out=")
    probe = os.path.join(out, ".pyrovi-write-test")
    try:
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.unlink(probe)
    except OSError as e:
        try:
            os.unlink(probe)
        except OSError:
            pass
        raise ConfigError(f"cannot write into out={out!r}: {e.strerror}; free disk space or choose another out=") from None
    if resume or overwrite:  # half-written temp files of a killed process (atomic_write's prefix) are garbage
        for name in os.listdir(out):
            if name.startswith(".tmp-"):
                try:
                    os.unlink(os.path.join(out, name))
                except OSError:
                    pass
    ckpt = os.path.join(out, CHECKPOINT)
    if os.path.isfile(ckpt) and not (resume or overwrite):
        raise ConfigError(f"{out!r} already holds a run; pass resume=True to continue it or overwrite=True "
                          "to replace it (or choose another out=)")


def adam(params, *, lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """The optimizer ``fit`` (and the distributed loop) use: torch's Adam, with its fused kernel.

    Same update rule as ``torch.optim.Adam``'s default implementation (up to float
    rounding); on CPU torch's default is a Python loop over parameters, which took
    1.6 ms of a 3.8 ms VAE step against 0.4 ms fused (``benchmarks/RESULTS.md``).
    Falls back to the default where no fused kernel exists for the parameters' device.
    """
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _scheduler(opt, cfg: TrainConfig):
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.lr_schedule == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.01 ** (1.0 / cfg.epochs))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)


def _restore(path, run, opt, sched, shuffle_gen, config, dev) -> dict:
    try:
        return _restore_unchecked(path, run, opt, sched, shuffle_gen, config, dev)
    except PyroviError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
        # a checkpoint is written by pyrovi whole or not at all; one that parses but lacks
        # pieces was edited or crafted
        raise CheckpointError(f"checkpoint {path!r} is incomplete or malformed ({type(e).__name__}: "
                              f"{str(e)[:120]}); start again with overwrite=True") from None


def _restore_unchecked(path, run, opt, sched, shuffle_gen, config, dev) -> dict:
    tensors, meta = load_tensors(path, "cpu")
    diff = _same(meta.get("config", {}), config, ("model", "guide", "objective"))
    if diff:
        raise CheckpointError(f"the checkpoint in {os.path.dirname(path)!r} was trained with a different {diff}; "
                              "use the same settings to resume, or overwrite=True to start again")
    run.load_state_tensors({k: v.to(dev) for k, v in tensors.items()
                            if k.split("/")[0] in ("model", "guide", "param")}, meta.get("constraints", {}))
    try:
        opt.load_state_dict(_optim_state({k: v.to(dev) for k, v in tensors.items()}, meta["optimizer"], dev))
        sched.load_state_dict(meta["scheduler"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"optimizer state in {path} does not fit this model/guide: {e}") from None
    torch.set_rng_state(tensors["rng/torch"])
    shuffle_gen.set_state(tensors["rng/shuffle"])
    if "rng/cuda" in tensors and run.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng/cuda"], run.device)
    run.history = list(meta.get("history", []))
    loop = dict(meta["loop"])
    ints = all(isinstance(loop.get(k), int) and loop[k] >= 0 for k in ("epoch", "step", "best_epoch", "bad_epochs"))
    nums = all(isinstance(loop.get(k), (int, float)) for k in ("best", "seconds"))
    if not (ints and nums and all(isinstance(h, dict) for h in run.history)):
        raise CheckpointError(f"checkpoint {path!r} has a malformed training state; start again with overwrite=True")
    return loop


def _best_from_checkpoint(path, dev) -> dict:
    tensors, _ = load_tensors(path, dev)
    return {k[len("best/"):]: v for k, v in tensors.items() if k.startswith("best/")}


def train_step(loss_fn, optimizer, x: torch.Tensor, y: Optional[torch.Tensor] = None, n: Optional[int] = None,
               *, beta: float = 1.0, clip_norm: Optional[float] = None, params: Optional[list] = None) -> float:
    """One gradient step of ``loss_fn`` (a :class:`BatchLoss`) on the batch ``x`` (``y``) drawn from ``n`` rows.

    Returns the batch's loss in nats per datapoint, before the update. A
    non-finite loss is returned without touching the parameters, so the caller
    can stop cleanly.
    """
    loss = loss_fn(x, y, n, beta)
    value = loss.item()
    if not math.isfinite(value):
        return value
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(params or [p for grp in optimizer.param_groups for p in grp["params"]],
                                       clip_norm)
    optimizer.step()
    return value


def batch_step(loss_fn, opt, train, idx: torch.Tensor, n: int, cfg: TrainConfig, loop: dict, warm_steps: int,
               binarize: Optional[str], params: list, ckpt_path: Optional[str], where: str = "") -> tuple:
    """One optimizer step on rows ``idx`` of ``train``: ``(loss in nats/datapoint, beta used, rows)``.

    Shared by the single-process and the distributed loop: dynamic binarization,
    the KL warm-up's beta for this step, and a clear stop on a non-finite loss.
    """
    xb = train.x[idx]
    if binarize == "dynamic":
        xb = torch.bernoulli(xb)
    yb = None if train.y is None else train.y[idx]
    beta = cfg.beta * (min(1.0, (loop["step"] + 1) / warm_steps) if warm_steps else 1.0)
    loss = train_step(loss_fn, opt, xb, yb, n, beta=beta, clip_norm=cfg.clip_norm, params=params)
    if not math.isfinite(loss):
        raise TrainingError(
            f"loss became {loss} at epoch {loop['epoch'] + 1}, step {loop['step'] + 1}{where}; "
            f"training stopped. The last good checkpoint (epoch {loop['epoch']}) is kept"
            f"{' in ' + repr(ckpt_path) if ckpt_path else ''}. Try a lower lr, clip_norm, or check the data.")
    return loss, beta, xb.shape[0]


def finish(run, loop: dict, **extra) -> dict:
    """Put model and guide in eval mode; the ``metrics.json`` of a finished fit (losses in nats/datapoint)."""
    for m in (run.model, run.guide):
        if isinstance(m, torch.nn.Module):
            m.eval()
    last = run.history[-1] if run.history else {}
    return {
        "epochs": loop["epoch"],
        "best_epoch": loop["best_epoch"],
        "train_loss": last.get("train_loss"),
        "val_loss": loop["best"] if math.isfinite(loop["best"]) else None,
        "train_seconds": loop["seconds"],
        **extra,
        "units": "nats per datapoint; loss = -bound",
    }


def record_epoch(run, loop: dict, cfg: TrainConfig, best: dict, *, train_loss: float, val_loss: float, lr: float,
                 beta: float, secs: float, seen: float) -> None:
    """End-of-epoch bookkeeping shared by the single-process and the distributed loop.

    Refuses a non-finite validation loss (the last checkpoint stays), appends the
    history row, and tracks the best epoch; with early stopping on, ``best`` keeps
    a copy of the best-validation weights.
    """
    if not math.isfinite(val_loss):
        raise TrainingError(f"validation loss is {val_loss} after epoch {loop['epoch'] + 1}; the last good "
                            f"checkpoint (epoch {loop['epoch']}) is kept")
    loop["epoch"] += 1
    loop["seconds"] += secs
    run.history.append({"epoch": loop["epoch"], "train_loss": train_loss, "val_loss": val_loss, "lr": lr,
                        "beta": beta, "seconds": secs, "items_per_second": seen / secs})
    if val_loss < loop["best"]:
        loop.update(best=val_loss, best_epoch=loop["epoch"], bad_epochs=0)
        if cfg.patience is not None:
            best.clear()
            best.update({k: v.detach().clone() for k, v in run.state_tensors().items()})
    else:
        loop["bad_epochs"] += 1


def _train_loop(run, loss_fn, steps_per_epoch, train, val, cfg, opt, sched, shuffle_gen, loop, ckpt_path,
                binarize, progress, best) -> None:
    model, guide, obj = run.model, run.guide, run.objective
    n = len(train)
    full = cfg.batch_size is None
    bsz = n if full else cfg.batch_size
    warm_steps = cfg.warmup * steps_per_epoch
    params = [p for g in opt.param_groups for p in g["params"]]
    bar = tqdm(total=cfg.epochs, initial=loop["epoch"], disable=not progress, unit="epoch", dynamic_ncols=True,
               desc=f"{obj.name}")
    try:
        while loop["epoch"] < cfg.epochs:
            t0 = time.perf_counter()
            for m in (model, guide):
                if isinstance(m, torch.nn.Module):
                    m.train()
            perm = torch.randperm(n, generator=shuffle_gen).to(train.x.device)
            total, seen = 0.0, 0
            for i in range(steps_per_epoch):
                idx = perm if full else perm[i * bsz:(i + 1) * bsz]
                loss, beta, rows = batch_step(loss_fn, opt, train, idx, n, cfg, loop, warm_steps, binarize, params,
                                              ckpt_path)
                b = n / steps_per_epoch if full else rows  # datapoints one step stands for
                total += loss * b
                seen += b
                loop["step"] += 1
            lr_now = opt.param_groups[0]["lr"]
            sched.step()
            val_loss = _mean_loss(loss_fn, val, None if full else max(cfg.batch_size, 256))
            secs = time.perf_counter() - t0
            record_epoch(run, loop, cfg, best, train_loss=total / seen, val_loss=val_loss, lr=lr_now, beta=beta,
                         secs=secs, seen=seen)
            if ckpt_path:
                _save_checkpoint(ckpt_path, run, opt, sched, shuffle_gen, loop, best)
            bar.set_postfix(loss=f"{total / seen:.3f}", val=f"{val_loss:.3f}", it_s=f"{seen / secs:.0f}")
            bar.update(1)
            if cfg.patience is not None and loop["bad_epochs"] >= cfg.patience:
                bar.write(f"early stopping after epoch {loop['epoch']}: no validation improvement for "
                          f"{cfg.patience} epochs (best {loop['best']:.4f} at epoch {loop['best_epoch']})")
                break
    except KeyboardInterrupt:
        bar.write(f"interrupted; the checkpoint of epoch {loop['epoch']} is kept"
                  f"{' in ' + repr(ckpt_path) + ' (continue with resume=True)' if ckpt_path else ''}",
                  file=sys.stderr)
        raise
    finally:
        bar.close()


@torch.no_grad()
def _mean_loss(loss_fn: BatchLoss, split, batch_size: Optional[int]) -> float:
    """Loss per datapoint on a whole split (chunks of ``batch_size`` rows, None = one pass), no gradients.

    Each chunk's loss estimates the split's per-datapoint loss (sites in the data plate scaled
    by n/b); the chunks are averaged with weights b/n, so global terms count once per split.
    """
    for m in (loss_fn.model, loss_fn.guide):
        if isinstance(m, torch.nn.Module):
            m.eval()
    n = len(split)
    if batch_size is None:
        return float(loss_fn(split.x, split.y, n))
    total = 0.0
    for i in range(0, n, batch_size):
        xb = split.x[i:i + batch_size]
        yb = None if split.y is None else split.y[i:i + batch_size]
        total += float(loss_fn(xb, yb, n)) * xb.shape[0]
    return total / n


def _check_structure(shape: dict, guide, cfg: TrainConfig, n: int) -> None:
    """Refuse set-ups that would silently train or validate the wrong objective."""
    from pyro.infer.autoguide import AutoGuide, AutoGuideList

    if isinstance(guide, AutoGuide) and not isinstance(guide, AutoGuideList) and shape["local_latents"]:
        raise ConfigError(
            f"{type(guide).__name__} keeps one set of parameters per training datapoint for the local latent(s) "
            f"{shape['local_latents']} (inside plate {cfg.data_plate!r}): it cannot be lined up with shuffled "
            "minibatches nor scored on held-out rows, which fit validates on every epoch. Use an amortized "
            "guide for the local latents (pyrovi.guides, or an encoder registered with pyro.module) and keep "
            "the autoguide for the global latents (e.g. AutoNormal(poutine.block(model, hide=[...])) in an "
            "AutoGuideList)")
    if cfg.batch_size is None or cfg.batch_size >= n:
        return
    if not shape["data_plate"]:
        raise ConfigError(
            f"fit(batch_size={cfg.batch_size}) trains on minibatches and weights the per-datapoint terms by N/B, "
            f"but the model has no plate named {cfg.data_plate!r}. Put the per-datapoint sites inside "
            f"pyro.plate({cfg.data_plate!r}, len(x)), name your plate with data_plate=..., or pass "
            "batch_size=None to give the model the whole data set every step")
