"""Normalizing-flow amortized guide: a diagonal Gaussian pushed through conditional transforms.

.. math::

    u_0 \\sim \\mathcal N\\big(\\mu(x), \\mathrm{diag}\\,\\sigma(x)^2\\big), \\qquad
    z = u_K = f_K(\\cdots f_1(u_0; h) \\cdots; h), \\qquad
    \\log q(z \\mid x) = \\log \\mathcal N(u_0) - \\sum_{k=1}^K \\log\\Big|\\det \\frac{\\partial f_k}{\\partial u_{k-1}}\\Big|

Every transform is conditioned on the encoder's hidden state ``h`` (its
*context*), so the flow's shape changes with x, not only its location and
scale (Rezende & Mohamed 2015; Kingma et al. 2016). Pyro's conditional
transforms do the work (``flow=``):

========== =========================================================== =============================
name       transform                                                   Pyro class
========== =========================================================== =============================
iaf        affine autoregressive ``y = exp(s(x_<i, h)) x + m(x_<i, h)`` ConditionalAffineAutoregressive
spline     monotone linear-rational spline per coordinate, autoreg.  ConditionalSplineAutoregressive
planar     ``y = x + u tanh(w^T x + b)``, (u, w, b) from h               ConditionalPlanar
radial     ``y = x + beta (x - x0) / (alpha + |x - x0|)``                ConditionalRadial
========== =========================================================== =============================

Autoregressive layers alternate the variable order (identity, reversed, ...)
so that every coordinate depends on every other after two layers; the order is
fixed (not random) so a rebuilt guide matches its checkpoint.

Sampling and scoring a *drawn* z use the forward pass only (Pyro caches the
inverse). The ``stl``/``dreg`` objectives score the draw with detached weights
from what the sampler recorded (:class:`FlowDistribution`,
:class:`DetachedFlowScore`): nothing is inverted. Scoring an arbitrary z (not a
draw) does invert: Pyro inverts the autoregressive layers; planar and radial
layers have no inverse in Pyro, so this module adds one
(:class:`InvertiblePlanar`: a 1-D root find for :math:`w^\\top x`, then one
differentiable Newton step; :class:`InvertibleRadial`: closed form).
"""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from functools import partial
from typing import Optional

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.transforms import (
    ConditionalAffineAutoregressive,
    ConditionalPlanar,
    ConditionalRadial,
    ConditionalSplineAutoregressive,
)
from pyro.distributions.transforms.affine_autoregressive import AffineAutoregressive
from pyro.distributions.transforms.planar import ConditionedPlanar
from pyro.distributions.transforms.radial import ConditionedRadial
from pyro.distributions.transforms.spline_autoregressive import SplineAutoregressive
from pyro.distributions.transforms.utils import clamp_preserve_gradients
from pyro.nn import ConditionalAutoRegressiveNN, DenseNN
from torch import nn
from torch.distributions import constraints

from ..errors import ConfigError, check_positive, lookup
from ..nets import as_widths
from .amortized import Amortized

__all__ = ["FLOWS", "Flow", "FlowHead", "FlowDistribution", "DetachedFlowScore", "flow_options", "InvertiblePlanar",
           "InvertibleRadial", "PLANAR_MIN_DET"]

FLOWS = ("iaf", "spline", "planar", "radial")

#: A planar layer keeps ``w.u_hat >= -1 + PLANAR_MIN_DET``, so its Jacobian determinant
#: ``1 + (1 - tanh^2) w.u_hat`` is at least this (Pyro's own bound is 0). Near 0 the layer folds space
#: almost flat: log q(z) spikes and the STL/DReG gradient, which divides by the determinant, spikes
#: with it; on the issue-17 benchmark 1 of 5 planar + stl seeds blew up late that way (docs/objectives.md).
PLANAR_MIN_DET = 0.1


# --------------------------------------------------------------------------- inverses Pyro lacks


class InvertiblePlanar(ConditionedPlanar):
    """Pyro's conditioned planar transform plus an inverse (for scoring arbitrary z), with its Jacobian
    determinant kept at least :data:`PLANAR_MIN_DET`."""

    def u_hat(self, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``u`` moved along ``w`` so that ``w.u_hat = -1 + PLANAR_MIN_DET + softplus(w.u)``, shapes ``(..., n)``.

        Pyro's map is the same with 0 for ``PLANAR_MIN_DET``; every path (sampling, log|det J|, the inverse,
        the STL/DReG score) goes through this method."""
        alpha = (u * w).sum(-1, keepdim=True)
        target = PLANAR_MIN_DET - 1.0 + F.softplus(alpha)
        return u + (target - alpha) * w / w.pow(2).sum(-1, keepdim=True)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        bias, u, w = self._params() if callable(self._params) else self._params
        u_hat = self.u_hat(u, w)  # (..., n); guarantees c = w.u_hat > -1, so g below is increasing
        c = (w * u_hat).sum(-1, keepdim=True)  # (..., 1)
        t = (w * y).sum(-1, keepdim=True)  # w.y = a + c tanh(a + b) with a = w.x; solve for a
        with torch.no_grad():
            lo, hi = t - c.abs() - 1.0, t + c.abs() + 1.0  # g(a) - t changes sign in [lo, hi]
            lo, hi = torch.broadcast_tensors(lo, hi)
            lo, hi = lo.clone(), hi.clone()
            for _ in range(60):  # bisection: g is monotone, so this cannot fail
                mid = 0.5 * (lo + hi)
                above = mid + c * torch.tanh(mid + bias) > t
                hi = torch.where(above, mid, hi)
                lo = torch.where(above, lo, mid)
            a0 = 0.5 * (lo + hi)
        # One Newton step from the (detached) root: same value, and d a / d(y, params) from the implicit function.
        th = torch.tanh(a0 + bias)
        a = a0 - (a0 + c * th - t) / (1.0 + c * (1.0 - th ** 2))
        x = y - u_hat * torch.tanh(a + bias)
        self._call(x)  # sets the cached log|det J| at x for log_abs_det_jacobian
        return x


class InvertibleRadial(ConditionedRadial):
    """Pyro's conditioned radial transform plus its closed-form inverse."""

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        x0, alpha_prime, beta_prime = self._params() if callable(self._params) else self._params
        alpha = F.softplus(alpha_prime)  # as in Pyro's forward
        beta = -alpha + F.softplus(beta_prime)
        d = y - x0
        s = d.norm(dim=-1, keepdim=True)  # |y - x0| = r (1 + beta / (alpha + r)), r = |x - x0|
        b = alpha + beta - s
        r = 0.5 * (-b + torch.sqrt(b ** 2 + 4.0 * s * alpha))  # positive root of r^2 + b r - s alpha = 0
        x = x0 + d / (1.0 + beta / (alpha + r))
        self._call(x)
        return x


class _ConditionalPlanar(ConditionalPlanar):
    def condition(self, context):
        return InvertiblePlanar(partial(self.nn, context))


class _ConditionalRadial(ConditionalRadial):
    def condition(self, context):
        return InvertibleRadial(partial(self.nn, context))


# --------------------------------------------------------------------------- stop-gradient score from the draw


class _Draw:
    """What the last :meth:`FlowDistribution.rsample` drew, detached: ``u_0 .. u_K``, ``log q(u_K)``, each
    layer's log-scale where the layer computed one (an iaf layer's clamped ``s``; None for the others) and
    each autoregressive layer's MADE first-layer output (its hidden pre-activation; None for the others)
    and each spline layer's MADE output (the raw bin parameters ``(..., m n)``; None for the others).

    Shared by a flow's q, its expanded copies (Pyro's particle plate expands q before drawing)
    and its stop-gradient score, so the score reads the very values the sampler computed.
    """

    __slots__ = ("us", "log_q", "log_scales", "pre", "made_out")

    def __init__(self):
        self.us, self.log_q, self.log_scales, self.pre, self.made_out = None, None, None, None, None


class FlowDistribution(dist.TransformedDistribution):
    """A flow's q: Pyro's ``TransformedDistribution`` whose ``rsample`` also records the draw (:class:`_Draw`).

    Batch and event shapes, values and gradients are those of the plain
    ``TransformedDistribution(base, transforms)``. The record is what
    :class:`DetachedFlowScore` reads; recording costs no extra pass (each layer's
    log-determinant is the one Pyro caches when the layer is applied).
    """

    def __init__(self, base_distribution, transforms, draw: Optional[_Draw] = None, validate_args=None):
        super().__init__(base_distribution, transforms, validate_args=validate_args)
        self.draw = _Draw() if draw is None else draw
        self._score = None  # () -> DetachedFlowScore, set by the head that built this q

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(FlowDistribution, _instance)
        new = super().expand(batch_shape, _instance=new)
        new.draw, new._score = self.draw, self._score
        return new

    def stop_gradient(self) -> "DetachedFlowScore":
        """The stop-gradient score of this q's draws (see :func:`pyrovi.stop_gradient.detached`)."""
        if self._score is None:
            raise ConfigError("this flow distribution was not built by a FlowHead: it has no stop-gradient score")
        return self._score()

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        x = self.base_dist.rsample(sample_shape)
        us, lds, pre, made_out = [x], [], [], []
        for t in self.transforms:
            # the score's backward reads them; without gradients (evaluation) nothing will, so they are not kept
            made = _made(t) if torch.is_grad_enabled() else None
            seen, seen_out, hooks = [], [], []
            if made is not None:
                hooks.append(made.layers[0].register_forward_hook(lambda m, i, out: seen.append(out)))
                if isinstance(t, SplineAutoregressive):  # its bin parameters: the score reads them too
                    hooks.append(made.layers[-1].register_forward_hook(lambda m, i, out: seen_out.append(out)))
            try:
                y = t(x)  # Transform.__call__: Pyro caches (x, y) and this layer's log|det J|
            finally:
                for hook in hooks:
                    hook.remove()
            pre.append(seen[-1].detach() if seen else None)
            made_out.append(seen_out[-1].detach() if seen_out else None)
            lds.append(t.log_abs_det_jacobian(x, y))
            x = y
            us.append(x)
        with torch.no_grad():  # log q(u_K) in the order TransformedDistribution.log_prob sums it: bit for bit
            log_q = 0.0
            for ld in reversed(lds):
                log_q = log_q - ld
            log_q = log_q + self.base_dist.log_prob(us[0])
        self.draw.us, self.draw.log_q = [u.detach() for u in us], log_q.detach()
        self.draw.log_scales = [_detached_or_none(getattr(t, "_cached_log_scale", None)) for t in self.transforms]
        self.draw.pre, self.draw.made_out = pre, made_out
        return x


def _detached_or_none(t):
    return None if t is None else t.detach()


def _made(t):
    """The MADE of a conditioned autoregressive layer (its first layer's output: the hidden pre-activation
    the stl/dreg score reads; a spline's last layer's: its bin parameters), else None."""
    arn = getattr(t, "arn", None)  # Pyro's conditioned iaf/spline: partial(ConditionalAutoRegressiveNN, context)
    made = getattr(arn, "func", None)
    return made if isinstance(made, ConditionalAutoRegressiveNN) else None


class DetachedFlowScore(dist.TorchDistribution):
    """log q of the flow's own last draw with *detached* parameters, for the ``stl``/``dreg`` objectives.

    ``log_prob(z)`` returns the log-density the sampler computed for its draw
    (bit for bit) and passes gradient to ``z`` only: :math:`g_K = \partial \log q / \partial z_K`
    at fixed parameters, by the recursion over the recorded layer values

    .. math::

        g_0 = -\frac{u_0 - \mu}{\sigma^2}, \qquad
        g_k = J_k^{-\top}\big(g_{k-1} - \nabla_{u_{k-1}} \log|\det J_k(u_{k-1})|\big),

    with :math:`J_k = \partial f_k / \partial u_{k-1}`. Nothing is inverted: planar
    and radial layers use closed forms (rank-one updates of the identity), the
    autoregressive layers (iaf, spline) their triangular Jacobian, formed in closed
    form from the MADE's masked weights and the sampler's recorded first-layer output (and a spline's
    recorded MADE output)
    (:func:`_iaf_jacobians`, :func:`_spline_jacobians`, :func:`_autoregressive_jacobian`) and solved with
    ``torch.linalg.solve_triangular``.
    Only ``log_prob`` of the recorded draw (any value of its shape, e.g. a copy of
    it, is taken to be that draw) is defined.
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, head: "FlowHead", h: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, draw: _Draw,
                 batch_shape, event_shape):
        self.head, self.h, self.loc, self.scale, self.draw = head, h.detach(), loc.detach(), scale.detach(), draw
        super().__init__(batch_shape, event_shape, validate_args=False)

    def expand(self, batch_shape, _instance=None):  # Pyro may expand the site's twin with it
        return DetachedFlowScore(self.head, self.h, self.loc, self.scale, self.draw, batch_shape, self.event_shape)

    @property
    def support(self):
        return constraints.real_vector

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        us = self.draw.us
        if us is None or value.shape != us[-1].shape:
            raise RuntimeError(
                "the stop-gradient score of a flow only scores the flow's own last draw "
                f"(shape {None if us is None else tuple(us[-1].shape)}), got a value of shape {tuple(value.shape)}")
        return _ScoreFromDraw.apply(value, self)

    def value_gradient(self) -> torch.Tensor:
        """:math:`\partial \log q / \partial z` at the recorded draw with the parameters held fixed, ``(..., n)``."""
        us, modules, log_scales, pre = self.draw.us, list(self.head.transforms), self.draw.log_scales, self.draw.pre
        with torch.no_grad():
            g = -(us[0] - self.loc) / self.scale ** 2
            if _iaf_simple(modules) and all(s is not None for s in log_scales):
                # iaf layers: with few draws, every layer's Jacobian in one batch (they read recorded values
                # only), then the solves; with many, one layer at a time (see _FUSE_DRAWS)
                per = len(modules) if us[0].numel() // us[0].shape[-1] <= _FUSE_DRAWS else 1
                for i in range(0, len(modules), per):
                    group = modules[i:i + per]
                    jacs, grad_lds = _iaf_jacobians(group, self.h, us[i:i + len(group)], log_scales[i:i + per],
                                                    pre[i:i + per])
                    for module, jac, grad_ld in zip(group, jacs, grad_lds):
                        g = _solve_transposed(module, jac, g - grad_ld)
                return g
            if _spline_simple(modules):  # spline layers: every layer's Jacobian in one batch, then the solves
                jacs, grad_lds = _spline_jacobians(modules, self.h, us[:-1], pre, self.draw.made_out)
                for module, jac, grad_ld in zip(modules, jacs, grad_lds):
                    g = _solve_transposed(module, jac, g - grad_ld)
                return g
            for module, x, log_scale, a in zip(modules, us[:-1], log_scales, pre):
                # an autoregressive layer is read from its module (conditioning one builds a Module: ~0.2 ms)
                t = None if _ar_info(module) else module.condition(self.h)
                g = _transpose_solve_step(module, t, self.h, x, g, log_scale, a)
        return g


class _ScoreFromDraw(torch.autograd.Function):
    """Forward: the recorded log q. Backward: ``grad * dlog q/dz`` to the value, nothing to anything else."""

    @staticmethod
    def forward(ctx, value, score):
        ctx.score = score
        return score.draw.log_q.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.unsqueeze(-1) * ctx.score.value_gradient().to(grad.dtype), None


def _transpose_solve_step(module, t, ctx: torch.Tensor, x: torch.Tensor, g: torch.Tensor,
                          log_scale: Optional[torch.Tensor] = None, pre: Optional[torch.Tensor] = None
                          ) -> torch.Tensor:
    """``J^{-T} (g - grad_x log|det J|)`` for the layer ``module`` conditioned on ``ctx`` as ``t``, at ``x``.

    ``t`` None: an autoregressive ``module`` (read directly); ``log_scale`` (an iaf layer's) and ``pre``
    (its MADE's first-layer output), as its sampler computed them at ``x`` (else recomputed)."""
    if isinstance(t, ConditionedPlanar):
        # y = x + u tanh(w.x + b): J = I + u psi^T, psi = (1 - tanh^2) w, log|det J| = log|1 + psi.u|
        bias, u, w = t._params() if callable(t._params) else t._params
        u = t.u_hat(u, w)
        th = torch.tanh((w * x).sum(-1, keepdim=True) + bias)
        d = 1.0 - th ** 2
        wu = (w * u).sum(-1, keepdim=True)
        det = 1.0 + d * wu
        v = g - (-2.0 * th * d * wu / det) * w  # grad_x log|det| = d/da log|1 + (1 - tanh^2 a) w.u| * w
        return v - (d * w) * (u * v).sum(-1, keepdim=True) / det  # Sherman-Morrison: (I + psi u^T)^{-1} v
    if isinstance(t, ConditionedRadial):
        # y = x + beta h (x - x0), h = 1/(alpha + r): J = A I + B e e^T, A = 1 + beta h, B = -beta h^2 r
        x0, alpha_p, beta_p = t._params() if callable(t._params) else t._params
        alpha = F.softplus(alpha_p)
        beta = -alpha + F.softplus(beta_p)
        diff = x - x0
        r = diff.norm(dim=-1, keepdim=True)
        e = diff / r
        h = 1.0 / (alpha + r)
        a = 1.0 + beta * h
        b = -beta * h ** 2 * r
        n = x.shape[-1]
        # log|det J| = (n - 1) log A + log(A + B); d/dr with dA/dr = -beta h^2, dB/dr = beta h^2 (2 h r - 1)
        dld = (n - 1) * (-beta * h ** 2) / a + beta * h ** 2 * (2.0 * h * r - 2.0) / (a + b)
        v = g - dld * e
        return v / a - (b / (a * (a + b))) * e * (e * v).sum(-1, keepdim=True)  # J symmetric: J^{-1} v
    # autoregressive (iaf, spline): J is triangular in the layer's variable order
    jac, grad_ld = _autoregressive_jacobian(module, ctx, x, log_scale, pre)
    return _solve_transposed(module, jac, g - grad_ld)


def _solve_transposed(module, jac: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``J^{-T} v`` for the autoregressive layer ``module``'s Jacobian ``jac`` (triangular in its variable order)."""
    order = _ar_info(module)[1]
    if order != "permuted":  # J lower (identity order) or upper (reversed) triangular as it is: J^T the other
        return torch.linalg.solve_triangular(jac.transpose(-1, -2), v.unsqueeze(-1), upper=order == "lower").squeeze(-1)
    perm = module.nn.get_permutation()  # output perm[i] depends on inputs perm[:i]
    lower = jac[..., perm, :][..., :, perm]  # row/column i = variable perm[i]: lower triangular
    sol = torch.linalg.solve_triangular(lower.transpose(-1, -2), v[..., perm].unsqueeze(-1), upper=True)
    out = torch.empty_like(v)
    out[..., perm] = sol.squeeze(-1)
    return out


#: The stl/dreg score of iaf layers batches all layers' Jacobians while a layer has at most this many draws:
#: 4 layers x 128 draws (stl) took 28% less CPU time batched (a quarter of the ops), while with 1024 draws
#: (dreg, K = 8) batching was 40% slower than one layer at a time (plain matrix products, smaller intermediates).
_FUSE_DRAWS = 512

_AR_INFO: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _ar_info(module) -> Optional[tuple]:
    """``(iaf log-scale clip (min, max) or None, variable order)`` of an autoregressive layer, None for others.

    Fixed when the layer is built, so read once per module: the order is ``"lower"`` (identity: J lower
    triangular), ``"upper"`` (reversed) or ``"permuted"``; the clip is set for Pyro's (non-stable) affine layer.
    """
    if module not in _AR_INFO:
        info = None
        if isinstance(module, (ConditionalAffineAutoregressive, ConditionalSplineAutoregressive)):
            t = module.condition(None)  # its options only: the MADE is not called
            arn = module.nn
            iaf = (isinstance(t, AffineAutoregressive) and not t.stable
                   and arn.output_multiplier == 2 and arn.count_params == 2)
            perm = arn.get_permutation()
            order = torch.arange(perm.numel(), device=perm.device)
            kind = "lower" if torch.equal(perm, order) else "upper" if torch.equal(perm, order.flip(0)) else "permuted"
            info = ((t.log_scale_min_clip, t.log_scale_max_clip) if iaf else None, kind)
        _AR_INFO[module] = info
    return _AR_INFO[module]


_AR_PAIRS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _ar_pairs(module, device) -> tuple:
    """``(rows, cols, rows * n + cols)``: the strictly triangular entries of an autoregressive layer's Jacobian
    the masks allow (output ``rows[k]`` reads input ``cols[k]``: ``cols[k]`` comes before ``rows[k]`` in the
    layer's order)."""
    pairs = _AR_PAIRS.get(module)
    if pairs is None or pairs[0].device != device:
        perm = module.nn.get_permutation()
        pos = torch.empty_like(perm)
        pos[perm] = torch.arange(perm.numel(), device=perm.device)  # pos[v]: variable v's place in the order
        rows, cols = torch.nonzero(pos.unsqueeze(1) > pos.unsqueeze(0), as_tuple=True)
        pairs = _AR_PAIRS[module] = (rows.to(device), cols.to(device), (rows * perm.numel() + cols).to(device))
    return pairs


def _slope(f, a: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``f'(a)`` of the MADE's elementwise nonlinearity ``f`` (``inplace``: ``a`` may be overwritten)."""
    if isinstance(f, nn.ReLU):  # 1 where a > 0, else 0 (as ReLU's backward); 3x faster than (a > 0).to()
        return a.relu_().sign_() if inplace else torch.relu(a).sign_()
    with torch.enable_grad():
        a_ = a.detach().requires_grad_(True)
        return torch.autograd.grad(f(a_).sum(), a_)[0]


def _made_simple(modules) -> bool:
    """True for autoregressive layers whose MADE has one hidden layer and no skip connections, all of one shape."""
    if not modules or any(_ar_info(m) is None or len(m.nn.layers) != 2 or m.nn.skip_layer is not None
                          for m in modules):
        return False
    shapes = {(tuple(m.nn.layers[0].weight.shape), tuple(m.nn.layers[1].weight.shape), type(m.nn.f)) for m in modules}
    return len(shapes) == 1


def _iaf_simple(modules) -> bool:
    """True for iaf layers whose MADE has one hidden layer and no skip connections, all of one shape."""
    return (_made_simple(modules) and all(_ar_info(m)[0] is not None for m in modules)
            and len({_ar_info(m)[0] for m in modules}) == 1)


def _stack(ts):
    """``torch.stack(ts)``; one tensor: a view, no copy."""
    return ts[0].unsqueeze(0) if len(ts) == 1 else torch.stack(ts)


def _bmm(p, q, add=None):
    """``p @ q (+ add)`` over a leading layer dim; one layer: a plain matrix product (25% faster than bmm on
    tall-skinny p)."""
    if p.shape[0] == 1:
        return (p[0] @ q[0] if add is None else torch.addmm(add[0], p[0], q[0])).unsqueeze(0)
    return p @ q if add is None else torch.baddbmm(add, p, q)


def _masked(arns, k: int) -> torch.Tensor:
    """Layer ``k``'s masked weights of each MADE in ``arns``, stacked: ``(L, out, in)``."""
    return _stack([arn.layers[k].weight for arn in arns]) * _stack([arn.layers[k].mask for arn in arns])


def _made_first(arns, ctx: torch.Tensor, x: torch.Tensor, pres) -> tuple:
    """``(W_1 (L, H, c + n), a (L, ..., H), owned)`` of L one-hidden-layer MADEs ``arns`` at ``x (L, ..., n)``:
    their masked first-layer weights and first-layer outputs, the sampler's ``pres`` where all are given,
    else recomputed (the context's share once per context row); ``owned``: ``a`` may be overwritten."""
    n_layers, n, c = len(arns), x.shape[-1], ctx.shape[-1]
    lead = x.shape[1:-1]
    w1 = _masked(arns, 0)  # (L, H, c + n)
    if pres is not None and all(p is not None for p in pres):  # the sampler's own
        return w1, _stack(list(pres)), n_layers > 1  # (a stacked copy may be overwritten)
    hidden = w1.shape[1]
    share = _bmm(ctx.reshape(1, -1, c).expand(n_layers, -1, c), w1[..., :c].transpose(1, 2),
                 _stack([arn.layers[0].bias for arn in arns]).unsqueeze(1))
    share = share.reshape((n_layers,) + (1,) * (len(lead) + 1 - ctx.dim()) + ctx.shape[:-1] + (hidden,))
    a = _bmm(x.reshape(n_layers, -1, n), w1[..., c:].transpose(1, 2)).reshape((n_layers,) + lead + (hidden,))
    return w1, a.add_(share) if torch.broadcast_shapes(a.shape, share.shape) == a.shape else a + share, True


def _iaf_jacobians(modules, ctx: torch.Tensor, xs, log_scales, pres=None) -> tuple:
    """``(dy/dx (L, ..., n, n), grad_x log|det J| (L, ..., n))`` of L iaf layers (:func:`_iaf_simple`) at ``xs``.

    Layer l is ``y = exp(s) x + mu`` with ``(mu, s) = MADE_l(x, ctx)``, one hidden layer:
    ``d theta / dx = W_out diag(f'(a)) W_1x``. Every layer's nonzero entries (the pairs its masks
    connect: half of n x n) and its ``grad log|det J| = grad sum s`` come from one product
    ``f'(a) @ P`` with ``P``'s columns ``W_out[p, h] W_1x[h, j]``, the L layers batched (each
    op once per step, not once per layer). ``log_scales[l]``: the layer's clamped ``s`` at
    ``xs[l]`` as its sampler computed it, or None (recomputed from the MADE's output layer);
    ``pres[l]``: its MADE's first-layer output there, or None (recomputed, the context's
    share once per context row).
    """
    n, c = xs[0].shape[-1], ctx.shape[-1]
    arns = [m.nn for m in modules]
    x = _stack(list(xs))  # (L, ..., n)
    lead = x.shape[1:-1]
    w1, a, owned = _made_first(arns, ctx, x, pres)
    w_out = _masked(arns, 1)  # (L, 2n, H)
    n_layers, hidden = w1.shape[0], w1.shape[1]
    tangent = w1[..., c:]  # (L, H, n): d a / d x
    if any(s is None for s in log_scales):  # the MADE's output layer, as the sampler ran it
        theta_s = _bmm(arns[0].f(a).reshape(n_layers, -1, hidden), w_out[:, n:].transpose(1, 2),
                      _stack([arn.layers[1].bias[n:] for arn in arns]).unsqueeze(1))
        clip = _ar_info(modules[0])[0]
        log_s = clamp_preserve_gradients(theta_s, *clip).reshape(x.shape)
        log_s = _stack([log_s[i] if s is None else s for i, s in enumerate(log_scales)])
    else:
        log_s = _stack(list(log_scales))
    slope = _slope(arns[0].f, a, inplace=owned).reshape(n_layers, -1, hidden)  # (a is not read again)
    rows, cols, flat = (_stack(t) for t in zip(*(_ar_pairs(m, x.device) for m in modules)))  # (L, k)
    k = rows.shape[-1]
    outer = w_out.transpose(1, 2).unsqueeze(-1) * tangent.unsqueeze(2)  # (L, H, 2n, n): d theta_p/dx_j via unit h
    picked = outer.reshape(n_layers, hidden, -1).gather(2, torch.cat([flat, flat + n * n], 1).unsqueeze(1).expand(
        -1, hidden, -1))  # (L, H, 2k): (mu, s) of each connected pair
    prod = _bmm(slope, torch.cat([picked, outer[:, :, n:].sum(2)], dim=2))  # (L, draws, 2k + n)
    scale = torch.exp(log_s).reshape(n_layers, -1, n)
    sx = scale * x.reshape(n_layers, -1, n)  # d y_i / d s_i (d y_i / d mu_i = 1)
    draws = sx.shape[1]
    vals = torch.addcmul(prod[..., :k], sx.gather(2, rows.unsqueeze(1).expand(-1, draws, -1)), prod[..., k:2 * k])
    jac = prod.new_zeros(n_layers, draws, n * n).scatter_(2, flat.unsqueeze(1).expand(-1, draws, -1), vals)
    jac = jac.reshape((n_layers, draws, n, n))  # (index_put is 7x slower than scatter_)
    jac.diagonal(dim1=-2, dim2=-1).add_(scale)
    return jac.reshape((n_layers,) + lead + (n, n)), prod[..., 2 * k:].reshape(x.shape)


def _autoregressive_jacobian(module, ctx: torch.Tensor, x: torch.Tensor, log_scale: Optional[torch.Tensor] = None,
                             pre: Optional[torch.Tensor] = None) -> tuple:
    """``(dy/dx (..., n, n), grad_x log|det J| (..., n))`` of the autoregressive layer ``module`` at ``x``
    (context ``ctx``).

    The layer is ``y_i = phi(x_i; theta_i)`` with ``theta = MADE(x, context)``, a
    ``ConditionalAutoRegressiveNN`` (masked linear layers ``W_l``, elementwise nonlinearity
    ``f``), in closed form: with one hidden layer ``d theta / dx = W_out diag(f'(a)) W_1x``
    (``W_1x``: the first layer's columns that read x, masked), deeper MADEs carry that
    product through each hidden layer. ``phi``'s partials are contracted with ``W_out`` first
    (``C[i, h] = sum_k d y_i / d theta_ki W_out[ki, h]``), so no per-draw tensor of size
    ``n x`` (MADE outputs) is formed: ``dy/dx = diag(d phi/d x) + (C diag(f'(a))) W_1x``, and
    ``grad log|det J|`` the same with ``log|det J|``'s partials. ``phi``'s partials are in
    closed form: the iaf's (``y = exp(s) x + m``) inline, the spline's from :func:`_spline_partials`
    (one-hidden-layer spline MADEs take the faster :func:`_spline_jacobians`). The context's share
    of the first layer is computed once per context row, not per particle. An iaf layer's
    ``log_scale`` (clamped ``s``), when given (the sampler's), spares the MADE's output layer;
    ``pre``, its first layer's output (the sampler's), the first layer.
    """
    if _iaf_simple([module]):
        jac, grad_ld = _iaf_jacobians([module], ctx, [x], [log_scale], [pre])
        return jac[0], grad_ld[0]
    arn, n = module.nn, x.shape[-1]
    c = ctx.shape[-1]
    first, *hidden_layers, last = list(arn.layers)  # (slicing a ModuleList builds one: ~50 us)
    w1 = first.weight * first.mask  # (H, c + n): the MADE reads cat([context, x])
    tangent = w1[:, c:]  # d a / d x: (H, n) for every draw; (..., H, n) after a second hidden layer
    if pre is not None:  # the sampler's own
        a, owned = pre, False
    else:
        a, share = F.linear(x, tangent), F.linear(ctx, w1[:, :c], first.bias)  # share: once per context row
        a, owned = a.add_(share) if torch.broadcast_shapes(a.shape, share.shape) == a.shape else a + share, True
    for layer in hidden_layers:
        w = layer.weight * layer.mask
        tangent = w @ (_slope(arn.f, a).unsqueeze(-1) * tangent)
        a, owned = F.linear(arn.f(a), w, layer.bias), True
    w_out = last.weight * last.mask  # (m n, H): output k n + i is parameter row k of coordinate i
    m = w_out.shape[0] // n
    clip = _ar_info(module)[0]
    if arn.skip_layer is not None:
        w_skip = arn.skip_layer.weight * arn.skip_layer.mask
    if clip is None or log_scale is None:
        theta = F.linear(arn.f(a), w_out, last.bias)
        if arn.skip_layer is not None:
            theta = theta + F.linear(ctx, w_skip[:, :c], arn.skip_layer.bias) + F.linear(x, w_skip[:, c:])
    slope = _slope(arn.f, a, inplace=owned)  # (a is not read again)
    hidden = w_out.shape[-1]
    if clip is not None:
        # iaf: y = exp(s) x + mu (s clamped, its gradient kept, as Pyro does), log|det| = sum s
        scale = torch.exp(clamp_preserve_gradients(theta[..., n:], *clip) if log_scale is None else log_scale)
        dy_dx, dld_dx = scale, None
        gy = torch.stack([torch.ones_like(scale), scale * x], dim=-2)  # (..., 2, n): d y_i / d (mu_i, s_i)
        gl = torch.cat([x.new_zeros(n), x.new_ones(n)])  # d log|det| / d theta, the same for every draw
    else:  # spline: its partials in closed form (_spline_partials)
        dy_dx, dld_dx, grads = _spline_partials(theta.reshape(theta.shape[:-1] + (m, n)), x, *_spline_info(module))
        gy, gl = grads[0], grads[1].reshape(theta.shape)
    # C[i, ..., h] = sum_k d y_i / d theta_ki W_out[ki, h] f'(a_h), coordinate-major (one bmm, no permuted copy)
    lead = slope.shape[:-1]
    cy = gy.expand(lead + (m, n)).reshape(-1, m, n).permute(2, 0, 1) @ w_out.reshape(m, n, hidden).transpose(0, 1)
    cy = cy.reshape((n,) + slope.shape).mul_(slope)  # (n, ..., H)
    v = (gl @ w_out) * slope  # (..., H): d log|det| / d a
    if tangent.dim() == 2:
        jac = (cy.reshape(-1, hidden) @ tangent).reshape((n,) + lead + (n,)).movedim(0, -2)
        grad_ld = (v.reshape(-1, hidden) @ tangent).reshape(lead + (n,))
    else:
        jac = (cy.unsqueeze(-2) @ tangent).squeeze(-2).movedim(0, -2)
        grad_ld = (v.unsqueeze(-2) @ tangent).squeeze(-2)
    if dy_dx is not None:  # jac was strictly triangular (the masks): add phi's own d y_i / d x_i
        jac.diagonal(dim1=-2, dim2=-1).add_(dy_dx)
    if arn.skip_layer is not None:
        ws = w_skip[:, c:]
        jac = jac + torch.einsum("...ki,kij->...ij", gy, ws.reshape(m, n, n))
        grad_ld = grad_ld + gl @ ws
    if dld_dx is not None:
        grad_ld = grad_ld + dld_dx
    return jac, grad_ld  # jac[..., i, j] = dy_i / dx_j


# --------------------------------------------------------------------------- spline partials in closed form
#
# The stl/dreg score needs, per draw and coordinate, the partials of a spline layer's y_i and of
# log|dy_i/dx_i| with respect to x_i and to every raw MADE output of coordinate i. Neither Pyro nor torch
# gives them except by reverse-mode autograd through Pyro's spline (one forward and two backward passes
# per layer: ~70% of the score's time, against issue 17's cost target of 1.3x the elbo step), so they
# are derived here by hand, from Pyro's parameterisation (pyro.distributions.transforms.spline) and
# checked against autograd in tests/test_spline_partials.py.

#: Pyro's spline constants (min_bin_width, min_bin_height, min_derivative, min_lambda, eps), read from the
#: defaults of the function its spline layers call, so a change there is followed here.
def _spline_constants() -> dict:
    names = ("min_bin_width", "min_bin_height", "min_derivative", "min_lambda", "eps")
    try:  # a private function of Pyro's: if a release renames it, Pyro 1.9's values (tests compare with its spline)
        from pyro.distributions.transforms.spline import _monotonic_rational_spline
    except ImportError:  # pragma: no cover - Pyro 1.9 has it
        return dict(zip(names, (1e-3, 1e-3, 1e-3, 0.025, 1e-6)))
    return {k: p.default for k, p in inspect.signature(_monotonic_rational_spline).parameters.items() if k in names}


_SPLINE_CONSTANTS = _spline_constants()

_SPLINE_INFO: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _spline_info(module) -> tuple:
    """``(count_bins, bound, order)`` of a ``ConditionalSplineAutoregressive`` layer (fixed when it is built)."""
    if module not in _SPLINE_INFO:
        s = module.condition(None).spline  # its options only: the MADE is not called
        _SPLINE_INFO[module] = (s.count_bins, float(s.bound), s.order)
    return _SPLINE_INFO[module]


_SCRATCH: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


#: the largest scratch buffer kept between steps (bytes); larger ones are allocated per call
_SCRATCH_MAX_BYTES = 32 * 2 ** 20


def _scratch(owner, name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised buffer of ``shape`` (``like``'s dtype and device) kept for module ``owner`` between calls.

    The spline score's largest arrays (the MADE's outputs, their partials and the arrays over the
    bins: about 8 MB with 1024 draws) live within one call; allocated afresh, their memory was
    faulted in anew on every step (the C allocator returns it to the system between steps): ~1000
    page faults a dreg step, 5-10% of its time. One owner's buffers must not be used by two threads
    at once.
    """
    if math.prod(shape) * like.element_size() > _SCRATCH_MAX_BYTES:  # a large one is not held between steps
        return like.new_empty(shape)
    bufs = _SCRATCH.setdefault(owner, {})
    buf = bufs.get(name)
    if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
        buf = bufs[name] = like.new_empty(shape)
    return buf


def _spline_partials(theta: torch.Tensor, x: torch.Tensor, count_bins: int, bound: float, order: str,
                     out: Optional[torch.Tensor] = None, owner=None) -> tuple:
    """Partials of Pyro's monotone rational spline ``y = g(x; theta)`` and of ``L = log(dy/dx)``, elementwise.

    ``theta (..., m, d)``: each of ``x (..., d)``'s raw MADE outputs (``m = 4K - 1`` for
    ``order="linear"``: K widths, K heights, K - 1 slopes, K lambdas; ``3K - 1`` for ``"quadratic"``,
    no lambdas). Returns ``dy/dx``, ``dL/dx`` ``(..., d)`` and the partials with respect to theta
    ``(2, ..., m, d)`` (``[0]`` of y, ``[1]`` of L; written into ``out`` if given; with ``owner``, the
    largest temporaries are :func:`_scratch` buffers of that module). Any layout works;
    the stl/dreg score puts the draws last (``d``), so that every operation over bins runs along long
    contiguous rows.

    Widths and heights are ``min + (1 - K min) softmax(raw)`` scaled onto ``[-B, B]`` (knots
    ``X_k``, ``Y_k``), the interior slopes ``min_derivative + softplus(raw)`` (the two end ones
    fixed at ``1 - min_derivative``, as in Pyro), the lambdas ``min + (1 - 2 min) sigmoid(raw)``.
    In x's bin ``b`` (``t = (x - X_b) / w``, ``w = X_{b+1} - X_b``, ``delta = (Y_{b+1} - Y_b) / w``,
    end slopes ``d0, d1``):

    * quadratic (Durkan et al. 2019, eq. 4): ``y = Y_b + (Y_{b+1} - Y_b) (delta t^2 + d0 t(1-t)) / den``,
      ``den = delta + (d0 + d1 - 2 delta) t(1-t)``, ``dy/dx = delta^2 (d1 t^2 + 2 delta t(1-t)
      + d0 (1-t)^2) / den^2``;
    * linear (Dolatabadi et al. 2020): ``w_b = sqrt(d0/d1)``, ``w_c = (lambda d0 + (1 - lambda) w_b d1)
      / delta``, ``y_c = ((1 - lambda) Y_b + lambda w_b Y_{b+1}) / ((1 - lambda) + lambda w_b)``; both
      halves of the bin are ``y = p + (y_c - p) r tau / D``, ``D = mu + (r - 1) tau``,
      ``dy/dtau = (y_c - p) r mu / D^2``, with ``(p, tau, mu, r) = (Y_b, t, lambda, w_c)`` for
      ``t <= lambda`` and ``(Y_{b+1}, 1 - t, 1 - lambda, w_c / w_b)`` above.

    The partials with respect to the bin's scalars (``X_b, X_{b+1}, Y_b, Y_{b+1}, d0, d1, lambda``)
    are carried back by hand (reverse mode, y's and L's adjoints stacked), then to the raw outputs:
    ``dX_k / draw_l = 2B (1 - K min) s_l ([l < k] - S_k)`` (softmax ``s``, ``S_k = sum_{j<k} s_j``),
    ``softplus' = sigmoid`` (1 above 20, as torch's), ``sigmoid' = s (1 - s)``. Outside ``[-B, B]``
    the layer is the identity: ``dy/dx = 1``, every other partial 0.
    """
    c = _SPLINE_CONSTANTS
    k_, m = count_bins, theta.shape[-2]
    lead = torch.broadcast_shapes(theta.shape[:-2], x.shape[:-1])
    d_ = x.shape[-1]
    # the arrays over every bin are the large ones (K times the rest): with an owner they are written into
    # buffers kept between steps rather than allocated (and their pages faulted in) afresh each step
    work = ((lambda name, shape, dtype=x.dtype: _scratch(owner, name, shape, x.new_empty((), dtype=dtype)))
            if owner is not None else (lambda name, shape, dtype=x.dtype: x.new_empty(shape, dtype=dtype)))
    inside = (x >= -bound) & (x <= bound)
    x = torch.where(inside, x, 0.0)  # outside: the identity; every partial below is finite, then masked
    # knots of widths and heights together, as Pyro forms them (the same operations as its spline, up to the
    # softmax's rounding): C_k = sum_{j<=k} (min + (1 - K min) s_j), knot k + 1 = 2B C_k - B; knots 0, K: -B, B
    raw = theta[..., :2 * k_, :].unflatten(-2, (2, k_))
    s = work("s", raw.shape)
    torch.sub(raw, raw.amax(-2, keepdim=True), out=s).exp_()
    s = s.mul_(s.sum(-2, keepdim=True).reciprocal_()).expand(lead + (2, k_, d_))
    mins = (c["min_bin_width"] if c["min_bin_width"] == c["min_bin_height"]
            else s.new_tensor([c["min_bin_width"], c["min_bin_height"]]).reshape(2, 1))
    mins_ = mins if isinstance(mins, float) else mins.unsqueeze(-1)  # (2, 1, 1): over (widths/heights, K, d)
    frac = 1.0 - mins_ * k_
    cum = torch.mul(s, frac, out=work("cum", s.shape)).add_(mins_).cumsum_(-2)  # (..., 2, K, d)
    interior = torch.mul(cum[..., 0, :k_ - 1, :], 2.0 * bound, out=work("knots", lead + (k_ - 1, d_))).sub_(
        bound).add_(c["eps"])  # X_1 .. X_{K-1}, plus Pyro's eps
    b = torch.ge(x.unsqueeze(-2), interior, out=work("ge", interior.shape, torch.bool)).sum(
        -2, keepdim=True)  # (..., 1, d): x's bin, as Pyro's search
    ends = torch.cat([b, b + 1], dim=-2)  # (..., 2, d): x's bin's knots
    fixed = ends.remainder(k_) == 0  # knots 0 and K: fixed positions, fixed slopes
    at = torch.cat([(b - 1).clamp_(min=0), b], dim=-2)  # C_{k-1} of knots b and b + 1
    cab = cum.gather(-2, at.unsqueeze(-3).expand(lead + (2, 2, d_)))  # (..., 2, 2, d)
    kab = torch.where(fixed.unsqueeze(-3), s.new_tensor([[-bound], [bound]]), cab * (2.0 * bound) - bound)
    xa, xb, ya, yb = kab[..., 0, 0, :], kab[..., 0, 1, :], kab[..., 1, 0, :], kab[..., 1, 1, :]
    # S_k = sum_{j<k} s_j at the bin's knots (what a knot's partial reads): (C_{k-1} - k min) / (1 - K min)
    cab = torch.where(fixed.unsqueeze(-3) & (ends == 0).unsqueeze(-3), 0.0,
                      (cab - ends.unsqueeze(-3).to(cab.dtype) * mins_) / frac)  # (int * float: the default dtype)
    d_raw = theta[..., 2 * k_:3 * k_ - 1, :].expand(lead + (k_ - 1, d_)).gather(
        -2, torch.cat([at[..., :1, :], b.clamp(max=k_ - 2)], dim=-2))  # raw slopes at knots b, b + 1 (interior)
    d = torch.where(fixed, 1.0 - c["min_derivative"], F.softplus(d_raw) + c["min_derivative"])
    d0, d1 = d[..., 0, :], d[..., 1, :]
    w = xb - xa
    iw = 1.0 / w
    delta = (yb - ya) * iw
    t = (x - xa) * iw
    if order == "linear":
        sig_l = torch.sigmoid(theta[..., 3 * k_ - 1:, :].expand(lead + (k_, d_)).gather(-2, b).squeeze(-2))
        lam = (1.0 - 2.0 * c["min_lambda"]) * sig_l + c["min_lambda"]
        lam1 = 1.0 - lam
        wb = torch.sqrt(d0 / d1)
        lwb, lwd = lam * wb, lam1 * wb
        idc = (lam1 + lwb).reciprocal_()
        yc = torch.addcmul(lam1 * ya, lwb, yb).mul_(idc)
        idelta = w / (yb - ya)
        wc = torch.addcmul(lam * d0, lwd, d1).mul_(idelta)
        low = t <= lam
        sign = torch.where(low, 1.0, -1.0)
        p = torch.where(low, ya, yb)
        tau = torch.where(low, t, 1.0 - t)
        mu = torch.where(low, lam, lam1)
        rho = torch.where(low, 1.0, wb.reciprocal())  # d r / d w_c
        r = wc * rho
        r1 = r - 1.0
        q = yc - p
        iden = torch.addcmul(mu, r1, tau).reciprocal_()
        phi = r * tau * iden
        e = (iden * iden).mul_(q)
        er = e * r
        iq = q.reciprocal()
        # (2, ..., d): d(y, L) / d(p, y_c, tau, r, mu), then to (Y_b, Y_{b+1}, t, w_c, w_b, lambda)
        a_yc = torch.stack([phi, iq])
        a_p = torch.stack([1.0 - phi, -iq])
        a_t = torch.stack([er * mu, -2.0 * r1 * iden]).mul_(sign)
        a_r = torch.stack([e * tau * (mu - tau), r.reciprocal().sub_(2.0 * tau * iden)])
        a_lam = torch.stack([-er * tau, mu.reciprocal().sub_(2.0 * iden)]).mul_(sign)
        # back through y_c, w_c (r = w_c rho), w_b (rho and y_c, w_c); L = log(dy/dt) - log w
        ayc = a_yc * idc
        awc = a_r * (rho * idelta)  # d / d(lambda d0 + (1 - lambda) w_b d1)
        a_ya = torch.addcmul(a_p * low, ayc, lam1)
        a_yb = torch.addcmul(a_p * ~low, ayc, lwb)
        a_wb = torch.addcmul(a_r * torch.where(low, 0.0, -r * rho), ayc, lam * (yb - yc)).addcmul_(awc, lam1 * d1)
        a_lam = a_lam.addcmul_(ayc, torch.addcmul(yc - ya, wb, yb - yc)).addcmul_(awc, d0 - wb * d1)
        a_delta = awc * -wc
        hw = 0.5 * wb
        a_d0 = torch.addcmul(awc * lam, a_wb, hw / d0)
        a_d1 = torch.addcmul(awc * lwd, a_wb, -hw / d1)
        a_w = torch.stack([torch.zeros_like(iw), -iw])
    elif order == "quadratic":
        u = t * (1.0 - t)
        one_2t = 1.0 - 2.0 * t
        cc = d0 + d1 - 2.0 * delta
        den = delta + cc * u
        p = delta * t ** 2 + d0 * u
        q = d1 * t ** 2 + 2.0 * delta * u + d0 * (1.0 - t) ** 2
        hd = (yb - ya) / den ** 2
        zero = torch.zeros_like(t)
        a_t = torch.stack([hd * ((2.0 * delta * t + d0 * one_2t) * den - p * cc * one_2t),
                           (2.0 * d1 * t + 2.0 * delta * one_2t - 2.0 * d0 * (1.0 - t)) / q - 2.0 * cc * one_2t / den])
        a_yb = torch.stack([p / den, zero])  # y = Y_b + (Y_{b+1} - Y_b) p / den
        a_ya = torch.stack([1.0 - p / den, zero])
        a_delta = torch.stack([hd * (t ** 2 * den - p * (1.0 - 2.0 * u)),
                               2.0 / delta + 2.0 * u / q - 2.0 * (1.0 - 2.0 * u) / den])
        a_d0 = torch.stack([hd * u * (den - p), (1.0 - t) ** 2 / q - 2.0 * u / den])
        a_d1 = torch.stack([-hd * p * u, t ** 2 / q - 2.0 * u / den])
        a_w, a_lam = torch.stack([zero, zero]), None
    else:  # pragma: no cover - Pyro accepts only these two
        raise ConfigError(f"unknown spline order {order!r}")
    # back through delta = (Y_{b+1} - Y_b) / w, t = (x - X_b) / w, w = X_{b+1} - X_b
    a_h = a_delta * iw
    a_x = a_t * iw  # (2, ...): dy/dx, dL/dx
    a_w = a_w - a_h * delta - a_x * t  # = the partial with respect to X_{b+1}
    # to the raw outputs: widths and heights (softmax, then cumsum), as
    # 2B (1 - K min) s_l (left-knot adjoint [l < b] + right-knot adjoint [l <= b] - shift)
    scale = (2.0 * bound) * (1.0 - mins * k_)  # dX_k / d(cumulative fraction)
    inside_ = inside.to(x.dtype).unsqueeze(-2)  # (..., 1, d)
    lo = torch.stack([-(a_x + a_w), a_ya - a_h], dim=-2).mul_(inside_ * scale).unsqueeze(-2)  # (2, ..., 2, 1, d)
    hi = torch.stack([a_w, a_yb + a_h], dim=-2).mul_(inside_ * scale).unsqueeze(-2)  # X_b, Y_b; X_{b+1}, Y_{b+1}
    shift = lo * cab[..., :1, :] + hi * cab[..., 1:, :]
    bins = torch.arange(k_, device=x.device).unsqueeze(-1)  # (K, 1)
    below = torch.lt(bins, b, out=work("below", lead + (k_, d_), torch.bool)).unsqueeze(-3)  # (..., 1, K, d)
    upto = torch.le(bins, b, out=work("upto", lead + (k_, d_), torch.bool)).unsqueeze(-3)
    grads = theta.new_empty((2,) + lead + (m, d_)) if out is None else out
    # (lo * below + ... with both operands broadcast ran 10x slower than addcmul onto the small shift)
    torch.addcmul(shift.neg_(), lo, below, out=grads[..., :2 * k_, :].unflatten(-2, (2, k_))).addcmul_(
        hi, upto).mul_(s)
    # slopes (raw k sets interior knot k + 1) and lambdas: one entry each, added where it sits
    grads[..., 2 * k_:, :] = 0.0
    pos = [ends + (2 * k_ - 1)]
    val = [torch.stack([a_d0, a_d1], dim=-2) * torch.where(fixed, 0.0, torch.where(d_raw > 20.0, 1.0, torch.sigmoid(
        d_raw)) * inside_)]
    if a_lam is not None:
        pos.append(b + (3 * k_ - 1))
        val.append((a_lam * ((1.0 - 2.0 * c["min_lambda"]) * sig_l * (1.0 - sig_l) * inside)).unsqueeze(-2))
    pos = torch.cat(pos, dim=-2).clamp_(max=m - 1)  # (a clamped entry adds 0)
    grads.scatter_add_(-2, pos.expand((2,) + pos.shape), torch.cat(val, dim=-2))
    return torch.where(inside, a_x[0], 1.0), a_x[1] * inside, grads


#: The stl/dreg score of spline layers contracts every coordinate's MADE-output partials at once while there
#: are at most this many draws; with more, one coordinate at a time through one reused buffer: with 1024 draws
#: (dreg, K = 8) the batched product's (L, n, H, draws) output (5 MB) cost more in fresh memory than in
#: arithmetic (page faults), while with 128 (stl) the 16 small products cost more in calls.
_SPLINE_BATCH_DRAWS = 512


_OUT_PREFIX: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _out_prefix(module) -> list:
    """Per coordinate ``i`` of a one-hidden-layer autoregressive layer, how many hidden units its MADE outputs
    read: 1 + the last column of ``W_out``'s mask that is set in any of ``i``'s rows (the masked weights after
    it are zero). Pyro's MADE orders its hidden units by degree, so the coordinate at place ``p`` of the
    order reads a prefix of about ``(p + 1) H / n`` units: products over the prefix do half the work."""
    if module not in _OUT_PREFIX:
        out_mask = module.nn.layers[1].mask  # (m n, H): output p n + i is coordinate i's parameter p
        mask = out_mask.reshape(-1, module.nn.input_dim, out_mask.shape[-1]).ne(0).any(0)  # (n, H)
        cols = torch.arange(1, mask.shape[-1] + 1, device=mask.device)
        _OUT_PREFIX[module] = (mask * cols).amax(-1).tolist()
    return _OUT_PREFIX[module]


def _spline_simple(modules) -> bool:
    """True for spline layers whose MADE has one hidden layer and no skip connections, all of one shape."""
    return (_made_simple(modules) and all(isinstance(m, ConditionalSplineAutoregressive) for m in modules)
            and len({_spline_info(m) for m in modules}) == 1)


def _spline_jacobians(modules, ctx: torch.Tensor, xs, pres=None, outs=None) -> tuple:
    """``(dy/dx (L, ..., n, n), grad_x log|det J| (L, ..., n))`` of L spline layers (:func:`_spline_simple`) at
    ``xs``, batched over layers (each op once per step, not once per layer).

    Layer l is ``y_i = g(x_i; theta_i)`` with ``theta = MADE_l(x, ctx)``, one hidden layer: ``dy/dx =
    diag(dg/dx) + (dg/dtheta) W_out diag(f'(a)) W_1x``, and ``grad log|det J|`` the same with
    ``log g'``'s partials (:func:`_spline_partials`). Everything per draw runs with the draws on
    the last dim (long contiguous rows), in the MADE's own output order: ``theta (L, m, n, draws)``
    (parameter-major), so the partials of every coordinate run as one row of ``n draws`` and the
    ``log g'`` partials contract with ``W_out`` in one product; the ``g`` partials contract per
    coordinate (one batched product, or a loop over coordinates for many draws:
    :data:`_SPLINE_BATCH_DRAWS`). ``pres[l]``, ``outs[l]``: the MADE's first-layer output and output
    at ``xs[l]`` as the sampler computed them, or None (recomputed).
    """
    n, c = xs[0].shape[-1], ctx.shape[-1]
    arns = [m.nn for m in modules]
    x = _stack(list(xs))  # (L, ..., n)
    lead = x.shape[1:-1]
    w1, a, owned = _made_first(arns, ctx, x, pres)
    n_layers, hidden = w1.shape[0], w1.shape[1]
    a = a.reshape(n_layers, -1, hidden)  # (L, draws, H)
    draws = a.shape[1]
    w_out = _masked(arns, 1)  # (L, m n, H): output p n + i is coordinate i's parameter p
    m = w_out.shape[1] // n
    theta = _scratch(modules[0], "theta", (n_layers, m * n, draws), a)  # (L, m n, draws)
    if outs is not None and all(o is not None and o.numel() == draws * m * n for o in outs):  # the sampler's
        for k, o in enumerate(outs):  # (a transposing copy: 5x cheaper than forming them again)
            theta[k].copy_(o.reshape(draws, m * n).t())
    else:
        torch.baddbmm(_stack([arn.layers[1].bias for arn in arns]).unsqueeze(-1), w_out, arns[0].f(a).transpose(1, 2),
                      out=theta)
    xt = x.reshape(n_layers, draws, n).transpose(1, 2).reshape(n_layers, n * draws)  # (L, n draws)
    dy_dx, dld_dx, grads = _spline_partials(theta.view(n_layers, m, n * draws), xt, *_spline_info(modules[0]),
                                            out=_scratch(modules[0], "partials", (2, n_layers, m, n * draws), a),
                                            owner=modules[0])
    slope = _slope(arns[0].f, a, inplace=owned).transpose(1, 2).contiguous()  # (L, H, draws)
    tangent_t = w1[..., c:].transpose(1, 2)  # (L, n, H): d a / d x, transposed
    w_cm_t = w_out.view(n_layers, m, n, hidden).permute(0, 2, 3, 1).contiguous()  # (L, n, H, m): per coordinate
    gy = grads[0].view(n_layers, m, n, draws)
    if draws <= _SPLINE_BATCH_DRAWS:  # all coordinates in one batched product
        cy = torch.matmul(w_cm_t, gy.transpose(1, 2)).mul_(slope.unsqueeze(1))  # (L, n, H, draws)
        jac = torch.matmul(tangent_t.unsqueeze(1), cy)  # (L, n_i, n_j, draws): d y_i / d x_j through the MADE
        v = torch.bmm(w_out.transpose(1, 2), grads[1].view(n_layers, m * n, draws))  # (L, H, draws)
    else:  # one coordinate at a time, through one (H, draws) buffer, over the hidden units it reads
        jac, cy = dy_dx.new_empty(n_layers, n, n, draws), dy_dx.new_empty(hidden, draws)
        v, gl = dy_dx.new_zeros(n_layers, hidden, draws), grads[1].view(n_layers, m, n, draws)
        for k in range(n_layers):
            for i, h in enumerate(_out_prefix(modules[k])):
                torch.mm(w_cm_t[k, i, :h], gy[k, :, i], out=cy[:h]).mul_(slope[k, :h])
                torch.mm(tangent_t[k, :, :h], cy[:h], out=jac[k, i])
                v[k, :h].addmm_(w_cm_t[k, i, :h], gl[k, :, i])
    jac.diagonal(dim1=1, dim2=2).add_(dy_dx.view(n_layers, n, draws).transpose(1, 2))  # (a (L, draws, n) view)
    grad_ld = torch.baddbmm(dld_dx.view(n_layers, n, draws), tangent_t, v.mul_(slope))  # (L, n, draws)
    return (jac.permute(0, 3, 1, 2).reshape((n_layers,) + lead + (n, n)),
            grad_ld.transpose(1, 2).reshape((n_layers,) + lead + (n,)))


# --------------------------------------------------------------------------- head


def flow_options(*, flow="iaf", depth=4, flow_hidden=None, count_bins=8, bound=3.0) -> dict:
    """The flow head's options, validated (shared by :class:`Flow` and ``Auto(family="flow")``)."""
    flow = lookup({f: f for f in FLOWS}, flow, "flow")
    check_positive("depth", depth, integer=True)
    check_positive("count_bins", count_bins, integer=True)
    if count_bins < 2:
        raise ConfigError(f"count_bins must be >= 2, got {count_bins}")
    check_positive("bound", bound)
    return {"flow": flow, "depth": depth, "flow_hidden": None if flow_hidden is None else as_widths(
        flow_hidden, "flow_hidden"), "count_bins": count_bins, "bound": float(bound)}


class FlowHead(nn.Module):
    """``h (..., H)`` -> diagonal Gaussian over ``R^n`` pushed through ``depth`` conditional transforms of kind ``flow``."""

    #: ``stl``/``dreg`` start with the plain gradient on this head (:func:`pyrovi.objectives.flow_warm_start`)
    stop_gradient_warm_start = True

    def __init__(self, context_dim: int, dim: int, *, flow: str = "iaf", depth: int = 4, flow_hidden=None,
                 count_bins: int = 8, bound: float = 3.0, min_scale: float = 1e-4):
        super().__init__()
        self.dim, self.min_scale = dim, float(min_scale)
        self.base = nn.Linear(context_dim, 2 * dim)
        hidden = list(flow_hidden) if flow_hidden else [max(32, 10 * dim)]
        layers = []
        for k in range(depth):
            # Fixed alternating orders (identity, reversed): deterministic, so rebuilt guides match checkpoints.
            perm = torch.arange(dim) if k % 2 == 0 else torch.arange(dim - 1, -1, -1)
            ar_hidden = [max(h, dim) for h in hidden]  # MADE needs hidden widths >= n
            with warnings.catch_warnings():  # n = 1 is fine (the layer is an affine map of the context)
                warnings.filterwarnings("ignore", message="ConditionalAutoRegressiveNN input_dim = 1")
                if flow == "iaf":
                    arn = ConditionalAutoRegressiveNN(dim, context_dim, ar_hidden, permutation=perm)
                    layers.append(ConditionalAffineAutoregressive(arn))
                elif flow == "spline":
                    arn = ConditionalAutoRegressiveNN(dim, context_dim, ar_hidden, permutation=perm,
                                                      param_dims=[count_bins, count_bins, count_bins - 1, count_bins])
                    layers.append(ConditionalSplineAutoregressive(dim, arn, count_bins=count_bins, bound=bound))
                elif flow == "planar":
                    layers.append(_ConditionalPlanar(DenseNN(context_dim, hidden, param_dims=[1, dim, dim])))
                elif flow == "radial":
                    layers.append(_ConditionalRadial(DenseNN(context_dim, hidden, param_dims=[dim, 1, 1])))
                else:  # pragma: no cover - validated by Flow
                    raise ConfigError(f"unknown flow {flow!r}")
        self.transforms = nn.ModuleList(layers)

    def q(self, h: torch.Tensor, *, validate_args=False):
        """q alone (no stop-gradient score), batch ``h.shape[:-1]``, event ``(n,)``.

        The base Gaussian is not argument-checked by default: its scale is ``softplus(.) + min_scale``.
        """
        return self._q(h, validate_args)[0]

    def _q(self, h: torch.Tensor, validate_args=None) -> tuple:
        loc, raw = self.base(h).chunk(2, dim=-1)  # (..., n) each
        scale = F.softplus(raw) + self.min_scale
        base = dist.Normal(loc, scale, validate_args=validate_args).to_event(1)
        transforms = [t.condition(h) for t in self.transforms]
        q = FlowDistribution(base, transforms, validate_args=validate_args)
        q._score = partial(DetachedFlowScore, self, h, loc, scale, q.draw, q.batch_shape, q.event_shape)
        return q, loc, scale

    def forward(self, h: torch.Tensor) -> tuple:
        """``(q, q_stop_gradient)`` with batch ``h.shape[:-1]`` and event ``(n,)``.

        ``q_stop_gradient`` (:class:`DetachedFlowScore`) scores q's own draw from what q's sampler recorded.
        """
        q = self._q(h)[0]
        return q, q.stop_gradient()

    pair = forward


class Flow(Amortized):
    """q(z|x): a diagonal Gaussian pushed through ``depth`` conditional ``flow`` transforms, per latent site.

    The encoder body ``D -> hidden`` gives ``h``; per site, a linear layer gives
    the base ``(loc, scale)`` and the transforms take ``h`` as context.
    Reparameterized, usable under vectorized particles; ``log q`` by change of
    variables; KL by Monte Carlo.

    Args:
        model: the model served (pyrovi model, or any Pyro model with ``example=``).
        flow: ``"iaf"`` (default), ``"spline"``, ``"planar"`` or ``"radial"``.
        depth: number of transforms K >= 1.
        flow_hidden: hidden widths of each transform's network (default ``[max(32, 10 n)]``).
        count_bins: spline segments (``flow="spline"``).
        bound: splines act on the box ``[-bound, bound]`` (``flow="spline"``).
        hidden: encoder hidden widths, an int or a sequence (see :class:`~pyrovi.guides.amortized.Amortized`).
        activation: encoder activation.
        example: example inputs to trace a user's model with (optional: without it, the first call
            or :meth:`~pyrovi.guides.amortized.Amortized.setup` traces it).
        data_plate: name of the plate over datapoints.
        min_scale: lower bound on the base sigma.
    """

    def __init__(self, model, *, flow: str = "iaf", depth: int = 4, flow_hidden=None, count_bins: int = 8,
                 bound: float = 3.0, hidden=(256,), activation: str = "relu", min_scale: float = 1e-4,
                 example=None, data_plate: str = "data"):
        o = flow_options(flow=flow, depth=depth, flow_hidden=flow_hidden, count_bins=count_bins, bound=bound)
        self.flow, self.depth, self.flow_hidden, self.count_bins, self.bound = (
            o["flow"], o["depth"], o["flow_hidden"], o["count_bins"], o["bound"])
        super().__init__(model, hidden=hidden, activation=activation, min_scale=min_scale, example=example,
                         data_plate=data_plate)

    def _head(self, context_dim: int, shape: tuple) -> FlowHead:
        return FlowHead(context_dim, math.prod(shape), flow=self.flow, depth=self.depth, flow_hidden=self.flow_hidden,
                        count_bins=self.count_bins, bound=self.bound, min_scale=self.min_scale)

    def config(self) -> dict:
        """JSON-able options (the model is supplied when rebuilding)."""
        d = {"name": "flow", "flow": self.flow, "depth": self.depth, "count_bins": self.count_bins,
             "bound": self.bound, "min_scale": self.min_scale, **self._base_config()}
        if self.flow_hidden is not None:
            d["flow_hidden"] = list(self.flow_hidden)
        return d
