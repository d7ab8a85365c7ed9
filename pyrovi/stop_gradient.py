"""Stop-gradient pieces of the STL and DReG gradient estimators.

Both estimators score the guide's own draws ``z`` under ``q`` whose variational
parameters are *detached*: the value of :math:`\\log q_{\\bar\\phi}(z)` is
unchanged, but its gradient reaches the parameters only through the path
:math:`z = g_\\phi(\\varepsilon)`, never through the score
:math:`\\partial_\\phi \\log q_\\phi(z)|_z` (whose expectation is zero and whose
variance does not vanish as q approaches the posterior).

How the detached q is obtained, per guide site:

1. pyrovi's guides (DiagNormal, Mixture, Flow, Auto) put a *stop-gradient twin*
   of each site's distribution into the site's ``infer`` dict under
   :data:`STOP_GRADIENT_FN`. For a Gaussian or mixture this is the same
   distribution built from detached parameter tensors (a closed form). For a
   flow it is :class:`~pyrovi.guides.flow.DetachedFlowScore`, which reads what
   the flow's sampler recorded for its draw (the base draw, every layer's
   value and, for autoregressive layers, the MADE's first-layer output and the
   iaf's log-scale): its value is the sampler's own ``log q`` (bit for bit) and
   its gradient to ``z`` is :math:`\partial \log q / \partial z` at fixed
   parameters, propagated through the layers' Jacobians, so nothing is inverted.
   Planar and radial layers take closed forms; an autoregressive layer's
   triangular Jacobian is formed in closed form from the MADE's masked weights
   (``d theta / dx = W_out diag(f'(a)) W_1x``) and solved. Its cost, per guide,
   is in ``benchmarks/RESULTS.md`` (*Cost of stl and dreg per guide*).
2. Any other guide (Pyro autoguides, a user's guide): the site's distribution
   is rebuilt from detached copies of its parameter tensors
   (:func:`detach_distribution`), which covers the usual reparameterized
   families (Normal, LogNormal, MultivariateNormal, mixtures of diagonal Normals,
   ``to_event``/expanded/masked wrappers, parameter-free transforms) and raises a
   :class:`~pyrovi.errors.ConfigError` for anything else.

Either way the twin computes the same ``log q`` value as the site's own
distribution for the same draw (the same operations on the same numbers), so
the surrogate is the twin's ``log_prob`` alone: no second evaluation of log q.

DReG additionally weights the pathwise gradient of particle ``s`` by its
normalized importance weight. The weights are only known after the model has
been scored, so :class:`ScaleLatentGradients` inserts an identity op on every
latent value *where the model and the stop-gradient q read it* whose backward
multiplies the incoming gradient by the weight (filled in later). Inserting it
at the consumers, not on the guide's own sample, means a guide whose later
sites depend on earlier ones is still scaled exactly once per path.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import transforms as T

from .errors import ConfigError
from .distributions import DiagonalNormal
from .traces import data_dim

__all__ = ["STOP_GRADIENT_FN", "ScaleLatentGradients", "StopGradientScorer", "detach_distribution", "detached"]

#: ``infer`` key under which pyrovi's guides store the stop-gradient twin of a site's distribution.
STOP_GRADIENT_FN = "pyrovi_stop_gradient_fn"

# Transforms with no learnable state: safe to reuse as they are in a detached distribution.
_PARAMETER_FREE = (
    T.ExpTransform, T.SigmoidTransform, T.TanhTransform, T.SoftmaxTransform, T.StickBreakingTransform,
    T.ReshapeTransform, T.LowerCholeskyTransform, T.AbsTransform, T.CorrCholeskyTransform, T.SoftplusTransform,
)


def _d(t):
    return t.detach() if torch.is_tensor(t) else t


def _detach_transform(t):
    if isinstance(t, T.ComposeTransform):
        return T.ComposeTransform([_detach_transform(p) for p in t.parts])
    if isinstance(t, T.IndependentTransform):
        return T.IndependentTransform(_detach_transform(t.base_transform), t.reinterpreted_batch_ndims)
    if isinstance(t, T.AffineTransform):
        return T.AffineTransform(_d(t.loc), _d(t.scale), event_dim=t.event_dim)
    if isinstance(t, T._InverseTransform):
        return _detach_transform(t.inv).inv
    if isinstance(t, _PARAMETER_FREE):
        return t
    raise ConfigError(
        f"stl/dreg need log q with detached parameters, but the guide uses transform {type(t).__name__}, "
        "which pyrovi cannot detach; use a pyrovi guide (Flow, Mixture, Auto, DiagNormal) or objective='elbo'/'iwae'"
    )


def detach_distribution(fn):
    """``fn`` rebuilt from detached parameter tensors (same batch/event shape); see the module doc."""
    if isinstance(fn, dist.Independent):
        return dist.Independent(detach_distribution(fn.base_dist), fn.reinterpreted_batch_ndims)
    if isinstance(fn, dist.ExpandedDistribution):
        return detach_distribution(fn.base_dist).expand(fn.batch_shape)
    if isinstance(fn, dist.MaskedDistribution):
        return dist.MaskedDistribution(detach_distribution(fn.base_dist), fn._mask)
    if isinstance(fn, dist.Delta):
        return dist.Delta(fn.v.detach(), fn.log_density.detach(), event_dim=fn.event_dim)
    if isinstance(fn, dist.MultivariateNormal):
        return dist.MultivariateNormal(fn.loc.detach(), scale_tril=fn.scale_tril.detach())
    if isinstance(fn, dist.LowRankMultivariateNormal):
        return dist.LowRankMultivariateNormal(fn.loc.detach(), fn.cov_factor.detach(), fn.cov_diag.detach())
    if isinstance(fn, dist.TransformedDistribution) and not isinstance(fn, dist.LogNormal):
        return dist.TransformedDistribution(detach_distribution(fn.base_dist),
                                            [_detach_transform(t) for t in fn.transforms])
    simple = (dist.Normal, dist.LogNormal, dist.Laplace, dist.Cauchy, dist.StudentT, dist.Gamma, dist.Beta,
              dist.Uniform, dist.HalfNormal, dist.HalfCauchy, dist.Exponential, dist.MixtureOfDiagNormals)
    if isinstance(fn, simple):
        # Their constructors take exactly the tensors named in arg_constraints.
        return type(fn)(**{k: getattr(fn, k).detach() for k in fn.arg_constraints})
    raise ConfigError(
        f"stl/dreg need log q with detached parameters, but a guide site uses {type(fn).__name__}, "
        "which pyrovi cannot rebuild; use a pyrovi guide (Flow, Mixture, Auto, DiagNormal) or objective='elbo'/'iwae'"
    )


def detached(q):
    """The stop-gradient twin of ``q`` itself: its own (a flow's recorded-draw score) or :func:`detach_distribution`."""
    own = getattr(q, "stop_gradient", None)
    if callable(own):
        return own()
    if isinstance(q, DiagonalNormal):  # the same lean formulas as q's own log_prob
        return DiagonalNormal(q._loc_arg.detach(), q._scale_arg.detach(), q.reinterpreted_batch_ndims,
                              validate_args=False)
    return detach_distribution(q)


def fast_stop_gradient_weights(model, guide, args: tuple, particles: int, beta: float = 1.0,
                               scale: "ScaleLatentGradients | None" = None, stratify: bool = False):
    """:func:`pyrovi.fastpath.fast_log_weights` with ``log q`` scored by each q's stop-gradient twin.

    For pyrovi's model/guide pairs: ``particles`` draws ``z ~ q`` per site, drawn as the fast
    path draws them (:func:`pyrovi.fastpath._draw`: a mixture site expanded to ``(S, B)``; with
    ``stratify``, stratified over its components, ``particles`` being per component times
    ``guide.strata``, with ``log_rho``); with ``scale`` (DReG) the model and the twin read ``z``
    through :class:`ScaleLatentGradients` (``rank`` 2: particles, datapoints).
    Returns :class:`~pyrovi.weights.LogWeights` with shapes ``(S, B)``.
    """
    from .fastpath import _draw, _weights

    x, y = args[0], (args[1] if len(args) > 1 else None)
    qs, z, _, log_rho = _draw(guide, x, y, particles, score=False, stratify=stratify)  # z (S, B, *event)
    log_q = None
    for s, q in qs.items():
        v = z[s]
        if scale is not None:
            v = z[s] = scale.wrap(v, len(q.event_shape), None)
        lq = detached(q).log_prob(v)  # (S, B)
        log_q = lq if log_q is None else log_q + lq
    return _weights(model, x, y, qs, z, log_q, log_rho, beta)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scaler.factor(layout)``."""

    @staticmethod
    def forward(ctx, x, scaler, layout):
        ctx.scaler, ctx.layout = scaler, layout
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scaler.factor(ctx.layout, grad), None, None


class ScaleLatentGradients(Messenger):
    """Scale the gradient reaching each replayed latent value by its particle's normalized weight (DReG).

    Used as a context around :func:`pyrovi.weights.log_weights`: it sits outside
    the trace, so the model (replayed on the guide's draws) and the trace
    record the wrapped value. Call :meth:`set_weights` with the detached
    normalized weights ``(S, B)`` (or ``(S, 1)``) before ``backward``.
    """

    def __init__(self, rank: int, data_plate: str = "data"):
        super().__init__()
        self.rank = rank
        self.data_plate = data_plate
        self.weights: torch.Tensor | None = None

    def set_weights(self, w: torch.Tensor) -> None:
        self.weights = w.detach()

    def layout(self, value: torch.Tensor, event_dim: int, site) -> tuple:
        """``(batch dims, event dims, data dim or None)`` of ``value`` at ``site`` (a trace node or message).

        ``site`` None: the fast path's ``(S, B, *event)`` value, data at batch dim -1.
        """
        return value.dim() - event_dim, event_dim, -1 if site is None else data_dim(site, self.data_plate)

    def factor(self, layout: tuple, grad: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            raise RuntimeError("ScaleLatentGradients.set_weights must be called before backward")
        batch_dims, event_dim, data_dim = layout
        w = self.weights  # (S, B) or (S, 1)
        shape = [1] * batch_dims
        shape[batch_dims - self.rank] = w.shape[0]
        if w.shape[1] > 1:
            shape[batch_dims + data_dim] = w.shape[1]
        else:
            w = w[:, 0]
        return w.reshape(shape + [1] * event_dim).to(grad.dtype)

    def wrap(self, value: torch.Tensor, event_dim: int, site) -> torch.Tensor:
        if not value.requires_grad:
            return value
        return _ScaleGrad.apply(value, self, self.layout(value, event_dim, site))

    def _process_message(self, msg) -> None:
        # Outermost handler: runs after replay has put the guide's draw into a model site.
        if (msg["type"] == "sample" and msg["done"] and not msg["is_observed"] and not site_is_subsample(msg)
                and torch.is_tensor(msg["value"])):
            msg["value"] = self.wrap(msg["value"], msg["fn"].event_dim, msg)


class StopGradientScorer:
    """``guide_log_prob`` hook for :func:`pyrovi.weights.log_weights`: log q with detached parameters.

    ``scorer(site)`` returns an object whose ``log_prob(z)`` is the stop-gradient twin's
    (the value of ``site["fn"].log_prob(z)``, gradient to ``z`` only). With ``scale``
    (DReG) the twin reads ``z`` through :class:`ScaleLatentGradients`.
    """

    def __init__(self, scale: ScaleLatentGradients | None = None):
        self.scale = scale

    def __call__(self, site):
        twin = site["infer"].get(STOP_GRADIENT_FN) if site["infer"] else None
        if twin is None:
            twin = detach_distribution(site["fn"])
        return _Surrogate(site, twin, self.scale)


class _Surrogate:
    def __init__(self, site, twin, scale):
        self.site, self.twin, self.scale = site, twin, scale

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            value = self.scale.wrap(value, self.site["fn"].event_dim, self.site)
        lp = self.twin.log_prob(value)  # (S, ..., B): gradient only through value
        shape = value.shape[:value.dim() - self.site["fn"].event_dim]  # the site's batch shape, as fn's log_prob
        return lp.expand(shape) if lp.shape != shape else lp
