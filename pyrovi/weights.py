"""Log importance weights log p(x, z) - log q(z|x) from Pyro traces.

The one place where pyrovi reads Pyro traces by hand. Pyro's ``RenyiELBO``
has no ``differentiable_loss`` and log-sum-exps whole batches when any site
sits outside the data plate; pyrovi's importance-weighted objectives
(``iwae``, ``renyi``, ``dreg``), the IWAE log-likelihood of ``evaluate`` and the
weights of ``diagnose`` all start here instead.

Per-datapoint weights. When every sample site (latent and observed) lies in
the plate named ``data_plate`` ("data" in pyrovi's models), the weights
factorize over datapoints and we return one weight per particle and
datapoint, ``(S, B)``, so the IWAE bound log-sum-exps per datapoint:

.. math::

    \\log w_{s,n} = \\sum_{\\text{sites}} \\log p(x_n, z_{s,n}) - \\log q(z_{s,n} \\mid x_n).

Otherwise (a global latent, or no data plate) the weights do not factorize:
one weight per particle for the whole batch, ``(S, 1)``, exactly as Pyro's
``RenyiELBO`` computes it. A bound over whole-batch weights is looser and
its variance grows with the batch size; see the objectives docs.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, NamedTuple, Optional

import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import site_is_subsample

from . import enumeration
from .errors import ConfigError
from .stratify import log_stratum, stratified
from .traces import PARTICLE_PLATE, data_dim as _data_dim, guess_max_plate_nesting, trace_pair

__all__ = ["LogWeights", "log_weights", "guess_max_plate_nesting", "PARTICLE_PLATE"]


class LogWeights(NamedTuple):
    """Result of :func:`log_weights`. Log-densities in nats.

    ``log_p``, ``log_q``, ``log_lik`` and ``log_w = log_p - log_q`` have shape ``(S, B)``
    (per-datapoint) or ``(S, 1)`` (whole batch). A bound computed from them
    is multiplied by ``scale`` (the data plate's subsampling factor N/B).
    """

    log_w: torch.Tensor
    log_p: torch.Tensor
    log_q: torch.Tensor
    log_lik: torch.Tensor  # the observed sites' part of log_p, log p(x | z)
    scale: float
    per_datapoint: bool
    model_trace: object
    guide_trace: object
    #: log of the stratification weights rho_s of stratified mixture draws, ``(S, B|1)``; None: all rho = 1
    log_rho: Optional[torch.Tensor] = None
    #: log q of the guide's non-reparameterized sites (discrete draws), unscaled, ``(S, B|1)``; None: there are none
    log_q_score: Optional[torch.Tensor] = None
    #: names of those sites, in trace order
    score_sites: tuple = ()


def _site_log_prob(site, detach_params: Optional[Callable] = None) -> torch.Tensor:
    fn = site["fn"] if detach_params is None else detach_params(site)
    lp = fn.log_prob(site["value"])
    mask = site["mask"]
    if mask is not None and mask is not True:
        lp = torch.where(torch.as_tensor(mask, device=lp.device), lp, lp.new_zeros(()))
    return lp


def _reduce(lp: torch.Tensor, rank: int, data_dim: Optional[int]) -> torch.Tensor:
    """Sum ``lp`` (batch shape of a site) to ``(S|1, B|1)``: keep the particle dim and the data dim."""
    lp = lp.reshape((1,) * (rank - lp.dim()) + lp.shape)  # (S|1, ..., ) with `rank` dims
    keep = {0} if data_dim is None else {0, rank + data_dim}
    dims = [d for d in range(rank) if d not in keep]
    if dims:
        lp = lp.sum(dims, keepdim=True)
    return lp.reshape(lp.shape[0], -1)  # (S|1, B|1)


def log_weights(
    model,
    guide,
    *args,
    particles: int = 1,
    max_plate_nesting: Optional[int] = None,
    data_plate: str = "data",
    guide_log_prob: Optional[Callable] = None,
    stratify: bool = False,
    vectorize: bool = True,
    **kwargs,
) -> LogWeights:
    """Draw ``particles`` vectorized samples z ~ q(z|x), replay the model, return log weights.

    Args:
        model: the Pyro model, a callable taking ``(*args, **kwargs)``.
        guide: the Pyro guide, called with the same arguments.
        *args: the model's arguments (e.g. ``x`` of shape ``(B, D)``).
        particles: S, drawn in one vectorized plate on the leftmost batch dim.
        max_plate_nesting: plate depth; guessed by one trace when None.
        data_plate: name of the plate over datapoints.
        guide_log_prob: optional ``site -> distribution`` used to score guide
            sites instead of ``site["fn"]`` (STL/DReG evaluate log q with
            detached variational parameters this way).
        stratify: draw mixture sites stratified over the particles
            (:func:`pyrovi.guides.mixture.stratified`); their weights are returned as ``log_rho``.

        vectorize: False draws the particles one at a time, each without a particle plate (for models that
            cannot take a leading particle dim, see :mod:`pyrovi.particles`); ``model_trace``/``guide_trace``
            are then the last particle's.

    Sites of the model marked for enumeration (``config_enumerate``, ``infer={"enumerate": "parallel"}``)
    that the guide does not draw are summed out exactly (:mod:`pyrovi.enumeration`).
    Gradients flow through z (reparameterized guides) into both log p and log q.
    """
    if not isinstance(particles, int) or isinstance(particles, bool) or particles < 1:
        raise ConfigError(f"particles must be a positive integer, got {particles!r}")
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
    if not vectorize:
        if stratify:
            raise ConfigError("stratified mixture draws need vectorized particles; this model runs its particles "
                              "one at a time: use objective='iwae' or a guide without mixture sites")
        draws = [_log_weights(model, guide, args, kwargs, 1, max_plate_nesting, data_plate, guide_log_prob, False,
                              False) for _ in range(particles)]
        return _concat(draws)
    return _log_weights(model, guide, args, kwargs, particles, max_plate_nesting, data_plate, guide_log_prob,
                        stratify, True)


def _concat(draws: list) -> LogWeights:
    """One :class:`LogWeights` of S single-particle draws (their traces: the last draw's)."""
    last = draws[-1]

    def cat(i):
        parts = [d[i] for d in draws]
        return None if parts[0] is None else torch.cat(parts, 0)

    return LogWeights(cat(0), cat(1), cat(2), cat(3), last.scale, last.per_datapoint, last.model_trace,
                      last.guide_trace, cat(8), cat(9), last.score_sites)


def _log_weights(model, guide, args, kwargs, particles, max_plate_nesting, data_plate, guide_log_prob, stratify,
                 vectorize) -> LogWeights:
    rank = max_plate_nesting + 1
    # the model's sites marked for enumeration (and not drawn by the guide) are summed out, on dims left of all
    model = poutine.enum(model, first_available_dim=-(rank + 1))
    with stratified(rank) if stratify else nullcontext():
        guide_tr, model_tr = trace_pair(model, guide, args, kwargs, particles=particles if vectorize else None,
                                        max_plate_nesting=max_plate_nesting)
    enumerated = enumeration.summed_sites(model_tr)
    if enumerated:
        enumeration.check_plates(model_tr, enumerated, data_plate)
    if is_validation_enabled():
        _check_sites(model_tr, guide_tr)

    sites = []  # (log_prob, scale, data_dim, sign); sign 2 marks observed model sites
    strata = []  # (log rho, data_dim) of stratified guide draws
    score = []  # (log q, data_dim, name) of guide sites drawn without rsample: they need a score-function term
    for tr, sign, scorer in ((model_tr, 1.0, None), (guide_tr, -1.0, guide_log_prob)):
        for site in tr.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            data_dim = _data_dim(site, data_plate)
            use_scorer = scorer if not site["is_observed"] else None
            kind = 2.0 if (sign > 0 and site["is_observed"]) else sign
            lp = _site_log_prob(site, use_scorer)
            if sign > 0 and enumerated and lp.dim() > rank:  # depends on an enumerated site: summed out below
                kind = 3.0
            sites.append((lp, site["scale"], data_dim, kind))
            if sign < 0 and not getattr(site["fn"], "has_rsample", True):
                score.append((sites[-1][0], data_dim, site["name"]))
            site_rho = log_stratum(site["fn"]) if stratify and sign < 0 else None
            if site_rho is not None:
                strata.append((site_rho, data_dim))

    per_datapoint = bool(sites) and all(d is not None for _, _, d, _ in sites)
    # A data-plate subsampling factor N/B common to every site multiplies the per-datapoint
    # bound from outside; any other scales stay inside the weights, as in Pyro's RenyiELBO.
    scalar = all(not torch.is_tensor(s) or s.numel() == 1 for _, s, _, _ in sites)
    distinct = {float(s) for _, s, _, _ in sites} if scalar else set()
    factor_out = per_datapoint and len(distinct) == 1
    scale = distinct.pop() if factor_out else 1.0

    log_p = log_q = log_lik = None
    block = []  # (log_prob, data_dim) of model sites on enumerated dims
    for lp, s, data_dim, sign in sites:
        if not factor_out and not (isinstance(s, (int, float)) and s == 1.0):
            lp = lp * s
        if sign == 3.0:
            block.append((lp, data_dim if per_datapoint else None))
            continue
        term = _reduce(lp, rank, data_dim if per_datapoint else None)
        if sign > 0:
            log_p = term if log_p is None else log_p + term
            if sign == 2.0:
                log_lik = term if log_lik is None else log_lik + term
        else:
            log_q = term if log_q is None else log_q + term
    if block:  # log sum over the enumerated values of p(x, enumerated | z): part of log p and of log p(x | z)
        term = enumeration.sum_out(block, rank)
        log_p = term if log_p is None else log_p + term
        log_lik = term if log_lik is None else log_lik + term
    zero = torch.zeros(particles, 1)
    log_p = zero if log_p is None else log_p
    log_q = torch.zeros_like(log_p) if log_q is None else log_q
    log_lik = torch.zeros_like(log_p) if log_lik is None else log_lik
    log_p, log_q, log_lik = torch.broadcast_tensors(log_p, log_q, log_lik)
    if log_p.shape[0] != particles:
        log_p, log_q, log_lik = (t.expand(particles, -1) for t in (log_p, log_q, log_lik))
    log_rho = None
    for lr, data_dim in strata:
        term = _reduce(lr, rank, data_dim if per_datapoint else None)
        log_rho = term if log_rho is None else log_rho + term
    if log_rho is not None:
        log_rho = log_rho.expand_as(log_p)
    log_q_score = None
    for lq, data_dim, _ in score:  # unscaled: the score function is the gradient of the draw's own log-density
        term = _reduce(lq, rank, data_dim if per_datapoint else None)
        log_q_score = term if log_q_score is None else log_q_score + term
    if log_q_score is not None:
        log_q_score = log_q_score.expand_as(log_p)
    return LogWeights(log_p - log_q, log_p, log_q, log_lik, scale, per_datapoint, model_tr, guide_tr, log_rho,
                      log_q_score, tuple(name for _, _, name in score))


def _check_sites(model_tr, guide_tr) -> None:
    def latent(tr):
        return {n for n, s in tr.nodes.items()
                if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)}

    model_latent, guide_latent = latent(model_tr), latent(guide_tr)
    missing = model_latent - guide_latent - set(enumeration.summed_sites(model_tr))
    if missing:
        raise ConfigError(
            f"the guide does not sample the model's latent site(s) {sorted(missing)}; "
            "an importance weight needs q for every latent of the model"
        )
