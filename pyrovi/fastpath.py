"""The fast path: the log weights of pyrovi's own model/guide pairs without Pyro's tracing.

Pyro's ``Trace_ELBO`` runs every ``pyro.sample``/``pyro.param`` statement through
its effect handlers (trace, plates, broadcasting, validation), about 1-2 ms per
step on a small VAE: 30 % of a CPU training step. pyrovi's models and guides
therefore expose the same computation as plain tensor functions —
``guide.posterior(x, y) -> {site: q}`` and ``model.fast_log_joint(x, z, y) ->
(log p(x|z), {site: p(z)})`` — built from the very methods their ``forward``
uses, and the objectives evaluate those directly.

Same draws, same values: sites are sampled in the guide's order with the same
``rsample`` shapes Pyro's vectorized particle plate uses, so under one seed the
fast path and Pyro's path give equal losses (tested). A class whose
``forward`` is overridden below the class that defines the fast methods falls
back to Pyro's path automatically.

Implemented by :class:`~pyrovi.models.VAE` (and its subclasses), ``LinearGaussian``
and every guide on the amortized base (:class:`~pyrovi.guides.DiagNormal`,
:class:`~pyrovi.guides.Delta`, :class:`~pyrovi.guides.Mixture`,
:class:`~pyrovi.guides.Flow`, :class:`~pyrovi.guides.Auto`): the fast path is a
property of the guide's head, whose ``q`` both ``forward`` and ``posterior`` use.
A guide on a user's Pyro model has no fast path (the model has no ``fast_log_joint``).
A q with ``rsample_and_log_prob`` (:class:`pyrovi.distributions.DiagonalNormal`) is
drawn and scored in one pass, through its standard-normal draw; a mixture's q is
expanded to ``(S, B)`` and drawn with ``rsample()``, as Pyro's particle plate does.
Mixture guides (``guide.strata > 1``) draw *stratified* ELBO particles
(``fast_log_weights(..., stratify=True)``, :mod:`pyrovi.stratify`) and return their
weights as ``log_rho``; a caller that does not draw them so must not take the fast
path for such a guide, hence :func:`supported`'s ``stratify`` flag. The lean
distributions of :mod:`pyrovi.distributions` keep the rest of the step close to
hand-written PyTorch (``benchmarks/RESULTS.md``). ``stl`` and ``dreg`` take a fast
path of their own, drawn as here (mixture guides too: ``stl`` stratified, ``dreg`` plain)
(:func:`pyrovi.stop_gradient.fast_stop_gradient_weights`).

Which path ran is recorded by the caller: ``Objective.path_counts``.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
from torch.distributions import kl_divergence

from .stratify import log_stratum, strata, stratified
from .weights import LogWeights

__all__ = ["supported", "fast_log_weights", "fast_elbo_weights", "fast_meanfield_bound"]


def _owner(cls, name: str):
    return next((k for k in cls.__mro__ if name in k.__dict__), None)


_SUPPORTED: dict = {}  # (model class, guide class) -> bool; asked once per training step


def supported(model, guide, *, stratify: bool = False) -> bool:
    """True when ``model`` and ``guide`` both implement the fast protocol consistently with their ``forward``.

    A guide with mixture sites (``guide.strata > 1``) counts only with ``stratify=True``: the
    caller then draws its ELBO particles stratified (``fast_log_weights(..., stratify=True)``,
    as the traced path does) or needs plain draws (importance-weighted bounds).
    """
    key = (type(model), type(guide))
    ok = _SUPPORTED.get(key)
    if ok is None:
        # forward defined in the class with the fast method or above it (the amortized base defines
        # both); a forward overridden below it may sample differently, so it falls back
        ok = _SUPPORTED[key] = all(
            (owner := _owner(type(obj), fast)) is not None and issubclass(owner, _owner(type(obj), "forward"))
            for obj, fast in ((model, "fast_log_joint"), (guide, "posterior")))
    return ok and (stratify or strata(guide) == 1) and getattr(guide, "is_setup", True)


def _split(args: tuple) -> tuple:
    return args[0], (args[1] if len(args) > 1 else None)


def _draw(guide, x, y, particles: int, score: bool = True, stratify: bool = False) -> tuple:
    """``(qs, z, log_q, log_rho)``: ``{site: q}`` (batch ``(B,)``), ``{site: (S, B, *event)}``, ``(S, B)`` or None,
    and the stratification weights ``(S, B)`` (None unless ``stratify`` and a mixture site).

    Draws in the guide's site order with the random numbers Pyro's vectorized particle plate
    uses: a distribution with ``rsample_and_log_prob`` (pyrovi's DiagonalNormal) scores its draw
    in the same pass; a mixture guide's q is expanded to ``(S, B)`` and drawn with ``rsample()``
    (its sampler draws per batch element), inside :func:`~pyrovi.stratify.stratified` when
    ``stratify``; any other q is drawn with ``rsample((S,))``.
    """
    qs = guide.posterior(x, y)  # {site: q}, batch shape (B,)
    expand = stratify or strata(guide) > 1  # a mixture's sampler draws per batch element, as Pyro's plate does
    z, log_q, log_rho = {}, None, None
    for s, q in qs.items():
        if score and not expand and hasattr(q, "rsample_and_log_prob"):
            z[s], lq = q.rsample_and_log_prob((particles,))
        elif not expand:
            z[s] = q.rsample((particles,))  # (S, B, *event)
            lq = q.log_prob(z[s]) if score else None
        else:
            qe = q.expand((particles,) + tuple(q.batch_shape))  # (S, B)
            with stratified(len(qe.batch_shape)) if stratify else nullcontext():
                z[s] = qe.rsample()  # (S, B, *event)
            lr = log_stratum(qe) if stratify else None
            if lr is not None:
                log_rho = lr if log_rho is None else log_rho + lr  # (S, B)
            lq = qe.log_prob(z[s]) if score else None
        if score:
            log_q = lq if log_q is None else log_q + lq  # (S, B)
    return qs, z, log_q, log_rho


def _total(terms) -> torch.Tensor:
    """Sum of tensors without Python's ``sum`` starting at 0 (one add fewer per call)."""
    out = None
    for t in terms:
        out = t if out is None else out + t
    return out


def fast_log_weights(model, guide, *args, particles: int = 1, beta: float = 1.0, stratify: bool = False) -> LogWeights:
    """:func:`pyrovi.weights.log_weights` for fast-path pairs: all shapes ``(S, B)``, per datapoint.

    ``beta`` weights the latent terms: log w = log p(x|z) + beta (log p(z) - log q(z|x)).
    ``stratify``: draw mixture sites stratified over the ``particles`` (pass ``particles`` per
    component times ``guide.strata``, as for :func:`~pyrovi.weights.log_weights`); their weights
    are returned as ``log_rho``.
    """
    x, y = _split(args)
    qs, z, log_q, log_rho = _draw(guide, x, y, particles, stratify=stratify)  # log_q (S, B)
    return _weights(model, x, y, qs, z, log_q, log_rho, beta)


def _weights(model, x, y, qs: dict, z: dict, log_q: torch.Tensor, log_rho, beta: float) -> LogWeights:
    """:class:`LogWeights` ``(S, B)`` of the draws ``z`` of the sites ``qs``, scored ``log_q`` (by q itself, or by
    its stop-gradient twin: :func:`pyrovi.stop_gradient.fast_stop_gradient_weights`)."""
    log_lik, priors = model.fast_log_joint(x, z, y)  # (S, B), {site: p(z)}
    log_prior = _total(priors[s].log_prob(z[s]) for s in qs)  # (S, B)
    if log_lik.shape != log_q.shape:
        log_lik = log_lik.expand_as(log_q)
    log_w = log_lik + (log_prior - log_q) if beta == 1.0 else log_lik + beta * (log_prior - log_q)
    if log_rho is not None:
        log_rho = log_rho.expand_as(log_w)
    return LogWeights(log_w, log_lik + log_prior, log_q, log_lik, 1.0, True, None, None, log_rho)


def fast_elbo_weights(model, guide, *args, particles: int = 1, beta: float = 1.0) -> LogWeights:
    """Log weights for an ELBO estimate, as ``Objective._elbo_weights`` draws them on Pyro's path.

    ``particles`` plain draws, or, for a guide with mixture sites (``guide.strata = C > 1``),
    ``particles`` per component drawn stratified (``S = particles * C``, with ``log_rho``);
    ``pyrovi.objectives.iw_bound(lw, alpha=1)`` turns either into the ELBO.
    """
    c = strata(guide)
    return fast_log_weights(model, guide, *args, particles=particles * c, beta=beta, stratify=c > 1)


def fast_meanfield_bound(model, guide, *args, particles: int = 1, beta: float = 1.0) -> torch.Tensor:
    """ELBO with analytic KL(q || p) where one is registered, summed over datapoints (as TraceMeanField_ELBO).

    .. math:: \\sum_n \\Big( \\frac1S \\sum_s \\log p(x_n \\mid z_{s,n}) - \\beta\\,\\mathrm{KL}(q(z|x_n) \\,\\|\\, p(z)) \\Big)
    """
    x, y = _split(args)
    qs, z, _, _ = _draw(guide, x, y, particles, score=False)
    log_lik, priors = model.fast_log_joint(x, z, y)
    kl: Optional[torch.Tensor] = None
    for s, q in qs.items():
        try:
            k = kl_divergence(q, priors[s])  # (B,)
        except NotImplementedError:  # Monte Carlo for pairs without a closed form, as Pyro does
            k = (q.log_prob(z[s]) - priors[s].log_prob(z[s])).mean(0)
        kl = k if kl is None else kl + k
    return log_lik.mean(0).sum() - (kl.sum() if beta == 1.0 else beta * kl.sum())
