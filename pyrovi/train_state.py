"""What a training run keeps between epochs: optimizer, scheduler, checkpoint, run directory.

Used by the one training loop (:mod:`pyrovi.loop`) whatever the number of
processes: the optimizer ``fit`` builds (:func:`adam`), its learning-rate
schedule, and the checkpoint that lets ``fit(resume=True)`` continue the same
trajectory (weights, optimizer moments, scheduler, loop counters, RNG states).
"""

from __future__ import annotations

import json
import math
import os

import torch

from ._version import __version__
from .checkpoint import load_tensors, save_tensors
from .errors import CheckpointError, ConfigError, PyroviError, TrainingError
from .run_files import CHECKPOINT, HISTORY, METRICS, WEIGHTS, append_history, checkpoint_history, lock_run

__all__ = ["adam", "OPTIMIZERS", "optimizer_class", "check_optimizer_kwargs", "make_optimizer", "scheduler", "save_checkpoint", "restore", "best_from_checkpoint", "prepare_out", "new_loop",
           "check_checkpoint", "check_history", "HISTORY_KEYS"]


def new_loop() -> dict:
    """The loop counters of a fresh run (stored in every checkpoint under ``"loop"``)."""
    return {"epoch": 0, "step": 0, "best": float("inf"), "best_epoch": 0, "bad_epochs": 0, "seconds": 0.0,
            "best_train": float("inf")}


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


def save_checkpoint(path, run, opt, sched, shuffle_gen, loop: dict, best: dict) -> None:
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
        # the rows themselves are appended to history.csv (authoritative up to loop["epoch"] rows):
        # a checkpoint holding the whole history made a run's I/O grow with the square of its epochs
        "history_last": run.history[-1] if run.history else None,
        "loop": loop,
        "config": {k: run.config[k] for k in ("model", "guide", "objective", "train")},
    }
    try:
        append_history(os.path.join(os.path.dirname(path), HISTORY), run.history)  # before the checkpoint counts it
        save_tensors(path, tensors, meta)
    except OSError as e:  # full disk, directory made read-only, ...: atomic_write kept the previous file
        raise TrainingError(f"could not write the checkpoint {path!r} after epoch {loop['epoch']}: "
                            f"{e.strerror or e}; the previous checkpoint is kept. Free disk space and "
                            "continue with resume=True") from None


def _same(a: dict, b: dict, keys) -> list:
    return [k for k in keys if a.get(k) != b.get(k)]


#: training options added after runs were first saved, with their defaults (:class:`pyrovi.train.TrainConfig`'s):
#: a run whose config lacks one trained with that default, so resuming it with the default is no change
LATER_OPTION_DEFAULTS = {"optimizer": "adam", "optimizer_kwargs": None, "semi_supervised": False, "extra_loss": None}

#: training options a resume may change: how long to go on, and when to stop early
RESUME_MAY_CHANGE = ("epochs", "patience", "val_every")


def _changed_options(saved, now) -> list:
    """``["lr=0.01 (the run has 0.001)", ...]``: options of ``now`` that differ from the run's ``saved`` ones.

    A resumed run continues one trajectory; a changed lr, batch size, schedule or beta would
    silently make it another (the scheduler and optimizer state restored from the checkpoint
    would even override some of them), so they are refused instead of half-applied.
    """
    if not isinstance(saved, dict) or not isinstance(now, dict):
        return []
    saved = {**LATER_OPTION_DEFAULTS, **saved}  # an option newer than the run: the run trained with its default
    return [f"{k}={now.get(k)!r} (the run has {saved.get(k)!r})" for k in sorted(set(saved) | set(now))
            if k not in RESUME_MAY_CHANGE and saved.get(k) != now.get(k)]



def prepare_out(out: str, resume: bool, overwrite: bool) -> None:
    """Create and probe the run directory ``out`` and take its writer's lock (held until the run is saved)."""
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
    lock_run(out, "training")  # before the temp files below: they may be a live trainer's
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
    # From here the directory is being rewritten: a finished run's final files go first, so a
    # process killed before the new ones are saved leaves an unfinished run (load_run falls back
    # to the checkpoint and warns), never one run's weights beside another's config.
    stale = (WEIGHTS,) + ((CHECKPOINT, HISTORY, METRICS) if overwrite and not resume else ())
    for name in stale if (resume or overwrite) else ():
        try:
            os.unlink(os.path.join(out, name))
        except FileNotFoundError:
            pass


def adam(params, *, lr: float, weight_decay: float = 0.0, **kwargs) -> torch.optim.Adam:
    """The optimizer ``fit`` (and the distributed loop) use: torch's Adam, with its fused kernel.

    Same update rule as ``torch.optim.Adam``'s default implementation (up to float
    rounding); on CPU torch's default is a Python loop over parameters, which took
    1.6 ms of a 3.8 ms VAE step against 0.4 ms fused (``benchmarks/RESULTS.md``).
    Falls back to the default where no fused kernel exists for the parameters' device.
    """
    params = list(params)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}  # betas from JSON
    if kwargs.get("fused", True) is not True or kwargs.get("foreach"):  # the user chose the implementation
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **kwargs)
    kwargs.pop("fused", None)
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **kwargs)


def _optimizers() -> dict:
    from pyro.optim.clipped_adam import ClippedAdam  # a torch.optim.Optimizer (pyro.optim.ClippedAdam wraps it)

    return {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
            "rmsprop": torch.optim.RMSprop, "adagrad": torch.optim.Adagrad, "clippedadam": ClippedAdam}


#: optimizer names ``fit(optimizer=...)`` takes (case-insensitive), each a ``torch.optim.Optimizer`` class
OPTIMIZERS = tuple(_optimizers())


def optimizer_class(optimizer) -> tuple:
    """``fit``'s ``optimizer=`` (a name of :data:`OPTIMIZERS` or a ``torch.optim.Optimizer`` subclass) ->
    ``(name config.json records, class)``; a class of the table records its name, any other its dotted path."""
    table = _optimizers()
    if isinstance(optimizer, str):
        key = optimizer.lower().replace("_", "")
        if key not in table:
            raise ConfigError(f"unknown optimizer {optimizer!r}; valid optimizers: {', '.join(sorted(table))} "
                              "(or a torch.optim.Optimizer subclass)")
        return key, table[key]
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        for name, cls in table.items():
            if cls is optimizer:
                return name, cls
        return f"{optimizer.__module__}.{optimizer.__qualname__}", optimizer
    raise ConfigError(f"optimizer must be a name ({', '.join(sorted(table))}) or a torch.optim.Optimizer subclass, "
                      f"got {optimizer!r:.60}; pass its keyword arguments as optimizer_kwargs=")


def check_optimizer_kwargs(cls, kwargs, *, lr: float, weight_decay: float) -> dict:
    """Validate ``optimizer_kwargs`` for ``cls`` by building it on one dummy tensor: a JSON-able dict, no
    ``lr`` (fit's own option), ``weight_decay`` in one place only, arguments ``cls`` accepts. A plain dict."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ConfigError(f"optimizer_kwargs must be a dict of keyword arguments, got {type(kwargs).__name__}")
    if "params" in kwargs or "lr" in kwargs:
        raise ConfigError("optimizer_kwargs must not hold 'params' or 'lr'; pass fit's own lr= instead")
    if weight_decay and "weight_decay" in kwargs:
        raise ConfigError(f"weight_decay is given twice: weight_decay={weight_decay} and optimizer_kwargs="
                          f"{{'weight_decay': {kwargs['weight_decay']!r}}}; pass one of them")
    try:
        json.dumps(kwargs)
    except (TypeError, ValueError):
        raise ConfigError(f"optimizer_kwargs must hold numbers, strings, booleans or lists of them (they are "
                          f"recorded in config.json); got {kwargs!r:.80}") from None
    try:
        _build(cls, [torch.zeros(1, requires_grad=True)], lr=lr, weight_decay=weight_decay, kwargs=kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"{cls.__name__} does not take optimizer_kwargs={kwargs!r:.80}: {e}") from None
    return dict(kwargs)


def _build(cls, params, *, lr: float, weight_decay: float, kwargs: dict):
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}  # JSON lists back to betas tuples
    if weight_decay:
        kw["weight_decay"] = weight_decay
    return cls(params, lr=lr, **kw)


def make_optimizer(params, cfg, cls=None) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names (``cls``: the class itself, for one outside :data:`OPTIMIZERS`)
    with ``cfg.lr``, ``cfg.weight_decay`` and ``cfg.optimizer_kwargs``; Adam (the default) is :func:`adam`."""
    name = getattr(cfg, "optimizer", "adam")
    kwargs = dict(getattr(cfg, "optimizer_kwargs", None) or {})
    if name == "adam":
        return adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)
    if cls is None:
        cls = optimizer_class(name)[1]
    return _build(cls, list(params), lr=cfg.lr, weight_decay=cfg.weight_decay, kwargs=kwargs)


def scheduler(opt, cfg):
    """The per-epoch learning-rate schedule ``cfg.lr_schedule`` names (``cfg``: a :class:`pyrovi.train.TrainConfig`)."""
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.lr_schedule == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.01 ** (1.0 / cfg.epochs))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)


def restore(path, run, opt, sched, shuffle_gen, config, dev) -> dict:
    """Put the checkpoint at ``path`` back into ``run``, ``opt``, ``sched`` and the RNGs; its loop counters.

    A checkpoint may come from anyone, and torch trusts what it is handed (its fused CPU
    Adam does not check shapes, so a moment of the wrong shape ends in a segfault). So every
    piece is first checked against the live objects, as data, by :func:`check_checkpoint`;
    only a checkpoint that passes whole touches torch state. Anything wrong raises
    :class:`CheckpointError` naming the piece.
    """
    try:
        tensors, meta = load_tensors(path, "cpu")
        meta = dict(meta, history=checkpoint_history(path, meta))
        loop = check_checkpoint(path, tensors, meta, run, opt, sched, shuffle_gen, config)
        _apply(tensors, meta, run, opt, sched, shuffle_gen, dev)
    except PyroviError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
        # a checkpoint is written by pyrovi whole or not at all; one that passed the checks but
        # still does not load was edited or crafted in a way the checks did not foresee
        raise CheckpointError(f"checkpoint {path!r} is incomplete or malformed ({type(e).__name__}: "
                              f"{str(e)[:120]}); start again with overwrite=True") from None
    _RESTORED_BEST[os.path.abspath(path)] = {k[len("best/"):]: v.to(dev) for k, v in tensors.items()
                                             if k.startswith("best/")}
    return loop


#: the ``best/`` tensors of the checkpoint :func:`restore` read last, by path: handed to
#: :func:`best_from_checkpoint` so a resume reads (and checks) the file once
_RESTORED_BEST: dict = {}

_STATE_PREFIXES = ("model", "guide", "param")
_TENSOR_PREFIXES = _STATE_PREFIXES + ("best", "optim", "rng")
#: per-parameter state of torch's Adam: the moments have the parameter's shape, ``step`` is a scalar
_ADAM_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_LOOP_INTS = ("epoch", "step", "best_epoch", "bad_epochs")
#: columns every history row has (written by :func:`pyrovi.loop.record_epoch`)
HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "lr", "beta", "seconds", "items_per_second")


def _bad(path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path!r}: {what}; edited, crafted or from another run: start again "
                           "with overwrite=True")


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(t: torch.Tensor) -> bool:
    return not t.is_floating_point() or bool(torch.isfinite(t).all())


def check_checkpoint(path, tensors: dict, meta: dict, run, opt, sched, shuffle_gen, config) -> dict:
    """Check a loaded checkpoint against the live run, optimizer, scheduler and RNGs; its loop counters.

    Nothing is changed. Checked: the config it was trained with; every model/guide/param
    tensor (same names, shapes, kinds of dtype as the live ones, finite), the best-epoch
    copy likewise; the optimizer's groups (same parameters, positive finite ``lr``,
    sensible ``betas``/``eps``/``weight_decay``) and per-parameter Adam state (moments of
    the parameter's shape, finite, second moments >= 0, ``step`` a finite scalar >= 0);
    the scheduler state (the live scheduler's structure, finite numbers, positive rates);
    the RNG states (the live ones' size and dtype); loop counters and history rows.
    """
    if not isinstance(meta, dict):
        raise _bad(path, "its metadata is not a JSON object")
    saved_cfg = meta.get("config")
    if not isinstance(saved_cfg, dict):
        raise _bad(path, "it records no config")
    diff = _same(saved_cfg, config, ("model", "guide", "objective"))
    if diff:
        raise CheckpointError(f"the checkpoint in {os.path.dirname(path)!r} was trained with a different {diff}; "
                              "use the same settings to resume, or overwrite=True to start again")
    changed = _changed_options(saved_cfg.get("train"), config.get("train"))
    if changed:
        raise ConfigError(f"resume continues the run in {os.path.dirname(path)!r} with its own settings, but "
                          f"{', '.join(changed)}; pass the run's values (only epochs, patience and val_every may "
                          "change on resume), or overwrite=True to start a new run with the new ones")
    odd = sorted(k for k in tensors if k.split("/")[0] not in _TENSOR_PREFIXES)
    if odd:
        raise _bad(path, f"it holds tensors pyrovi never writes in a checkpoint: {odd[:3]}")
    live = run.state_tensors()
    state = {k: v for k, v in tensors.items() if k.split("/")[0] in _STATE_PREFIXES}
    _check_like(path, state, live, "weights", exact=True)
    best = {k[len("best/"):]: v for k, v in tensors.items() if k.startswith("best/")}
    if best:
        _check_like(path, best, live, "best-epoch weights", exact=True)
    _check_optimizer(path, tensors, meta.get("optimizer"), opt)
    _check_plain(path, meta.get("scheduler"), sched.state_dict(), "scheduler state")
    rngs = {"rng/torch": torch.get_rng_state(), "rng/shuffle": shuffle_gen.get_state()}
    for k, ref in rngs.items():
        t = tensors.get(k)
        if t is None or t.dtype != ref.dtype or t.shape != ref.shape:
            got = "missing" if t is None else f"{t.dtype} {tuple(t.shape)}"
            raise _bad(path, f"RNG state {k!r} is {got}, expected {ref.dtype} {tuple(ref.shape)}")
    if "rng/cuda" in tensors and run.device.type == "cuda":
        ref = torch.cuda.get_rng_state(run.device)
        t = tensors["rng/cuda"]
        if t.dtype != ref.dtype or t.shape != ref.shape:
            raise _bad(path, f"RNG state 'rng/cuda' is {t.dtype} {tuple(t.shape)}, expected {tuple(ref.shape)}")
    return _check_loop(path, meta.get("loop"), meta.get("history"))


def _check_like(path, saved: dict, live: dict, what: str, exact: bool) -> None:
    """Saved tensors against live ones: same names, shapes and kind of dtype; floating ones finite."""
    missing, extra = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    if exact and (missing or extra):
        raise _bad(path, f"its {what} do not fit this model/guide: missing {missing[:4]}, unexpected {extra[:4]}")
    for k, v in saved.items():
        ref = live[k]
        if v.shape != ref.shape:
            raise _bad(path, f"{what} {k!r} has shape {tuple(v.shape)}, this model/guide has {tuple(ref.shape)}")
        if v.is_floating_point() != ref.is_floating_point() or (not ref.is_floating_point() and v.dtype != ref.dtype):
            raise _bad(path, f"{what} {k!r} has dtype {v.dtype}, this model/guide has {ref.dtype}")
        if not _finite(v):
            raise _bad(path, f"{what} {k!r} holds NaN or inf")


def _check_optimizer(path, tensors: dict, ometa, opt) -> None:
    if not isinstance(ometa, dict) or not isinstance(ometa.get("param_groups"), list):
        raise _bad(path, "its optimizer state is not a JSON object with 'param_groups'")
    live_groups = opt.state_dict()["param_groups"]
    groups = ometa["param_groups"]
    if len(groups) != len(live_groups):
        raise _bad(path, f"its optimizer has {len(groups)} parameter groups, this one {len(live_groups)}")
    for i, (g, ref) in enumerate(zip(groups, live_groups)):
        if not isinstance(g, dict):
            raise _bad(path, f"optimizer group {i} is not a JSON object")
        unknown = sorted(str(k) for k in g if k not in ref)
        if unknown:
            raise _bad(path, f"optimizer group {i} has keys {_opt_name(opt)} does not: {unknown[:4]}")
        if g.get("params") != ref["params"]:
            raise _bad(path, f"optimizer group {i} holds other parameters than this model/guide's")
        for k, v in g.items():
            if k == "params":
                continue
            if k in ("initial_lr", "eps"):
                ok = _is_num(v) and math.isfinite(v) and v > 0
                want = "a finite number > 0"
            elif k in ("lr", "weight_decay"):  # a cosine schedule ends at lr = 0
                ok = _is_num(v) and math.isfinite(v) and v >= 0
                want = "a finite number >= 0"
            elif k == "betas":
                ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_num(b) and 0 <= b < 1 for b in v)
                want = "two numbers in [0, 1)"
            elif _is_num(ref[k]):  # momentum, alpha, clip_norm, lrd, ... of other optimizers
                ok = _is_num(v) and math.isfinite(v) and v >= 0
                want = "a finite number >= 0"
            else:  # flags: amsgrad, maximize, foreach, fused, ...; the live group's type
                ok = type(v) is type(ref[k]) or (v is None or ref[k] is None) and isinstance(v, (bool, type(None)))
                want = f"like {ref[k]!r}"
            if not ok:
                raise _bad(path, f"optimizer group {i} has {k}={v!r:.60}; expected {want}")
    params = [p for grp in opt.param_groups for p in grp["params"]]
    if type(opt) is not torch.optim.Adam:
        _check_other_state(path, tensors, ometa, opt, params)
        return
    scalars = ometa.get("scalars", {})
    if not isinstance(scalars, dict) or scalars:
        raise _bad(path, "its optimizer state has non-tensor entries; torch's Adam keeps only tensors")
    seen: dict = {}
    for k, v in tensors.items():
        if not k.startswith("optim/"):
            continue
        parts = k.split("/")
        if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) >= len(params):
            raise _bad(path, f"optimizer tensor {k!r} names no parameter of this model/guide")
        idx, name = int(parts[1]), parts[2]
        p = params[idx]
        if name in _ADAM_MOMENTS:
            if v.shape != p.shape or not v.is_floating_point():
                raise _bad(path, f"optimizer tensor {k!r} is {v.dtype} {tuple(v.shape)}; its parameter is "
                                 f"{p.dtype} {tuple(p.shape)}")
            if not _finite(v) or (name != "exp_avg" and bool((v < 0).any())):
                raise _bad(path, f"optimizer tensor {k!r} holds NaN, inf or (second moments) negative values")
        elif name == "step":
            if v.dim() != 0 or not v.is_floating_point() or not _finite(v) or float(v) < 0:
                raise _bad(path, f"optimizer step {k!r} must be a finite scalar >= 0, got {v.dtype} "
                                 f"{tuple(v.shape)}")
        else:
            raise _bad(path, f"optimizer tensor {k!r}: torch's Adam keeps no {name!r}")
        seen.setdefault(idx, set()).add(name)
    amsgrad = bool(live_groups[0].get("amsgrad")) if live_groups else False
    need = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
    for idx, names in seen.items():
        if names != need:
            raise _bad(path, f"optimizer state of parameter {idx} has {sorted(names)}, expected {sorted(need)}")


def _opt_name(opt) -> str:
    return "torch's Adam" if type(opt) is torch.optim.Adam else type(opt).__name__


#: per-parameter state that is never negative (second moments, accumulated squares)
_NONNEGATIVE = {"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"}


def _check_other_state(path, tensors: dict, ometa: dict, opt, params: list) -> None:
    """Per-parameter state of an optimizer other than Adam, against what that optimizer keeps.

    What it keeps is read off a twin: the same class and group settings over zero copies
    of the parameters, stepped once on zero gradients (SGD without momentum keeps nothing,
    ClippedAdam an int ``step``, RMSprop ``square_avg``, ...). Every saved entry must be one
    the twin has, of its kind: a tensor of the parameter's shape (finite; squares >= 0) or a
    scalar (a finite number >= 0), and every parameter with state must have all of them.
    """
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    twin_params = [[torch.zeros_like(p, requires_grad=True) for p in g["params"]] for g in opt.param_groups]
    twin = type(opt)([dict(g, params=ps) for g, ps in zip(groups, twin_params)])
    for ps in twin_params:
        for p in ps:
            p.grad = torch.zeros_like(p)
    twin.step()
    ref = twin.state_dict()["state"]
    saved: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            parts = k.split("/")
            if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) >= len(params):
                raise _bad(path, f"optimizer tensor {k!r} names no parameter of this model/guide")
            saved.setdefault(int(parts[1]), {})[parts[2]] = v
    scalars = ometa.get("scalars", {})
    if not isinstance(scalars, dict):
        raise _bad(path, "its optimizer scalars are not a JSON object")
    for k, v in scalars.items():
        parts = str(k).split("/")
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) >= len(params):
            raise _bad(path, f"optimizer entry {k!r} names no parameter of this model/guide")
        saved.setdefault(int(parts[0]), {})[parts[1]] = v
    name = _opt_name(opt)
    for idx, st in saved.items():
        want = ref.get(idx, {})
        if set(st) != set(want):
            raise _bad(path, f"optimizer state of parameter {idx} has {sorted(st)}, {name} keeps {sorted(want)}")
        for k, v in st.items():
            r, p = want[k], params[idx]
            if torch.is_tensor(r):
                if not torch.is_tensor(v) or v.shape != r.shape or v.is_floating_point() != r.is_floating_point():
                    got = f"{v.dtype} {tuple(v.shape)}" if torch.is_tensor(v) else repr(v)[:40]
                    raise _bad(path, f"optimizer entry {idx}/{k} is {got}; {name} keeps {r.dtype} {tuple(r.shape)} "
                                     f"(its parameter is {tuple(p.shape)})")
                if not _finite(v) or ((k in _NONNEGATIVE or r.dim() == 0) and bool((v < 0).any())):
                    raise _bad(path, f"optimizer entry {idx}/{k} holds NaN, inf or negative values")
            elif _is_num(r):
                if not (_is_num(v) and math.isfinite(v) and v >= 0 and type(v) is type(r)):
                    raise _bad(path, f"optimizer entry {idx}/{k} is {v!r:.40}; expected a finite "
                                     f"{type(r).__name__} >= 0")
            elif v is not None or r is not None:
                raise _bad(path, f"optimizer entry {idx}/{k} is {v!r:.40}; pyrovi cannot check it")


def _check_plain(path, saved, ref, what: str, where: str = "") -> None:
    """JSON ``saved`` against the live ``ref``: same structure, finite numbers, rates > 0, counters ints >= 0."""
    at = where or what
    if isinstance(ref, dict):
        if not isinstance(saved, dict) or set(saved) != set(ref):
            got = sorted(saved)[:6] if isinstance(saved, dict) else type(saved).__name__
            raise _bad(path, f"{at} is {got!r:.120}, expected the keys {sorted(ref)[:8]} (another lr schedule?)")
        for k in ref:
            _check_plain(path, saved[k], ref[k], what, f"{what} {k}")
    elif isinstance(ref, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(ref):
            raise _bad(path, f"{at} is {saved!r:.80}, expected {len(ref)} entries")
        for s, r in zip(saved, ref):
            _check_plain(path, s, r, what, at)
    elif isinstance(ref, bool) or ref is None or isinstance(ref, str):
        if type(saved) is not type(ref):
            raise _bad(path, f"{at} is {saved!r:.80}, expected {type(ref).__name__}")
    elif _is_num(ref):
        ok = _is_num(saved) and math.isfinite(saved) and saved >= 0 and (isinstance(saved, int) or
                                                                          not isinstance(ref, int))
        if ok and at.split()[-1] == "base_lrs":
            ok = saved > 0
        if not ok:
            raise _bad(path, f"{at} is {saved!r:.80}; expected a finite {type(ref).__name__} >= 0"
                             f"{' (> 0 for a base rate)' if 'base_lrs' in at else ''}")
    else:
        raise _bad(path, f"{at} has a value pyrovi cannot check ({type(ref).__name__})")


def _check_loop(path, loop, history) -> dict:
    keys = set(new_loop())
    # "best_train" (the divergence watch's best step loss) is absent from checkpoints written before it existed
    if not isinstance(loop, dict) or not (keys - {"best_train"} <= set(loop) <= keys):
        raise _bad(path, f"its loop counters are {loop!r:.100}, expected the keys {sorted(keys)}")
    if "best_train" in loop and not (_is_num(loop["best_train"]) and not math.isnan(loop["best_train"])):
        raise _bad(path, f"its loop counter best_train is {loop['best_train']!r:.40}, expected a number")
    ints = all(isinstance(loop[k], int) and not isinstance(loop[k], bool) and loop[k] >= 0 for k in _LOOP_INTS)
    nums = _is_num(loop["best"]) and not math.isnan(loop["best"]) and _is_num(loop["seconds"]) and \
        math.isfinite(loop["seconds"]) and loop["seconds"] >= 0
    if not (ints and nums) or loop["best_epoch"] > loop["epoch"]:
        raise _bad(path, f"its loop counters {loop!r:.160} are malformed")
    check_history(path, history, loop["epoch"])
    return dict(loop)


def check_history(path, history, epochs: int) -> None:
    """History rows as :func:`pyrovi.loop.record_epoch` writes them: ``epochs`` rows, numbered 1.., finite losses."""
    if not isinstance(history, list) or len(history) != epochs:
        got = f"{len(history)} rows" if isinstance(history, list) else type(history).__name__
        raise _bad(path, f"its history has {got} for {epochs} epochs")
    for i, h in enumerate(history):
        if not isinstance(h, dict):
            raise _bad(path, f"history row {i + 1} is {h!r:.60}, not a JSON object")
        lacks = [k for k in HISTORY_KEYS if k not in h]
        if lacks:
            raise _bad(path, f"history row {i + 1} lacks {lacks}")
        if h["epoch"] != i + 1 or isinstance(h["epoch"], bool):
            raise _bad(path, f"history row {i + 1} says epoch {h['epoch']!r:.20}")
        for k, v in h.items():
            if not isinstance(k, str) or not (_is_num(v) or v is None) or (
                    k in ("train_loss", "val_loss") and not (v is None and k == "val_loss")  # None: not validated
                    and not (_is_num(v) and math.isfinite(v))) or (_is_num(v) and math.isnan(v)):
                raise _bad(path, f"history row {i + 1} has {k!r:.40}={v!r:.40}")


def _apply(tensors: dict, meta: dict, run, opt, sched, shuffle_gen, dev) -> None:
    """Load a checkpoint that :func:`check_checkpoint` passed into the live objects."""
    run.load_state_tensors({k: v.to(dev) for k, v in tensors.items() if k.split("/")[0] in _STATE_PREFIXES},
                           meta.get("constraints", {}))
    opt.load_state_dict(_optim_state({k: v.to(dev) for k, v in tensors.items() if k.startswith("optim/")},
                                     meta["optimizer"], dev))
    sched.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng/torch"])
    shuffle_gen.set_state(tensors["rng/shuffle"])
    if "rng/cuda" in tensors and run.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng/cuda"], run.device)
    run.history = [dict(h) for h in meta["history"]]


def best_from_checkpoint(path, dev) -> dict:
    """The best-epoch weights (``best/`` tensors) of the checkpoint at ``path`` (``{}`` when it has none).

    After :func:`restore` read that file, its checked copy is handed back without a second read.
    """
    cached = _RESTORED_BEST.pop(os.path.abspath(path), None)
    if cached is not None:
        return {k: v.to(dev) for k, v in cached.items()}
    tensors, _ = load_tensors(path, dev)
    return {k[len("best/"):]: v for k, v in tensors.items() if k.startswith("best/")}
