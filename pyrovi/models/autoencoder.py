"""The plain (deterministic) autoencoder, written as a Pyro model so ``pyrovi.fit`` trains it.

An autoencoder learns an encoder :math:`f` and a decoder :math:`g` by
reconstruction alone:

.. math::

    \\min_{f, g}\\ \\sum_n -\\log p\\big(x_n \\mid g(f(x_n))\\big)
    \\;=\\; \\sum_n \\tfrac{1}{2\\delta^2}\\lVert x_n - g(f(x_n)) \\rVert^2 + \\text{const}
    \\quad\\text{(Gaussian, i.e. MSE)}

or the binary cross-entropy for a Bernoulli likelihood. No KL term, no prior.

Why this is a Pyro model: give ``z`` a *flat* (improper) prior, log-density 0
everywhere, and use the point-mass guide :class:`pyrovi.guides.Delta`,
:math:`q(z \\mid x) = \\delta(z - f(x))`, whose log-density Pyro takes as 0 at
its point. The ELBO then collapses to the autoencoder's objective,

.. math::

    \\mathbb E_q[\\log p(x \\mid z) + \\log p(z) - \\log q(z \\mid x)] = \\log p\\big(x \\mid g(f(x))\\big),

so the same ``fit`` (checkpoints, resume, early stopping, CLI) trains it, with
the *same* encoder and decoder nets as the VAE. It is not a bound on
:math:`\\log p(x)`: the autoencoder defines no density over ``x``, and the
"log-likelihood" that ``evaluate`` reports for it is the reconstruction
log-likelihood only.
"""

from __future__ import annotations

from typing import Optional

import pyro.distributions as dist
import torch
from torch.distributions import constraints

from .vae import VAE

__all__ = ["Autoencoder"]


class Autoencoder(VAE):
    """Deterministic autoencoder baseline: :class:`~pyrovi.models.VAE`'s decoder with a flat prior on ``z``.

    Latent site ``"z"`` of shape ``(L,)``, observation ``"x"`` of shape ``(D,)``.
    Train it with the point-mass guide ``pyrovi.guides.Delta(model)`` (the
    model's ``default_guide``); any other guide would add that guide's entropy
    to the objective and no longer be an autoencoder.

    Args:
        shape: the data's event shape ``(D,)`` or ``D``.
        latent_dim: L, the code size.
        hidden: decoder hidden widths (the VAE's defaults, for a like-for-like comparison).
        likelihood: ``"bernoulli"`` (binary cross-entropy, data in [0, 1]) or
            ``"gaussian"`` (squared error; with fixed ``sigma`` the loss is
            :math:`\\lVert x - \\hat x\\rVert^2 / (2\\sigma^2)` plus a constant, i.e. MSE).

    The other options (``sigma``, ``learn_sigma``, ``activation``,
    ``image_shape``) are :class:`~pyrovi.models.VAE`'s.
    """

    #: the guide that makes this model an autoencoder (read by the CLI)
    default_guide = "delta"

    def config(self) -> dict:
        """JSON-able options that rebuild this model (``pyrovi.models.build``)."""
        return {**super().config(), "name": "autoencoder"}

    def prior(self, batch: int, like: torch.Tensor) -> dist.TorchDistribution:
        """Flat improper "prior" on R^L, log-density 0 (it cannot be sampled; a guide supplies z)."""
        return dist.ImproperUniform(constraints.real, (), (self.cfg.latent_dim,))

    @torch.no_grad()
    def sample(self, n: int, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Decode ``n`` codes z ~ N(0, I_L); shape ``(n, D)``.

        An autoencoder has no prior to sample from. This decodes the same
        standard-normal draws a VAE would, which is the baseline the seed's
        argument needs ("a random z gives garbage"); it is not a generative
        model's sample.
        """
        return super().sample(n, generator=generator)
