"""``fit``: train a Pyro model and guide with an objective, checkpointing as it goes.

The loss is the objective called on (model, guide, batch), divided by the
batch size (nats per datapoint), minimized with a plain ``torch.optim``
optimizer over the parameters found the way Pyro's SVI finds them. Each fit
runs in its own Pyro param-store scope, so the global store neither leaks
into it nor is clobbered by it.

This module is an entry point, like the CLI: it holds the options
(:class:`TrainConfig`) and their validation, resolves data, guide and precision
once, runs the one loop of :mod:`pyrovi.loop` in this process or, with
``strategy=``, on every rank that :func:`pyrovi.distributed.launch` starts, and
finally has :func:`pyrovi.report.write` draw the report from the run directory.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import pyro
import torch

from . import budget
from . import data as data_mod
from . import guides as guides_mod
from . import inputs
from . import loggers
from . import objectives as objectives_mod
from ._version import __version__
from .callbacks import check_callbacks
from .errors import ConfigError, DataError, SeedWarning, check_positive, check_seed, lookup
from .loop import BatchLoss, World, train, train_step
from .precision import canonical_compile, canonical_precision
from .progress import TrainingBar
from .run import Run, resolve_device
from .run_files import RUN_DTYPES
from .train_state import adam, check_optimizer_kwargs, optimizer_class

__all__ = ["fit", "train_step", "TrainConfig", "LR_SCHEDULES", "BatchLoss", "DTYPES", "adam"]

LR_SCHEDULES = ("constant", "cosine", "exponential")
#: floating-point precisions fit trains in (``dtype=``)
DTYPES = RUN_DTYPES  # the one table: config.json names these, load_run reads them back


@dataclass
class TrainConfig:
    """Training options of :func:`fit` (stored under ``"train"`` in ``config.json``)."""

    epochs: int = 20  # passes over the training split
    batch_size: Optional[int] = 128  # datapoints per step; None = the whole training set every step
    lr: float = 1e-3  # the optimizer's learning rate
    seed: int = 0  # seeds parameters' draws, particles, shuffling
    patience: Optional[int] = None  # early stopping: epochs without val improvement; None = off
    beta: float = 1.0  # weight of the latent (KL) terms; beta-VAE when != 1
    warmup: int = 0  # epochs of linear KL warm-up of beta from 0
    clip_norm: Optional[float] = None  # gradient-norm clipping; None = off
    lr_schedule: str = "constant"  # "constant" | "cosine" | "exponential" (per epoch)
    weight_decay: float = 0.0
    val_fraction: float = 0.1  # held out of raw arrays that come without a validation split; 0 = none
    data_plate: str = "data"  # name of the model's plate over datapoints (minibatch scaling N/B)
    dtype: Optional[str] = None  # "float32" | "float64"; None: the model's own parameter dtype
    precision: Optional[str] = None  # None | "tf32" | "bf16" | "16-mixed" (pyrovi.precision); weights stay float32
    compile: Optional[str] = None  # None (off) or a torch.compile mode for the model's and guide's nets
    val_every: int = 1  # validate after every N-th epoch and the last; others' val_loss is None (empty in CSV)
    optimizer: str = "adam"  # a name of pyrovi.train_state.OPTIMIZERS, or the dotted path of a user's class
    optimizer_kwargs: Optional[dict] = None  # its keyword arguments besides lr and weight_decay (e.g. betas)
    semi_supervised: bool = False  # y marks missing labels (-1 / NaN rows): those rows call model(x) without y
    extra_loss: Optional[str] = None  # name of the extra loss callable added in training (recorded, not called)

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
        # names are case-insensitive; store the canonical one (the scheduler compares it exactly)
        self.lr_schedule = lookup({s: s for s in LR_SCHEDULES}, self.lr_schedule, "lr_schedule")
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        if not (isinstance(self.val_fraction, (int, float)) and not isinstance(self.val_fraction, bool)
                and 0 <= self.val_fraction < 1):
            raise ConfigError(f"val_fraction must be in [0, 1) (0: no validation split), got {self.val_fraction!r}")
        if not isinstance(self.data_plate, str) or not self.data_plate:
            raise ConfigError(f"data_plate must be the name of the model's plate over datapoints, "
                              f"got {self.data_plate!r}")
        if self.dtype is not None:
            self.dtype = str(lookup(DTYPES, self.dtype, "dtype")).replace("torch.", "")
        self.precision = canonical_precision(self.precision)
        self.compile = canonical_compile(self.compile)
        if self.precision in ("bf16", "16-mixed") and self.dtype == "float64":
            raise ConfigError(f"precision={self.precision!r} (mixed precision) and dtype='float64' exclude each "
                              "other; drop one of them")
        check_positive("val_every", self.val_every, integer=True)
        if not isinstance(self.semi_supervised, bool):
            raise ConfigError(f"semi_supervised must be True or False, got {self.semi_supervised!r}")


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


def _check_data(model, split: data_mod.Split, name: str, cfg: TrainConfig, binarize: Optional[str]) -> None:
    likelihood = getattr(getattr(model, "cfg", None), "likelihood", None)
    labels = getattr(model, "uses_labels", False)  # pyrovi's conditional models: y are class labels
    nc = getattr(model, "num_classes", None) if labels else None
    data_mod.validate(split.x, name=name, likelihood=likelihood if binarize is None else "bernoulli",
                      y=split.y if labels else None, num_classes=nc)
    inputs.check_targets(split, name, cfg.semi_supervised)
    obs = getattr(model, "obs_shape", None)
    if obs is not None and tuple(split.x.shape[1:]) != tuple(obs):
        raise DataError(f"{name} items have shape {tuple(split.x.shape[1:])} but the model expects {tuple(obs)}; "
                        "build the model with the data's shape (e.g. VAE(data.shape, ...))")
    if labels and split.y is None:
        raise DataError(f"{type(model).__name__} conditions on labels but {name} has none; pass (x, y)")


def _callable_name(fn, what: str) -> Optional[str]:
    """The name ``config.json`` records for a user callable (None stays None); not callable -> ConfigError."""
    if fn is None:
        return None
    if not callable(fn):
        raise ConfigError(f"{what} must be a callable returning a scalar loss tensor (nats), got {type(fn).__name__}")
    return getattr(fn, "__qualname__", type(fn).__qualname__)


def _check_semi_supervised(model, train) -> None:
    """Semi-supervised data needs a model called both as ``model(x, y)`` and ``model(x)``."""
    if isinstance(getattr(model, "uses_labels", None), bool):
        raise ConfigError(f"semi_supervised=True needs a model that infers missing labels, called as model(x) for "
                          f"them; pyrovi's {type(model).__name__} needs y for every row")
    if not inputs.takes_y(model):
        raise ConfigError("semi_supervised=True calls the model as model(x, y) for labelled rows and model(x) for "
                          "the rest; this model takes no y (write it as def model(x, y=None))")


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
    """The guide ``guide=None`` stands for: a pyrovi model's ``default_guide`` (a guide name; ``diag_normal`` when it
    names none), or ``Auto`` traced on ``example`` (a few training rows) for any other model."""
    if getattr(model, "latent_sites", None):
        return guides_mod.build(model, getattr(model, "default_guide", None) or "diag_normal")
    return guides_mod.Auto(model, example=example or None)


def _warn_unseeded(seed: int, model, guide) -> None:
    """Warn (:class:`~pyrovi.errors.SeedWarning`) when ``fit(seed=seed)`` gets nets built outside that seed.

    Modules handed to ``fit`` already hold weights, drawn when they were built. ``fit``
    keeps them (it never re-draws weights: they may be pretrained, loaded from a run,
    or initialised by the user's own scheme, none of which a re-initialisation could
    reproduce), so ``seed=`` cannot make them reproducible. torch records the last seed
    given to its generator (``torch.initial_seed()``): when that is ``seed``, the nets
    were built after ``pyro.set_rng_seed(seed)``/``torch.manual_seed(seed)``, as the docs
    recommend, and there is nothing to say.
    """
    built = [type(m).__name__ for m in (model, guide)
             if isinstance(m, torch.nn.Module) and next(iter(m.parameters()), None) is not None]
    if built and torch.initial_seed() != seed:
        warnings.warn(
            f"fit(seed={seed}) seeds particles, shuffling, pyro.param initial values and the nets fit builds "
            f"itself (guide=None, a guide built without example=), not the weights of {' and '.join(built)}, "
            f"which were drawn when built (torch's generator was last seeded with {torch.initial_seed()}). "
            f"For identical runs call pyro.set_rng_seed({seed}) before building them", SeedWarning, stacklevel=3)


def _run_config(model, guide, obj, cfg: TrainConfig, train, val, ds, data_desc: dict, pass_y: bool,
                model_kwargs: dict) -> dict:
    """The JSON form of a run's ``config.json`` (also stored in checkpoints)."""
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


# --------------------------------------------------------------------------- fit


def fit(
    model,
    guide=None,
    data: Any = "digits",
    *,
    objective: Any = "elbo",
    particles: Optional[int] = None,
    alpha: Optional[float] = None,
    vectorize: Optional[bool] = None,
    epochs: int = 20,
    batch_size: Optional[int] = 128,
    lr: float = 1e-3,
    seed: Optional[int] = None,
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
    precision: Optional[str] = None,
    compile: Any = None,
    val_every: int = 1,
    callbacks: Optional[list] = None,
    logger: Any = None,
    semi_supervised: bool = False,
    extra_loss: Optional[Any] = None,
    optimizer: Any = "adam",
    optimizer_kwargs: Optional[dict] = None,
) -> Run:
    """Train ``guide`` and ``model`` on ``data`` by maximizing ``objective``.

    Args:
        model: a Pyro model: pyrovi's, your own ``PyroModule``, or a plain
            function using ``pyro.module``/``pyro.param`` (see docs "Bring your
            own Pyro model"). Its parameters are found as SVI finds them and
            trained in a param-store scope of this fit's own.
        guide: a Pyro guide of any of those styles, or one of Pyro's
            autoguides; None picks the model's ``default_guide`` for pyrovi's models
            (``DiagNormal``; ``Delta`` for the autoencoder, ``Codebook`` for the VQ-VAE)
            and :class:`pyrovi.guides.Auto` (traced on two training rows) for any other model.
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
        vectorize: draw the particles in one vectorized plate (True), one at a time (False: for models that
            cannot take a leading particle dim, see :mod:`pyrovi.particles`), or None: probe once on Pyro's
            traced path and loop, warning in one line, when the model cannot be vectorized.
        epochs: passes over the training split.
        batch_size: datapoints per optimizer step. ``batch_size=B`` slices B rows per step and
            weights the sites in ``data_plate`` by N/B (:class:`BatchLoss`); ``batch_size=None``
            passes the whole training set every step (full-data mode), for models that subsample
            themselves with ``pyro.plate("data", len(x), subsample_size=B)`` (then an epoch is
            N/B steps) or full-batch training.
        lr: the optimizer's learning rate.
        seed: seeds particles, shuffling, the validation hold-out and every weight
            ``fit`` draws itself: ``pyro.param`` initial values, a default guide
            (``guide=None``) and a guide built without ``example=`` (set up on the first
            rows here). Modules handed in already built keep their weights: ``fit`` never
            re-draws them (they may be pretrained, loaded, or initialised by your own
            scheme), so for identical runs build them after ``pyro.set_rng_seed(seed)``;
            when a seed is given and they were not (``torch.initial_seed() != seed``),
            a :class:`~pyrovi.errors.SeedWarning` says so. None (default): seed 0, no warning.
        patience: early stopping after this many epochs without a better
            validation loss (None: off); the best weights are handed back.
        beta: weight of the latent sites' log-density terms (the KL; beta-VAE when != 1).
        warmup: epochs of linear KL warm-up of beta from 0.
        clip_norm: gradient-norm clipping (None: off).
        lr_schedule: ``"constant"``, ``"cosine"`` or ``"exponential"`` (stepped per epoch).
        weight_decay: the optimizer's weight decay (L2 for Adam, decoupled for AdamW).
        optimizer: ``"adam"`` (default: torch's Adam, fused kernel), ``"adamw"``, ``"sgd"``,
            ``"rmsprop"``, ``"adagrad"``, ``"clippedadam"`` (Pyro's ClippedAdam), case-insensitive,
            or any ``torch.optim.Optimizer`` subclass (e.g. ``torch.optim.SGD``). Recorded in
            ``config.json`` (a class outside the list by its dotted path); resume must use the same.
        optimizer_kwargs: its keyword arguments besides ``lr``/``weight_decay``, e.g.
            ``{"betas": [0.9, 0.99]}`` or ``{"momentum": 0.9}`` (numbers, strings, lists: recorded as JSON).
        semi_supervised: ``data`` is ``(x, y)`` with some labels missing, marked ``y = -1`` (integer
            labels) or a row of NaN (one-hot or real ``y``). Each batch's labelled rows are one call
            ``model(x_l, y_l)``, its other rows one call ``model(x_u)`` (y=None: the model and guide
            infer y), as in Pyro's SS-VAE. Needs a model ``def model(x, y=None)`` with every sample
            site in the data plate.
        extra_loss: a callable ``extra_loss(x, y, **model_kwargs) -> scalar tensor`` (nats, summed over
            its rows) added to the training loss of every batch, divided by the batch size like the
            bound's terms; called on the labelled rows (semi-supervised) or all rows. E.g. the M2
            auxiliary classifier loss ``-alpha * log q(y|x)``. Trains only: the validation loss is the
            bound alone. Recorded by name; pass the same callable to resume.
        val_fraction: share of raw arrays held out for validation (datasets bring their own split).
            ``0``: no validation split (a small Bayesian data set keeps every row); early stopping
            and the best epoch then use the epoch's training loss, which the history records as
            ``val_loss`` too (``metrics.json`` says ``"val_loss_is": "train_loss"``).
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
            "pyrovi[distributed]"``); the same loop on every rank
            (:mod:`pyrovi.distributed`); ``batch_size`` stays the *global* batch per
            optimizer step and must be a multiple of devices x num_nodes. Every
            option of this function behaves the same under it.
        devices: processes per node, with ``strategy`` (world size = devices x num_nodes).
        num_nodes: machines, with ``strategy``.
        accelerator: ``"auto"``, ``"cpu"`` or ``"cuda"``/``"gpu"``, with ``strategy``.
        dtype: ``torch.float64`` (or ``"float64"``) trains model, guide and data in
            double precision; ``torch.float32`` in single; None (default) keeps the
            model's own parameter dtype (``torch.set_default_dtype`` before building
            the model has the same effect). Stored in ``config.json``; ``load_run``
            restores it.
        precision: None (float32 throughout, the default), ``"tf32"`` (TF32 matmuls on
            CUDA), ``"bf16"`` or ``"16-mixed"``: the nets run under ``torch.autocast`` while the
            loss, log q, the likelihood and the prior stay float32, and the weights float32
            (:mod:`pyrovi.precision`).
        compile: True or a ``torch.compile`` mode compiles the model's and guide's nets in place
            (the first steps are slow while it compiles); None/False (default): eager.
        val_every: validate after every N-th epoch (and always after the last); the other
            epochs' ``val_loss`` is None in ``run.history`` (an empty cell in ``history.csv``).
            Early stopping's ``patience`` then counts validations, not epochs. May change on resume.
        callbacks: :class:`pyrovi.callbacks.Callback` objects the loop calls on rank 0
            (on_train_begin, on_step_end, on_epoch_end, on_checkpoint, on_train_end).
        logger: ``"csv"`` (history.csv, always written), ``"tensorboard"`` (scalars per step
            and per epoch into ``out/tensorboard``, :class:`pyrovi.loggers.TensorBoard`;
            ``pip install "pyrovi[tensorboard]"``), or a list of these names.

    Returns:
        :class:`pyrovi.run.Run`. Losses in its history are in nats per
        datapoint: minus the bound of the whole split divided by its size
        (global latents' terms counted once per split), loss = -bound.

    Raises:
        ConfigError / DataError: bad arguments or data, before any training.
        TrainingError: a non-finite loss, a diverging one (a step's loss more than
            ``max(1e3, 100*|best|)`` nats per datapoint above the best so far, see
            :func:`pyrovi.loop.diverged`) or non-finite optimizer state after an epoch;
            it names the epoch and step, and the last good checkpoint is kept.
    """
    seed_given = seed is not None
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=0 if seed is None else seed,
                      patience=patience, beta=beta,
                      warmup=warmup, clip_norm=clip_norm, lr_schedule=lr_schedule, weight_decay=weight_decay,
                      val_fraction=val_fraction, data_plate=data_plate, dtype=_dtype_name(dtype),
                      val_every=val_every, semi_supervised=semi_supervised,
                      extra_loss=_callable_name(extra_loss, "extra_loss"), precision=precision, compile=compile)
    cfg.validate()
    cfg.optimizer, opt_cls = optimizer_class(optimizer)
    cfg.optimizer_kwargs = check_optimizer_kwargs(opt_cls, optimizer_kwargs, lr=cfg.lr,
                                                  weight_decay=cfg.weight_decay) or None
    hooks = check_callbacks(callbacks) + loggers.resolve(logger, out)  # the bar and loggers are callbacks too
    if progress:
        hooks.append(TrainingBar())
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise ConfigError(f"out must be a directory path (str), got {type(out).__name__} {out!r}")
    for flag, value in (("resume", resume), ("overwrite", overwrite)):
        if not isinstance(value, bool):
            raise ConfigError(f"{flag} must be True or False, got {value!r}")
    model_kwargs = inputs.check_model_kwargs(model_kwargs)
    distributed = strategy is not None or devices != 1 or num_nodes != 1 or accelerator != "auto"
    if distributed:
        from . import distributed as dist_mod  # imports Lightning only when it launches

        dist_mod.check_options(strategy, devices, num_nodes, accelerator, cfg.batch_size)
    if not callable(model):
        raise ConfigError(f"model must be a Pyro model (a callable), got {type(model).__name__}")
    obj = objectives_mod.get(objective, particles=particles, alpha=alpha)
    train_, val, ds, data_desc = inputs.training_data(data, seed=cfg.seed, val_fraction=cfg.val_fraction,
                                                         semi_supervised=cfg.semi_supervised)
    binarize = ds.binarize if ds is not None else None
    _check_data(model, train_, "training data", cfg, binarize)
    if len(val):  # val_fraction=0: no validation split
        _check_data(model, val, "validation data", cfg, binarize)
    if cfg.semi_supervised:
        _check_semi_supervised(model, train_)
    S = getattr(obj, "particles", None) or 1
    budget.check_rows(f"particles={S}", S * min(cfg.batch_size or len(train_), len(train_)),
                      max(train_.x[0].numel(), budget.widest(model, guide)), "use fewer particles or a smaller "
                      "batch_size", what="a layer's activations for every particle of a batch")
    # semi-supervised: the example call (Auto's tracing, guide set-up) is an unlabelled one, model(x)
    ex_y = None if train_.y is None or cfg.semi_supervised else train_.y[:2]
    example, _ = inputs.call_args(model, train_.x[:2], ex_y, model_kwargs)
    if seed_given:
        _warn_unseeded(cfg.seed, model, guide)
    # Whatever fit builds below (default guide, lazy set-up) is drawn from the seed, on a stream of its own: not
    # torch's stream restarted at `seed`, which a model built right after pyro.set_rng_seed(seed) already used.
    pyro.set_rng_seed(int(np.random.SeedSequence([cfg.seed, 1]).generate_state(1)[0]))
    if guide is None:
        guide = _default_guide(model, example)
    if not callable(guide):
        raise ConfigError(f"guide must be a Pyro guide (a callable), got {type(guide).__name__}")
    if callable(getattr(guide, "setup", None)):  # a guide built without example= finds its sites on the first rows
        guide.setup(*example, **model_kwargs)
    obj.check_guide(guide)
    if cfg.batch_size is not None and cfg.batch_size > len(train_):
        raise ConfigError(f"batch_size={cfg.batch_size} is larger than the {len(train_)} training rows; "
                          f"use batch_size <= {len(train_)}")
    # Precision: the one asked for, else the model's own (e.g. after torch.set_default_dtype(torch.float64)).
    dt = lookup(DTYPES, cfg.dtype, "dtype") if cfg.dtype else _module_dtype(model, guide)
    if dt not in DTYPES.values():
        raise ConfigError(f"model/guide parameters are {dt}; pass dtype=torch.float32 or dtype=torch.float64")
    cfg.dtype = str(dt).replace("torch.", "")
    spec = dict(model=model, guide=guide, obj=obj, cfg=cfg, train=train_, val=val, ds=ds, dtype=dt, extra_loss=extra_loss,
                optimizer_class=opt_cls,
                binarize=binarize, model_kwargs=model_kwargs, out=None if out is None else os.fspath(out),
                resume=resume, overwrite=overwrite, progress=progress, callbacks=hooks,
                config=_run_config(model, guide, obj, cfg, train_, val, ds, data_desc, inputs.takes_y(model),
                                   model_kwargs))
    spec["vectorize"] = vectorize
    if distributed:
        run = dist_mod.launch(spec, strategy=strategy, devices=devices, num_nodes=num_nodes,
                              accelerator=accelerator, device=device)
    else:
        run = train(World(resolve_device(device)), spec)
    if figures and run.directory is not None:  # rank 0 only: the other ranks' runs have no directory
        from . import report  # matplotlib only when a report is drawn

        report.write(run)  # figures and report.md/html, drawn from what the run directory holds
    return run
