"""Held-out metrics of a trained run: ELBO, importance-weighted log p(x), reconstruction, KL.

.. math::

    \\log p(x) \\approx \\log \\frac1K \\sum_{k=1}^K \\frac{p(x, z_k)}{q(z_k \\mid x)},\\quad z_k \\sim q(z|x)

(the IWAE bound with K particles; Burda et al. 2016), computed per datapoint
in chunks of particles whose log-sum-exps are merged, so memory stays bounded
at K = 5000. All values are in nats per datapoint; ``bits_per_dim`` is
:math:`-\\log_2 p(x) / D`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import torch

from . import data as data_mod
from .checkpoint import write_json
from .errors import ConfigError, check_positive
from .weights import guess_max_plate_nesting, log_weights

__all__ = ["evaluate", "iw_log_likelihood"]


def _split_of(run, data) -> data_mod.Split:
    if data is None:
        if run.data is None:
            raise ConfigError("evaluate needs data= (this run does not carry its dataset)")
        return run.data.test
    if isinstance(data, str):
        return data_mod.load(data, seed=run.config.get("train", {}).get("seed", 0)).test
    if isinstance(data, data_mod.Dataset):
        return data.test
    if isinstance(data, data_mod.Split):
        return data
    if isinstance(data, tuple) and len(data) == 2:
        return data_mod.Split(data_mod.as_tensor(data[0]).float(),
                              None if data[1] is None else data_mod.as_tensor(data[1], "y").long())
    return data_mod.Split(data_mod.as_tensor(data).float(), None)


@torch.no_grad()
def iw_log_likelihood(model, guide, *args, k: int = 5000, chunk: int = 500, max_plate_nesting=None) -> dict:
    """Per-datapoint estimates from ``k`` importance samples drawn ``chunk`` at a time.

    Returns ``{"log_likelihood": (B,), "elbo": (B,), "reconstruction": (B,), "kl": (B,),
    "log_w": (k, B) or None}`` in nats (``log_w`` only when ``k <= chunk``).
    """
    check_positive("k", k, integer=True)
    check_positive("chunk", chunk, integer=True)
    lse = None
    sum_w = sum_lik = sum_kl = None
    done = 0
    last = None
    while done < k:
        s = min(chunk, k - done)
        lw = log_weights(model, guide, *args, particles=s, max_plate_nesting=max_plate_nesting)
        if not lw.per_datapoint:
            raise ConfigError("evaluate's per-datapoint log-likelihood needs every site in the 'data' plate; "
                              "this model has a global site")
        c = torch.logsumexp(lw.log_w, 0)  # (B,)
        lse = c if lse is None else torch.logaddexp(lse, c)
        w, lik = lw.log_w.sum(0), lw.log_lik.sum(0)
        kl = (lw.log_q - (lw.log_p - lw.log_lik)).sum(0)  # log q(z|x) - log p(z)
        sum_w = w if sum_w is None else sum_w + w
        sum_lik = lik if sum_lik is None else sum_lik + lik
        sum_kl = kl if sum_kl is None else sum_kl + kl
        done += s
        last = lw
    return {
        "log_likelihood": lse - math.log(k),
        "elbo": sum_w / k,
        "reconstruction": sum_lik / k,
        "kl": sum_kl / k,
        "log_w": last.log_w if k <= chunk else None,
    }


def evaluate(run, data: Any = None, *, k: int = 5000, batch_size: int = 100, chunk: Optional[int] = None,
             save: bool = True) -> dict:
    """Held-out metrics of ``run`` on ``data`` (default: the run's test split).

    Args:
        run: a :class:`pyrovi.run.Run` (from ``fit`` or ``load_run``).
        data: a Dataset (its ``test`` split is used), a dataset name, a Split,
            a tensor/array ``(N, D)`` or an ``(x, y)`` pair.
        k: importance samples per datapoint for ``log_likelihood``.
        batch_size: datapoints per pass.
        chunk: particles per pass (default: bounded so a pass holds about
            2**24 numbers of data size).

    Returns:
        dict of floats, nats per datapoint: ``elbo`` (mean of log w over k
        draws), ``log_likelihood`` (IWAE-k estimate of log p(x)),
        ``reconstruction`` (E_q log p(x|z)), ``kl`` (E_q[log q(z|x) - log p(z)]),
        ``bits_per_dim``, plus ``k`` and ``n``. Saved into ``metrics.json`` under
        ``"test"`` when the run has a directory and ``save`` is true.
    """
    check_positive("k", k, integer=True)
    check_positive("batch_size", batch_size, integer=True)
    if getattr(run.guide, "point_mass", False):
        # A point-mass guide (the VQ-VAE's Codebook: one-hot q) draws the same z for every particle, so
        # all k importance weights are equal and the IWAE estimate is the ELBO itself: one draw suffices.
        k = 1
    split = _split_of(run, data)
    data_mod.validate(split.x, name="evaluation data")
    dev = run.device
    D = split.x[0].numel()
    if chunk is None:
        chunk = max(1, min(k, (1 << 24) // max(1, batch_size * D)))
    model, guide = run.model, run.guide
    for m in (model, guide):
        if isinstance(m, torch.nn.Module):
            m.eval()
    uses_labels = getattr(model, "uses_labels", False)
    totals = {"log_likelihood": 0.0, "elbo": 0.0, "reconstruction": 0.0, "kl": 0.0}
    with run.scope():
        mpn = run.objective.max_plate_nesting
        for i in range(0, len(split), batch_size):
            xb = split.x[i:i + batch_size].to(dev)
            args = (xb, split.y[i:i + batch_size].to(dev)) if uses_labels else (xb,)
            if mpn is None:
                mpn = guess_max_plate_nesting(model, guide, args, {})
            r = iw_log_likelihood(model, guide, *args, k=k, chunk=chunk, max_plate_nesting=mpn)
            for key in totals:
                totals[key] += float(r[key].sum())
    n = len(split)
    out = {key: v / n for key, v in totals.items()}
    out["bits_per_dim"] = -out["log_likelihood"] / (D * math.log(2))
    out.update(k=k, n=n)
    if save and run.directory:
        run.metrics["test"] = out
        write_json(os.path.join(run.directory, "metrics.json"), run.metrics)
    return out
