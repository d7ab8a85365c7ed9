"""The spline layer's closed-form partials, against autograd of Pyro's own spline (issue 17, item 1).

The stl/dreg score of a ``Flow(flow="spline")`` guide needs, per draw and coordinate, the
partials of Pyro's rational spline ``y = g(x; theta)`` and of ``log g'`` with respect to ``x``
and to every raw MADE output ``theta`` (through softmax widths/heights, softplus slopes,
sigmoid lambdas). ``pyrovi.guides.flow._spline_partials`` writes them by hand (autograd cost
~70% of the score); here they are checked in float64 against
``torch.autograd.functional.jacobian`` of Pyro's ``_monotonic_rational_spline`` (inside the
box, in the identity tails outside ``[-B, B]``, both spline orders Pyro offers, 2 and 8 bins),
and the whole layer's Jacobian from ``_spline_jacobians`` (the score's batched path, with and
without a context row per draw, both of its contraction paths) against autograd of the
layer's forward map.
"""

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro.distributions.transforms import ConditionalSplineAutoregressive
from pyro.distributions.transforms.spline import _monotonic_rational_spline
from pyro.nn import ConditionalAutoRegressiveNN

from pyrovi.guides import flow as flow_module
from pyrovi.guides.flow import _solve_transposed, _spline_jacobians, _spline_partials, _spline_simple

pytestmark = pytest.mark.usefixtures("one_thread")

BOUND = 2.5


def _pyro_spline(theta, x, bins, order):
    """Pyro's spline of each x with its raw outputs ``theta (..., m)``, parameterised as Pyro's
    ``ConditionalSpline._params`` does: ``(y, log dy/dx)``."""
    w = F.softmax(theta[..., :bins], dim=-1)
    h = F.softmax(theta[..., bins:2 * bins], dim=-1)
    d = F.softplus(theta[..., 2 * bins:3 * bins - 1])
    lam = torch.sigmoid(theta[..., 3 * bins - 1:]) if order == "linear" else None
    return _monotonic_rational_spline(x, w, h, d, lam, bound=BOUND)


@pytest.mark.parametrize("order", ["linear", "quadratic"])
@pytest.mark.parametrize("bins", [2, 8])
def test_partials_match_autograd_of_pyros_spline(order, bins):
    torch.manual_seed(bins)
    m = 4 * bins - 1 if order == "linear" else 3 * bins - 1
    points = 48
    theta = 2.0 * torch.randn(points, m, dtype=torch.float64)  # raw outputs far from uniform bins
    theta[:4, 2 * bins:3 * bins - 1] = 20.1  # softplus just above its threshold: there torch's slope is 1
    x = torch.empty(points, dtype=torch.float64).uniform_(-1.4 * BOUND, 1.4 * BOUND)  # a quarter in the tails
    x[4:8] = torch.tensor([-BOUND, BOUND, -1.2 * BOUND, 1.3 * BOUND], dtype=torch.float64)
    inside = x.abs() <= BOUND
    assert 8 < int(inside.sum()) < points - 4

    dy_dx, dl_dx, grads = _spline_partials(theta.T, x, bins, BOUND, order)  # bins on dim -2, points last
    assert dy_dx.shape == dl_dx.shape == (points,) and grads.shape == (2, m, points)

    def y_and_log_slope(th, v):
        y, log_slope = _pyro_spline(th, v, bins, order)
        return y, log_slope

    (y_th, y_x), (l_th, l_x) = torch.autograd.functional.jacobian(y_and_log_slope, (theta, x))
    # every point reads only its own theta and x: the Jacobians are block-diagonal over points
    idx = torch.arange(points)
    for full in (y_th, l_th):
        off = full.clone()
        off[idx, idx] = 0.0
        assert off.abs().max() == 0.0
    opts = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dy_dx, y_x[idx, idx], **opts)
    torch.testing.assert_close(dl_dx, l_x[idx, idx], **opts)
    torch.testing.assert_close(grads[0].T, y_th[idx, idx], **opts)
    torch.testing.assert_close(grads[1].T, l_th[idx, idx], **opts)
    # the identity outside the box
    assert torch.all(dy_dx[~inside] == 1.0) and torch.all(dl_dx[~inside] == 0.0)
    assert torch.all(grads[:, :, ~inside] == 0.0)


def _layers(n, hidden, bins, order, context):
    dims = [bins, bins, bins - 1, bins] if order == "linear" else [bins, bins, bins - 1]
    out = []
    for k in range(2):  # identity and reversed variable orders, as FlowHead alternates them
        perm = torch.arange(n) if k == 0 else torch.arange(n - 1, -1, -1)
        arn = ConditionalAutoRegressiveNN(n, context, [hidden], param_dims=dims, permutation=perm)
        layer = ConditionalSplineAutoregressive(n, arn, count_bins=bins, bound=BOUND, order=order)
        with torch.no_grad():  # weights large enough that the map is far from the identity
            for p in layer.parameters():
                p.mul_(3.0)
        out.append(layer.double())
    return out


@pytest.mark.parametrize("order,bins,per_draw_context,batched", [
    ("linear", 8, False, True),
    ("linear", 2, True, False),
    ("quadratic", 8, True, True),
    ("quadratic", 2, False, False),
])
def test_layer_jacobians_match_autograd(order, bins, per_draw_context, batched, monkeypatch):
    """``_spline_jacobians``: every layer's ``dy/dx`` and ``grad_x log|det J|`` at once, as autograd gives them
    from the layer's forward map (Pyro's), with the MADE's first-layer output and output as the sampler
    recorded them or recomputed; and the transposed solve the score makes with them."""
    pyro.set_rng_seed(bins)
    n, context = 4, 5
    monkeypatch.setattr(flow_module, "_SPLINE_BATCH_DRAWS", 10 ** 6 if batched else 0)
    if bins == 2:  # scratch buffers allocated per call, as for a batch too large to hold them between steps
        monkeypatch.setattr(flow_module, "_SCRATCH_MAX_BYTES", 0)
    layers = _layers(n, 12, bins, order, context)
    assert _spline_simple(layers)
    ctx = torch.randn((2, 3, context) if per_draw_context else (3, context), dtype=torch.float64)
    xs = [1.6 * torch.randn(2, 3, n, dtype=torch.float64) for _ in layers]  # 2 particles of 3 datapoints
    pres = [layer.nn.layers[0](torch.cat([ctx.expand(x.shape[:-1] + (context,)), x], dim=-1)).detach()
            for layer, x in zip(layers, xs)]
    outs = [layer.nn.layers[1](layer.nn.f(a)).detach() for layer, a in zip(layers, pres)]  # the MADE's outputs
    with torch.no_grad():
        jacs, grad_lds = _spline_jacobians(layers, ctx, xs, pres, outs)
        jacs2, grad_lds2 = _spline_jacobians(layers, ctx, xs)
    assert jacs.shape == (2, 2, 3, n, n) and grad_lds.shape == (2, 2, 3, n)
    torch.testing.assert_close(jacs2, jacs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_lds2, grad_lds, rtol=1e-12, atol=1e-12)
    assert any((x.abs() > BOUND).any() for x in xs)  # some coordinates in the identity tails
    g = torch.randn(2, 3, n, dtype=torch.float64)
    for k, (layer, x) in enumerate(zip(layers, xs)):
        solved = _solve_transposed(layer, jacs[k], g - grad_lds[k])
        for s in range(2):
            for b in range(3):
                t = layer.condition(ctx[s, b] if per_draw_context else ctx[b])
                ref = torch.autograd.functional.jacobian(t, x[s, b])
                ref_ld = torch.autograd.functional.jacobian(lambda v: t.log_abs_det_jacobian(v, t(v)), x[s, b])
                torch.testing.assert_close(jacs[k, s, b], ref, rtol=1e-10, atol=1e-10)
                torch.testing.assert_close(grad_lds[k, s, b], ref_ld, rtol=1e-10, atol=1e-10)
                torch.testing.assert_close(solved[s, b], torch.linalg.solve(ref.T, g[s, b] - ref_ld),
                                           rtol=1e-9, atol=1e-9)
