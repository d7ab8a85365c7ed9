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
    each autoregressive layer's MADE first-layer output (its hidden pre-activation; None for the others).

    Shared by a flow's q, its expanded copies (Pyro's particle plate expands q before drawing)
    and its stop-gradient score, so the score reads the very values the sampler computed.
    """

    __slots__ = ("us", "log_q", "log_scales", "pre")

    def __init__(self):
        self.us, self.log_q, self.log_scales, self.pre = None, None, None, None


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
        us, lds, pre = [x], [], []
        for t in self.transforms:
            # the score's backward reads it; without gradients (evaluation) nothing will, so it is not kept
            first = _made_first_layer(t) if torch.is_grad_enabled() else None
            seen = []
            hook = None if first is None else first.register_forward_hook(lambda m, i, out: seen.append(out))
            try:
                y = t(x)  # Transform.__call__: Pyro caches (x, y) and this layer's log|det J|
            finally:
                if hook is not None:
                    hook.remove()
            pre.append(seen[-1].detach() if seen else None)
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
        self.draw.pre = pre
        return x


def _detached_or_none(t):
    return None if t is None else t.detach()


def _made_first_layer(t):
    """The first masked layer of a conditioned autoregressive layer's MADE (its output: the hidden
    pre-activation the stl/dreg score reads), else None."""
    arn = getattr(t, "arn", None)  # Pyro's conditioned iaf/spline: partial(ConditionalAutoRegressiveNN, context)
    made = getattr(arn, "func", None)
    return made.layers[0] if isinstance(made, ConditionalAutoRegressiveNN) else None


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
    form from the MADE's masked weights and the sampler's recorded first-layer output
    (:func:`_iaf_jacobians`, :func:`_autoregressive_jacobian`) and solved with
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


def _made_params(arn, h: torch.Tensor) -> tuple:
    """Split a MADE's last-layer output ``(..., m n)`` into its parameters, as the MADE's own forward does."""
    if arn.output_multiplier == 1:
        return h
    h = h.reshape(h.shape[:-1] + (arn.output_multiplier, arn.input_dim))
    if arn.count_params == 1:
        return h
    if arn.all_ones:
        return torch.unbind(h, dim=-2)
    return tuple(h[..., sl, :] for sl in arn.param_slices)


def _slope(f, a: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``f'(a)`` of the MADE's elementwise nonlinearity ``f`` (``inplace``: ``a`` may be overwritten)."""
    if isinstance(f, nn.ReLU):  # 1 where a > 0, else 0 (as ReLU's backward); 3x faster than (a > 0).to()
        return a.relu_().sign_() if inplace else torch.relu(a).sign_()
    with torch.enable_grad():
        a_ = a.detach().requires_grad_(True)
        return torch.autograd.grad(f(a_).sum(), a_)[0]


def _iaf_simple(modules) -> bool:
    """True for iaf layers whose MADE has one hidden layer and no skip connections, all of one shape."""
    if not modules or any(_ar_info(m) is None or _ar_info(m)[0] is None or len(m.nn.layers) != 2
                          or m.nn.skip_layer is not None for m in modules):
        return False
    shapes = {(tuple(m.nn.layers[0].weight.shape), tuple(m.nn.layers[1].weight.shape), type(m.nn.f)) for m in modules}
    return len(shapes) == 1 and len({_ar_info(m)[0] for m in modules}) == 1


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

    def stack(ts):  # one layer: a view, no copy
        return ts[0].unsqueeze(0) if len(ts) == 1 else torch.stack(ts)

    def bmm(p, q, add=None):  # one layer: a plain matrix product (25% faster than bmm on tall-skinny p)
        if p.shape[0] == 1:
            return (p[0] @ q[0] if add is None else torch.addmm(add[0], p[0], q[0])).unsqueeze(0)
        return p @ q if add is None else torch.baddbmm(add, p, q)

    w1 = stack([a.layers[0].weight for a in arns]) * stack([a.layers[0].mask for a in arns])  # (L, H, c + n)
    w_out = stack([a.layers[1].weight for a in arns]) * stack([a.layers[1].mask for a in arns])  # (L, 2n, H)
    n_layers, hidden = w1.shape[0], w1.shape[1]
    x = stack(list(xs))  # (L, ..., n)
    lead = x.shape[1:-1]
    tangent = w1[..., c:]  # (L, H, n): d a / d x
    if pres is not None and all(p is not None for p in pres):  # the sampler's own
        a, owned = stack(list(pres)), n_layers > 1  # (a stacked copy may be overwritten)
    else:
        share = bmm(ctx.reshape(1, -1, c).expand(n_layers, -1, c), w1[..., :c].transpose(1, 2),
                    stack([a.layers[0].bias for a in arns]).unsqueeze(1))
        share = share.reshape((n_layers,) + (1,) * (len(lead) + 1 - ctx.dim()) + ctx.shape[:-1] + (hidden,))
        a = bmm(x.reshape(n_layers, -1, n), tangent.transpose(1, 2)).reshape((n_layers,) + lead + (hidden,))
        a, owned = a.add_(share) if torch.broadcast_shapes(a.shape, share.shape) == a.shape else a + share, True
    if any(s is None for s in log_scales):  # the MADE's output layer, as the sampler ran it
        theta_s = bmm(arns[0].f(a).reshape(n_layers, -1, hidden), w_out[:, n:].transpose(1, 2),
                      stack([a_.layers[1].bias[n:] for a_ in arns]).unsqueeze(1))
        clip = _ar_info(modules[0])[0]
        log_s = clamp_preserve_gradients(theta_s, *clip).reshape(x.shape)
        log_s = stack([log_s[i] if s is None else s for i, s in enumerate(log_scales)])
    else:
        log_s = stack(list(log_scales))
    slope = _slope(arns[0].f, a, inplace=owned).reshape(n_layers, -1, hidden)  # (a is not read again)
    rows, cols, flat = (stack(t) for t in zip(*(_ar_pairs(m, x.device) for m in modules)))  # (L, k)
    k = rows.shape[-1]
    outer = w_out.transpose(1, 2).unsqueeze(-1) * tangent.unsqueeze(2)  # (L, H, 2n, n): d theta_p/dx_j via unit h
    picked = outer.reshape(n_layers, hidden, -1).gather(2, torch.cat([flat, flat + n * n], 1).unsqueeze(1).expand(
        -1, hidden, -1))  # (L, H, 2k): (mu, s) of each connected pair
    prod = bmm(slope, torch.cat([picked, outer[:, :, n:].sum(2)], dim=2))  # (L, draws, 2k + n)
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
    closed form for the iaf (``y = exp(s) x + m``) and from two reverse passes over the
    layer's own map otherwise (spline); the context's share of the first layer is computed
    once per context row, not per particle. An iaf layer's ``log_scale`` (clamped ``s``), when
    given (the sampler's), spares the MADE's output layer; ``pre``, its first layer's output
    (the sampler's), the first layer.
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
    else:
        t = module.condition(ctx)
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(True)
            theta_ = theta.detach().requires_grad_(True)
            params = _made_params(arn, theta_)
            given = lambda _: params  # noqa: E731 - the MADE's output, given
            if hasattr(t, "spline"):  # a spline layer reads its MADE through its spline's own reference
                t.spline.nn = given
            else:
                t.arn = given
            y = t(x_)  # Transform.__call__ caches (x, y): log_abs_det_jacobian then reads the cached value
            ld = t.log_abs_det_jacobian(x_, y)
            dy_dx, gy = torch.autograd.grad(y.sum(), [x_, theta_], retain_graph=True, allow_unused=True)
            dld_dx, gl = torch.autograd.grad(ld.sum(), [x_, theta_], allow_unused=True)
        gy = torch.zeros_like(theta) if gy is None else gy
        gy = gy.reshape(gy.shape[:-1] + (m, n))
        gl = torch.zeros_like(theta) if gl is None else gl
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
