"""Data-parallel training of a pyrovi model, guide and objective through PyTorch Lightning (DDP).

``pyrovi.fit(..., strategy="ddp", devices=N, num_nodes=M)`` lands here. Lightning
Fabric does everything a distributed engine does (starting the processes or
joining the ones torchrun/SLURM started, the process group (NCCL on GPUs, Gloo
on CPUs), device placement, DistributedDataParallel, collectives); pyrovi keeps
its own training loop semantics on top of it:

- **Global batch.** ``batch_size`` is the number of datapoints per optimizer
  step summed over all ``W = devices * num_nodes`` ranks, exactly as in a
  single-process ``fit``; each rank takes ``batch_size / W`` of them. Each rank's
  loss is its mean over its share, and DDP *averages* gradients across ranks,
  so the update is the gradient of the mean loss over the global batch:

  .. math::

      \\nabla \\frac{1}{W} \\sum_{r=1}^{W} \\frac{1}{b} \\sum_{i \\in B_r} \\ell_i
      = \\nabla \\frac{1}{Wb} \\sum_{i \\in B_1 \\cup \\dots \\cup B_W} \\ell_i, \\qquad b = \\text{batch\\_size} / W.

  Changing only ``devices`` therefore keeps the learning-rate meaning; see
  ``docs/distributed.md`` for scaling the batch (and ``lr``) with the devices.
- **Sharding.** Every epoch the training rows are permuted with the seed
  ``seed + epoch`` and dealt out round-robin (``torch.utils.data.DistributedSampler``
  with ``drop_last=True``), so the ranks' shards are disjoint and of equal size;
  at most ``W - 1`` rows (a different random few each epoch) sit out an epoch.
- **Randomness.** Each rank reseeds Pyro/torch/NumPy at the start of every epoch
  from ``(seed, rank, epoch)``, so particles differ across ranks, and a resumed
  run draws the same numbers as an uninterrupted one.
- **Metrics.** Training and validation losses are sums and counts all-reduced
  over ranks: the mean over every datapoint seen, in nats per datapoint.
- **Files.** Only rank 0 writes the run directory (same format as ``fit``:
  ``config.json`` plus a ``"distributed"`` section, checkpoints, weights,
  history), so :func:`pyrovi.load_run` and ``pyrovi evaluate`` read it like any other.

Lightning is an optional extra: ``pip install "pyrovi[distributed]"``. This
module imports it only when :func:`fit` runs.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Optional

import numpy as np
import pyro
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from . import data as data_mod
from . import objectives as objectives_mod
from .errors import CheckpointError, ConfigError, DataError, PyroviError, TrainingError, check_positive, lookup
from .run import CHECKPOINT, CONFIG, Run, discover_params, empty_param_state, resolve_device
from . import inputs
from .train import (
    BatchLoss,
    TrainConfig,
    _best_from_checkpoint,
    _check_data,
    _default_guide,
    _prepare_out,
    _resolve_data,
    _restore,
    _run_config,
    _save_checkpoint,
    _scheduler,
    _structure,
    adam,
    batch_step,
    finish,
    record_epoch,
)
from .weights import guess_max_plate_nesting

__all__ = ["fit", "check_options", "shard", "rank_seed", "rank", "STRATEGIES", "INSTALL_HINT"]

#: pyrovi name -> Lightning strategy. "ddp" starts the other ranks by re-running this
#: script (like torchrun) or joins the ranks torchrun/SLURM started; "ddp_spawn" starts
#: them with multiprocessing, so it also works where the script cannot be re-run (tests).
STRATEGIES = {"ddp": "ddp", "ddp_spawn": "ddp_spawn"}
ACCELERATORS = {"auto": "auto", "cpu": "cpu", "cuda": "cuda", "gpu": "cuda"}
INSTALL_HINT = 'pip install "pyrovi[distributed]"'


def check_options(strategy, devices, num_nodes, accelerator) -> None:
    """Validate the scale-out arguments of :func:`pyrovi.fit` (no Lightning needed)."""
    if strategy is None:
        for name, value, default in (("devices", devices, 1), ("num_nodes", num_nodes, 1),
                                     ("accelerator", accelerator, "auto")):
            if value != default:
                raise ConfigError(f"{name}={value!r} needs a data-parallel strategy: pass strategy='ddp' "
                                  f"(or leave {name} at {default!r} and use device= for one process)")
        return
    lookup(STRATEGIES, strategy, "strategy")
    check_positive("devices", devices, integer=True)
    check_positive("num_nodes", num_nodes, integer=True)
    lookup(ACCELERATORS, accelerator, "accelerator")


def _require_lightning():
    try:
        import lightning.fabric as fabric_mod
    except ImportError as e:
        raise ConfigError(f"strategy='ddp' trains through PyTorch Lightning, which is not installed ({e}); "
                          f"install it with: {INSTALL_HINT}") from None
    return fabric_mod


# --------------------------------------------------------------------------- sharding and seeds


def shard(n: int, epoch: int, rank: int, world_size: int, seed: int) -> torch.Tensor:
    """Row indices ``(n // world_size,)`` that ``rank`` trains on in ``epoch``.

    Torch's ``DistributedSampler`` semantics (``shuffle=True, drop_last=True``): a
    permutation of ``range(n)`` seeded with ``seed + epoch``, cut to a multiple of
    ``world_size`` and dealt round-robin, so the shards of one epoch are disjoint.
    """
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True,
                                                  seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return torch.as_tensor(list(sampler), dtype=torch.long)


def rank_seed(seed: int, rank: int, epoch: int) -> int:
    """A 32-bit seed for ``(seed, rank, epoch)``: independent streams per rank and epoch (NumPy ``SeedSequence``)."""
    return int(np.random.SeedSequence([seed % 2**64, rank, epoch]).generate_state(1)[0])


def rank() -> int:
    """Global rank of this process: from the process group once ``fit`` has joined it, else ``RANK`` (torchrun), else 0.

    Under ``strategy="ddp"`` every rank runs the whole script; guard what only one
    process should do after ``fit`` (printing, evaluating) with ``if rank() == 0``.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


# --------------------------------------------------------------------------- the module DDP wraps


class _ObjectiveModule(torch.nn.Module):
    """Model + guide + objective as one ``nn.Module`` whose ``forward`` is the loss, so DDP can wrap it.

    DDP averages the gradients of ``self.parameters()`` across ranks, so this must
    own every trainable tensor the objective touches: the model's and guide's
    parameters, and the ``pyro.param`` s of plain-function models that live only in
    the run's param store (see :func:`_store_params_as_parameters`).
    """

    def __init__(self, objective, model, guide, params: list):
        super().__init__()
        self.objective = objective
        self.parts = torch.nn.ModuleList([m for m in (model, guide) if isinstance(m, torch.nn.Module)])
        owned = {id(p) for p in self.parts.parameters()}
        self.store_params = torch.nn.ParameterList([p for p in params if id(p) not in owned])

    def forward(self, model, guide, *args, **kwargs):
        # model/guide come in as arguments (maybe wrapped for beta/KL warm-up by BatchLoss);
        # they are the same objects as self.parts, whose parameters DDP watches.
        return self.objective(model, guide, *args, **kwargs)


def _store_params_as_parameters(params: list) -> list:
    """Swap plain tensors of the current param store for ``nn.Parameter`` s sharing their storage.

    ``nn.Module`` only registers ``nn.Parameter`` s; the store keeps plain leaf tensors
    for ``pyro.param``. The store entry is replaced in place, so ``pyro.param(name)``
    returns (a transform of) the very tensor DDP and the optimizer update.
    """
    store = pyro.get_param_store()
    by_id = {id(v): k for k, v in store._params.items()}
    out = []
    for p in params:
        if not isinstance(p, torch.nn.Parameter) and id(p) in by_id:
            name = by_id[id(p)]
            new = torch.nn.Parameter(p.detach())  # same storage, now a Parameter leaf
            store._params[name] = new
            store._param_to_name.pop(p, None)
            store._param_to_name[new] = name
            p = new
        out.append(p)
    return out


# --------------------------------------------------------------------------- collectives that fail together


def _on_rank0(fabric, what: str, fn: Callable[[], Any]) -> None:
    """Run ``fn`` on rank 0 only; if it raises a pyrovi error, every rank raises it.

    A rank-0-only failure (an unwritable ``out``, a full disk) would otherwise leave
    the other ranks waiting in the next collective until the process-group timeout.
    """
    err = None
    if fabric.is_global_zero:
        try:
            fn()
        except PyroviError as e:
            err = (type(e).__name__, str(e))
        except OSError as e:
            err = ("CheckpointError", f"{what} failed on rank 0: {e}")
    if fabric.world_size > 1:
        err = fabric.broadcast(err, src=0)
    if err is not None:
        cls = {"ConfigError": ConfigError, "DataError": DataError, "TrainingError": TrainingError}
        raise cls.get(err[0], CheckpointError)(err[1])


def _sum_over_ranks(fabric, *values: float) -> list:
    t = torch.tensor(values, dtype=torch.float64, device=fabric.device)
    if fabric.world_size > 1:
        t = fabric.all_reduce(t, reduce_op="sum")
    return [float(v) for v in t.cpu()]


# --------------------------------------------------------------------------- fit


def fit(model, guide=None, data: Any = "digits", *, objective: Any = "elbo", particles: Optional[int] = None,
        alpha: Optional[float] = None, epochs: int = 20, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
        out: Optional[str] = None, resume: bool = False, overwrite: bool = False, patience: Optional[int] = None,
        beta: float = 1.0, warmup: int = 0, clip_norm: Optional[float] = None, lr_schedule: str = "constant",
        weight_decay: float = 0.0, val_fraction: float = 0.1, device: Any = "auto", progress: bool = True,
        figures: bool = True, strategy: str = "ddp", devices: int = 1, num_nodes: int = 1,
        accelerator: str = "auto", model_kwargs: Optional[dict] = None, data_plate: str = "data") -> Run:
    """:func:`pyrovi.fit` on ``devices * num_nodes`` data-parallel ranks (DDP through Lightning Fabric).

    Same arguments and run directory as :func:`pyrovi.fit`, plus:

    Args:
        strategy: ``"ddp"``: this script is re-run for ranks 1..devices-1 (as torchrun
            would), or, under torchrun/SLURM, joins the ranks they started; every rank
            runs the whole script and gets a :class:`Run` back. ``"ddp_spawn"``: ranks
            are started with multiprocessing from this call and the trained weights
            come back into ``model``/``guide`` in this process (works in tests and from
            any Python session; ``model``, ``guide`` and ``data`` must be picklable).
        devices: processes per node (GPUs per node, or CPU processes).
        num_nodes: machines.
        accelerator: ``"auto"`` (CUDA when present), ``"cpu"`` (Gloo) or ``"cuda"``/``"gpu"`` (NCCL).
            ``device="cpu"``/``"cuda"`` picks the accelerator when this is ``"auto"``.

    ``batch_size`` is the global batch per optimizer step and must be a multiple of
    ``devices * num_nodes``. Only rank 0 writes ``out``; the :class:`Run` of the
    other ranks has ``directory=None`` (so nothing they do after ``fit`` writes
    into the run), and :func:`rank` tells a script which rank it is on.

    Raises:
        ConfigError: Lightning is missing (with the install command), bad options.
    """
    check_options(strategy, devices, num_nodes, accelerator)
    strategy = lookup(STRATEGIES, strategy, "strategy")
    fabric_mod = _require_lightning()
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, patience=patience, beta=beta,
                      warmup=warmup, clip_norm=clip_norm, lr_schedule=lr_schedule, weight_decay=weight_decay,
                      val_fraction=val_fraction, data_plate=data_plate)
    cfg.validate()
    model_kwargs = inputs.check_model_kwargs(model_kwargs)
    world = devices * num_nodes
    if cfg.batch_size is None:
        raise ConfigError("batch_size=None (full-data mode) is not supported with a distributed strategy; "
                          "give the global batch size")
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size={cfg.batch_size} is the global batch per step and must be a multiple of "
                          f"devices*num_nodes={world}; use batch_size={max(world, cfg.batch_size // world * world)}")
    accel = _accelerator(accelerator, device)
    if not callable(model):
        raise ConfigError(f"model must be a Pyro model (a callable), got {type(model).__name__}")
    obj = objectives_mod.get(objective, particles=particles, alpha=alpha)
    train, val, ds, data_desc = _resolve_data(data, cfg)
    binarize = ds.binarize if ds is not None else None
    _check_data(model, train, "training data", cfg, binarize)
    _check_data(model, val, "validation data", cfg, binarize)
    if guide is None:
        guide = _default_guide(model)
    if not callable(guide):
        raise ConfigError(f"guide must be a Pyro guide (a callable), got {type(guide).__name__}")
    if cfg.batch_size > len(train):
        raise ConfigError(f"batch_size={cfg.batch_size} is larger than the {len(train)} training rows; "
                          f"use batch_size <= {len(train)}")
    spec = dict(model=model, guide=guide, obj=obj, cfg=cfg, train=train, val=val, ds=ds, data_desc=data_desc,
                model_kwargs=model_kwargs,
                binarize=binarize, out=None if out is None else os.fspath(out), resume=resume, overwrite=overwrite,
                progress=progress, figures=figures,
                distributed={"strategy": strategy, "devices": devices, "num_nodes": num_nodes,
                             "world_size": world, "accelerator": accel,
                             "batch_size_per_rank": cfg.batch_size // world})
    fabric = fabric_mod.Fabric(accelerator=accel, strategy=strategy, devices=devices, num_nodes=num_nodes)
    if strategy != "ddp_spawn":
        return fabric.launch(_worker, spec)
    # Spawned ranks train copies; rank 0 hands its learned tensors back to this process.
    result = fabric.launch(_worker, spec)
    run = Run(model, guide, obj, result["config"], history=result["history"], directory=spec["out"],
              param_state=empty_param_state(), device=_device_of(model, guide), data=ds, metrics=result["metrics"],
              model_kwargs=model_kwargs)
    probe, kw = run.call_args(train.x[:2], None if train.y is None else train.y[:2])
    run.load_state_tensors(st_load(result["tensors"]), result["constraints"], probe, kw)
    for m in (model, guide):
        if isinstance(m, torch.nn.Module):
            m.eval()
    return run


def _accelerator(accelerator: str, device: Any) -> str:
    accel = lookup(ACCELERATORS, accelerator, "accelerator")
    if device not in (None, "auto"):
        dev_type = resolve_device(device).type  # validates device=
        if accel == "auto":
            accel = dev_type
        elif accel != dev_type:
            raise ConfigError(f"device={device!r} and accelerator={accelerator!r} disagree; set one of them")
    if accel == "auto":
        accel = "cuda" if torch.cuda.is_available() else "cpu"
    if accel == "cuda" and not torch.cuda.is_available():
        raise ConfigError("accelerator='cuda' was asked for but no CUDA device is available; use 'cpu' or 'auto'")
    return accel


def _device_of(model, guide) -> torch.device:
    for m in (model, guide):
        if isinstance(m, torch.nn.Module):
            for p in m.parameters():
                return p.device
    return torch.device("cpu")


def _worker(fabric, spec: dict):
    """One rank's training (every rank runs this); returns the Run (or, spawned, rank 0's tensors)."""
    model, guide, obj, cfg = spec["model"], spec["guide"], spec["obj"], spec["cfg"]
    dev, world = fabric.device, fabric.world_size
    # every rank uses rank 0's path (the CLI's default out has the time in it, which differs per process)
    out = fabric.broadcast(spec["out"], src=0) if world > 1 else spec["out"]
    ckpt_path = None if out is None else os.path.join(out, CHECKPOINT)
    if out is not None:
        _on_rank0(fabric, "preparing out", lambda: _prepare_out(out, spec["resume"], spec["overwrite"]))
    for m in (model, guide):
        if isinstance(m, torch.nn.Module):
            m.to(dev)
    train = data_mod.Split(spec["train"].x.to(dev), None if spec["train"].y is None else spec["train"].y.to(dev))
    val = data_mod.Split(spec["val"].x.to(dev), None if spec["val"].y is None else spec["val"].y.to(dev))
    if spec["binarize"] == "dynamic":  # validation is scored on one fixed binarization, as in fit
        g = torch.Generator().manual_seed(cfg.seed + 2)
        val = data_mod.Split((torch.rand(val.x.shape, generator=g).to(dev) < val.x).float(), val.y)
    pass_y = inputs.takes_y(model)
    config = _run_config(model, guide, obj, cfg, spec["train"], spec["val"], spec["ds"], spec["data_desc"], pass_y,
                         spec["model_kwargs"])
    config["distributed"] = dict(spec["distributed"])
    run = Run(model, guide, obj, config, directory=out if fabric.is_global_zero else None,
              param_state=empty_param_state(), device=dev, data=spec["ds"], model_kwargs=spec["model_kwargs"])

    pyro.set_rng_seed(cfg.seed)  # the same draws on every rank for anything initialized lazily below
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)  # unused by the DDP loop; kept for the checkpoint format
    with run.scope():
        probe, kw = run.call_args(train.x[:2], None if train.y is None else train.y[:2])
        obj.max_plate_nesting = guess_max_plate_nesting(model, guide, probe, kw)
        shape = _structure(model, guide, probe, kw, cfg.data_plate)
        params = discover_params(model, guide, lambda: obj(model, guide, *probe, **kw))
        if not params:
            raise ConfigError("found no trainable parameters in model or guide")
        params = _store_params_as_parameters(params)
        wrapper = _ObjectiveModule(obj, model, guide, params)
        opt = adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = _scheduler(opt, cfg)
        loop = {"epoch": 0, "step": 0, "best": math.inf, "best_epoch": 0, "bad_epochs": 0, "seconds": 0.0}
        resuming = bool(spec["resume"] and ckpt_path and os.path.isfile(ckpt_path))
        if world > 1:
            resuming = fabric.broadcast(resuming, src=0)  # rank 0's view of the (shared) run directory decides
        if resuming:
            loop = _restore(ckpt_path, run, opt, sched, shuffle_gen, config, dev)
        # DDP broadcasts rank 0's parameters and buffers here, so all ranks start from the same weights.
        ddp = fabric.setup_module(wrapper)
        if out is not None:
            from .checkpoint import write_json

            _on_rank0(fabric, "writing config.json", lambda: write_json(os.path.join(out, CONFIG), config))
        best = _best_from_checkpoint(ckpt_path, dev) if resuming and cfg.patience is not None else {}
        _ddp_loop(fabric, ddp, run, train, val, cfg, opt, sched, shuffle_gen, loop, ckpt_path, spec["binarize"],
                  spec["progress"], best, shape["global_sites"])
        if best and loop["best_epoch"] != loop["epoch"]:
            run.load_state_tensors(best, {})  # early stopping hands back the best-validation weights
    run.metrics = finish(run, loop, world_size=world)
    if out is not None:
        def save():
            run.save(out)
            if spec["figures"]:
                from .report import write_training_report

                write_training_report(run)

        _on_rank0(fabric, "saving the run", save)
    fabric.barrier()  # no rank returns before rank 0 has written the run directory
    if spec["distributed"]["strategy"] == "ddp_spawn":
        # as safetensors bytes: torch's shared-memory tensor passing breaks once this worker has exited
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in run.state_tensors().items()}
        return {"tensors": st_save(tensors),
                "constraints": run.param_constraints(), "history": run.history, "metrics": run.metrics,
                "config": config} if fabric.is_global_zero else None
    return run


def _ddp_loop(fabric, ddp, run, train, val, cfg, opt, sched, shuffle_gen, loop, ckpt_path, binarize, progress,
              best, global_sites: bool) -> None:
    """pyrovi's epoch loop (see ``pyrovi.train._train_loop``) on this rank's shard, with reduced metrics."""
    model, guide, obj = run.model, run.guide, run.objective
    r, world = fabric.global_rank, fabric.world_size
    per_rank = cfg.batch_size // world
    n = len(train)
    steps_per_epoch = math.ceil((n // world) / per_rank)
    warm_steps = cfg.warmup * steps_per_epoch
    params = [p for g in opt.param_groups for p in g["params"]]

    def step_objective(m, g, *args, **kw):
        loss = ddp(m, g, *args, **kw)  # through DDP: its backward averages gradients across ranks
        # All ranks must skip a non-finite step together: a rank that skipped backward alone
        # would leave the others waiting in DDP's gradient all-reduce forever.
        if world > 1 and not math.isfinite(_sum_over_ranks(fabric, float(loss.detach()))[0]):
            return loss * float("nan")
        return loss

    # the same loss as single-process fit (scaling, calling rule), evaluated through DDP
    loss_fn = BatchLoss(step_objective, model, guide, global_sites=global_sites, data_plate=cfg.data_plate,
                        pass_y=run.pass_y, model_kwargs=run.model_kwargs)
    val_fn = BatchLoss(obj, model, guide, global_sites=global_sites, data_plate=cfg.data_plate,
                       pass_y=run.pass_y, model_kwargs=run.model_kwargs)
    bar = tqdm(total=cfg.epochs, initial=loop["epoch"], disable=not (progress and fabric.is_global_zero),
               unit="epoch", dynamic_ncols=True, desc=f"{obj.name} x{world}")
    try:
        while loop["epoch"] < cfg.epochs:
            t0 = time.perf_counter()
            pyro.set_rng_seed(rank_seed(cfg.seed, r, loop["epoch"]))
            for m in (model, guide):
                if isinstance(m, torch.nn.Module):
                    m.train()
            idx_all = shard(n, loop["epoch"], r, world, cfg.seed).to(train.x.device)  # (n // world,)
            total, seen = 0.0, 0
            for i in range(steps_per_epoch):
                idx = idx_all[i * per_rank:(i + 1) * per_rank]
                loss, beta, rows = batch_step(loss_fn, opt, train, idx, n, cfg, loop, warm_steps, binarize, params,
                                              ckpt_path, where=" (on some rank)")
                total += loss * rows
                seen += rows
                loop["step"] += 1
            lr_now = opt.param_groups[0]["lr"]
            sched.step()
            total, seen = _sum_over_ranks(fabric, total, seen)
            val_loss = _val_loss(fabric, val_fn, val, max(per_rank, 256))
            secs = time.perf_counter() - t0
            record_epoch(run, loop, cfg, best, train_loss=total / seen, val_loss=val_loss, lr=lr_now, beta=beta,
                         secs=secs, seen=seen)
            if ckpt_path:
                _on_rank0(fabric, "writing the checkpoint",
                          lambda: _save_checkpoint(ckpt_path, run, opt, sched, shuffle_gen, loop, best))
            bar.set_postfix(loss=f"{total / seen:.3f}", val=f"{val_loss:.3f}", it_s=f"{seen / secs:.0f}")
            bar.update(1)
            if cfg.patience is not None and loop["bad_epochs"] >= cfg.patience:
                if fabric.is_global_zero:
                    bar.write(f"early stopping after epoch {loop['epoch']}: no validation improvement for "
                              f"{cfg.patience} epochs (best {loop['best']:.4f} at epoch {loop['best_epoch']})")
                break
    finally:
        bar.close()


@torch.no_grad()
def _val_loss(fabric, loss_fn, split, batch_size: int) -> float:
    """Mean loss per datapoint over the whole split: each rank scores rows ``rank::world``, sums are all-reduced."""
    for m in (loss_fn.model, loss_fn.guide):
        if isinstance(m, torch.nn.Module):
            m.eval()
    rows = torch.arange(fabric.global_rank, len(split), fabric.world_size, device=split.x.device)
    total = 0.0
    for i in range(0, len(rows), batch_size):
        idx = rows[i:i + batch_size]
        yb = None if split.y is None else split.y[idx]
        total += float(loss_fn(split.x[idx], yb, len(split))) * len(idx)
    total, count = _sum_over_ranks(fabric, total, len(rows))
    return total / count
