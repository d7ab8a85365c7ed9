"""The one training loop of ``fit``, for one process or for N data-parallel ranks.

(Over 500 lines on purpose: the loop is one idea, read in one sitting — the world it asks,
the loss it minimizes, one step, one epoch, divergence and the whole fit on one rank; the
pieces that are not the loop itself live in train_state, traces and distributed.)

``pyrovi.fit`` validates its options and data, then hands :func:`train` a
*world* and a spec. The loop never asks how many processes there are; it asks
the world:

* which rows this rank trains on in an epoch (:meth:`World.rows`),
* to reseed at the start of an epoch (:meth:`World.begin_epoch`),
* to sum numbers over ranks (:meth:`World.sum`),
* to run a write on rank 0 only, failing on every rank if it fails (:meth:`World.on_rank0`),
* to wrap the objective so gradients are averaged over ranks (:meth:`World.objective`).

:class:`World` is one process. :class:`pyrovi.distributed.FabricWorld` is the
same interface over a Lightning Fabric process group, which starts and joins
the processes (Lightning stays the engine; this module is the loop only).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Optional

import pyro
import torch
from tqdm.auto import tqdm

from . import data as data_mod
from .callbacks import Dispatch, State
from . import particles
from .checkpoint import read_json, write_json
from .errors import ConfigError, PyroviError, TrainingError
from .run import Run, default_device, discover_params, empty_param_state
from .run_files import CHECKPOINT, CONFIG, HELD_OUT_KEYS, METRICS, release_run
from .train_state import best_from_checkpoint, make_optimizer, new_loop, prepare_out, restore, save_checkpoint, scheduler
from .precision import autocast, compile_nets, grad_scaler, tf32
from .traces import ScalePlate, guess_max_plate_nesting, structure

__all__ = ["World", "BatchLoss", "Parts", "train", "train_step", "batch_step", "mean_loss", "record_epoch", "finish",
           "check_structure", "diverged", "optimizer_state_finite", "DivergenceWatch", "DIVERGENCE_MARGIN",
           "DIVERGENCE_FACTOR"]


class World:
    """One process: rank 0 of a world of 1, training on ``device``.

    The interface the loop uses; :class:`pyrovi.distributed.FabricWorld` implements it for N ranks.
    """

    rank = 0
    size = 1
    where = ""  # added to error messages that name a step ("on some rank" under DDP)

    def __init__(self, device):
        self.device = torch.device(device)

    @property
    def is_zero(self) -> bool:
        """Whether this process writes the run directory and shows the progress bar."""
        return self.rank == 0

    def rows(self, n: int, epoch: int, seed: int, gen: torch.Generator) -> torch.Tensor:
        """Row indices this rank trains on in ``epoch``, in order: a permutation of ``range(n)`` from ``gen``."""
        return torch.randperm(n, generator=gen)

    def begin_epoch(self, seed: int, epoch: int) -> None:
        """Called before every epoch; one process keeps one random stream for the whole run."""

    def sum(self, *values: float) -> list:
        """``values`` summed over ranks."""
        return [float(v) for v in values]

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        return obj

    def on_rank0(self, what: str, fn) -> None:
        """Run ``fn`` (a write named ``what``) on rank 0 only."""
        fn()

    def barrier(self) -> None:
        """Wait until every rank has arrived."""

    def own(self, params: list) -> list:
        """The parameters the optimizer updates (N ranks: turned into ones DDP can watch)."""
        return params

    def objective(self, obj, model, guide, params: list):
        """The callable the training steps evaluate: ``obj`` itself (N ranks: through DDP)."""
        return obj

    def describe(self) -> Optional[dict]:
        """The ``"distributed"`` section of ``config.json``; None for one process."""
        return None


# --------------------------------------------------------------------------- the loss


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
        objective: a :class:`pyrovi.objectives.Objective` (its ``loss`` returns -bound, nats).
        model, guide: Pyro callables.
        global_sites: whether model or guide has sample sites outside the data plate.
        data_plate: name of the plate over datapoints.
        full: full-data mode.
        pass_y, model_kwargs: the calling rule of :mod:`pyrovi.inputs`.
    """

    def __init__(self, objective, model, guide, *, global_sites: bool, data_plate: str = "data",
                 full: bool = False, pass_y: bool = False, model_kwargs: Optional[dict] = None,
                 precision: Optional[str] = None):
        self.objective, self.model, self.guide = objective, model, guide
        self.global_sites, self.data_plate, self.full = global_sites, data_plate, full
        self.pass_y, self.model_kwargs = pass_y, dict(model_kwargs or {})
        self.precision = precision  # mixed precision: the loss runs under autocast (pyrovi.precision)
        self.scaler = None  # a GradScaler for "16-mixed", set by the loop

    def __call__(self, x, y=None, n: Optional[int] = None, beta: float = 1.0) -> torch.Tensor:
        """Loss of the batch ``x`` (B rows) drawn from ``n`` rows (default B): a scalar, nats per datapoint."""
        b = x.shape[0]
        n = b if n is None else n
        model, guide = self.model, self.guide
        scaled = self.global_sites and not self.full and n != b
        if scaled:
            model, guide = ScalePlate(self.data_plate, n / b)(model), ScalePlate(self.data_plate, n / b)(guide)
        args = (x, y) if (self.pass_y and y is not None) else (x,)
        # beta goes to the objective, which keeps its fast path under KL warm-up
        if self.precision is None:
            loss = self.objective.loss(model, guide, args, self.model_kwargs, beta=beta)
        else:
            with autocast(self.precision, x.device):
                loss = self.objective.loss(model, guide, args, self.model_kwargs, beta=beta).float()
        return loss / (n if (scaled or self.full) else b)


class Parts:
    """An objective over a batch that may hold unlabelled rows, plus extra loss terms (nats, summed).

    .. math::

        \\ell = -\\mathcal L(x_l, y_l) - \\mathcal L(x_u) + \\text{extra}(x_l, y_l)

    Semi-supervised (``semi_supervised=True``, Pyro's SS-VAE): the batch's labelled rows
    (:func:`pyrovi.inputs.labelled_rows`) are one call ``model(x_l, y_l)``, the others one call
    ``model(x_u)`` (y=None: model and guide infer y); each part that has rows is scored by
    ``objective``. ``extra_loss(x, y, **model_kwargs)`` (e.g. the M2 classifier's
    ``-alpha log q(y|x)``, summed over its rows) is added on the labelled rows, or on every row
    when not semi-supervised. :class:`BatchLoss` divides the sum by the batch size as always.

    It wraps the objective *inside* what the world evaluates (N ranks: one DDP forward and one
    collective per step however a rank's rows split). Other attributes are the objective's.
    """

    def __init__(self, objective, *, semi_supervised: bool = False, extra_loss=None):
        self.objective, self.semi_supervised, self.extra_loss = objective, semi_supervised, extra_loss

    def __getattr__(self, name):  # only for names Parts lacks: max_plate_nesting, path_counts, config, ...
        if name == "objective":  # not set yet (unpickling, copying)
            raise AttributeError(name)
        return getattr(self.objective, name)

    def loss(self, model, guide, args: tuple = (), kwargs: Optional[dict] = None, *, beta: float = 1.0
             ) -> torch.Tensor:
        """``-bound`` of every part of the batch ``args = (x[, y])`` plus the extra terms (nats, summed over rows)."""
        kwargs = dict(kwargs or {})
        x, y = args[0], (args[1] if len(args) > 1 else None)
        if self.semi_supervised and y is not None:
            from .inputs import labelled_rows

            lab = labelled_rows(y)
            xl, yl = x[lab], y[lab]
            parts = [a for a in ((xl, yl), (x[~lab],)) if a[0].shape[0]]
        else:
            parts, xl, yl = [tuple(args)], x, y
        loss = sum(self.objective.loss(model, guide, a, kwargs, beta=beta) for a in parts)
        if self.extra_loss is not None and xl.shape[0]:
            loss = loss + self.extra_loss(xl, yl, **kwargs)
        return loss


# --------------------------------------------------------------------------- structure


def check_structure(shape: dict, guide, cfg, n: int) -> None:
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


# --------------------------------------------------------------------------- one step, one epoch


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
    scaler = getattr(loss_fn, "scaler", None)  # "16-mixed": float16 gradients need loss scaling
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(params or [p for grp in optimizer.param_groups for p in grp["params"]],
                                       clip_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return value


def kept(loop: dict, ckpt_path: Optional[str]) -> str:
    """What a stopped fit leaves behind, for its error message: the last checkpoint, or that there is none."""
    ep = loop["epoch"]
    if not ckpt_path:
        return "nothing was saved (no out=)"
    if ep == 0:
        return f"no checkpoint was written yet (it stopped in epoch 1); {ckpt_path!r} holds none"
    return f"the last good checkpoint (epoch {ep}) is kept in {ckpt_path!r}"


def batch_step(loss_fn, opt, train, idx: torch.Tensor, n: int, cfg, loop: dict, warm_steps: int,
               binarize: Optional[str], params: list, ckpt_path: Optional[str], where: str = "") -> tuple:
    """One optimizer step on rows ``idx`` of ``train``: ``(loss in nats/datapoint, beta used, rows)``.

    Dynamic binarization, the KL warm-up's beta for this step, and a clear stop on a non-finite loss.
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
            f"training stopped; {kept(loop, ckpt_path)}. Try a lower lr, clip_norm, or check the data.")
    return loss, beta, xb.shape[0]


def streamed_batches(train, order: torch.Tensor, batch_size: int):
    """For a split streamed from disk (``x`` a :class:`pyrovi.images.LazyRows`): an iterator of the epoch's
    batches as in-memory Splits on the training device, in ``order``; None for in-memory data."""
    if torch.is_tensor(train.x) or not hasattr(train.x, "batches"):
        return None
    y = train.y
    return (data_mod.Split(x, None if y is None else y[rows.to(y.device)])
            for rows, x in train.x.batches(order, batch_size))


# --------------------------------------------------------------------------- divergence

#: A step's training loss counts as diverged when it exceeds the best step loss seen so far by more
#: than ``max(DIVERGENCE_MARGIN, DIVERGENCE_FACTOR * |best|)`` nats per datapoint (see :func:`diverged`).
DIVERGENCE_MARGIN = 1e3
DIVERGENCE_FACTOR = 100.0


def diverged(loss: float, best: float) -> bool:
    """Whether a finite training ``loss`` (nats per datapoint) has run away from the ``best`` one seen so far.

    The rule is ``loss > best + max(1e3, 100 * |best|)``. Why these numbers:

    * The loss is a per-datapoint negative bound, so 1000 nats above the best means the
      model now gives each datapoint e^-1000 of the probability it gave before: no
      minibatch noise, learning-rate spike or bad batch does that while training works
      (minibatch losses of the digits/MNIST VAEs vary by a few nats, a few percent).
    * Losses come in any scale (a Gaussian likelihood with sigma=1e-6 starts near 1e13
      nats per datapoint and is still learning), so the margin also grows with the
      loss itself: a loss 100 times the size of its best is a blow-up at any scale.
    * No absolute cap (such as "any loss > 1e10") is applied: such a cap would stop
      models that legitimately start there (the sigma=1e-6 case above). What a finite
      loss cannot hide is overflow in the optimizer, which :func:`optimizer_state_finite`
      checks after every epoch.

    ``best`` is infinite before the first step: nothing has diverged then.
    """
    if not math.isfinite(best):
        return False
    return loss > best + max(DIVERGENCE_MARGIN, DIVERGENCE_FACTOR * abs(best))


@torch.no_grad()
def optimizer_state_finite(opt: torch.optim.Optimizer) -> bool:
    """Whether every floating-point tensor of ``opt``'s state (Adam's ``exp_avg``, ``exp_avg_sq``) is finite.

    One reduction per tensor and one host sync in all; ``fit`` calls it once per epoch.
    Infinite second moments come from gradients whose square overflows (|g| > 1.8e19 in
    float32); the loss can stay finite while the weights stop moving (Adam divides by inf).
    """
    bad = None
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0:
                b = ~torch.isfinite(v).all()
                bad = b if bad is None else bad | b.to(bad.device)
    return bad is None or not bool(bad)


class DivergenceWatch:
    """Stops a fit whose loss runs away (:func:`diverged`) or whose optimizer state overflows.

    One process stops at the diverging step itself. Under N ranks each rank's step
    losses differ (different rows), so a rank only remembers its first diverging step
    and :meth:`end_epoch` decides from numbers summed over ranks (:meth:`World.sum`):
    every rank makes the same decision and they stop together, not one rank alone
    while the others wait in DDP's gradient all-reduce.

    The best step loss is tracked only at full ``beta``: during KL warm-up the loss is a
    different function each step. It lives in ``loop["best_train"]``, so a resumed fit
    keeps it.
    """

    def __init__(self, world: World, cfg, loop: dict, ckpt_path: Optional[str]):
        self.world, self.cfg, self.loop, self.ckpt_path = world, cfg, loop, ckpt_path
        self.first = None  # (step, loss, best) of this rank's first diverging step in this epoch
        try:
            self.loop["best_train"] = float(loop.get("best_train", math.inf))
        except (TypeError, ValueError):
            self.loop["best_train"] = math.inf

    def _advice(self) -> str:
        clip = "a smaller clip_norm" if self.cfg.clip_norm is not None else "clip_norm=10 (gradient clipping)"
        return (f"Try a lower lr (now {self.cfg.lr:g}), {clip}, or another estimator (e.g. objective='elbo' or "
                "'iwae' instead of 'stl'/'dreg'); check the likelihood's scale (a tiny fixed sigma makes huge "
                "gradients)")

    def step(self, loss: float, beta: float) -> None:
        """After step ``loop["step"] + 1`` of epoch ``loop["epoch"] + 1`` returned ``loss`` (finite)."""
        if beta != self.cfg.beta:
            return
        best = self.loop["best_train"]
        if diverged(loss, best):
            if self.first is None:
                self.first = (self.loop["step"] + 1, loss, best)
            if self.world.size == 1:
                self.raise_diverged(1)
        self.loop["best_train"] = min(best, loss)

    def raise_diverged(self, count: float) -> None:
        step, loss, best = self.first if self.first is not None else (self.loop["step"], math.nan, math.nan)
        where = "" if self.world.size == 1 else f" (this rank; {int(count)} diverged step(s) over all ranks)"
        raise TrainingError(
            f"training diverged at epoch {self.loop['epoch'] + 1}, step {step}{where}: the training loss rose to "
            f"{loss:.4g} nats per datapoint, far above its best {best:.4g} (more than max({DIVERGENCE_MARGIN:g}, "
            f"{DIVERGENCE_FACTOR:g}*|best|) above; rule: pyrovi.loop.diverged); training stopped; {kept(self.loop, self.ckpt_path)}. "
            + self._advice())

    def end_epoch(self, opt: torch.optim.Optimizer) -> None:
        """Before the epoch's checkpoint: stop (on every rank alike) on a diverged step or non-finite Adam state."""
        count, state_bad = self.world.sum(0.0 if self.first is None else 1.0,
                                          0.0 if optimizer_state_finite(opt) else 1.0)
        if count:
            self.raise_diverged(count)
        if state_bad:
            raise TrainingError(
                f"the optimizer's state (Adam's moment estimates) became non-finite during epoch "
                f"{self.loop['epoch'] + 1} (by step {self.loop['step']}){self.world.where}: a gradient overflowed, "
                f"so the weights no longer train although the loss may look finite; training stopped; "
                f"{kept(self.loop, self.ckpt_path)}. " + self._advice())


@torch.no_grad()
def mean_loss(loss_fn: BatchLoss, split, batch_size: Optional[int], world: Optional[World] = None) -> float:
    """Loss per datapoint on a whole split, no gradients; N ranks score rows ``rank::size`` and sum.

    Each chunk of ``batch_size`` rows (None: one pass) estimates the split's per-datapoint loss
    (sites in the data plate scaled by n/b); the chunks are averaged with weights b/n, so global
    terms count once per split.
    """
    world = world or World(split.x.device)
    for m in (loss_fn.model, loss_fn.guide):
        if isinstance(m, torch.nn.Module):
            m.eval()
    n = len(split)
    if world.size == 1:
        rows = None  # every row, in order: slices, no gather
        count = n
    else:
        rows = torch.arange(world.rank, n, world.size, device=split.x.device)
        count = len(rows)
    step = count if batch_size is None else batch_size
    total = 0.0
    for i in range(0, count, step):
        idx = slice(i, i + step) if rows is None else rows[i:i + step]
        xb = split.x[idx]
        yb = None if split.y is None else split.y[idx]
        total += float(loss_fn(xb, yb, n)) * xb.shape[0]
    total, count = world.sum(total, count)
    return total / count


def record_epoch(run, loop: dict, cfg, best: dict, *, train_loss: float, val_loss: float, lr: float,
                 beta: float, secs: float, seen: float, ckpt_path: Optional[str] = None) -> None:
    """End-of-epoch bookkeeping: refuse a non-finite validation loss, append the history row, track the best.

    With early stopping on, ``best`` keeps a copy of the best-validation weights. ``val_loss=None``:
    an epoch without validation (``val_every``); it neither improves the best nor counts against patience.
    """
    if val_loss is not None and not math.isfinite(val_loss):
        raise TrainingError(f"validation loss is {val_loss} after epoch {loop['epoch'] + 1}; training stopped; "
                            f"{kept(loop, ckpt_path)}")
    loop["epoch"] += 1
    loop["seconds"] += secs
    run.history.append({"epoch": loop["epoch"], "train_loss": train_loss, "val_loss": val_loss, "lr": lr,
                        "beta": beta, "seconds": secs, "items_per_second": seen / secs})
    if val_loss is None:
        return
    if val_loss < loop["best"]:
        loop.update(best=val_loss, best_epoch=loop["epoch"], bad_epochs=0)
        if cfg.patience is not None:
            best.clear()
            best.update({k: v.detach().clone() for k, v in run.state_tensors().items()})
    else:
        loop["bad_epochs"] += 1


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


def _epochs(world: World, run, loss_fn, val_fn, train, val, cfg, opt, sched, shuffle_gen, loop, ckpt_path,
            binarize, callbacks, best, steps_per_epoch: int) -> None:
    """Train until ``cfg.epochs`` (or early stopping), checkpointing after every epoch.

    Validates after every ``cfg.val_every``-th epoch and after the last one; ``callbacks``
    (progress bar and loggers included) are called on rank 0 (:mod:`pyrovi.callbacks`).
    """
    model, guide = run.model, run.guide
    n = len(train)
    full = cfg.batch_size is None
    per_rank = None if full else cfg.batch_size // world.size  # rows per rank per step
    warm_steps = cfg.warmup * steps_per_epoch
    params = [p for g in opt.param_groups for p in g["params"]]
    watch = DivergenceWatch(world, cfg, loop, ckpt_path)
    hooks = Dispatch(callbacks, world, State(run, loop["epoch"], loop["step"], cfg.epochs,
                                             ckpt_path and os.path.dirname(ckpt_path), world.size))
    every = cfg.val_every
    try:
        hooks.begin(loop)
        while loop["epoch"] < cfg.epochs:
            t0 = time.perf_counter()
            world.begin_epoch(cfg.seed, loop["epoch"])
            for m in (model, guide):
                if isinstance(m, torch.nn.Module):
                    m.train()
            order = world.rows(n, loop["epoch"], cfg.seed, shuffle_gen).to(train.x.device)
            total, seen = 0.0, 0
            stream = streamed_batches(train, order, len(order) if full else per_rank)
            for i in range(steps_per_epoch):
                idx = order if full else order[i * per_rank:(i + 1) * per_rank]
                src = train
                if stream is not None:  # read from disk one batch ahead by the DataLoader's workers
                    src, idx = next(stream), slice(None)
                run.objective.at_step(loop["step"])  # its warm start counts the steps before a resume too
                loss, beta, rows = batch_step(loss_fn, opt, src, idx, n, cfg, loop, warm_steps, binarize, params,
                                              ckpt_path, where=world.where)
                watch.step(loss, beta)
                b = n / steps_per_epoch if full else rows  # datapoints one step stands for
                total += loss * b
                seen += b
                loop["step"] += 1
                hooks.step(loop, {"step": loop["step"], "epoch": loop["epoch"] + 1, "loss": loss, "beta": beta,
                                  "lr": opt.param_groups[0]["lr"]})
            lr_now = opt.param_groups[0]["lr"]
            sched.step()
            total, seen = world.sum(total, seen)
            watch.end_epoch(opt)  # before this epoch's checkpoint: a diverged epoch is never saved
            watch.first = None
            ep = loop["epoch"] + 1
            if not len(val):  # no validation split (val_fraction=0): early stopping and the best epoch use the
                val_loss = total / seen  # training loss, known every epoch whatever val_every says
            elif ep % every == 0 or ep >= cfg.epochs:
                val_loss = mean_loss(val_fn, val, None if full else max(per_rank, 256), world)
            else:
                val_loss = None
            secs = time.perf_counter() - t0
            record_epoch(run, loop, cfg, best, train_loss=total / seen, val_loss=val_loss, lr=lr_now, beta=beta,
                         secs=secs, seen=seen, ckpt_path=ckpt_path)
            if ckpt_path:
                world.on_rank0("writing the checkpoint",
                               lambda: save_checkpoint(ckpt_path, run, opt, sched, shuffle_gen, loop, best))
                hooks.checkpoint(loop, ckpt_path)
            hooks.epoch(loop, run.history[-1])
            if cfg.patience is not None and loop["bad_epochs"] >= cfg.patience:
                if world.is_zero:
                    tqdm.write(f"early stopping after epoch {loop['epoch']}: no validation improvement for "
                               f"{cfg.patience} {'epochs' if every == 1 else 'validations'} "
                               f"(best {loop['best']:.4f} at epoch {loop['best_epoch']})")
                break
    except KeyboardInterrupt:
        if world.is_zero:
            tqdm.write(f"interrupted; the checkpoint of epoch {loop['epoch']} is kept"
                       f"{' in ' + repr(ckpt_path) + ' (continue with resume=True)' if ckpt_path else ''}",
                       file=sys.stderr)
        raise
    finally:
        hooks.end(loop)


# --------------------------------------------------------------------------- a whole fit


def _held_out_metrics(out: Optional[str]) -> dict:
    """The held-out results in ``out/metrics.json`` (empty when there are none or the file is unreadable)."""
    path = None if out is None else os.path.join(out, METRICS)
    if path is None or not os.path.isfile(path):
        return {}
    try:
        metrics = read_json(path, "metrics")
    except PyroviError:
        return {}
    return {k: metrics[k] for k in HELD_OUT_KEYS if isinstance(metrics, dict) and k in metrics}


def _path_name(calls: dict) -> Optional[str]:
    """``"fast"``, ``"traced"`` or ``"mixed"``: which estimator path the objective's calls took (None: no calls)."""
    used = sorted(k for k, v in calls.items() if v)
    return None if not used else used[0] if len(used) == 1 else "mixed"


def train(world: World, spec: dict) -> Run:
    """Train ``spec["model"]``/``spec["guide"]`` on this rank of ``world``; the :class:`Run` of the fit.

    ``spec`` is what :func:`pyrovi.fit` validated: model, guide, obj (an Objective), cfg (TrainConfig),
    train/val (Splits), ds (Dataset or None), config (``config.json``), dtype, binarize, model_kwargs,
    out, resume, overwrite, progress. Every rank runs this; only rank 0 writes ``out``; the figures and
    report are drawn afterwards from the run directory (:func:`pyrovi.report.write`).
    """
    out = world.broadcast(spec["out"])  # every rank uses rank 0's path (a default out may hold the time)
    ckpt_path = None if out is None else os.path.join(out, CHECKPOINT)
    if out is not None:
        world.on_rank0("preparing out", lambda: prepare_out(out, spec["resume"], spec["overwrite"]))
    try:
        return _fit_rank(world, spec, out, ckpt_path)
    except BaseException:
        if out is not None and world.is_zero:
            release_run(out)  # the writer's lock prepare_out took: a failed or interrupted fit frees it at once
        raise


def _probes(run, train_, rows: int, semi: bool) -> list:
    """``[(args, kwargs)]`` of the calls that find plates, sites and parameters on the first ``rows`` rows.

    Semi-supervised: the labelled call ``model(x_l, y_l)`` (first labelled rows) and the
    unlabelled call ``model(x_u)``, unlabelled first (it has the most latent sites); each only when
    the data has such rows.
    """
    y = train_.y
    if not semi or y is None:
        return [run.call_args(train_.x[:rows], None if y is None else y[:rows])]
    from .inputs import labelled_rows

    lab = labelled_rows(y)
    calls = []
    for m, has_y in ((~lab, False), (lab, True)):
        idx = m.nonzero().flatten()[:rows]  # index first: a boolean mask would gather every such row of the data
        if len(idx):
            calls.append(run.call_args(train_.x[idx], y[idx] if has_y else None))
    return calls


def _fit_rank(world: World, spec: dict, out: Optional[str], ckpt_path: Optional[str]) -> Run:
    """:func:`train` after the run directory is prepared (and locked, on rank 0)."""
    model, guide, obj, cfg = spec["model"], spec["guide"], spec["obj"], spec["cfg"]
    dev, dt = world.device, spec["dtype"]
    for m in (model, guide):
        if isinstance(m, torch.nn.Module):
            m.to(dev, dt)
    train_, val = spec["train"], spec["val"]
    train_ = data_mod.Split(train_.x.to(dev, dt), None if train_.y is None else train_.y.to(dev))
    val = data_mod.Split(val.x.to(dev, dt), None if val.y is None else val.y.to(dev))
    if spec["binarize"] == "dynamic":  # validation is scored on one fixed binarization
        g = torch.Generator().manual_seed(cfg.seed + 2)
        val = data_mod.Split((torch.rand(val.x.shape, generator=g).to(dev) < val.x).to(dt), val.y)
    config = dict(spec["config"])
    if world.describe() is not None:
        config["distributed"] = world.describe()
    run = Run(model, guide, obj, config, directory=out if world.is_zero else None, param_state=empty_param_state(),
              device=dev, data=spec["ds"], model_kwargs=spec["model_kwargs"])

    pyro.set_rng_seed(cfg.seed)  # the same draws on every rank for anything initialized lazily below
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)
    with run.scope():
        rows = len(train_) if cfg.batch_size is None else min(cfg.batch_size, len(train_))
        probes = _probes(run, train_, rows, getattr(cfg, "semi_supervised", False))
        probe, kw = probes[0]
        extra_fn = spec.get("extra_loss")
        with default_device(dev):  # pyro.param inits and lazy autoguide params land on `dev`
            obj.max_plate_nesting = max(guess_max_plate_nesting(model, guide, a, kw) for a, _ in probes)
            obj.data_plate = cfg.data_plate
            shape = structure(model, guide, probe, kw, cfg.data_plate)
            particles.settle(obj, spec.get("vectorize"), model, guide, probe, kw, config)
            params = discover_params(model, guide, lambda: [obj(model, guide, *a, **kw) for a, _ in probes] + (
                [extra_fn(*probes[-1][0][:2], **kw)] if extra_fn is not None and len(probes[-1][0]) > 1 else []))
        if not params:
            raise ConfigError("found no trainable parameters in model or guide")
        check_structure(shape, guide, cfg, len(train_))
        params = world.own(params)
        opt = make_optimizer(params, cfg, spec.get("optimizer_class"))
        sched = scheduler(opt, cfg)
        loop = new_loop()
        resuming = world.broadcast(bool(spec["resume"] and ckpt_path and os.path.isfile(ckpt_path)))
        if resuming:
            loop = restore(ckpt_path, run, opt, sched, shuffle_gen, config, dev)
        start_epoch, earlier = loop["epoch"], _held_out_metrics(out) if resuming else {}
        semi = getattr(cfg, "semi_supervised", False)
        if semi and shape["global_sites"]:
            raise ConfigError("semi_supervised=True needs every sample site inside the data plate "
                              f"{cfg.data_plate!r}: the labelled and unlabelled calls of a batch would each count "
                              "a global latent once. Fit global latents without semi-supervision, or name the "
                              "per-datapoint plate with data_plate=")
        # the labelled/unlabelled calls and extra terms go inside what the world evaluates (DDP: one forward)
        inner = Parts(obj, semi_supervised=semi, extra_loss=extra_fn) if semi or extra_fn is not None else obj
        step_obj = world.objective(inner, model, guide, params)  # N ranks: DDP broadcasts rank 0's weights here
        if out is not None:
            world.on_rank0("writing config.json", lambda: write_json(os.path.join(out, CONFIG), config))
        best = best_from_checkpoint(ckpt_path, dev) if resuming and cfg.patience is not None else {}
        common = dict(global_sites=shape["global_sites"], data_plate=cfg.data_plate, full=cfg.batch_size is None,
                      pass_y=run.pass_y, model_kwargs=spec["model_kwargs"])
        loss_fn = BatchLoss(step_obj, model, guide, precision=getattr(cfg, "precision", None), **common)
        loss_fn.scaler = grad_scaler(loss_fn.precision, dev)
        # validation: the bound alone (no extra loss), in full precision
        val_fn = BatchLoss(Parts(obj, semi_supervised=True) if semi else obj, model, guide, **common)
        compile_nets(getattr(cfg, "compile", None), model, guide)
        m = len(train_) // world.size  # rows per rank per epoch
        steps = math.ceil(m / ((cfg.batch_size and cfg.batch_size // world.size) or shape["subsample_size"] or m))
        before = dict(getattr(obj, "path_counts", {}))
        with tf32(loss_fn.precision, dev):
            _epochs(world, run, loss_fn, val_fn, train_, val, cfg, opt, sched, shuffle_gen, loop, ckpt_path,
                    spec["binarize"], spec.get("callbacks", ()), best, steps)
        calls = {k: v - before.get(k, 0) for k, v in getattr(obj, "path_counts", {}).items()}
        if best and loop["best_epoch"] != loop["epoch"]:
            run.load_state_tensors(best, {})  # early stopping hands back the best-validation weights
    extra = {"steps": loop["step"], "estimator_path": _path_name(calls), "estimator_calls": calls}
    if len(val) == 0:
        extra["val_loss_is"] = "train_loss"  # val_fraction=0: no validation split
    if world.size > 1:
        extra["world_size"] = world.size
    run.metrics = finish(run, loop, **extra)
    if loop["epoch"] == start_epoch:  # a resume that trained nothing: the held-out results still describe the weights
        run.metrics.update(earlier)
    if out is not None:
        world.on_rank0("saving the run", lambda: run.save(out))
    world.barrier()  # no rank returns before rank 0 has written the run directory
    return run
