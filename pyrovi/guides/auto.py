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
``delta``        a point mass (:class:`~pyrovi.guides.Delta`: amortized MAP, no density)
================ ========================================================

Each family is the same head the named guide class uses, so ``Auto(model,
family="flow", ...)`` and ``Flow(model, ..., example=...)`` build the same q;
``Auto`` differs only in its config (``{"name": "auto", "family": ...}``).

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
import math

from .amortized import Amortized, DeltaHead, NormalHead, WrappedHead
from .flow import FlowHead, flow_options
from .mixture import MixtureHead

__all__ = ["FAMILIES", "Auto"]

FAMILIES = ("diag_normal", "mixture", "flow", "delta")
_FAMILY_OPTIONS = {"diag_normal": (), "mixture": ("components", "learn_weights"),
                   "flow": ("flow", "depth", "flow_hidden", "count_bins", "bound"), "delta": ()}
_DEFAULTS = {"components": 5, "learn_weights": True, "flow": "iaf", "depth": 4, "flow_hidden": None,
             "count_bins": 8, "bound": 3.0}


class Auto(Amortized):
    """Amortized guide for any Pyro model: trace, find latent sites, encode x -> q for each.

    Args:
        model: any Pyro model (a ``PyroModule`` or a function) with its
            per-datapoint latents inside ``pyro.plate(data_plate, B)``.
        family: ``"diag_normal"`` (default), ``"mixture"``, ``"flow"`` or ``"delta"``.
        example: example inputs to trace the model with: a tensor (the model's
            first argument, a batch ``(B, ...)``), a tuple of positional tensor
            arguments, or the JSON spec stored in a run's config. Not needed for
            pyrovi's models (they declare their latent sites); without it a Pyro model
            is traced on the first call or by :meth:`~pyrovi.guides.amortized.Amortized.setup`.
        hidden: encoder hidden widths, an int or a sequence.
        activation: encoder activation.
        data_plate: name of the plate over datapoints.
        **options: the family's own options: ``components``, ``learn_weights`` (``family="mixture"``, see
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
        self.options = {k: options.get(k, _DEFAULTS[k]) for k in allowed}
        if self.family == "mixture":
            check_positive("components", self.options["components"], integer=True)
            if not isinstance(self.options["learn_weights"], bool):
                raise ConfigError(f"learn_weights must be True or False, got {self.options['learn_weights']!r}")
        if self.family == "flow":
            self.options = flow_options(**self.options)
        super().__init__(model, hidden=hidden, activation=activation, min_scale=min_scale, example=example,
                         data_plate=data_plate)

    @property
    def strata(self) -> int:
        """Components per site for ``family="mixture"`` (stratified training draws), else 1."""
        return self.options["components"] if self.family == "mixture" else 1

    def _head(self, context_dim: int, shape: tuple):
        if self.family == "mixture":
            return MixtureHead(context_dim, math.prod(shape), min_scale=self.min_scale, **self.options)
        if self.family == "flow":
            return FlowHead(context_dim, math.prod(shape), min_scale=self.min_scale, **self.options)
        if self.family == "delta":
            return DeltaHead(context_dim, shape)
        # the same head as DiagNormal's, held as ``linear``: the parameter names Auto's run directories have
        return WrappedHead(NormalHead(context_dim, shape, min_scale=self.min_scale))

    def config(self) -> dict:
        """JSON-able options; with a traced model, the example inputs' shapes (not their values)."""
        opts = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.options.items()}
        return {"name": "auto", "family": self.family, "min_scale": self.min_scale, **opts, **self._base_config()}
