"""``fit``: train a Pyro model and guide with an objective, checkpointing as it goes.

The loss is the objective called on (model, guide, batch), divided by the
batch size (nats per datapoint), minimized with a plain ``torch.optim``
optimizer over the parameters found the way Pyro's SVI finds them. Each fit
runs in its own Pyro param-store scope, so the global store neither leaks
into it nor is clobbered by it.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import pyro
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from tqdm.auto import tqdm

from . import __version__
from . import data as data_mod
from . import guides as guides_mod
from . import objectives as objectives_mod
from .checkpoint import load_tensors, save_tensors, write_json
from .errors import CheckpointError, ConfigError, DataError, TrainingError, check_positive, lookup
from .run import CHECKPOINT, CONFIG, Run, discover_params, empty_param_state, resolve_device
from .weights import guess_max_plate_nesting

__all__ = ["fit", "TrainConfig", "LR_SCHEDULES"]

LR_SCHEDULES = ("constant", "cosine", "exponential")


@dataclass
class TrainConfig:
    """Training options of :func:`fit` (stored under ``"train"`` in ``config.json``)."""

    epochs: int = 20  # passes over the training split
    batch_size: int = 128  # datapoints per step
    lr: float = 1e-3  # Adam learning rate
    seed: int = 0  # seeds parameters' draws, particles, shuffling
    patience: Optional[int] = None  # early stopping: epochs without val improvement; None = off
    beta: float = 1.0  # weight of the latent (KL) terms; beta-VAE when != 1
    warmup: int = 0  # epochs of linear KL warm-up of beta from 0
    clip_norm: Optional[float] = None  # gradient-norm clipping; None = off
    lr_schedule: str = "constant"  # "constant" | "cosine" | "exponential" (per epoch)
    weight_decay: float = 0.0
    val_fraction: float = 0.1  # held out of raw arrays that come without a validation split

    def validate(self) -> None:
        check_positive("epochs", self.epochs, integer=True)
        check_positive("batch_size", self.batch_size, integer=True)
        check_positive("lr", self.lr)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
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


class _ScaleLatents(Messenger):
    """Multiply the log-density of every latent (non-observed) site by ``beta`` (β-VAE, KL warm-up)."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def _process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg):
            msg["scale"] = self.beta * msg["scale"]


# --------------------------------------------------------------------------- data


def _materialize(data) -> data_mod.Split:
    """A torch Dataset/DataLoader or array-likes -> one in-memory Split (no per-batch loader overhead)."""
    if isinstance(data, torch.utils.data.DataLoader):
        xs, ys = [], []
        for b in data:
            x, y = (b[0], b[1]) if isinstance(b, (tuple, list)) and len(b) >= 2 else (b, None)
            xs.append(data_mod.as_tensor(x))
            if y is not None:
                ys.append(data_mod.as_tensor(y, "y"))
        if not xs:
            raise DataError("the DataLoader yielded no batches")
        return data_mod.Split(torch.cat(xs).float(), torch.cat(ys).long() if ys else None)
    if isinstance(data, torch.utils.data.Dataset):
        items = [data[i] for i in range(len(data))]
        if not items:
            raise DataError("the torch Dataset is empty")
        if isinstance(items[0], (tuple, list)) and len(items[0]) >= 2:
            return data_mod.Split(torch.stack([data_mod.as_tensor(i[0]) for i in items]).float(),
                                  torch.as_tensor([int(i[1]) for i in items]))
        return data_mod.Split(torch.stack([data_mod.as_tensor(i) for i in items]).float(), None)
    if isinstance(data, data_mod.Split):
        return data
    if isinstance(data, tuple) and len(data) == 2:
        x, y = data
        return data_mod.Split(data_mod.as_tensor(x).float(), None if y is None else data_mod.as_tensor(y, "y").long())
    return data_mod.Split(data_mod.as_tensor(data).float(), None)


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
    whole = _materialize(data)
    data_mod.validate(whole.x, y=whole.y, min_rows=2)
    n = whole.x.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    n_val = max(1, int(round(n * cfg.val_fraction)))
    tr, va = perm[n_val:], perm[:n_val]
    pick = lambda idx: data_mod.Split(whole.x[idx], None if whole.y is None else whole.y[idx])  # noqa: E731
    return pick(tr), pick(va), None, {"name": "arrays", "rows": n, "val_fraction": cfg.val_fraction}


def _check_data(model, split: data_mod.Split, name: str, cfg: TrainConfig, binarize: Optional[str]) -> None:
    likelihood = getattr(getattr(model, "cfg", None), "likelihood", None)
    nc = getattr(model, "num_classes", None) if getattr(model, "uses_labels", False) else None
    data_mod.validate(split.x, name=name, likelihood=likelihood if binarize is None else "bernoulli",
                      y=split.y, num_classes=nc)
    obs = getattr(model, "obs_shape", None)
    if obs is not None and tuple(split.x.shape[1:]) != tuple(obs):
        raise DataError(f"{name} items have shape {tuple(split.x.shape[1:])} but the model expects {tuple(obs)}; "
                        "build the model with the data's shape (e.g. VAE(data.shape, ...))")
    if getattr(model, "uses_labels", False) and split.y is None:
        raise DataError(f"{type(model).__name__} conditions on labels but {name} has none; pass (x, y)")


def _args(model, x, y):
    return (x, y) if getattr(model, "uses_labels", False) else (x,)


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
    save_tensors(path, tensors, meta)


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
    batch_size: int = 128,
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
) -> Run:
    """Train ``guide`` and ``model`` on ``data`` by maximizing ``objective``.

    Args:
        model: a Pyro model (pyrovi's, a ``PyroModule``, or a plain function).
        guide: a Pyro guide; None picks ``DiagNormal`` for pyrovi's models and
            :class:`pyrovi.guides.Auto` (traced on two training rows) for any other model.
        data: a :class:`pyrovi.data.Dataset` or dataset name (uses its train
            and validation splits; the test split is never touched), a tensor
            or array ``(N, D)``, an ``(x, y)`` pair, or a torch ``Dataset``/``DataLoader``
            (then ``val_fraction`` of it is held out for validation).
        objective: ``"elbo"``, ``"meanfield"``, ``"iwae"``, ``"renyi"``, ``"stl"``,
            ``"dreg"`` (see :mod:`pyrovi.objectives`) or an Objective instance.
        particles: S, vectorized particles per datapoint (objective default if None).
        alpha: Rényi order for ``objective="renyi"``.
        epochs, batch_size, lr, seed, patience, beta, warmup, clip_norm,
        lr_schedule, weight_decay, val_fraction: see :class:`TrainConfig`.
        out: run directory; checkpoints are written there after every epoch.
        resume: continue from ``out/checkpoint.safetensors`` (same trajectory:
            weights, optimizer moments, scheduler, RNG and history restored).
        overwrite: allow replacing an existing run in ``out``.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        progress: show a tqdm progress bar.
        figures: write figures and ``report.md`` into ``out`` at the end.

    Returns:
        :class:`pyrovi.run.Run`. Losses in its history are in nats per
        datapoint, loss = -bound.

    Raises:
        ConfigError / DataError: bad arguments or data, before any training.
        TrainingError: a non-finite loss; the last good checkpoint is kept.
    """
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, patience=patience, beta=beta,
                      warmup=warmup, clip_norm=clip_norm, lr_schedule=lr_schedule, weight_decay=weight_decay,
                      val_fraction=val_fraction)
    cfg.validate()
    if not callable(model):
        raise ConfigError(f"model must be a Pyro model (a callable), got {type(model).__name__}")
    obj = objectives_mod.get(objective, particles=particles, alpha=alpha)
    dev = resolve_device(device)
    train, val, ds, data_desc = _resolve_data(data, cfg)
    binarize = ds.binarize if ds is not None else None
    _check_data(model, train, "training data", cfg, binarize)
    _check_data(model, val, "validation data", cfg, binarize)
    if guide is None:
        guide = _default_guide(model, _args(model, train.x[:2], None if train.y is None else train.y[:2]))
    if not callable(guide):
        raise ConfigError(f"guide must be a Pyro guide (a callable), got {type(guide).__name__}")
    if cfg.batch_size > len(train):
        raise ConfigError(f"batch_size={cfg.batch_size} is larger than the {len(train)} training rows; "
                          f"use batch_size <= {len(train)}")

    ckpt_path = None
    if out is not None:
        out = os.fspath(out)
        ckpt_path = os.path.join(out, CHECKPOINT)
        _prepare_out(out, resume, overwrite)

    for m in (model, guide):
        if isinstance(m, torch.nn.Module):
            m.to(dev)
    train = data_mod.Split(train.x.to(dev), None if train.y is None else train.y.to(dev))
    val = data_mod.Split(val.x.to(dev), None if val.y is None else val.y.to(dev))
    if binarize == "dynamic":  # validation is scored on one fixed binarization
        g = torch.Generator().manual_seed(cfg.seed + 2)
        val = data_mod.Split((torch.rand(val.x.shape, generator=g).to(dev) < val.x).float(), val.y)

    config = {
        "pyrovi_version": __version__,
        "model": _describe(model, "model"),
        "guide": _describe(guide, "guide"),
        "objective": obj.config(),
        "train": asdict(cfg),
        "data": {**data_desc, "shape": list(train.x.shape[1:]),
                 "image_shape": list(ds.image_shape) if ds is not None and ds.image_shape else None,
                 "num_classes": ds.num_classes if ds is not None else None,
                 "n_train": len(train), "n_val": len(val)},
    }
    run = Run(model, guide, obj, config, directory=out, param_state=empty_param_state(), device=dev, data=ds)

    pyro.set_rng_seed(cfg.seed)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)
    with run.scope():
        probe = _args(model, train.x[:2], None if train.y is None else train.y[:2])
        obj.max_plate_nesting = guess_max_plate_nesting(model, guide, probe, {})
        params = discover_params(model, guide, lambda: obj(model, guide, *probe))
        if not params:
            raise ConfigError("found no trainable parameters in model or guide")
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = _scheduler(opt, cfg)
        loop = {"epoch": 0, "step": 0, "best": math.inf, "best_epoch": 0, "bad_epochs": 0, "seconds": 0.0}
        if resume and ckpt_path and os.path.isfile(ckpt_path):
            loop = _restore(ckpt_path, run, opt, sched, shuffle_gen, config, dev)
        if out is not None:
            write_json(os.path.join(out, CONFIG), config)
        best = {}  # best-validation weights, kept when early stopping is on
        if resume and ckpt_path and os.path.isfile(ckpt_path) and cfg.patience is not None:
            best = _best_from_checkpoint(ckpt_path, dev)
        _train_loop(run, train, val, cfg, opt, sched, shuffle_gen, loop, ckpt_path, binarize, progress, best)
        if best and loop["best_epoch"] != loop["epoch"]:
            run.load_state_tensors(best, {})  # early stopping hands back the best-validation weights
    for m in (model, guide):
        if isinstance(m, torch.nn.Module):
            m.eval()
    last = run.history[-1] if run.history else {}
    run.metrics = {
        "epochs": loop["epoch"],
        "best_epoch": loop["best_epoch"],
        "train_loss": last.get("train_loss"),
        "val_loss": loop["best"] if math.isfinite(loop["best"]) else None,
        "train_seconds": loop["seconds"],
        "units": "nats per datapoint; loss = -bound",
    }
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
        raise ConfigError(f"cannot write into out={out!r}: {e.strerror}; free disk space or choose another out=") from None
    ckpt = os.path.join(out, CHECKPOINT)
    if os.path.isfile(ckpt) and not (resume or overwrite):
        raise ConfigError(f"{out!r} already holds a run; pass resume=True to continue it or overwrite=True "
                          "to replace it (or choose another out=)")


def _scheduler(opt, cfg: TrainConfig):
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.lr_schedule == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.01 ** (1.0 / cfg.epochs))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)


def _restore(path, run, opt, sched, shuffle_gen, config, dev) -> dict:
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
    return dict(meta["loop"])


def _best_from_checkpoint(path, dev) -> dict:
    tensors, _ = load_tensors(path, dev)
    return {k[len("best/"):]: v for k, v in tensors.items() if k.startswith("best/")}


def _train_loop(run, train, val, cfg, opt, sched, shuffle_gen, loop, ckpt_path, binarize, progress, best) -> None:
    model, guide, obj = run.model, run.guide, run.objective
    n = len(train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
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
                idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                xb = train.x[idx]
                if binarize == "dynamic":
                    xb = torch.bernoulli(xb)
                yb = None if train.y is None else train.y[idx]
                beta = cfg.beta * (min(1.0, (loop["step"] + 1) / warm_steps) if warm_steps else 1.0)
                m, g = (model, guide) if beta == 1.0 else (_ScaleLatents(beta)(model), _ScaleLatents(beta)(guide))
                loss = obj(m, g, *_args(model, xb, yb)) / xb.shape[0]
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"loss became {loss.item()} at epoch {loop['epoch'] + 1}, step {loop['step'] + 1}; "
                        f"training stopped. The last good checkpoint (epoch {loop['epoch']}) is kept"
                        f"{' in ' + repr(ckpt_path) if ckpt_path else ''}. Try a lower lr, clip_norm, or check the data.")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
                opt.step()
                total += loss.item() * xb.shape[0]
                seen += xb.shape[0]
                loop["step"] += 1
            lr_now = opt.param_groups[0]["lr"]
            sched.step()
            val_loss = _mean_loss(obj, model, guide, val, max(cfg.batch_size, 256))
            if not math.isfinite(val_loss):
                raise TrainingError(f"validation loss is {val_loss} after epoch {loop['epoch'] + 1}; the last good "
                                    f"checkpoint (epoch {loop['epoch']}) is kept")
            loop["epoch"] += 1
            secs = time.perf_counter() - t0
            loop["seconds"] += secs
            run.history.append({"epoch": loop["epoch"], "train_loss": total / seen, "val_loss": val_loss,
                                "lr": lr_now, "beta": beta, "seconds": secs, "items_per_second": seen / secs})
            improved = val_loss < loop["best"]
            if improved:
                loop.update(best=val_loss, best_epoch=loop["epoch"], bad_epochs=0)
            else:
                loop["bad_epochs"] += 1
            if improved and cfg.patience is not None:
                best.clear()
                best.update({k: v.detach().clone() for k, v in run.state_tensors().items()})
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
                  f"{' in ' + repr(ckpt_path) + ' (continue with resume=True)' if ckpt_path else ''}")
        raise
    finally:
        bar.close()


@torch.no_grad()
def _mean_loss(obj, model, guide, split, batch_size: int) -> float:
    """Objective's loss per datapoint on a split, in batches, without gradients."""
    for m in (model, guide):
        if isinstance(m, torch.nn.Module):
            m.eval()
    total = 0.0
    for i in range(0, len(split), batch_size):
        xb = split.x[i:i + batch_size]
        yb = None if split.y is None else split.y[i:i + batch_size]
        total += float(obj(model, guide, *_args(model, xb, yb)))
    return total / len(split)
