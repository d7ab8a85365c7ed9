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
``learn_weights=False`` keeps them equal (1/C): the right choice when the
modes are known to be symmetric, and a way to avoid weight collapse.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pyro.distributions import MixtureOfDiagNormals
from torch import nn

from ..errors import ConfigError, check_positive
from .amortized import Amortized

__all__ = ["DiagNormalMixture", "Mixture", "MixtureHead"]


class DiagNormalMixture(MixtureOfDiagNormals):
    """Mixture of diagonal Normals with unbiased pathwise gradients for every parameter and any ``D >= 1``.

    ``locs``, ``coord_scale``: ``(*batch, K, D)``; ``component_logits``: ``(*batch, K)``.
    ``log_prob`` and ``expand`` are Pyro's; ``rsample`` is Graves' (2016) estimator (module doc).
    """

    def rsample(self, sample_shape=()) -> torch.Tensor:
        sample_shape = torch.Size(sample_shape)
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

    def forward(self, h: torch.Tensor) -> tuple:
        """``(q, q_stop_gradient)`` with batch ``h.shape[:-1]`` and event ``(n,)``."""
        C, n = self.components, self.dim
        out = self.linear(h)  # (..., C (2n + 1))
        locs = out[..., : C * n].unflatten(-1, (C, n))  # (..., C, n)
        scales = F.softplus(out[..., C * n: 2 * C * n]).unflatten(-1, (C, n)) + self.min_scale  # (..., C, n)
        logits = out[..., 2 * C * n:]  # (..., C)
        if not self.learn_weights:
            logits = torch.zeros_like(logits)  # equal weights 1/C (the head's logit rows stay unused)
        q = DiagNormalMixture(locs, scales, logits)
        return q, DiagNormalMixture(locs.detach(), scales.detach(), logits.detach())


class Mixture(Amortized):
    """q(z|x) = a mixture of ``components`` diagonal Gaussians for every latent site, amortized over x.

    An MLP body ``D -> hidden`` is shared; one linear head per site gives the
    ``C`` means, scales (``softplus + min_scale``) and mixture logits.
    Reparameterized, usable under vectorized particles; KL by Monte Carlo.

    Args:
        model: the model served (pyrovi model, or any Pyro model with ``example=``).
        components: C >= 1 (1 is a diagonal Gaussian).
        learn_weights: learn the mixture weights pi_c(x) (default) or keep them equal to 1/C.
        hidden: encoder hidden widths (see :class:`~pyrovi.guides.amortized.Amortized`).
        activation: encoder activation.
        example: example inputs to trace a user's model with.
        data_plate: name of the plate over datapoints.
        min_scale: lower bound on every component's sigma.
    """

    def __init__(self, model, *, components: int = 5, learn_weights: bool = True, hidden=(256,),
                 activation: str = "relu", min_scale: float = 1e-4, example=None, data_plate: str = "data"):
        check_positive("components", components, integer=True)
        check_positive("min_scale", min_scale, allow_zero=True)
        if not isinstance(learn_weights, bool):
            raise ConfigError(f"learn_weights must be True or False, got {learn_weights!r}")
        self.components, self.min_scale, self.learn_weights = components, float(min_scale), learn_weights
        super().__init__(model, self._head, hidden=hidden, activation=activation, example=example,
                         data_plate=data_plate)

    def _head(self, context_dim: int, dim: int) -> MixtureHead:
        return MixtureHead(context_dim, dim, components=self.components, min_scale=self.min_scale,
                           learn_weights=self.learn_weights)

    def config(self) -> dict:
        """JSON-able options (the model is supplied when rebuilding)."""
        return {"name": "mixture", "components": self.components, "learn_weights": self.learn_weights,
                "min_scale": self.min_scale, **self._base_config()}
