"""Mixture-of-diagonal-Gaussians amortized guide.

.. math::

    q_\\phi(z \\mid x) = \\sum_{c=1}^C \\pi_c(x)\\,
        \\mathcal N\\big(z;\\ \\mu_c(x),\\ \\mathrm{diag}\\,\\sigma_c(x)^2\\big)

A mixture can put mass on several modes of a multimodal posterior, which a
single Gaussian cannot. Its KL to the prior has no closed form, so every
objective estimates it by Monte Carlo (``meanfield`` falls back to it too).

Sampling picks a component, a discrete choice, yet gradients are pathwise:

* for ``n >= 2`` dimensions Pyro's :class:`~pyro.distributions.MixtureOfDiagNormals`
  supplies them (Jankowiak & Karaletsos 2018, *Pathwise derivatives for
  multivariate distributions*);
* Pyro does not support ``n = 1``, so :class:`DiagNormalMixture` adds the
  one-dimensional case by implicit reparameterization (Figurnov, Mohamed & Mnih
  2018): with the mixture CDF :math:`F_\\phi` and density :math:`q_\\phi`,
  :math:`\\mathrm dz/\\mathrm d\\phi = -\\partial_\\phi F_\\phi(z) / q_\\phi(z)`,
  written as the surrogate ``z - (F - F.detach()) / q.detach()``.

A known weakness, measured in pyrovi's tests: the pathwise gradient of a
mixture *weight* moves probability mass by moving draws through the region
between components, so once components sit on well-separated modes almost
no draw carries that signal, and Adam turns the remaining zero-mean noise into
a drift of the weights. The weights therefore start equal, and
``learn_weights=False`` keeps them equal (1/C): the right choice when the
modes are known to be symmetric, and a way to avoid weight collapse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pyro.distributions import MixtureOfDiagNormals
from torch import nn

from ..errors import ConfigError, check_positive
from .amortized import Amortized

__all__ = ["Mixture", "MixtureHead", "DiagNormalMixture"]


class DiagNormalMixture(MixtureOfDiagNormals):
    """:class:`~pyro.distributions.MixtureOfDiagNormals` that also has pathwise gradients for ``D = 1``.

    ``locs``, ``coord_scale``: ``(*batch, K, D)``; ``component_logits``: ``(*batch, K)``.
    """

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        if self.dim > 1:
            return super().rsample(sample_shape)
        sample_shape = torch.Size(sample_shape)
        locs = self.locs.expand(sample_shape + self.locs.shape)  # (*S, *batch, K, 1)
        scales = self.coord_scale.expand(sample_shape + self.coord_scale.shape)
        with torch.no_grad():
            which = self.categorical.sample(sample_shape)[..., None, None]  # (*S, *batch, 1, 1)
            loc = locs.gather(-2, which).squeeze(-2)  # (*S, *batch, 1)
            scale = scales.gather(-2, which).squeeze(-2)
            z0 = loc + scale * torch.randn_like(loc)
        # Implicit reparameterization: the value is z0, the gradient is -dF/dphi / q(z0).
        u = (z0.unsqueeze(-2) - locs) / scales  # (*S, *batch, K, 1)
        cdf = (self.probs * torch.special.ndtr(u).squeeze(-1)).sum(-1)  # (*S, *batch)
        dens = self.log_prob(z0).detach().exp().clamp_min(torch.finfo(z0.dtype).tiny)
        return z0 - ((cdf - cdf.detach()) / dens).unsqueeze(-1)


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
        hidden, activation, example, data_plate: see :class:`~pyrovi.guides.amortized.Amortized`.
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
