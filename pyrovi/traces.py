"""Reading Pyro traces: the data plate, guide-then-model traces, the sites' layout, and two scaling handlers.

One home for the questions every objective and diagnostic asks of a model and guide:

- **Where is the data plate?** :func:`data_frame`, :func:`data_dim` and
  :func:`in_data_plate` find the plate named ``data_plate`` (``"data"`` in
  pyrovi's models; ``fit(data_plate=...)`` names another) in a site's
  ``cond_indep_stack``.
- **Trace the guide, replay the model.** :func:`trace_pair` draws z ~ q(z|x)
  (optionally ``particles`` vectorized draws on the leftmost batch dim, in
  Pyro's own particle plate) and replays the model on those draws.
- **Which sites are global?** :func:`structure` says where the sites lie
  relative to the data plate; :func:`guess_max_plate_nesting` finds the plate depth.
- **Scaling handlers**: :class:`ScaleLatents` (beta on the latent sites, for
  KL warm-up and beta-VAEs) and :class:`ScalePlate` (N/B on the data plate's
  sites, for minibatches).
"""

from __future__ import annotations

from typing import Optional

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

__all__ = ["PARTICLE_PLATE", "data_frame", "data_dim", "in_data_plate", "trace_pair", "structure",
           "guess_max_plate_nesting", "rng_neutral", "ScaleLatents", "scale_latents", "ScalePlate"]

PARTICLE_PLATE = "num_particles_vectorized"  # Pyro's own name, so Pyro code treats it as particles


# --------------------------------------------------------------------------- the data plate


def data_frame(site, data_plate: str = "data"):
    """The ``CondIndepStackFrame`` of the plate named ``data_plate`` around ``site`` (a trace node or a
    message), or None when the site lies outside it."""
    return next((f for f in site["cond_indep_stack"] if f.name == data_plate), None)


def data_dim(site, data_plate: str = "data") -> Optional[int]:
    """The (negative) batch dim of ``site`` that indexes datapoints, or None outside the data plate."""
    f = data_frame(site, data_plate)
    return None if f is None else f.dim


def in_data_plate(site, data_plate: str = "data") -> bool:
    """Whether ``site`` lies inside the plate named ``data_plate`` (a per-datapoint site)."""
    return data_frame(site, data_plate) is not None


def _sample_sites(tr):
    """``(name, site)`` of a trace's sample sites, leaving out plates' subsample sites."""
    return ((n, s) for n, s in tr.nodes.items() if s["type"] == "sample" and not site_is_subsample(s))


# --------------------------------------------------------------------------- guide, then model


def trace_pair(model, guide, args: tuple = (), kwargs: Optional[dict] = None, *, particles: Optional[int] = None,
               max_plate_nesting: Optional[int] = None) -> tuple:
    """Trace the guide, replay the model on its draws: ``(guide_trace, model_trace)``.

    With ``particles`` (an int S), both run inside Pyro's vectorized particle plate at
    ``dim = -(max_plate_nesting + 1)``, so every latent has S draws on that leftmost dim;
    ``max_plate_nesting`` is then required (see :func:`guess_max_plate_nesting`). Gradients
    flow as usual: the caller decides about ``torch.no_grad`` and ``poutine.block``.
    """
    kwargs = kwargs or {}
    if particles is None:
        guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
        return guide_tr, model_tr
    if max_plate_nesting is None:
        raise ValueError("trace_pair(particles=...) needs max_plate_nesting (see guess_max_plate_nesting)")
    with pyro.plate(PARTICLE_PLATE, particles, dim=-(max_plate_nesting + 1)):
        return trace_pair(model, guide, args, kwargs)


def guess_max_plate_nesting(model, guide, args, kwargs) -> int:
    """Plate depth of model and guide, read from attributes or found by one trace."""
    declared = [getattr(m, "max_plate_nesting", None) for m in (model, guide)]
    declared = [d for d in declared if isinstance(d, int)]
    if declared:
        return max(declared)
    with poutine.block():
        traces = trace_pair(model, guide, args, kwargs)
    depth = 0
    for tr in traces:
        for _, site in _sample_sites(tr):
            for f in site["cond_indep_stack"]:
                if f.vectorized and f.dim is not None:
                    depth = max(depth, -f.dim)
    return depth


def rng_neutral():
    """Around a look at model and guide (a probe, a check): leave the caller's random stream as it was, so the
    draws after the look are those without it."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)


def structure(model, guide, args, kwargs, data_plate: str = "data") -> dict:
    """One trace of guide and model (no gradients): where the sites lie relative to the data plate.

    Returns ``{"data_plate": bool, "global_sites": bool, "local_latents": [names],
    "subsample_size": int or None}``: whether any site lies in the plate named
    ``data_plate``; whether any site (of model or guide) lies outside it; the model's
    latent sites inside it, in trace order (leaving out sites marked for enumeration that the guide does not
    draw: they are summed out); the plate's size when it subsamples itself
    (``pyro.plate(name, N, subsample_size=B)``).
    """
    with poutine.block(), torch.no_grad():
        guide_tr, model_tr = trace_pair(model, guide, args, kwargs)
    info = {"data_plate": False, "global_sites": False, "local_latents": [], "subsample_size": None}
    for tr in (guide_tr, model_tr):
        for name, site in _sample_sites(tr):
            frame = data_frame(site, data_plate)
            if frame is None:
                info["global_sites"] = True
                continue
            info["data_plate"] = True
            if frame.full_size is not None and frame.size < frame.full_size:
                info["subsample_size"] = int(frame.size)
            if tr is model_tr and not site["is_observed"] and name not in info["local_latents"]:
                if name not in guide_tr.nodes and site["infer"].get("enumerate") in ("parallel", "sequential"):
                    continue  # summed out (pyrovi.enumeration): the guide keeps no parameters for it
                info["local_latents"].append(name)
    return info


# --------------------------------------------------------------------------- scaling handlers


class ScaleLatents(Messenger):
    """Multiply the log-density of every latent (non-observed) site by ``beta`` (beta-VAE, KL warm-up).

    Wrap both model and guide (``ScaleLatents(beta)(model)``): the bound becomes
    :math:`\\mathbb E_q[\\log p(x \\mid z) + \\beta(\\log p(z) - \\log q(z \\mid x))]`.
    """

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def _process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg):
            msg["scale"] = self.beta * msg["scale"]


class _Scaled:
    """``fn`` run under :class:`ScaleLatents` (``beta``), keeping the ``strata`` it declares.

    A plain Pyro wrapper (``ScaleLatents(beta)(guide)``) hides the guide's attributes, so the
    objectives would not see a mixture guide's components and would draw it plainly, not
    stratified (unbiased, but not the estimator ``beta = 1`` uses).
    """

    def __init__(self, beta: float, fn):
        self.beta, self.fn = beta, fn
        if getattr(fn, "strata", None) is not None:
            self.strata = fn.strata

    def __call__(self, *args, **kwargs):
        with ScaleLatents(self.beta):
            return self.fn(*args, **kwargs)


def scale_latents(beta: float, model, guide) -> tuple:
    """``(model, guide)`` with every latent site's log-density scaled by ``beta`` (:class:`ScaleLatents`);
    the guide still declares its ``strata`` (mixture components the objectives stratify over)."""
    return _Scaled(beta, model), _Scaled(beta, guide)


class ScalePlate(Messenger):
    """Weight every site inside plate ``name`` by ``factor`` = N / B (minibatch of B rows out of N).

    The same estimator of the whole data set's ELBO that ``pyro.plate(name, N, subsample=idx)``
    gives: local terms scaled up by N/B, global terms (outside the plate) counted once.
    """

    def __init__(self, name: str, factor: float):
        super().__init__()
        self.name = name
        self.factor = factor

    def _process_message(self, msg):
        # The model's plate is entered inside this handler, so it has already added its frame.
        if msg["type"] == "sample" and not site_is_subsample(msg) and in_data_plate(msg, self.name):
            msg["scale"] = self.factor * msg["scale"]
