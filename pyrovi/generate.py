"""Drawing from a trained model's prior: the one sampler behind ``Run.sample``, ``pyrovi.uses.sample_prior`` and
``pyrovi sample``, and the size check every generating call makes first.

It sits in the run's layer (below :mod:`pyrovi.uses`) so that :meth:`pyrovi.Run.sample` and
:func:`pyrovi.uses.sample_prior` are one function, not two that could disagree. ``run`` is a
:class:`pyrovi.Run` or a ``(model, guide)`` pair throughout (duck-typed: this module does not import the run).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .errors import ConfigError, check_positive

__all__ = ["parts", "check_rows", "sample_prior"]


def parts(run) -> tuple:
    """-> (model, guide, param-scope context) from a Run or a (model, guide) pair."""
    if isinstance(run, (tuple, list)) and len(run) == 2:
        model, guide = run
        return model, guide, contextlib.nullcontext()
    if hasattr(run, "model") and hasattr(run, "guide"):
        scope = run.scope() if hasattr(run, "scope") else contextlib.nullcontext()
        return run.model, run.guide, scope
    raise ConfigError(f"run must be a pyrovi Run or a (model, guide) pair, got {type(run).__name__}")


def check_rows(run, option: str, rows: int) -> None:
    """Refuse ``rows`` datapoints through the networks at once beyond the memory budget (:mod:`pyrovi.budget`),
    before anything is drawn: a typo of a few zeros is an error, not a kill."""
    if hasattr(run, "check_rows"):
        run.check_rows(option, rows)
        return
    from . import budget

    model, guide, _ = parts(run)
    budget.check_rows(option, rows, budget.widest(model, guide), f"use a smaller {option.split('=')[0]}",
                      what=f"{rows} datapoints through the networks at once")


@torch.no_grad()
def sample_prior(run, n: int, *, label=None, seed: Optional[int] = None) -> torch.Tensor:
    """Decode ``n`` draws z ~ p(z): ``(n, D)`` means of p(x | z) (probabilities for Bernoulli).

    Args:
        run: a :class:`pyrovi.Run` or ``(model, guide)`` (only the model is used).
        n: number of samples.
        label: for a conditional model, one int or ``n`` labels (None: classes in turn).
        seed: seeds the draws (a private CPU generator; the global RNG is untouched).
    """
    check_positive("n", n, integer=True)
    model, _, scope = parts(run)
    if not hasattr(model, "sample"):
        raise ConfigError(f"{type(model).__name__} has no sample(n) method")
    check_rows(run, f"n={n}", n)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    kw = {"generator": gen}
    if getattr(model, "uses_labels", False):
        kw["label"] = label
    elif label is not None:
        raise ConfigError(f"label={label!r} was given but {type(model).__name__} does not condition on labels; "
                          "train a conditional_vae to sample by class")
    with scope:
        return model.sample(n, **kw)
