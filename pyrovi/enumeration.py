"""Enumerated discrete sites: find them, and sum them out of the importance weights.

Pyro users mark discrete sites for exact summation with ``config_enumerate``
or ``infer={"enumerate": "parallel"}`` and train with ``TraceEnum_ELBO``.
pyrovi does the same:

- ``elbo`` runs through Pyro's ``TraceEnum_ELBO`` when model or guide has such
  sites (:func:`has_enumeration` decides, on one trace);
- the importance-weighted objectives, ``evaluate`` and ``diagnose`` replay the
  model under ``poutine.enum`` (:func:`pyrovi.weights.log_weights`), so a model
  site marked for enumeration that the guide does not draw is summed out
  exactly, per particle and datapoint:

  .. math:: \\log w_s = \\log \\sum_{e} p(x, e, z_s) - \\log q(z_s \\mid x);

- a *guide* site marked for enumeration is drawn from q like any other (an
  importance sample stays unbiased); ``iwae``/``renyi`` train it with VIMCO.

:func:`sum_out` sums every plate dim but the particle and data dims before
the log-sum-exp over enumerated values, which is exact when each enumerated
site lies in no plate but the data plate (one value per datapoint, as in a
mixture model); :func:`check_plates` refuses the other layouts by name.
"""

from __future__ import annotations

from typing import Optional

import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from .errors import ConfigError
from .traces import PARTICLE_PLATE, rng_neutral, trace_pair

__all__ = ["marked_sites", "summed_sites", "has_enumeration", "check_plates", "sum_out"]


def marked_sites(tr) -> list:
    """Names of the latent sites of trace ``tr`` marked for enumeration (``infer={"enumerate": ...}``)."""
    return [n for n, s in tr.nodes.items()
            if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
            and s["infer"].get("enumerate") in ("parallel", "sequential")]


def summed_sites(tr) -> list:
    """Names of the sites ``poutine.enum`` enumerated in trace ``tr`` (they are summed out)."""
    return [n for n, s in tr.nodes.items()
            if s["type"] == "sample" and s["infer"].get("_enumerate_dim") is not None]


def has_enumeration(model, guide, args: tuple, kwargs: Optional[dict] = None) -> dict:
    """One trace of guide and model (no gradients): ``{"model": [names], "guide": [names]}`` of sites marked for
    enumeration; the model's list leaves out sites the guide draws (replayed, not enumerated). ``"score"``: the
    guide's latent sites drawn without ``rsample`` (discrete), which need a score-function term."""
    with poutine.block(), torch.no_grad(), rng_neutral():  # a look that leaves the draws after it as they were
        guide_tr, model_tr = trace_pair(model, guide, args, kwargs or {})
    guide_marked = marked_sites(guide_tr)
    drawn = {n for n, s in guide_tr.nodes.items() if s["type"] == "sample"}
    score = [n for n, st in guide_tr.nodes.items() if st["type"] == "sample" and not st["is_observed"]
             and not site_is_subsample(st) and not getattr(st["fn"], "has_rsample", True)]
    return {"model": [n for n in marked_sites(model_tr) if n not in drawn], "guide": guide_marked, "score": score}


def check_plates(model_tr, names: list, data_plate: str) -> None:
    """Refuse an enumerated site inside a plate other than the data plate (its sum would need variable
    elimination across that plate, which :func:`sum_out` does not do)."""
    for name in names:
        site = model_tr.nodes[name]
        other = [f.name for f in site["cond_indep_stack"] if f.name not in (data_plate, PARTICLE_PLATE)]
        if other:
            raise ConfigError(
                f"the enumerated site {name!r} lies in plate(s) {other} besides {data_plate!r}: importance-weighted "
                "objectives, evaluate and diagnose sum enumerated sites out per datapoint only; use "
                "objective='elbo' (Pyro's TraceEnum_ELBO) to train, or draw the site in the guide")


def sum_out(block: list, rank: int) -> torch.Tensor:
    """``(S|1, B|1)``: log of the sum over enumerated values of exp(sum of the ``block`` log-densities).

    ``block`` holds ``(log_prob, data_dim)`` of the model sites whose log-density has enumerated dims
    (left of the ``rank`` batch dims: the particle dim, then the plates); ``data_dim`` None keeps no data dim.
    """
    n_enum = max(lp.dim() - rank for lp, _ in block)
    total = None
    for lp, data_dim in block:
        lp = lp.reshape((1,) * (rank + n_enum - lp.dim()) + lp.shape)  # (E.., S|1, plates...)
        keep = set(range(n_enum + 1)) | ({rank + n_enum + data_dim} if data_dim is not None else set())
        dims = [d for d in range(rank + n_enum) if d not in keep]
        if dims:
            lp = lp.sum(dims, keepdim=True)
        total = lp if total is None else total + lp
    if n_enum:
        total = torch.logsumexp(total, dim=tuple(range(n_enum)))  # (S|1, 1.., B|1, 1..)
    return total.reshape(total.shape[0], -1)  # (S|1, B|1)
