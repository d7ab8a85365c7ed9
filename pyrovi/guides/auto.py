"""``Auto``: an amortized guide for any Pyro model, found by tracing it.

Pyro's autoguides learn one set of parameters per latent variable; they are
not amortized, so a new datapoint needs new optimization. ``Auto`` instead
traces the model once on example inputs, finds every latent sample site in the
data plate (any number, any event shape, any continuous support), and builds
one encoder from the model's inputs to ``q(z_n | x_n)`` for all of them, in a
chosen family:

================ ========================================================
family           q per site (on the unconstrained space, then ``biject_to``)
================ ========================================================
``diag_normal``  diagonal Gaussian (default)
``mixture``      mixture of diagonal Gaussians (:class:`~pyrovi.guides.Mixture`)
``flow``         conditional normalizing flow (:class:`~pyrovi.guides.Flow`)
================ ========================================================

Supported: continuous reparameterizable latents inside one vectorized plate
(``"data"`` by default) whose size is the batch; several sites; constrained
supports (``positive``, ``unit_interval``, ``simplex``, ...). Sites are
independent given x (the encoder is shared). Not supported, with a
:class:`~pyrovi.errors.ConfigError` saying so: discrete latents, sites outside
the data plate (global latents), sites in further plates, subsampled plates.
See :mod:`pyrovi.guides.amortized` for what the encoder reads.
"""

from __future__ import annotations

from ..errors import ConfigError, check_positive, lookup
from .amortized import Amortized, NormalHead
from .flow import FLOWS, FlowHead
from .mixture import MixtureHead

__all__ = ["FAMILIES", "Auto"]

FAMILIES = ("diag_normal", "mixture", "flow")
_FAMILY_OPTIONS = {"diag_normal": (), "mixture": ("components",),
                   "flow": ("flow", "depth", "flow_hidden", "count_bins", "bound")}
_DEFAULTS = {"components": 5, "flow": "iaf", "depth": 4, "flow_hidden": None, "count_bins": 8, "bound": 3.0}


class Auto(Amortized):
    """Amortized guide for any Pyro model: trace, find latent sites, encode x -> q for each.

    Args:
        model: any Pyro model (a ``PyroModule`` or a function) with its
            per-datapoint latents inside ``pyro.plate(data_plate, B)``.
        family: ``"diag_normal"`` (default), ``"mixture"`` or ``"flow"``.
        example: example inputs to trace the model with: a tensor (the model's
            first argument, a batch ``(B, ...)``), a tuple of positional tensor
            arguments, or the JSON spec stored in a run's config. Not needed for
            pyrovi's models (they declare their latent sites).
        hidden: encoder hidden widths.
        activation: encoder activation.
        data_plate: name of the plate over datapoints.
        **options: the family's own options: ``components`` (``family="mixture"``, see
            :class:`~pyrovi.guides.Mixture`); ``flow``, ``depth``, ``flow_hidden``,
            ``count_bins``, ``bound`` (``family="flow"``, see :class:`~pyrovi.guides.Flow`).
        min_scale: lower bound on Gaussian scales.

    Example::

        def model(x):
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(0., 1.).expand([2]).to_event(1))
                s = pyro.sample("s", dist.LogNormal(0., 1.))
                pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), s[..., None]).to_event(1), obs=x)

        guide = pyrovi.guides.Auto(model, example=x[:2])
        run = pyrovi.fit(model, guide, x)
    """

    def __init__(self, model, *, family: str = "diag_normal", example=None, hidden=(256,),
                 activation: str = "relu", min_scale: float = 1e-4, data_plate: str = "data", **options):
        self.family = lookup({f: f for f in FAMILIES}, family, "family")
        allowed = _FAMILY_OPTIONS[self.family]
        wrong = sorted(k for k in options if k not in allowed)
        if wrong:
            raise ConfigError(f"Auto(family={self.family!r}) does not take {wrong}; its options are "
                              f"{list(allowed) or 'none'} (plus hidden, activation, min_scale, example, data_plate)")
        check_positive("min_scale", min_scale, allow_zero=True)
        self.min_scale = float(min_scale)
        self.options = {k: options.get(k, _DEFAULTS[k]) for k in allowed}
        if self.family == "mixture":
            check_positive("components", self.options["components"], integer=True)
        if self.family == "flow":
            lookup({f: f for f in FLOWS}, self.options["flow"], "flow")
            check_positive("depth", self.options["depth"], integer=True)
        super().__init__(model, self._head, hidden=hidden, activation=activation, example=example,
                         data_plate=data_plate)

    @property
    def strata(self) -> int:
        """Components per site for ``family="mixture"`` (stratified training draws), else 1."""
        return self.options["components"] if self.family == "mixture" else 1

    def _head(self, context_dim: int, dim: int):
        if self.family == "mixture":
            return MixtureHead(context_dim, dim, components=self.options["components"], min_scale=self.min_scale)
        if self.family == "flow":
            return FlowHead(context_dim, dim, min_scale=self.min_scale, **self.options)
        return NormalHead(context_dim, dim, min_scale=self.min_scale)

    def config(self) -> dict:
        """JSON-able options; with a traced model, the example inputs' shapes (not their values)."""
        opts = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.options.items()}
        return {"name": "auto", "family": self.family, "min_scale": self.min_scale, **opts, **self._base_config()}
