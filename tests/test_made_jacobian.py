"""The closed-form Jacobian of a conditional autoregressive flow layer, against autograd (issue 17, item 1).

The stl/dreg score of an iaf or spline flow (``DetachedFlowScore``) forms each layer's
``dy/dx`` and ``grad_x log|det J|`` per draw from the MADE's weights in closed form
(``pyrovi.guides.flow._autoregressive_jacobian``), and solves ``J^T g = v`` with it
(``_transpose_solve_step``). Here both are checked in float64 against
``torch.autograd.functional.jacobian`` of the layer's own forward map (Pyro's, with the
context fixed) over MADE depths, hidden widths, latent dims, nonlinearities, skip
connections and variable orders, with draws broadcast against one context row per datapoint
(as K particles read one encoder output).
"""

import pyro
import pytest
import torch
from pyro.distributions.transforms import ConditionalAffineAutoregressive, ConditionalSplineAutoregressive
from pyro.nn import ConditionalAutoRegressiveNN

from pyrovi.guides.flow import _autoregressive_jacobian, _transpose_solve_step

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:ConditionalAutoRegressiveNN input_dim = 1")]

CONTEXT = 5
CASES = [  # (kind, latent dim n, hidden widths, nonlinearity, skip connections, order)
    ("iaf", 1, [8], torch.nn.ReLU(), False, "identity"),
    ("iaf", 3, [12], torch.nn.ReLU(), False, "reversed"),
    ("iaf", 5, [16, 11], torch.nn.ReLU(), False, "random"),
    ("iaf", 4, [9, 9, 9], torch.nn.Tanh(), True, "identity"),
    ("iaf", 6, [20], torch.nn.Tanh(), True, "random"),
    ("spline", 1, [8], torch.nn.ReLU(), False, "identity"),
    ("spline", 3, [10], torch.nn.ReLU(), False, "reversed"),
    ("spline", 4, [12, 7], torch.nn.ReLU(), True, "random"),
    ("spline", 5, [15], torch.nn.Tanh(), False, "random"),
]


def _layer(kind, n, hidden, f, skip, order, bins=4):
    perm = {"identity": torch.arange(n), "reversed": torch.arange(n - 1, -1, -1), "random": torch.randperm(n)}[order]
    dims = [1, 1] if kind == "iaf" else [bins, bins, bins - 1, bins]
    arn = ConditionalAutoRegressiveNN(n, CONTEXT, hidden, param_dims=dims, permutation=perm, skip_connections=skip,
                                      nonlinearity=f)
    module = (ConditionalAffineAutoregressive(arn) if kind == "iaf"
              else ConditionalSplineAutoregressive(n, arn, count_bins=bins, bound=3.0))
    with torch.no_grad():  # weights large enough that the map is far from the identity
        for p in module.parameters():
            p.mul_(3.0)
    return module.double()


@pytest.mark.parametrize("kind,n,hidden,f,skip,order", CASES)
def test_closed_form_jacobian_matches_autograd(kind, n, hidden, f, skip, order):
    pyro.set_rng_seed(0)
    module = _layer(kind, n, hidden, f, skip, order)
    ctx = torch.randn(3, CONTEXT, dtype=torch.float64)  # one context row per datapoint
    x = 1.5 * torch.randn(2, 3, n, dtype=torch.float64)  # 2 particles of each datapoint

    with torch.no_grad():
        jac, grad_ld = _autoregressive_jacobian(module, ctx, x)
        # the score passes what the sampler computed: the MADE's first-layer output (on [context, x]) and an
        # iaf layer's log-scale, sparing the MADE's first (and output) layer
        t = module.condition(ctx)
        t(x)
        pre = module.nn.layers[0](torch.cat([ctx.expand(x.shape[:-1] + (CONTEXT,)), x], dim=-1))
        jac2, grad_ld2 = _autoregressive_jacobian(module, ctx, x, getattr(t, "_cached_log_scale", None), pre)
        torch.testing.assert_close(jac2, jac, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad_ld2, grad_ld, rtol=1e-12, atol=1e-12)
    assert jac.shape == (2, 3, n, n) and grad_ld.shape == (2, 3, n)

    for s in range(2):
        for b in range(3):
            def y_of(v, b=b):
                return module.condition(ctx[b])(v)

            def ld_of(v, b=b):
                t = module.condition(ctx[b])
                return t.log_abs_det_jacobian(v, t(v))

            ref = torch.autograd.functional.jacobian(y_of, x[s, b])
            torch.testing.assert_close(jac[s, b], ref, rtol=1e-10, atol=1e-10)
            ref_ld = torch.autograd.functional.jacobian(ld_of, x[s, b])
            torch.testing.assert_close(grad_ld[s, b], ref_ld, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind,n,hidden,f,skip,order", [c for c in CASES if c[1] > 1])
def test_transpose_solve_matches_a_dense_solve(kind, n, hidden, f, skip, order):
    """``J^{-T} (g - grad log|det J|)`` in the layer's variable order equals a dense solve with autograd's J."""
    pyro.set_rng_seed(1)
    module = _layer(kind, n, hidden, f, skip, order)
    ctx = torch.randn(3, CONTEXT, dtype=torch.float64)
    x = torch.randn(4, 3, n, dtype=torch.float64)
    g = torch.randn(4, 3, n, dtype=torch.float64)
    with torch.no_grad():
        out = _transpose_solve_step(module, None, ctx, x, g)
    for s in range(4):
        for b in range(3):
            t = module.condition(ctx[b])
            jac = torch.autograd.functional.jacobian(t, x[s, b])
            ld = torch.autograd.functional.jacobian(lambda v: t.log_abs_det_jacobian(v, t(v)), x[s, b])
            ref = torch.linalg.solve(jac.T, g[s, b] - ld)
            torch.testing.assert_close(out[s, b], ref, rtol=1e-9, atol=1e-9)


def test_iaf_layers_batched_match_autograd():
    """The score forms all iaf layers' Jacobians in one batched pass (``_iaf_jacobians``), each at its own
    recorded input; with each layer's recorded log-scale or without (recomputed), as autograd gives them."""
    from pyrovi.guides.flow import _iaf_jacobians, _iaf_simple

    pyro.set_rng_seed(2)
    n = 4
    modules = [_layer("iaf", n, [10], torch.nn.ReLU(), False, order) for order in ("identity", "reversed", "random")]
    assert _iaf_simple(modules)
    ctx = torch.randn(3, CONTEXT, dtype=torch.float64)
    xs = [torch.randn(2, 3, n, dtype=torch.float64) for _ in modules]
    recorded, pres = [], []
    for m, x in zip(modules, xs):
        t = m.condition(ctx)
        t(x)
        recorded.append(t._cached_log_scale)
        pres.append(m.nn.layers[0](torch.cat([ctx.expand(x.shape[:-1] + (CONTEXT,)), x], dim=-1)).detach())
    with torch.no_grad():
        jacs, grad_lds = _iaf_jacobians(modules, ctx, xs, [recorded[0], None, recorded[2]])
        jacs2, grad_lds2 = _iaf_jacobians(modules, ctx, xs, recorded, pres)  # the sampler's own, as the score
    assert jacs.shape == (3, 2, 3, n, n) and grad_lds.shape == (3, 2, 3, n)
    torch.testing.assert_close(jacs2, jacs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_lds2, grad_lds, rtol=1e-12, atol=1e-12)
    for layer, (m, x) in enumerate(zip(modules, xs)):
        for s in range(2):
            for b in range(3):
                t = m.condition(ctx[b])
                ref = torch.autograd.functional.jacobian(t, x[s, b])
                ref_ld = torch.autograd.functional.jacobian(lambda v: t.log_abs_det_jacobian(v, t(v)), x[s, b])
                torch.testing.assert_close(jacs[layer, s, b], ref, rtol=1e-10, atol=1e-10)
                torch.testing.assert_close(grad_lds[layer, s, b], ref_ld, rtol=1e-10, atol=1e-10)
