"""Mixture-of-diagonal-Gaussians amortized guide.

.. math::

    q_\\phi(z \\mid x) = \\sum_{c=1}^C \\pi_c(x)\\,
        \\mathcal N\\big(z;\\ \\mu_c(x),\\ \\mathrm{diag}\\,\\sigma_c(x)^2\\big)

A mixture can put mass on several modes of a multimodal posterior, which a
single Gaussian cannot. Its KL to the prior has no closed form, so every
objective estimates it by Monte Carlo (``meanfield`` falls back to it too).

Sampling picks a component, a discrete choice, yet gradients are pathwise,
by implicit reparameterization through the coordinates' conditional CDFs
(Graves 2016, *Stochastic backpropagation through mixture density
distributions*; Figurnov, Mohamed & Mnih 2018). Given the earlier coordinates
:math:`z_{<d}`, coordinate :math:`d` is a 1-D mixture with weights
:math:`w_c \\propto \\pi_c \\prod_{j<d} \\mathcal N(z_j; \\mu_{cj}, \\sigma_{cj})`
and CDF :math:`F_d`, and

.. math:: \\frac{\\mathrm dz_d}{\\mathrm d\\phi} = -\\frac{1}{q(z_d \\mid z_{<d})}\\,
          \\frac{\\mathrm d F_d(z_d \\mid z_{<d})}{\\mathrm d\\phi}
          \\quad (\\text{total derivative, through } z_{<d} \\text{ too}),

written coordinate by coordinate as the surrogate ``z_d - (F_d - F_d.detach()) / q_d.detach()``.
Why not Pyro's :class:`~pyro.distributions.MixtureOfDiagNormals` sampler (whose
density, shapes and ``expand`` are reused here): its pathwise gradient for the
mixture *logits* is biased when component scales differ; pyrovi's test
measured its mean gradient 10-55 Monte-Carlo standard errors away from the
closed form, while the estimator here matches it (``tests/test_guides_mixture_flow.py``).

A known weakness, measured in pyrovi's tests: the pathwise gradient of a
mixture *weight* moves probability mass by moving draws through the region
between components, so once components sit on well-separated modes almost
no draw carries that signal, and Adam turns the remaining zero-mean noise into
a drift of the weights. The weights therefore start equal, and
``learn_weights=False`` keeps them equal (1/C).

Training with the ELBO (``elbo``, ``meanfield``, ``stl``) therefore draws *stratified*
particles (Morningstar, Vikram, Ham, Gallagher & Dillon 2021, *Automatic
differentiation variational inference with mixtures*): ``particles`` per component, particle
``s`` from component :math:`c(s) = (s + u) \\bmod C` (``u`` uniform per site and
datapoint, so each particle's component is marginally uniform) by ordinary
reparameterization, and weight it by :math:`\\rho_s = C\\,\\pi_{c(s)}(x)`:

.. math:: \\mathbb E_q[f(z)] = \\sum_c \\pi_c\\, \\mathbb E_{q_c}[f(z)]
          \\approx \\frac1S \\sum_{s=1}^S \\rho_s f(z_s),
          \\qquad \\mathbb E\\Big[\\frac1S \\sum_s \\rho_s w_s\\Big] = p(x).

The ELBO is the first sum with :math:`f = \\log w`. (By the second identity a
log-average of :math:`\\rho_s w_s` is still a lower bound, by Jensen, which
:func:`pyrovi.objectives.iw_bound` accepts; the ``iwae``, ``renyi`` and ``dreg``
objectives keep plain draws, the bounds they name.) A weight
:math:`\\pi_c` now gets the exact gradient :math:`\\sum_s [c(s) = c]\\, C f(z_s) / S`,
and because the :math:`\\pi_c` sum to one every component's draw acts as
the others' baseline. On the bimodal test model this took learned weights from
2-3 of 5 seeds covering both modes to 9-10 of 10 (``tests/test_guide_quality.py``).
Evaluation and diagnostics draw from :math:`q` itself, with the sampler above.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from pyro.distributions import MixtureOfDiagNormals
from torch import nn

from ..errors import ConfigError, check_positive
from ..stratify import log_stratum, stratified, stratify_rank
from .amortized import Amortized

# ``stratified`` and ``log_stratum`` live in :mod:`pyrovi.stratify`; re-exported here for older imports.
__all__ = ["DiagNormalMixture", "Mixture", "MixtureHead", "stratified", "log_stratum"]

class DiagNormalMixture(MixtureOfDiagNormals):
    """Mixture of diagonal Normals with unbiased pathwise gradients for every parameter and any ``D >= 1``.

    ``locs``, ``coord_scale``: ``(*batch, K, D)``; ``component_logits``: ``(*batch, K)``.
    ``log_prob`` and ``expand`` are Pyro's; ``rsample`` is Graves' (2016) estimator (module doc).
    """

    log_stratum: Optional[torch.Tensor] = None  # set by a stratified draw: log(C pi_c(s)), batch shape

    def rsample(self, sample_shape=()) -> torch.Tensor:
        sample_shape = torch.Size(sample_shape)
        rank = stratify_rank()
        if rank is not None and not sample_shape and len(self.batch_shape) >= rank:
            return self._stratified_rsample(rank)
        locs = self.locs.expand(sample_shape + self.locs.shape)  # (*S, *batch, K, D)
        scales = self.coord_scale.expand(sample_shape + self.coord_scale.shape)  # (*S, *batch, K, D)
        log_w = torch.log_softmax(self.component_logits, -1).expand(locs.shape[:-1])  # (*S, *batch, K)
        with torch.no_grad():
            which = self.categorical.sample(sample_shape)[..., None, None].expand(locs.shape[:-2] + (1, self.dim))
            z0 = locs.gather(-2, which).squeeze(-2) + scales.gather(-2, which).squeeze(-2) * torch.randn(
                locs.shape[:-2] + (self.dim,), dtype=locs.dtype, device=locs.device)  # (*S, *batch, D)
        tiny = torch.finfo(z0.dtype).tiny
        zs = []
        for d in range(self.dim):
            mu, sd = locs[..., d], scales[..., d]  # (*S, *batch, K)
            u = (z0[..., d, None] - mu) / sd
            w = torch.softmax(log_w, -1)  # weights of the components given z_<d
            cdf = (w * torch.special.ndtr(u)).sum(-1)  # F_d(z_d | z_<d), (*S, *batch)
            dens = (w * torch.exp(-0.5 * u ** 2) / (sd * math.sqrt(2 * math.pi))).sum(-1)
            z_d = z0[..., d] - (cdf - cdf.detach()) / dens.detach().clamp_min(tiny)  # value z0[..., d]
            zs.append(z_d)
            log_w = log_w - 0.5 * ((z_d[..., None] - mu) / sd) ** 2 - sd.log()  # condition on z_d
        return torch.stack(zs, dim=-1)  # (*S, *batch, D)

    def _stratified_rsample(self, rank: int) -> torch.Tensor:
        """Particle s (batch dim -rank) from component (s + u) mod K, reparameterized; sets ``log_stratum``."""
        batch, K = self.batch_shape, self.locs.size(-2)
        S = batch[-rank]
        offset_shape = batch[:-rank] + (1,) + batch[len(batch) - rank + 1:]
        u = torch.randint(K, offset_shape, device=self.locs.device)
        s = torch.arange(S, device=self.locs.device).reshape((S,) + (1,) * (rank - 1))
        which = (u + s) % K  # (*batch)
        idx = which[..., None, None].expand(batch + (1, self.dim))
        loc = self.locs.expand(batch + self.locs.shape[-2:]).gather(-2, idx).squeeze(-2)  # (*batch, D)
        scale = self.coord_scale.expand(batch + self.coord_scale.shape[-2:]).gather(-2, idx).squeeze(-2)
        log_pi = torch.log_softmax(self.component_logits, -1).expand(batch + (K,))
        self.log_stratum = math.log(K) + log_pi.gather(-1, which[..., None]).squeeze(-1)  # (*batch)
        return loc + scale * torch.randn(loc.shape, dtype=loc.dtype, device=loc.device)


class MixtureHead(nn.Module):
    """``h (..., H)`` -> mixture of ``C`` diagonal Gaussians over ``R^n``."""

    def __init__(self, context_dim: int, dim: int, *, components: int = 5, min_scale: float = 1e-4,
                 learn_weights: bool = True):
        super().__init__()
        self.dim, self.components, self.min_scale = dim, components, float(min_scale)
        self.learn_weights = bool(learn_weights)
        self.linear = nn.Linear(context_dim, components * (2 * dim + 1))
        with torch.no_grad():
            # Spread the components' initial means over [-1, 1] in every coordinate (a random order per
            # coordinate): components that start on top of each other tend to stay there, and a mixture
            # started on one side of a symmetric posterior tends to drop its other component.
            spread = torch.linspace(-1.0, 1.0, components) if components > 1 else torch.zeros(1)
            order = torch.stack([torch.randperm(components) for _ in range(dim)], dim=-1)  # (C, n)
            self.linear.bias[: components * dim] = spread[order].reshape(-1)
            # Start from equal weights: the pathwise gradient of a weight is weak once components sit on
            # separate modes (it needs draws between them), so a weight that drifts early rarely recovers.
            self.linear.weight[2 * components * dim:] = 0.0
            self.linear.bias[2 * components * dim:] = 0.0

    def params(self, h: torch.Tensor) -> tuple:
        """``(locs (..., C, n), scales (..., C, n), logits (..., C))``."""
        C, n = self.components, self.dim
        out = self.linear(h)  # (..., C (2n + 1))
        locs = out[..., : C * n].unflatten(-1, (C, n))  # (..., C, n)
        scales = F.softplus(out[..., C * n: 2 * C * n]).unflatten(-1, (C, n)) + self.min_scale  # (..., C, n)
        logits = out[..., 2 * C * n:]  # (..., C)
        if not self.learn_weights:
            logits = torch.zeros_like(logits)  # equal weights 1/C (the head's logit rows stay unused)
        return locs, scales, logits

    def q(self, h: torch.Tensor) -> DiagNormalMixture:
        """q alone, batch ``h.shape[:-1]``, event ``(n,)``."""
        return DiagNormalMixture(*self.params(h))

    def moments(self, h: torch.Tensor) -> tuple:
        """The mixture's mean and standard deviation per coordinate, each ``(..., n)``."""
        locs, scales, logits = self.params(h)
        w = torch.softmax(logits, -1)[..., None]  # (..., C, 1)
        mean = (w * locs).sum(-2)  # (..., n)
        var = (w * (scales ** 2 + locs ** 2)).sum(-2) - mean ** 2
        return mean, var.clamp_min(0.0).sqrt()

    def forward(self, h: torch.Tensor) -> tuple:
        """``(q, q_stop_gradient)`` with batch ``h.shape[:-1]`` and event ``(n,)``."""
        locs, scales, logits = self.params(h)
        q = DiagNormalMixture(locs, scales, logits)
        return q, DiagNormalMixture(locs.detach(), scales.detach(), logits.detach())

    pair = forward


class Mixture(Amortized):
    """q(z|x) = a mixture of ``components`` diagonal Gaussians for every latent site, amortized over x.

    An MLP body ``D -> hidden`` is shared; one linear head per site gives the
    ``C`` means, scales (``softplus + min_scale``) and mixture logits.
    Reparameterized, usable under vectorized particles; KL by Monte Carlo.

    Args:
        model: the model served (pyrovi model, or any Pyro model with ``example=``).
        components: C >= 1 (1 is a diagonal Gaussian).
        learn_weights: learn the mixture weights pi_c(x) (default) or keep them equal to 1/C.
        hidden: encoder hidden widths, an int or a sequence (see :class:`~pyrovi.guides.amortized.Amortized`).
        activation: encoder activation.
        example: example inputs to trace a user's model with (optional: without it, the first call
            or :meth:`~pyrovi.guides.amortized.Amortized.setup` traces it).
        data_plate: name of the plate over datapoints.
        min_scale: lower bound on every component's sigma.
    """

    def __init__(self, model, *, components: int = 5, learn_weights: bool = True, hidden=(256,),
                 activation: str = "relu", min_scale: float = 1e-4, example=None, data_plate: str = "data"):
        check_positive("components", components, integer=True)
        if not isinstance(learn_weights, bool):
            raise ConfigError(f"learn_weights must be True or False, got {learn_weights!r}")
        self.components, self.learn_weights = components, learn_weights
        super().__init__(model, hidden=hidden, activation=activation, min_scale=min_scale, example=example,
                         data_plate=data_plate)

    @property
    def strata(self) -> int:
        """Components C: objectives draw ``particles`` stratified draws per component (module doc)."""
        return self.components

    def _head(self, context_dim: int, shape: tuple) -> MixtureHead:
        return MixtureHead(context_dim, math.prod(shape), components=self.components, min_scale=self.min_scale,
                           learn_weights=self.learn_weights)

    def config(self) -> dict:
        """JSON-able options (the model is supplied when rebuilding)."""
        return {"name": "mixture", "components": self.components, "learn_weights": self.learn_weights,
                "min_scale": self.min_scale, **self._base_config()}
