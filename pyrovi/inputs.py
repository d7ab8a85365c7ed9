"""Data in any form a user has, and the arguments a model and guide are called with.

pyrovi's ``fit``, ``evaluate`` and ``diagnose`` take data as a
:class:`pyrovi.data.Dataset`, a torch tensor or NumPy array ``(N, D...)``, an
``(x, y)`` pair, a ``torch.utils.data.Dataset`` (items ``x`` or ``(x, y)``) or a
``DataLoader``. It is read once into memory as a :class:`~pyrovi.data.Split`
(a DataLoader's own batching and shuffling are not used: ``fit`` shuffles
and batches itself, which is much faster than a per-batch Python loader on
data that fits in memory).

**One resolver.** Every entry point takes its ``data`` argument through this
module: ``fit`` through :func:`training_data`; ``evaluate``, ``diagnose``, the
priors, the uses and the CLI through :func:`dataset` / :func:`split`, where
``data=None`` means "the run's own data" (reloaded from the source its
``config.json`` records when the run came from disk).

**The calling rule.** Every call of the model and of the guide (Pyro passes
both the same arguments) is::

    model(x_batch, y_batch, **model_kwargs)   # when the data has y and the model takes it
    model(x_batch, **model_kwargs)            # otherwise

where "the model takes y" means: a pyrovi model whose ``uses_labels`` is
true, or any other callable whose signature accepts a second positional
argument (``def model(x, y=None)``, a ``PyroModule`` whose ``forward`` does,
or ``*args``). So a regression model ``model(x, y=None)`` gets its targets,
a VAE ``model(x)`` trained on an ``(images, labels)`` DataLoader does not get
the labels, and ``model_kwargs`` carries anything else the user's code needs
(constants, annealing factors) to every call.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch

from . import data as data_mod
from .errors import ConfigError, DataError

__all__ = ["as_split", "takes_y", "call_args", "check_model_kwargs", "as_targets", "training_data", "dataset",
           "split", "labelled_rows"]


def as_targets(y) -> torch.Tensor:
    """Second array of the data: integers stay int64 (labels), anything else becomes float32 (targets)."""
    t = data_mod.as_tensor(y, "y")
    if t.is_floating_point():
        return t.float()
    return t.long()


def _pair(b) -> tuple:
    if isinstance(b, (tuple, list)):
        if len(b) == 0:
            raise DataError("the data yielded an empty item; expected x or (x, y)")
        if len(b) > 2:
            raise DataError(f"the data yielded items of {len(b)} parts; pyrovi takes x or (x, y) "
                            "(pass other model inputs through model_kwargs=)")
        return (b[0], b[1]) if len(b) == 2 else (b[0], None)
    return b, None


def as_split(data: Any) -> data_mod.Split:
    """A tensor, array, ``(x, y)`` pair, Split, torch Dataset or DataLoader -> one in-memory Split.

    ``x`` becomes float32 ``(N, D...)``; ``y`` (optional) keeps integer labels
    as int64 and makes real-valued targets float32 (see :func:`as_targets`).
    """
    if isinstance(data, data_mod.Split):
        return data
    if isinstance(data, torch.utils.data.DataLoader):
        xs, ys = [], []
        for b in data:
            x, y = _pair(b)
            xs.append(data_mod.as_tensor(x))
            if y is not None:
                ys.append(data_mod.as_tensor(y, "y"))
        if not xs:
            raise DataError("the DataLoader yielded no batches")
        if ys and len(ys) != len(xs):
            raise DataError("the DataLoader yielded y for some batches but not for others")
        return data_mod.Split(torch.cat(xs).float(), as_targets(torch.cat(ys)) if ys else None)
    if isinstance(data, torch.utils.data.Dataset):
        try:
            n = len(data)
        except TypeError:
            raise DataError("a torch Dataset without __len__ (an IterableDataset) cannot be used; "
                            "wrap it in a DataLoader") from None
        if n == 0:
            raise DataError("the torch Dataset is empty")
        pairs = [_pair(data[i]) for i in range(n)]
        x = torch.stack([data_mod.as_tensor(p[0]) for p in pairs]).float()
        has_y = [p[1] is not None for p in pairs]
        if any(has_y) and not all(has_y):
            raise DataError("the torch Dataset yields y for some items but not for others")
        y = as_targets(torch.stack([torch.as_tensor(p[1]) for p in pairs])) if all(has_y) else None
        return data_mod.Split(x, y)
    if isinstance(data, tuple) and len(data) == 2:
        x, y = data
        return data_mod.Split(data_mod.as_tensor(x).float(), None if y is None else as_targets(y))
    if isinstance(data, (tuple, list, dict, str)) and not _numeric_list(data):
        raise DataError(f"data of type {type(data).__name__} is not understood; pass a tensor or array (N, D), "
                        "an (x, y) pair, a pyrovi Dataset, or a torch Dataset/DataLoader")
    return data_mod.Split(data_mod.as_tensor(data).float(), None)


def _numeric_list(data) -> bool:
    return isinstance(data, list) and bool(data) and not isinstance(data[0], (str, dict))


def check_targets(split: data_mod.Split, name: str, semi_supervised: bool = False) -> None:
    """``y`` of a user model: one row per row of x, finite (semi-supervised: missing rows marked, see
    :func:`labelled_rows`)."""
    y = split.y
    if y is None:
        if semi_supervised:
            raise DataError(f"{name} has no labels; semi_supervised=True needs (x, y) with the missing labels "
                            "marked (y = -1 for integer labels, a row of NaN for one-hot/real ones)")
        return
    if y.dim() == 0 or y.shape[0] != split.x.shape[0]:
        raise DataError(f"{name}: labels (targets) y must have one row per row of x ({split.x.shape[0]}); got shape {tuple(y.shape)}")
    if semi_supervised:
        y = y[labelled_rows(y, name)]
    if y.is_floating_point() and not bool(torch.isfinite(y).all()):
        hint = "" if semi_supervised else " (or mark missing labels with NaN rows and fit(semi_supervised=True))"
        raise DataError(f"{name}: y contains NaN/inf values; drop or impute those rows{hint}")


def labelled_rows(y: torch.Tensor, name: str = "y") -> torch.Tensor:
    """Which rows of ``y`` (N, ...) carry a label, for semi-supervised data: a bool tensor (N,).

    A missing label is marked ``y < 0`` for integer labels (e.g. -1) and a row that is
    all NaN for floating ones (one-hot labels, real targets). A float row only partly
    NaN is refused: it is neither a label nor a marked missing one.
    """
    if not y.is_floating_point():
        return (y.reshape(len(y), -1) >= 0).all(1)
    nan = torch.isnan(y.reshape(len(y), -1))
    missing = nan.all(1)
    if bool((nan.any(1) & ~missing).any()):
        raise DataError(f"{name}: some rows are partly NaN; mark a missing label with a row of NaN (all of it)")
    return ~missing


def takes_y(model) -> bool:
    """Whether ``model`` is called with ``y`` as its second argument (see the module docstring)."""
    declared = getattr(model, "uses_labels", None)
    if isinstance(declared, bool):
        return declared
    fn = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins, some C callables: nothing to read
        return False
    positional = 0
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            return True
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional += 1
    return positional >= 2


def call_args(model, x: torch.Tensor, y: Optional[torch.Tensor], model_kwargs: Optional[dict] = None,
              pass_y: Optional[bool] = None) -> tuple:
    """``(args, kwargs)`` to call model and guide with on a batch (the calling rule above)."""
    if pass_y is None:
        pass_y = takes_y(model)
    args = (x, y) if (pass_y and y is not None) else (x,)
    return args, dict(model_kwargs or {})


def check_model_kwargs(model_kwargs) -> dict:
    """Validate ``model_kwargs``: None or a dict with string keys."""
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, dict) or not all(isinstance(k, str) for k in model_kwargs):
        raise ConfigError(f"model_kwargs must be a dict of keyword arguments for model and guide, "
                          f"got {type(model_kwargs).__name__}")
    if "y" in model_kwargs:
        raise ConfigError("model_kwargs must not hold 'y'; pass the data as an (x, y) pair so y is batched with x")
    return dict(model_kwargs)


# --------------------------------------------------------------------------- the one data resolver


def training_data(data: Any, *, seed: int = 0, val_fraction: float = 0.1, semi_supervised: bool = False) -> tuple:
    """``fit``'s data -> ``(train Split, val Split, Dataset or None, JSON description of the source)``.

    A dataset name is loaded (seeded split); a :class:`~pyrovi.data.Dataset` brings its own
    train/validation splits (its test split is never touched); anything :func:`as_split`
    takes is split here, ``val_fraction`` of its rows (at least one) held out by a seeded
    permutation. ``val_fraction=0`` holds out nothing (an empty validation split; a Dataset's
    own validation split may then be empty too).
    """
    ds = None if data is None else dataset(data, seed=seed)  # fit has no run whose data None could mean
    if ds is not None:
        if len(ds.val) == 0 and val_fraction > 0:
            raise DataError(f"dataset {ds.name!r} has an empty validation split; load it with split=(0.1, ...), "
                            "or pass val_fraction=0 to train without validation")
        return ds.train, ds.val, ds, dict(ds.source)
    whole = as_split(data)
    data_mod.validate(whole.x, name="data", min_rows=2)
    check_targets(whole, "data", semi_supervised)
    n = whole.x.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * val_fraction))) if val_fraction > 0 else 0
    tr, va = perm[n_val:], perm[:n_val]
    pick = lambda idx: data_mod.Split(whole.x[idx], None if whole.y is None else whole.y[idx])  # noqa: E731
    return pick(tr), pick(va), None, {"name": "arrays", "rows": n, "val_fraction": val_fraction}


def _run_seed(run) -> int:
    seed = (getattr(run, "config", None) or {}).get("train", {}).get("seed", 0)
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else 0


def dataset(data: Any = None, run=None, *, seed: Optional[int] = None) -> Optional[data_mod.Dataset]:
    """The :class:`~pyrovi.data.Dataset` that ``data`` names, or None for raw arrays.

    ``data`` is a Dataset (returned as is), a dataset name (loaded with the run's seed, so
    its splits are the run's), or None: the run's own dataset — the object it was trained
    on, or, for a run loaded from disk, reloaded from the source its ``config.json``
    records (a :class:`~pyrovi.errors.ConfigError` says so when it was trained on
    in-memory arrays). Anything else (tensor, array, (x, y), torch Dataset) gives None.
    """
    if seed is None:
        seed = _run_seed(run)
    if data is None:
        if run is None:
            raise ConfigError("no data given: pass data= (a dataset name, a pyrovi Dataset, a tensor or an "
                              "(x, y) pair)")
        if getattr(run, "data", None) is not None:
            return run.data
        return data_mod.from_source((run.config or {}).get("data", {}))
    if isinstance(data, str):
        return data_mod.load(data, seed=seed)
    if isinstance(data, data_mod.Dataset):
        return data
    return None


def split(data: Any = None, run=None, which: str = "test") -> data_mod.Split:
    """The rows an evaluation uses: split ``which`` of :func:`dataset`, or ``data`` itself as one Split."""
    ds = dataset(data, run)
    out = getattr(ds, which) if ds is not None else as_split(data)
    if run is not None and hasattr(run, "check_items"):
        run.check_items(out.x, "evaluation data")  # before the network meets it: one clear error
    return out
