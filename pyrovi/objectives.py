"""Objectives by name: variational bounds and their gradient estimators.

An objective is called as ``objective(model, guide, *args, **kwargs)`` (or
``objective.loss(model, guide, args, kwargs, beta=...)``) and returns a
differentiable scalar **loss = -bound**, summed over the datapoints passed in
and averaged over particles, in nats (Pyro's convention for
``differentiable_loss``). ``pyrovi.fit`` divides by the batch size.

Per-datapoint bounds (``iwae``, ``renyi``, ``dreg``, and the stratified ELBO of
mixture guides) log-sum-exp over particles for each datapoint of the plate
named ``objective.data_plate`` ("data" unless ``fit(data_plate=...)`` says
otherwise); see :mod:`pyrovi.weights`. ``beta`` (KL warm-up, beta-VAE) weights
the latent sites' terms, :math:`\\log p(x|z) + \\beta(\\log p(z) - \\log q(z|x))`,
on the fast path and on Pyro's path alike.

========== ====================================================== ==================
name       bound                                                  implementation
========== ====================================================== ==================
elbo       E_q[log p(x,z) - log q(z|x)]                           Pyro ``Trace_ELBO``
meanfield  E_q[log p(x|z)] - KL(q || p), KL analytic where known  Pyro ``TraceMeanField_ELBO``
iwae       E[log 1/S sum_s w_s], w = p(x,z)/q(z|x)                pyrovi (per datapoint)
renyi      1/(1-a) E[log 1/S sum_s w_s^(1-a)]                     pyrovi (per datapoint)
stl        ELBO; gradient without the score term of log q         pyrovi (Roeder et al. 2017)
dreg       IWAE; doubly reparameterized encoder gradient          pyrovi (Tucker et al. 2018)
========== ====================================================== ==================

Discrete (non-reparameterized) guide sites: ``elbo`` uses Pyro's score-function estimator,
``iwae``/``renyi`` VIMCO (:mod:`pyrovi.vimco`); ``meanfield``, ``stl`` and ``dreg`` refuse them. Model sites
marked for enumeration are summed out (:mod:`pyrovi.enumeration`; ``elbo`` through Pyro's
``TraceEnum_ELBO``). Pyro's own ELBO objects are accepted too (:class:`PyroELBO`), and models that
cannot take a particle dim get their particles one at a time (``vectorize``, :mod:`pyrovi.particles`).

``stl`` and ``dreg`` are gradient estimators, not new bounds: each returns
the value of ``elbo``/``iwae`` for the same draws (to float rounding) and changes only
the gradient (stop-gradient surrogates, see :mod:`pyrovi.stop_gradient`).

All use ``particles`` vectorized draws. For a guide with mixture sites
(``guide.strata = C > 1``: :class:`~pyrovi.guides.Mixture`, ``Auto(family="mixture")``)
``elbo``, ``meanfield`` and ``stl`` estimate the ELBO as
:math:`\\sum_c \\pi_c \\mathbb E_{q_c}[\\log w]`: ``particles`` draws *per component*,
stratified, each weighted by :math:`\\rho = C \\pi_c(x)` (see :mod:`pyrovi.guides.mixture`).
Same expectation, and the mixture weights get an exact gradient instead of a
pathwise one that vanishes between separated modes. ``iwae``, ``renyi`` and
``dreg`` keep ``particles`` plain draws from the mixture (the bounds they name).
``iwae``/``renyi`` are pyrovi's own
because Pyro's ``RenyiELBO`` has no ``differentiable_loss``; their values
equal ``RenyiELBO.loss`` on models whose sites all lie in the data plate (tested).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import pyro.infer
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO

from . import enumeration, fastpath
from .errors import ConfigError, check_positive, lookup
from .stop_gradient import ScaleLatentGradients, StopGradientScorer, fast_stop_gradient_weights
from .stratify import strata
from .traces import guess_max_plate_nesting, scale_latents
from .vimco import check_particles, vimco_bound
from .weights import LogWeights, log_weights

__all__ = ["Objective", "ELBO", "MeanFieldELBO", "IWAE", "Renyi", "STL", "DReG", "PyroELBO", "get", "names",
           "OBJECTIVES", "PYRO_ELBOS", "iw_bound", "FLOW_WARM_START", "flow_warm_start"]


class Objective:
    """Base class: ``loss = objective(model, guide, *args, **kwargs)``; the bound is ``-loss``.

    :param int particles: number of vectorized particles S (>= 1).

    ``fast`` (default True) evaluates pyrovi's own model/guide pairs through
    :mod:`pyrovi.fastpath` (same draws, same values to float rounding, no Pyro
    tracing); other callables always go through Pyro. ``path_counts`` counts the
    calls that took each path. Subclasses implement one hook, :meth:`_bound`.
    """

    name = "objective"
    fast = True
    #: whether :meth:`_bound` has a fast-path branch (``stl``/``dreg`` score q through the traces)
    has_fast_path = True

    def __init__(self, particles: int = 1):
        check_positive("particles", particles, integer=True)
        self.particles = particles
        #: plate depth of the model; ``fit`` sets it once, else read from ``model.max_plate_nesting``
        self.max_plate_nesting: Optional[int] = None
        #: name of the model's plate over datapoints; ``fit`` sets it from ``fit(data_plate=...)``
        self.data_plate: str = "data"
        #: calls per path, ``{"fast": n, "traced": n}`` (:mod:`pyrovi.fastpath` or Pyro's traces)
        self.path_counts: dict = {"fast": 0, "traced": 0}
        #: draw the particles in one vectorized plate; ``fit`` turns it off for models that cannot take a leading
        #: particle dim (:mod:`pyrovi.particles`), and the particles are then drawn one at a time
        self.vectorize: bool = True

    def loss(self, model, guide, args: tuple = (), kwargs: Optional[dict] = None, *, beta: float = 1.0
             ) -> torch.Tensor:
        """Differentiable ``-bound`` of ``model``/``guide`` on ``args`` (nats, summed over datapoints).

        ``beta`` weights the latent sites' terms, :math:`\\log p(x|z) + \\beta(\\log p(z) - \\log q(z|x))`
        (KL warm-up, beta-VAE): passed to the fast path, or applied to Pyro's traces by
        :class:`~pyrovi.traces.ScaleLatents` around model and guide.
        """
        args, kwargs = tuple(args), dict(kwargs or {})
        if type(self).__call__ is not Objective.__call__:
            # a subclass written against the older API (it overrides __call__): its own estimate, traced
            self.path_counts["traced"] += 1
            if beta != 1.0:
                model, guide = scale_latents(beta, model, guide)
            return self(model, guide, *args, **kwargs)
        return self._loss(model, guide, args, kwargs, beta)

    def _loss(self, model, guide, args: tuple, kwargs: dict, beta: float) -> torch.Tensor:
        depth = self._plate_depth(model)  # read before wrapping: a wrapped model hides its attributes
        # every fast bound handles mixture guides itself (stratified ELBO draws, plain draws for IW bounds)
        fast = self.fast and self.has_fast_path and not kwargs and fastpath.supported(model, guide, stratify=True)
        self.path_counts["fast" if fast else "traced"] += 1
        if not fast and beta != 1.0:
            model, guide = scale_latents(beta, model, guide)
            beta = 1.0  # now in the traces' site scales
        return -self._bound(model, guide, args, kwargs, fast=fast, beta=beta, depth=depth)

    def __call__(self, model, guide, *args, **kwargs) -> torch.Tensor:
        return self._loss(model, guide, tuple(args), dict(kwargs), 1.0)

    def check_guide(self, guide) -> None:
        """Refuse, with a :class:`~pyrovi.errors.ConfigError` naming the pair, a guide this estimator is wrong for.

        ``fit`` asks before training. The base accepts every guide.
        """

    def at_step(self, step: int) -> None:
        """``fit``'s loop, before each gradient step: ``step`` steps were taken before it (those before a
        checkpoint included, when resumed). The base ignores it; ``stl``/``dreg`` count their warm start by it."""

    def _bound(self, model, guide, args: tuple, kwargs: dict, *, fast: bool, beta: float,
               depth: Optional[int]) -> torch.Tensor:  # pragma: no cover - abstract
        """The bound (summed over datapoints). ``fast``: evaluate through :mod:`pyrovi.fastpath`, weighting
        latent terms by ``beta``; otherwise through Pyro's traces (``beta`` is then 1: already applied).
        ``depth``: the model's plate depth, or None to find it."""
        raise NotImplementedError

    def _elbo_weights(self, model, guide, args, kwargs, depth, guide_log_prob=None) -> LogWeights:
        """Log weights for an ELBO estimate: ``particles`` plain draws, or per component, stratified, for a
        guide with mixture sites (see the module doc); :func:`iw_bound` with ``alpha=1`` turns them into the ELBO.
        """
        c = strata(guide)
        return log_weights(model, guide, *args, particles=self.particles * c, max_plate_nesting=depth,
                           data_plate=self.data_plate, guide_log_prob=guide_log_prob, stratify=c > 1,
                           vectorize=self.vectorize, **kwargs)

    def _plate_depth(self, model) -> Optional[int]:
        if self.max_plate_nesting is not None:
            return self.max_plate_nesting
        return getattr(model, "max_plate_nesting", None)

    def config(self) -> dict:
        """JSON-able description that :func:`get` turns back into this objective."""
        return {"name": self.name, "particles": self.particles}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({opts})"


class _PyroObjective(Objective):
    """An objective that is one of Pyro's ELBOs, used through ``differentiable_loss``."""

    pyro_class = Trace_ELBO

    def __init__(self, particles: int = 1):
        super().__init__(particles)
        self._elbo = None

    def pyro_elbo(self, max_plate_nesting: Optional[int] = None, enumerate: bool = False):
        """The underlying Pyro ELBO (vectorized particles unless ``vectorize`` is off); ``enumerate``: Pyro's
        ``TraceEnum_ELBO``, for models and guides with sites marked for enumeration (see :mod:`pyrovi.enumeration`).
        """
        kw = {} if max_plate_nesting is None else {"max_plate_nesting": max_plate_nesting}
        if enumerate:  # one particle needs no particle plate (a model indexing a global by an enumerated value
            # then keeps working, as under Pyro's own TraceEnum_ELBO(), whose default is not to vectorize)
            return TraceEnum_ELBO(num_particles=self.particles,
                                  vectorize_particles=self.vectorize and self.particles > 1, **kw)
        return self.pyro_class(num_particles=self.particles, vectorize_particles=self.vectorize, **kw)

    def _bound(self, model, guide, args, kwargs, *, fast, beta, depth):
        if fast:
            return self._fast_bound(model, guide, args, beta)
        if strata(guide) > 1:  # a mixture guide: the ELBO, stratified (its KL has no closed form anyway)
            return iw_bound(self._elbo_weights(model, guide, args, kwargs, depth), alpha=1.0)
        if self._elbo is None:
            marked = enumeration.has_enumeration(model, guide, args, kwargs)
            enum = bool(marked["model"] or marked["guide"])
            if enum and self.pyro_class is not Trace_ELBO:
                raise ConfigError(f"objective {self.name!r} samples the site(s) {marked['model'] + marked['guide']} "
                                  "marked for enumeration instead of summing them out; use objective='elbo' (Pyro's "
                                  "TraceEnum_ELBO), 'iwae' or 'renyi'")
            if marked["score"] and self.pyro_class is TraceMeanField_ELBO:
                raise ConfigError(f"objective 'meanfield' needs a reparameterized guide, but the guide draws the "
                                  f"site(s) {marked['score']} without rsample (discrete); use 'elbo' (score "
                                  "function), 'iwae' or 'renyi' (VIMCO)")
            self._elbo = self.pyro_elbo(depth, enumerate=enum)
        return -self._elbo.differentiable_loss(model, guide, *args, **kwargs)

    def _fast_bound(self, model, guide, args, beta):  # pragma: no cover - abstract
        raise NotImplementedError


class ELBO(_PyroObjective):
    """Evidence lower bound, estimated with ``S`` reparameterized particles (Pyro's ``Trace_ELBO``).

    .. math:: \\mathcal L = \\mathbb E_{q(z|x)}[\\log p(x, z) - \\log q(z \\mid x)] \\le \\log p(x)

    Kingma & Welling (2014), Auto-Encoding Variational Bayes.
    """

    name = "elbo"
    pyro_class = Trace_ELBO

    def _fast_bound(self, model, guide, args, beta):
        if strata(guide) > 1:  # stratified over mixture components, as on the traced path
            return iw_bound(fastpath.fast_elbo_weights(model, guide, *args, particles=self.particles, beta=beta), 1.0)
        return fastpath.fast_log_weights(model, guide, *args, particles=self.particles, beta=beta).log_w.mean(0).sum()


class MeanFieldELBO(_PyroObjective):
    """ELBO with analytic KL(q || p) per site where Pyro knows it (``TraceMeanField_ELBO``).

    .. math:: \\mathcal L = \\mathbb E_{q}[\\log p(x \\mid z)] - \\mathrm{KL}(q(z|x) \\,\\|\\, p(z))

    Same expectation as :class:`ELBO`, lower variance. Requires the guide's
    latents to be conditionally independent given x (mean field), as in
    pyrovi's DiagNormal guide; falls back to Monte Carlo for pairs without a
    closed-form KL.
    """

    name = "meanfield"
    pyro_class = TraceMeanField_ELBO

    def _fast_bound(self, model, guide, args, beta):
        if strata(guide) > 1:  # a mixture's KL has no closed form: the stratified ELBO, as on the traced path
            return iw_bound(fastpath.fast_elbo_weights(model, guide, *args, particles=self.particles, beta=beta), 1.0)
        return fastpath.fast_meanfield_bound(model, guide, *args, particles=self.particles, beta=beta)


def iw_bound(lw: LogWeights, alpha: float = 0.0) -> torch.Tensor:
    """Rényi/importance-weighted bound summed over datapoints, from :class:`LogWeights`.

    .. math::

        \\mathcal L_\\alpha = \\frac{1}{1-\\alpha} \\log \\frac1S \\sum_{s=1}^S w_s^{1-\\alpha},
        \\qquad \\alpha = 0: \\mathcal L_{\\mathrm{IWAE}} = \\log \\frac1S \\sum_s w_s,
        \\qquad \\alpha \\to 1: \\frac1S\\sum_s \\log w_s.

    The log-sum-exp runs over particles (dim 0) for each datapoint.
    With stratified mixture draws (``lw.log_rho``) each weight is multiplied by
    its :math:`\\rho_s`: :math:`\\frac1S\\sum_s \\rho_s \\log w_s` for
    :math:`\\alpha = 1`, :math:`\\log \\frac1S \\sum_s \\rho_s w_s^{1-\\alpha}` inside otherwise.
    """
    log_w = lw.log_w  # (S, B) or (S, 1)
    S = log_w.shape[0]
    log_rho = lw.log_rho  # (S, B|1) or None
    if alpha == 1.0:
        per = log_w.mean(0) if log_rho is None else (log_rho.exp() * log_w).mean(0)
    else:
        a = (1.0 - alpha) * log_w if log_rho is None else (1.0 - alpha) * log_w + log_rho
        per = (torch.logsumexp(a, dim=0) - math.log(S)) / (1.0 - alpha)  # (B,)
    return lw.scale * per.sum()


class Renyi(Objective):
    """Rényi variational bound (Li & Turner, 2016), importance-weighted per datapoint.

    For :math:`0 \\le \\alpha < 1` it lower-bounds :math:`\\log p(x)`, tighter as
    :math:`\\alpha \\to 0` (IWAE) and as S grows; :math:`\\alpha = 1` is the ELBO.
    See :func:`iw_bound`. The gradient is the plain reparameterized gradient of
    the bound.

    :param float alpha: Rényi order, default 0 (IWAE); must not be negative.
    :param int particles: S, drawn vectorized.
    """

    name = "renyi"

    def __init__(self, alpha: float = 0.0, particles: int = 2):
        super().__init__(particles)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
            raise ConfigError(f"alpha must be a finite number >= 0, got {alpha!r}")
        self.alpha = float(alpha)

    def config(self) -> dict:
        """JSON-able description (name, particles, alpha) that :func:`get` turns back into this objective."""
        return {"name": self.name, "particles": self.particles, "alpha": self.alpha}

    def _bound(self, model, guide, args, kwargs, *, fast, beta, depth):
        if fast:
            lw = fastpath.fast_log_weights(model, guide, *args, particles=self.particles, beta=beta)
        else:
            lw = log_weights(model, guide, *args, particles=self.particles, max_plate_nesting=depth,
                             data_plate=self.data_plate, vectorize=self.vectorize, **kwargs)
            if lw.score_sites:  # discrete guide draws: VIMCO's score term (Mnih & Rezende 2016)
                check_particles(self.particles, self.name, lw.score_sites)
                return vimco_bound(lw, self.alpha)
        return iw_bound(lw, self.alpha)


class IWAE(Renyi):
    """Importance-weighted bound (Burda, Grosse & Salakhutdinov, 2016).

    .. math:: \\mathcal L_S = \\mathbb E\\Big[\\log \\frac1S \\sum_{s=1}^S
              \\frac{p(x, z_s)}{q(z_s \\mid x)}\\Big],\\quad z_s \\sim q(z|x)

    :math:`\\mathcal L_1 = \\mathrm{ELBO} \\le \\mathcal L_S \\le \\mathcal L_{S+1} \\le \\log p(x)`,
    and :math:`\\mathcal L_S \\to \\log p(x)` as S grows.
    """

    name = "iwae"

    def __init__(self, particles: int = 8):
        super().__init__(alpha=0.0, particles=particles)

    def config(self) -> dict:
        """JSON-able description (name, particles) that :func:`get` turns back into this objective."""
        return {"name": self.name, "particles": self.particles}


class _StopGradient(Objective):
    """What ``stl`` and ``dreg`` share: a warm start of plain-gradient steps (:func:`flow_warm_start`)."""

    def __init__(self, particles: int, warm_start: Optional[int] = None):
        super().__init__(particles)
        if warm_start is not None:
            check_positive("warm_start", warm_start, integer=True, allow_zero=True)
        self.warm_start = warm_start  # None: automatic, resolved by check_guide (fit asks it before training)
        self._warm_steps = 0 if warm_start is None else int(warm_start)
        self._steps = 0  # gradient steps seen (calls with gradients enabled), when no loop says (at_step)
        self._told = None  # steps taken before the current one, as fit's loop last said (at_step)

    def check_guide(self, guide) -> None:
        """Resolves the automatic warm start (``warm_start=None``) for ``guide``; see :func:`flow_warm_start`."""
        self._warm_steps = flow_warm_start(guide) if self.warm_start is None else int(self.warm_start)

    def config(self) -> dict:
        """JSON-able description (name, particles and, when set, warm_start)."""
        d = super().config()
        if self.warm_start is not None:
            d["warm_start"] = self.warm_start
        return d

    def at_step(self, step: int) -> None:
        """Set the count of gradient steps taken before the next one (the warm start reads it)."""
        self._told = int(step)

    def _warming(self) -> bool:
        """True while this call (with gradients) belongs to one of the first ``_warm_steps`` gradient steps.

        Under ``fit`` the loop says how many steps were taken (:meth:`at_step`), so every call of a
        step agrees (a semi-supervised step calls the objective twice) and a resumed fit goes on counting;
        called on its own, each call with gradients counts as a step.
        """
        if not torch.is_grad_enabled():
            return False
        if self._told is not None:
            return self._told < self._warm_steps
        self._steps += 1
        return self._steps <= self._warm_steps


class STL(_StopGradient):
    """ELBO with the *sticking-the-landing* gradient (Roeder, Wu & Duvenaud, 2017).

    The reparameterized ELBO gradient of one draw :math:`z = g_\\phi(\\varepsilon)` is

    .. math::

        \\nabla_\\phi \\big[\\log p(x, z) - \\log q_\\phi(z)\\big]
        = \\underbrace{\\big(\\nabla_z \\log p(x, z) - \\nabla_z \\log q_\\phi(z)\\big)
          \\tfrac{\\partial z}{\\partial \\phi}}_{\\text{path}}
        \\; - \\; \\underbrace{\\nabla_\\phi \\log q_\\phi(z)\\big|_{z}}_{\\text{score}} .

    The score term has expectation zero but not variance zero, even when q is
    the exact posterior (then the path term vanishes and only noise is left).
    STL drops it by scoring ``log q`` with detached variational parameters:
    the estimator stays unbiased, and its variance goes to zero as q
    approaches the posterior. The value is the ELBO's for the same draws, to float rounding.

    loss = -ELBO, summed over datapoints, averaged over ``particles``.

    :param int particles: S, drawn vectorized.
    :param warm_start: gradient steps that take the plain ELBO gradient first (same value); None
        (default): :func:`flow_warm_start` of the guide ``fit`` trains (200 for flow guides, else 0).
    """

    name = "stl"

    def __init__(self, particles: int = 1, warm_start: Optional[int] = None):
        super().__init__(particles, warm_start)

    def _bound(self, model, guide, args, kwargs, *, fast, beta, depth):
        if self._warming():  # the plain ELBO gradient (same value)
            if fast:
                return iw_bound(fastpath.fast_elbo_weights(model, guide, *args, particles=self.particles, beta=beta),
                                alpha=1.0)
            return iw_bound(self._elbo_weights(model, guide, args, kwargs, depth), alpha=1.0)
        if fast:  # a mixture guide's draws stratified over its components, as on the traced path
            c = strata(guide)
            lw = fast_stop_gradient_weights(model, guide, args, self.particles * c, beta, stratify=c > 1)
        else:
            lw = self._elbo_weights(model, guide, args, kwargs, depth, guide_log_prob=StopGradientScorer())
        log_w = lw.log_w  # (S, B) or (S, 1)
        assert log_w.dim() == 2 and log_w.shape[0] == self.particles * strata(guide)
        return iw_bound(lw, alpha=1.0)  # = scale * sum_b mean_s log w_{s,b}


#: steps of plain ELBO/IWAE gradient before ``stl``/``dreg`` on a flow guide, when ``warm_start`` is None
FLOW_WARM_START = 200


def flow_warm_start(guide) -> int:
    """The automatic warm start of ``stl``/``dreg`` for ``guide``: :data:`FLOW_WARM_START` steps for a guide
    with a normalizing-flow site (``Flow``, ``Auto(family="flow")``: a head that declares
    ``stop_gradient_warm_start``), else 0 (see docs/objectives.md)."""
    heads = getattr(guide, "heads", None)
    flows = heads is not None and any(getattr(getattr(h, "linear", h), "stop_gradient_warm_start", False)
                                      for h in heads.values())
    return FLOW_WARM_START if flows else 0


class DReG(_StopGradient):
    """IWAE bound with the *doubly reparameterized* encoder gradient (Tucker, Lawson, Gu & Maddison, 2018).

    With normalized weights :math:`\\tilde w_s = w_s / \\sum_t w_t`, the IWAE
    gradient for the encoder is :math:`\\sum_s \\tilde w_s \\nabla_\\phi \\log w_s`,
    whose signal-to-noise ratio *falls* as S grows (Rainforth et al. 2018).
    Rewriting its score part by a second reparameterization gives

    .. math::

        \\nabla_\\phi \\mathcal L_S = \\mathbb E\\Big[\\sum_{s=1}^S \\tilde w_s^{\\,2}\\,
            \\frac{\\partial \\log w_s}{\\partial z_s}\\frac{\\partial z_s}{\\partial \\phi}\\Big],

    with :math:`\\log w_s` scored under detached variational parameters; the
    model's parameters keep the IWAE gradient :math:`\\sum_s \\tilde w_s \\nabla_\\theta \\log w_s`.
    Surrogate: the IWAE log-sum-exp of the stop-gradient log weights (its
    gradient is already :math:`\\sum_s \\tilde w_s \\nabla \\log w_s`), with
    the gradient reaching each latent draw multiplied once more by
    :math:`\\tilde w_s` (see :class:`pyrovi.stop_gradient.ScaleLatentGradients`).
    The value is the IWAE bound's for the same draws, to float rounding. With S = 1 it is :class:`STL`.

    loss = -IWAE bound, summed over datapoints (log-sum-exp per datapoint).

    :param int particles: S, drawn vectorized (default 8).
    :param warm_start: gradient steps that take the plain IWAE gradient first (same value); None
        (default): :func:`flow_warm_start` of the guide ``fit`` trains (200 for flow guides, else 0).
    """

    name = "dreg"

    def __init__(self, particles: int = 8, warm_start: Optional[int] = None):
        super().__init__(particles, warm_start)

    def check_guide(self, guide) -> None:
        """A point-mass guide (``guide.point_mass``: Delta, Codebook) has no density to reparameterize twice:
        its S draws are equal, and the estimator would scale the encoder's gradient by 1/S. Also resolves
        the automatic warm start (see :func:`flow_warm_start`)."""
        if getattr(guide, "point_mass", False):
            raise ConfigError(f"objective 'dreg' does not support the guide {type(guide).__name__}: q is a point mass, "
                              "so the doubly reparameterized gradient does not apply; use 'elbo' (or 'iwae', which "
                              "equals it for a point mass)")
        super().check_guide(guide)

    def _bound(self, model, guide, args, kwargs, *, fast, beta, depth):
        if not self.vectorize:
            raise ConfigError("objective 'dreg' reweights the gradient of each latent draw by the particles' "
                              "normalized weights, which needs vectorized particles; this model runs them one at a "
                              "time: use 'iwae' (same bound) or 'stl'")
        if self._warming():  # the plain IWAE gradient (same value)
            if fast:
                lw = fastpath.fast_log_weights(model, guide, *args, particles=self.particles, beta=beta)
            else:
                lw = log_weights(model, guide, *args, particles=self.particles, max_plate_nesting=depth,
                                 data_plate=self.data_plate, **kwargs)
            return iw_bound(lw, alpha=0.0)
        if fast:  # a mixture guide's draws plain (the IWAE bound), as on the traced path
            scale = ScaleLatentGradients(rank=2, data_plate=self.data_plate)
            lw = fast_stop_gradient_weights(model, guide, args, self.particles, beta, scale)
        else:
            if depth is None:
                depth = guess_max_plate_nesting(model, guide, args, kwargs)
            scale = ScaleLatentGradients(rank=depth + 1, data_plate=self.data_plate)
            with scale:  # outermost handler: wraps the latents where the model reads them
                lw = log_weights(model, guide, *args, particles=self.particles, max_plate_nesting=depth,
                                 data_plate=self.data_plate, guide_log_prob=StopGradientScorer(scale), **kwargs)
        log_w = lw.log_w  # (S, B) or (S, 1)
        assert log_w.dim() == 2 and log_w.shape[0] == self.particles
        scale.set_weights(torch.softmax(log_w.detach(), dim=0))  # normalized weights per datapoint, (S, B)
        return iw_bound(lw, alpha=0.0)


class PyroELBO(Objective):
    """One of Pyro's ELBO objects (``Trace_ELBO()``, ``TraceEnum_ELBO()``, ``TraceMeanField_ELBO()``, ...) as an
    objective: ``fit(objective=TraceEnum_ELBO(max_plate_nesting=1))`` trains what ``SVI`` would train.

    The loss is the object's ``differentiable_loss``. Its options (``num_particles``, ``vectorize_particles``,
    ``max_plate_nesting``, ...) are kept as given; an unset ``max_plate_nesting`` is filled in with the depth
    ``fit`` finds. Pyro's ``RenyiELBO`` has no ``differentiable_loss``: :func:`get` turns it into
    :class:`Renyi` with its ``alpha`` and ``num_particles`` (per-datapoint log-sum-exp, see
    :mod:`pyrovi.weights`). ELBOs without a ``differentiable_loss`` (``TraceGraph_ELBO``) are refused.

    :param elbo: an instance of a class in :data:`PYRO_ELBOS`.
    """

    name = "pyro"
    has_fast_path = False

    def __init__(self, elbo):
        cls = type(elbo).__name__
        if PYRO_ELBOS.get(cls) is not type(elbo):
            raise ConfigError(f"objective {cls} (a Pyro ELBO) has no differentiable_loss that fit can minimize with "
                              f"torch.optim; pass one of {sorted(PYRO_ELBOS)} or RenyiELBO, or an objective name "
                              f"({', '.join(names())})")
        super().__init__(int(elbo.num_particles))
        self.elbo_class = cls
        #: the JSON-able options the object was built with (what :meth:`config` records)
        self.options = {k: v for k, v in vars(elbo).items() if k in _PYRO_OPTIONS
                        and isinstance(v, (bool, int, float)) and math.isfinite(v)}
        if "max_plate_nesting" in self.options and elbo.vectorize_particles and elbo.num_particles > 1:
            self.options["max_plate_nesting"] -= 1  # Pyro added its particle plate: record the depth as given
        self.vectorize = bool(elbo.vectorize_particles) or self.particles == 1
        self._given = elbo
        self._elbo = None

    def _bound(self, model, guide, args, kwargs, *, fast, beta, depth):
        if self._elbo is None:
            if math.isfinite(self._given.max_plate_nesting) or depth is None:
                self._elbo = self._given
            else:  # fill in the depth fit found, leaving the user's object as it was
                self._elbo = PYRO_ELBOS[self.elbo_class](**{**self.options, "max_plate_nesting": depth})
        return -self._elbo.differentiable_loss(model, guide, *args, **kwargs)

    def config(self) -> dict:
        """``{"name": "pyro", "class": ..., "options": {...}}``: :func:`get` rebuilds the same Pyro ELBO."""
        return {"name": self.name, "class": self.elbo_class, "options": dict(self.options)}

    @classmethod
    def from_config(cls, config: dict) -> "PyroELBO":
        """Rebuild from :meth:`config` (a run's ``config.json``): only the classes in :data:`PYRO_ELBOS`."""
        name, options = config.get("class"), config.get("options") or {}
        if name not in PYRO_ELBOS or not isinstance(options, dict) or set(options) - set(_PYRO_OPTIONS):
            raise ConfigError(f"objective config {config!r} names no known Pyro ELBO; valid classes: "
                              f"{sorted(PYRO_ELBOS)}, options: {list(_PYRO_OPTIONS)}")
        try:
            return cls(PYRO_ELBOS[name](**options))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"objective config {config!r}: {e}") from None

    def __repr__(self) -> str:
        return f"PyroELBO({self.elbo_class}({', '.join(f'{k}={v!r}' for k, v in self.options.items())}))"


#: Pyro's ELBO classes with a ``differentiable_loss``, by name (what :class:`PyroELBO` takes and a config rebuilds)
PYRO_ELBOS: dict = {c.__name__: c for c in (Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO,
                                            pyro.infer.TraceTailAdaptive_ELBO)}
#: the options of those classes that a run's config records
_PYRO_OPTIONS = ("num_particles", "max_plate_nesting", "vectorize_particles", "strict_enumeration_warning",
                 "tail_adaptive_beta")


def _from_pyro(elbo) -> Objective:
    """A Pyro ELBO object as an :class:`Objective` (``RenyiELBO`` -> :class:`Renyi`)."""
    if isinstance(elbo, pyro.infer.RenyiELBO):
        obj = Renyi(alpha=float(elbo.alpha), particles=int(elbo.num_particles))
        obj.vectorize = bool(elbo.vectorize_particles) or obj.particles == 1
        return obj
    return PyroELBO(elbo)


#: name -> objective class
OBJECTIVES: dict = {"elbo": ELBO, "meanfield": MeanFieldELBO, "iwae": IWAE, "renyi": Renyi, "stl": STL,
                    "dreg": DReG}


def names() -> list:
    """Objective names accepted by :func:`get`, ``fit`` and the CLI."""
    return sorted(OBJECTIVES)


def get(objective="elbo", **options) -> Objective:
    """An :class:`Objective` from a name, a config dict, or an instance (returned as is).

    ``get("iwae", particles=8)``, ``get({"name": "renyi", "alpha": 0.5, "particles": 4})``,
    ``get(TraceEnum_ELBO(max_plate_nesting=1))`` (a Pyro ELBO object, see :class:`PyroELBO`).
    Options that are None are dropped (so defaults apply).
    """
    if isinstance(objective, Objective):
        return objective
    if isinstance(objective, pyro.infer.ELBO):  # anything SVI takes as its loss
        given = sorted(k for k, v in options.items() if v is not None)
        if given:
            raise ConfigError(f"objective {type(objective).__name__}(...) is a Pyro ELBO object: set its own options "
                              f"(num_particles=, alpha=, ...) instead of {given}")
        return _from_pyro(objective)
    if isinstance(objective, dict) and objective.get("name") == PyroELBO.name:
        return PyroELBO.from_config(objective)
    if isinstance(objective, dict):
        options = {**{k: v for k, v in objective.items() if k != "name"}, **options}
        objective = objective.get("name")
    if not isinstance(objective, str):
        raise ConfigError(f"objective must be a name ({', '.join(names())}), a pyrovi Objective or a Pyro ELBO "
                          f"object (Trace_ELBO(), TraceEnum_ELBO(), ...), got {type(objective).__name__} "
                          f"{objective!r:.60}")
    cls = lookup(OBJECTIVES, objective, "objective")
    options = {k: v for k, v in options.items() if v is not None}
    vectorize = options.pop("vectorize", True)  # False: a run whose model needed its particles looped
    if not isinstance(vectorize, bool):
        raise ConfigError(f"objective option vectorize must be True or False, got {vectorize!r}")
    try:
        obj = cls(**options)
    except TypeError as e:
        raise ConfigError(f"objective {objective!r} does not take options {sorted(options)}: {e}") from None
    obj.vectorize = vectorize
    return obj
