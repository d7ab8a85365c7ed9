"""Diagonal-Gaussian amortized guide, the VAE's standard q(z|x).

.. math::

    q_\\phi(z \\mid x) = \\mathcal N\\big(z;\\ \\mu_\\phi(x),\\ \\mathrm{diag}\\,\\sigma_\\phi(x)^2\\big),
    \\qquad z = \\mu + \\sigma \\odot \\varepsilon,\\ \\varepsilon \\sim \\mathcal N(0, I)

Reparameterized (pathwise gradients) and usable under vectorized particle
plates; with the ``meanfield`` objective its KL to N(0, I) is analytic:
:math:`\\tfrac12 \\sum_i (\\mu_i^2 + \\sigma_i^2 - \\log \\sigma_i^2 - 1)`.
"""

from __future__ import annotations

from .amortized import Amortized, NormalHead

__all__ = ["DiagNormal"]


class DiagNormal(Amortized):
    """q(z|x) = Normal(mu(x), sigma(x)) independently per latent dimension, for every latent site.

    An MLP body ``D -> hidden`` is shared; one linear head per latent site
    gives ``(loc, scale)`` with ``scale = softplus(raw) + min_scale``
    (:class:`~pyrovi.guides.amortized.NormalHead`). On a constrained site of a
    traced model the Gaussian lives on the unconstrained space and is mapped by
    ``biject_to(support)``.

    Args:
        model: the model served: a pyrovi model (declares ``latent_sites``) or any Pyro model,
            traced on ``example=`` or, without it, on the first call / :meth:`setup`.
        hidden: encoder hidden widths, an int or a sequence (default ``(256,)``).
        activation: encoder activation.
        min_scale: lower bound on sigma, for numerical safety.
        example: example inputs to trace a Pyro model with (e.g. ``x[:2]``).
        data_plate: name of the plate over datapoints.

    ``encode(x, y=None)`` gives ``{site: (loc, scale)}``, ``posterior(x, y=None)``
    ``{site: q}`` (each a :class:`~pyrovi.distributions.DiagonalNormal` with batch
    ``(B,)`` and the site's event shape).
    """

    def __init__(self, model, *, hidden=(256,), activation: str = "relu", min_scale: float = 1e-4,
                 example=None, data_plate: str = "data"):
        super().__init__(model, hidden=hidden, activation=activation, min_scale=min_scale, example=example,
                         data_plate=data_plate)

    def _head(self, context_dim: int, shape: tuple) -> NormalHead:
        return NormalHead(context_dim, shape, min_scale=self.min_scale)

    def config(self) -> dict:
        """JSON-able options (the model is supplied when rebuilding)."""
        d = self._base_config()
        return {"name": "diag_normal", "hidden": d.pop("hidden"), "activation": d.pop("activation"),
                "min_scale": self.min_scale, **d}
