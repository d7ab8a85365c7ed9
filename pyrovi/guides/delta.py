"""Point-mass amortized guide: q(z|x) = δ(z − f(x)), a deterministic encoder.

.. math::

    q_\\phi(z \\mid x) = \\delta\\big(z - f_\\phi(x)\\big)

Pyro's ``Delta`` gives its point log-density 0, so under any ELBO this guide
contributes :math:`\\log p(x, f(x))` and nothing else: with a model's proper
prior that is amortized MAP inference of ``z``; with the flat prior of
:class:`pyrovi.models.Autoencoder` it is the plain autoencoder's reconstruction
objective. It is not a density over z and gives no bound on log p(x).
"""

from __future__ import annotations

import math
from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from ..nets import MLP
from .base import encoder_input, input_dim, latent_sites

__all__ = ["Delta"]


class Delta(PyroModule):
    """Deterministic encoder: every latent site is the point ``f(x)``, shape ``(B, *event_shape)``.

    The encoder is the same MLP body as :class:`~pyrovi.guides.DiagNormal`'s
    (``D [+ C] -> hidden``), with one linear head per latent site giving the
    point itself instead of ``(loc, scale)``.

    Args:
        model: the model this guide serves (read: ``latent_sites``, ``obs_shape``).
        hidden: encoder hidden widths.
        activation: name of the hidden activation.
    """

    def __init__(self, model, *, hidden=(256,), activation: str = "relu"):
        super().__init__()
        self.sites = latent_sites(model)
        self.hidden = tuple(hidden)
        self.activation = activation
        self._model_ref = [model]  # a list so nn.Module does not register the model as a submodule
        self.body = MLP(input_dim(model), self.hidden, None, act=activation)
        self.heads = nn.ModuleDict(
            {name: nn.Linear(self.body.out_features, math.prod(shape)) for name, shape in self.sites.items()}
        )

    def config(self) -> dict:
        """JSON-able options (the model is supplied when rebuilding)."""
        return {"name": "delta", "hidden": list(self.hidden), "activation": self.activation}

    def encode(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> dict:
        """``{site: (point, scale)}`` with ``point`` of shape ``(B, *event_shape)`` and ``scale`` zeros of that shape.

        The zero scale says "point mass", so code that reads ``(loc, scale)``
        from any pyrovi guide reads this one too.
        """
        h = self.body(encoder_input(self._model_ref[0], x, y))  # (B, H)
        out = {}
        for name, shape in self.sites.items():
            point = self.heads[name](h).reshape(-1, *shape)  # (B, *shape)
            out[name] = (point, torch.zeros_like(point))
        return out

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> dict:
        """Sample (i.e. place) every latent site at ``f(x)`` inside ``pyro.plate("data", B)``."""
        params = self.encode(x, y)
        with pyro.plate("data", x.shape[0]):
            return {
                name: pyro.sample(name, dist.Delta(point, event_dim=len(self.sites[name])))
                for name, (point, _) in params.items()
            }
