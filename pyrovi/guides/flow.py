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
inverse). The ``stl``/``dreg`` objectives score z under a stop-gradient twin
of the flow (the same transforms with detached weights), which must invert the
flow: Pyro inverts the autoregressive layers; planar and radial layers have no
inverse in Pyro, so this module adds one (:class:`InvertiblePlanar`: a 1-D
root find for :math:`w^\\top x`, then one differentiable Newton step so the
gradient is the implicit-function one; :class:`InvertibleRadial`: closed form).
"""

from __future__ import annotations

import math
import warnings
from functools import partial

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.transforms import (
    ConditionalAffineAutoregressive,
    ConditionalPlanar,
    ConditionalRadial,
    ConditionalSplineAutoregressive,
)
from pyro.distributions.transforms.planar import ConditionedPlanar
from pyro.distributions.transforms.radial import ConditionedRadial
from pyro.nn import ConditionalAutoRegressiveNN, DenseNN
from torch import nn

from ..errors import ConfigError, check_positive, lookup
from ..nets import as_widths
from .amortized import Amortized

__all__ = ["FLOWS", "Flow", "FlowHead", "flow_options", "InvertiblePlanar", "InvertibleRadial"]

FLOWS = ("iaf", "spline", "planar", "radial")


# --------------------------------------------------------------------------- inverses Pyro lacks


class InvertiblePlanar(ConditionedPlanar):
    """Pyro's conditioned planar transform plus an inverse (for scoring arbitrary z)."""

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


# --------------------------------------------------------------------------- stop-gradient twins


class _Detached:
    """Call ``module`` with detached copies of its parameters (``torch.func.functional_call``).

    Not an ``nn.Module`` on purpose: a twin transform holding it registers no
    parameters, and it always reads the live module (after ``.to()``, loads, steps).
    """

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        params = {k: v.detach() for k, v in self.module.named_parameters()}
        return torch.func.functional_call(self.module, params, args, kwargs)

    def __getattr__(self, name):  # permutation, get_permutation, ... of autoregressive nets
        # Only called for names not found normally. copy/pickle build an empty instance and ask it for
        # __setstate__, __deepcopy__, ... before "module" is set: those must be AttributeErrors (not
        # KeyErrors) for copy.deepcopy, pickle and spawn-based launchers to work.
        module = self.__dict__.get("module")
        if module is None or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(module, name)


def _twin(t: nn.Module) -> nn.Module:
    """The same conditional transform, evaluated with detached weights."""
    if isinstance(t, _ConditionalPlanar):
        return _ConditionalPlanar(_Detached(t.nn))
    if isinstance(t, _ConditionalRadial):
        return _ConditionalRadial(_Detached(t.nn))
    if isinstance(t, ConditionalAffineAutoregressive):
        return ConditionalAffineAutoregressive(_Detached(t.nn), **t.kwargs)
    if isinstance(t, ConditionalSplineAutoregressive):
        return ConditionalSplineAutoregressive(t.input_dim, _Detached(t.nn), **t.kwargs)
    raise ConfigError(f"no stop-gradient twin for {type(t).__name__}")  # pragma: no cover - internal


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
        self._twins = [_twin(t) for t in layers]  # a plain list: the twins own no parameters

    def q(self, h: torch.Tensor, *, validate_args=False):
        """q alone (no stop-gradient twin), batch ``h.shape[:-1]``, event ``(n,)``.

        The base Gaussian is not argument-checked by default: its scale is ``softplus(.) + min_scale``.
        """
        return self._q(h, validate_args)[0]

    def _q(self, h: torch.Tensor, validate_args=None) -> tuple:
        loc, raw = self.base(h).chunk(2, dim=-1)  # (..., n) each
        scale = F.softplus(raw) + self.min_scale
        base = dist.Normal(loc, scale, validate_args=validate_args).to_event(1)
        transforms = [t.condition(h) for t in self.transforms]
        return dist.TransformedDistribution(base, transforms, validate_args=validate_args), loc, scale

    def forward(self, h: torch.Tensor) -> tuple:
        """``(q, q_stop_gradient)`` with batch ``h.shape[:-1]`` and event ``(n,)``."""
        q, loc, scale = self._q(h)
        hd = h.detach()
        base_sg = dist.Normal(loc.detach(), scale.detach()).to_event(1)
        q_sg = dist.TransformedDistribution(base_sg, [t.condition(hd) for t in self._twins])
        return q, q_sg

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
