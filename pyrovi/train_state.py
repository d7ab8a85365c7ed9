"""What a training run keeps between epochs: optimizer, scheduler, checkpoint, run directory.

Used by the one training loop (:mod:`pyrovi.loop`) whatever the number of
processes: the optimizer ``fit`` builds (:func:`adam`), its learning-rate
schedule, and the checkpoint that lets ``fit(resume=True)`` continue the same
trajectory (weights, optimizer moments, scheduler, loop counters, RNG states).
"""

from __future__ import annotations

import os

import torch

from ._version import __version__
from .checkpoint import load_tensors, save_tensors
from .errors import CheckpointError, ConfigError, PyroviError, TrainingError
from .run import CHECKPOINT

__all__ = ["adam", "scheduler", "save_checkpoint", "restore", "best_from_checkpoint", "prepare_out", "new_loop"]


def new_loop() -> dict:
    """The loop counters of a fresh run (stored in every checkpoint under ``"loop"``)."""
    return {"epoch": 0, "step": 0, "best": float("inf"), "best_epoch": 0, "bad_epochs": 0, "seconds": 0.0}


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



def prepare_out(out: str, resume: bool, overwrite: bool) -> None:
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


def scheduler(opt, cfg):
    """The per-epoch learning-rate schedule ``cfg.lr_schedule`` names (``cfg``: a :class:`pyrovi.train.TrainConfig`)."""
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.lr_schedule == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.01 ** (1.0 / cfg.epochs))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)


def restore(path, run, opt, sched, shuffle_gen, config, dev) -> dict:
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


def best_from_checkpoint(path, dev) -> dict:
    tensors, _ = load_tensors(path, dev)
    return {k[len("best/"):]: v for k, v in tensors.items() if k.startswith("best/")}


