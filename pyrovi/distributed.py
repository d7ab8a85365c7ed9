"""Data-parallel training of a pyrovi model, guide and objective through PyTorch Lightning (DDP).

``pyrovi.fit(..., strategy="ddp", devices=N, num_nodes=M)`` validates everything
as for one process, then :func:`launch` starts Lightning Fabric, which does
everything a distributed engine does (starting the processes or joining the
ones torchrun/SLURM started, the process group (NCCL on GPUs, Gloo on CPUs),
device placement, DistributedDataParallel, collectives). Every rank then runs
the one training loop of :mod:`pyrovi.loop`, handed a :class:`FabricWorld`
instead of the one-process :class:`~pyrovi.loop.World`; what differs is only
what the world answers:

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
module imports it only when :func:`launch` runs.
"""
from __future__ import annotations

import math
import os
import tempfile
from typing import Any, Callable

import numpy as np
import pyro
import torch

from .checkpoint import load_tensors, save_tensors
from .errors import CheckpointError, ConfigError, DataError, PyroviError, TrainingError, check_positive, lookup
from .loop import World, train
from .run import Run, empty_param_state, resolve_device

__all__ = ["launch", "FabricWorld", "check_options", "shard", "rank_seed", "rank", "STRATEGIES", "INSTALL_HINT"]

#: pyrovi name -> Lightning strategy. "ddp" starts the other ranks by re-running this
#: script (like torchrun) or joins the ranks torchrun/SLURM started; "ddp_spawn" starts
#: them with multiprocessing, so it also works where the script cannot be re-run (tests).
STRATEGIES = {"ddp": "ddp", "ddp_spawn": "ddp_spawn"}
ACCELERATORS = {"auto": "auto", "cpu": "cpu", "cuda": "cuda", "gpu": "cuda"}
INSTALL_HINT = 'pip install "pyrovi[distributed]"'


def check_options(strategy, devices, num_nodes, accelerator, batch_size=None) -> int:
    """Validate the scale-out arguments of :func:`pyrovi.fit` (no Lightning needed); the world size.

    ``batch_size`` (the global batch per step), when given, must split evenly over the ranks.
    """
    if strategy is None:
        for name, value, default in (("devices", devices, 1), ("num_nodes", num_nodes, 1),
                                     ("accelerator", accelerator, "auto")):
            if value != default:
                raise ConfigError(f"{name}={value!r} needs a data-parallel strategy: pass strategy='ddp' "
                                  f"(or leave {name} at {default!r} and use device= for one process)")
        return 1
    lookup(STRATEGIES, strategy, "strategy")
    check_positive("devices", devices, integer=True)
    check_positive("num_nodes", num_nodes, integer=True)
    lookup(ACCELERATORS, accelerator, "accelerator")
    world = devices * num_nodes
    if batch_size is None:
        raise ConfigError("batch_size=None (full-data mode) is not supported with a distributed strategy; "
                          "give the global batch size")
    if batch_size % world:
        raise ConfigError(f"batch_size={batch_size} is the global batch per step and must be a multiple of "
                          f"devices*num_nodes={world}; use batch_size={max(world, batch_size // world * world)}")
    return world


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

    def forward(self, model, guide, args, kwargs, beta):
        # model/guide come in as arguments (maybe wrapped for minibatch scaling by BatchLoss);
        # they are the same objects as self.parts, whose parameters DDP watches.
        return self.objective.loss(model, guide, args, kwargs, beta=beta)


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


# --------------------------------------------------------------------------- the world of N ranks


class FabricWorld(World):
    """The :class:`~pyrovi.loop.World` of one rank in a Lightning Fabric process group."""

    where = " (on some rank)"

    def __init__(self, fabric, describe: dict):
        super().__init__(fabric.device)
        self.fabric = fabric
        self.rank, self.size = fabric.global_rank, fabric.world_size
        self._describe = dict(describe)

    def rows(self, n, epoch, seed, gen):
        """This rank's shard of ``range(n)`` in ``epoch`` (:func:`shard`); ``gen`` is not used."""
        return shard(n, epoch, self.rank, self.size, seed)

    def begin_epoch(self, seed, epoch):
        """Reseed Pyro/torch/NumPy from ``(seed, rank, epoch)``: particles differ across ranks, and a
        resumed run draws what an uninterrupted one would."""
        pyro.set_rng_seed(rank_seed(seed, self.rank, epoch))

    def sum(self, *values):
        t = torch.tensor(values, dtype=torch.float64, device=self.fabric.device)
        if self.size > 1:
            t = self.fabric.all_reduce(t, reduce_op="sum")
        return [float(v) for v in t.cpu()]

    def broadcast(self, obj):
        return self.fabric.broadcast(obj, src=0) if self.size > 1 else obj

    def on_rank0(self, what: str, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on rank 0 only; if it raises a pyrovi error, every rank raises it.

        A rank-0-only failure (an unwritable ``out``, a full disk) would otherwise leave
        the other ranks waiting in the next collective until the process-group timeout.
        """
        err = None
        if self.fabric.is_global_zero:
            try:
                fn()
            except PyroviError as e:
                err = (type(e).__name__, str(e))
            except OSError as e:
                err = ("CheckpointError", f"{what} failed on rank 0: {e}")
        err = self.broadcast(err)
        if err is not None:
            cls = {"ConfigError": ConfigError, "DataError": DataError, "TrainingError": TrainingError}
            raise cls.get(err[0], CheckpointError)(err[1])

    def barrier(self):
        self.fabric.barrier()

    def own(self, params):
        return _store_params_as_parameters(params)

    def objective(self, obj, model, guide, params):
        """``obj`` evaluated through DDP, whose backward averages gradients across ranks."""
        return _ThroughDDP(self, self.fabric.setup_module(_ObjectiveModule(obj, model, guide, params)))

    def describe(self):
        return dict(self._describe)


class _ThroughDDP:
    """The objective's ``loss``, evaluated through the DDP module (its backward averages gradients)."""

    def __init__(self, world: FabricWorld, ddp):
        self.world, self.ddp = world, ddp

    def loss(self, model, guide, args, kwargs=None, *, beta: float = 1.0):
        loss = self.ddp(model, guide, tuple(args), dict(kwargs or {}), beta)
        # All ranks must skip a non-finite step together: a rank that skipped backward alone
        # would leave the others waiting in DDP's gradient all-reduce forever.
        if self.world.size > 1 and not math.isfinite(self.world.sum(float(loss.detach()))[0]):
            return loss * float("nan")
        return loss


# --------------------------------------------------------------------------- launching


def launch(spec: dict, *, strategy: str, devices: int, num_nodes: int, accelerator: str, device: Any) -> Run:
    """Start (or join) ``devices * num_nodes`` ranks through Lightning Fabric; each runs :func:`pyrovi.loop.train`.

    ``spec`` is what :func:`pyrovi.fit` validated. ``strategy="ddp"``: this script is
    re-run for ranks 1..devices-1 (as torchrun would), or, under torchrun/SLURM, joins
    the ranks they started; every rank gets a :class:`Run` back. ``"ddp_spawn"``: ranks
    are started with multiprocessing from this call and rank 0's trained weights come
    back into ``model``/``guide`` in this process (``model``, ``guide`` and ``data``
    must be picklable).

    Raises:
        ConfigError: Lightning is missing (with the install command), or device and accelerator disagree.
    """
    strategy = lookup(STRATEGIES, strategy, "strategy")
    fabric_mod = _require_lightning()
    accel = _accelerator(accelerator, device)
    world = devices * num_nodes
    describe = {"strategy": strategy, "devices": devices, "num_nodes": num_nodes, "world_size": world,
                "accelerator": accel, "batch_size_per_rank": spec["cfg"].batch_size // world}
    fabric = fabric_mod.Fabric(accelerator=accel, strategy=strategy, devices=devices, num_nodes=num_nodes)
    if strategy != "ddp_spawn":
        return fabric.launch(_worker, spec, describe)
    # Spawned ranks train copies; rank 0 hands its learned tensors back to this process through a file:
    # Lightning returns a worker's value through a pipe that is read only after every rank has exited,
    # so a value over the pipe's 64 KiB (any real model's weights) left rank 0 blocked forever
    with tempfile.TemporaryDirectory(prefix="pyrovi-spawn-") as handoff:
        path = os.path.join(handoff, "rank0.safetensors")
        try:
            fabric.launch(_worker, spec, describe, path)
        except Exception as e:  # torch's ProcessRaisedException carries a rank's pyrovi error as text
            raise _rank_error(e) from None
        if not os.path.exists(path):  # this node has no global rank 0 (num_nodes > 1)
            raise PyroviError("ddp_spawn: rank 0 trained on another node, so no weights came back to this process")
        tensors, result = load_tensors(path)
    model, guide, tr = spec["model"], spec["guide"], spec["train"]
    for m in (model, guide):
        if isinstance(m, torch.nn.Module):
            m.to(dtype=spec["dtype"])  # the precision the ranks trained in
    run = Run(model, guide, spec["obj"], result["config"], history=result["history"], directory=spec["out"],
              param_state=empty_param_state(), device=_device_of(model, guide), data=spec["ds"],
              metrics=result["metrics"], model_kwargs=spec["model_kwargs"])
    probe, kw = run.call_args(tr.x[:2], None if tr.y is None else tr.y[:2])
    run.load_state_tensors(tensors, result["constraints"], probe, kw)
    for m in (model, guide):
        if isinstance(m, torch.nn.Module):
            m.eval()
    return run


def _rank_error(e: Exception) -> Exception:
    """The pyrovi error a spawned rank raised (torch hands it back as text in its traceback), else ``e``."""
    last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
    classes = {f"pyrovi.errors.{c.__name__}": c for c in (ConfigError, DataError, TrainingError, CheckpointError)}
    name, _, message = last.partition(": ")
    return classes[name](message) if name in classes else e


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


def _worker(fabric, spec: dict, describe: dict, handoff: "str | None" = None):
    """One rank's fit (every rank runs this); returns the Run, or, spawned, None: rank 0 writes its tensors and
    their run's record (history, metrics, config, param constraints) to the safetensors file ``handoff``."""
    run = train(FabricWorld(fabric, describe), spec)
    if describe["strategy"] == "ddp_spawn":
        if fabric.is_global_zero:
            save_tensors(handoff, run.state_tensors(), {"constraints": run.param_constraints(), "history": run.history,
                                                        "metrics": run.metrics, "config": run.config})
        return None
    return run
