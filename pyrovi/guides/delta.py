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

from .amortized import Amortized, DeltaHead

__all__ = ["Delta"]


class Delta(Amortized):
    """Deterministic encoder: every latent site is the point ``f(x)``, shape ``(B, *event_shape)``.

    The encoder is the same MLP body as :class:`~pyrovi.guides.DiagNormal`'s
    (``D [+ C] -> hidden``), with one linear head per latent site giving the
    point itself instead of ``(loc, scale)`` (:class:`~pyrovi.guides.amortized.DeltaHead`).

    Args:
        model: the model served: a pyrovi model (declares ``latent_sites``) or any Pyro model,
            traced on ``example=`` or, without it, on the first call / :meth:`setup`.
        hidden: encoder hidden widths, an int or a sequence.
        activation: name of the hidden activation.
        example: example inputs to trace a Pyro model with (e.g. ``x[:2]``).
        data_plate: name of the plate over datapoints.

    ``encode(x, y=None)`` gives ``{site: (point, zeros)}``: the zero scale says
    "point mass", so code that reads ``(loc, scale)`` from any pyrovi guide reads
    this one too.
    """

    def __init__(self, model, *, hidden=(256,), activation: str = "relu", example=None, data_plate: str = "data"):
        super().__init__(model, hidden=hidden, activation=activation, example=example, data_plate=data_plate)

    def _head(self, context_dim: int, shape: tuple) -> DeltaHead:
        return DeltaHead(context_dim, shape)

    def config(self) -> dict:
        """JSON-able options (the model is supplied when rebuilding)."""
        return {"name": "delta", **self._base_config()}
