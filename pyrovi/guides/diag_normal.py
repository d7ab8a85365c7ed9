"""Diagonal-Gaussian amortized guide, the VAE's standard q(z|x).

.. math::

    q_\\phi(z \\mid x) = \\mathcal N\\big(z;\\ \\mu_\\phi(x),\\ \\mathrm{diag}\\,\\sigma_\\phi(x)^2\\big),
    \\qquad z = \\mu + \\sigma \\odot \\varepsilon,\\ \\varepsilon \\sim \\mathcal N(0, I)

Reparameterized (pathwise gradients) and usable under vectorized particle
plates; with the ``meanfield`` objective its KL to N(0, I) is analytic:
:math:`\\tfrac12 \\sum_i (\\mu_i^2 + \\sigma_i^2 - \\log \\sigma_i^2 - 1)`.
"""

from __future__ import annotations

import math
from typing import Optional

import pyro
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import nn

from ..distributions import DiagonalNormal
from ..errors import check_positive
from ..nets import MLP, as_widths
from .base import encoder_input, input_dim, latent_sites

__all__ = ["DiagNormal"]


class DiagNormal(PyroModule):
    """q(z|x) = Normal(mu(x), sigma(x)) independently per latent dimension, for every latent site.

    An MLP body ``D -> hidden`` is shared; one linear head per latent site
    gives ``(loc, scale)`` with ``scale = softplus(raw) + min_scale``.

    Args:
        model: the model this guide serves (read: ``latent_sites``, ``obs_shape``).
        hidden: encoder hidden widths.
        min_scale: lower bound on sigma, for numerical safety.
    """

    def __init__(self, model, *, hidden=(256,), activation: str = "relu", min_scale: float = 1e-4):
        super().__init__()
        check_positive("min_scale", min_scale, allow_zero=True)
        self.sites = latent_sites(model)
        self.hidden = as_widths(hidden)
        self.activation = activation
        self.min_scale = float(min_scale)
        self._model_ref = [model]  # a list so nn.Module does not register the model as a submodule
        self.body = MLP(input_dim(model), self.hidden, None, act=activation)
        self.heads = nn.ModuleDict(
            {name: nn.Linear(self.body.out_features, 2 * math.prod(shape)) for name, shape in self.sites.items()}
        )

    def config(self) -> dict:
        """JSON-able options (the model is supplied when rebuilding)."""
        return {"name": "diag_normal", "hidden": list(self.hidden), "activation": self.activation,
                "min_scale": self.min_scale}

    def encode(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> dict:
        """``{site: (loc, scale)}``, each of shape ``(B, *event_shape)``."""
        h = self.body(encoder_input(self._model_ref[0], x, y))  # (B, H)
        out = {}
        for name, shape in self.sites.items():
            loc, raw = self.heads[name](h).chunk(2, dim=-1)  # (B, prod(shape)) each
            scale = F.softplus(raw) + self.min_scale
            if len(shape) != 1:  # a (B, n) site needs no reshape (a no-op view, but a node in the graph)
                loc, scale = loc.reshape(-1, *shape), scale.reshape(-1, *shape)
            out[name] = (loc, scale)
        return out

    def posterior(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> dict:
        """``{site: q(z|x)}``, each a :class:`~pyrovi.distributions.DiagonalNormal` with batch shape ``(B,)``
        and the site's event shape.

        Not argument-checked: ``scale = softplus(.) + min_scale`` is positive by construction, and a
        non-finite encoder output surfaces as a non-finite loss, which fit reports.
        """
        return {name: DiagonalNormal(loc, scale, len(self.sites[name]), validate_args=False)
                for name, (loc, scale) in self.encode(x, y).items()}

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> dict:
        """Sample each latent site from q(z|x) in ``pyro.plate("data", B)``; returns ``{site: (S?, B, *shape)}``."""
        qs = self.posterior(x, y)
        with pyro.plate("data", x.shape[0]):
            return {name: pyro.sample(name, q) for name, q in qs.items()}
