"""STL and DReG: same value as ELBO/IWAE, unbiased gradients, lower encoder-gradient variance."""

import pyro
import pytest
import torch

import pyrovi as pv
from pyrovi.objectives import iw_bound
from pyrovi.stop_gradient import StopGradientScorer
from pyrovi.weights import log_weights

W = torch.tensor([[1.0, 0.8], [0.9, 1.0], [1.0, 1.1], [0.8, 0.9]])
EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7: the relative rounding error of one float32 operation


def rounding_rtol(terms: int) -> float:
    """Relative tolerance for two float32 sums of ``terms`` numbers added in different orders."""
    return 4 * EPS32 * terms


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(learn=True):
    return pv.models.LinearGaussian(W, sigma=1.0, learn=learn)


def _guides(model):
    torch.manual_seed(0)
    return {
        "diag_normal": pv.guides.DiagNormal(model, hidden=(8,)),
        "mixture": pv.guides.Mixture(model, components=2, hidden=(8,)),
        "iaf": pv.guides.Flow(model, flow="iaf", depth=1, hidden=(8,)),
        "planar": pv.guides.Flow(model, flow="planar", depth=2, hidden=(8,)),
    }


def _q(guide, x):
    """q(z|x) as a distribution, for pyrovi's DiagNormal and the amortized guides."""
    if isinstance(guide, pv.guides.DiagNormal):
        import pyro.distributions as dist

        loc, scale = guide.encode(x)["z"]
        return dist.Normal(loc, scale).to_event(1)
    return guide.distributions(x)["z"]


def _grads(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, allow_unused=False)])


@pytest.mark.parametrize("name", ["diag_normal", "mixture", "iaf", "planar"])
def test_values_equal_elbo_and_iwae_for_the_same_draws(name):
    model = _model()
    guide = _guides(model)[name]
    x = model.sample_data(6, seed=1)
    pyro.set_rng_seed(3)
    stl = pv.objectives.get("stl", particles=5)(model, guide, x)
    pyro.set_rng_seed(3)
    strata = getattr(guide, "strata", 1)  # a mixture's ELBO is estimated stratified, 5 draws per component
    elbo = -iw_bound(log_weights(model, guide, x, particles=5 * strata, stratify=strata > 1), alpha=1.0)
    pyro.set_rng_seed(3)
    pyro_elbo = pv.objectives.get("elbo", particles=5)(model, guide, x)
    # the surrogate keeps the value of log q, to float rounding: log w sums x's 4 and z's 2 (+ a flow's
    # log-det) numbers per draw and datapoint, over 5 * strata draws and 6 datapoints
    terms = 5 * strata * 6 * 8
    torch.testing.assert_close(stl, elbo, rtol=rounding_rtol(terms), atol=0)
    torch.testing.assert_close(stl, pyro_elbo, rtol=rounding_rtol(terms), atol=0)  # Pyro sums in another order
    pyro.set_rng_seed(4)
    dreg = pv.objectives.get("dreg", particles=7)(model, guide, x)
    pyro.set_rng_seed(4)
    iwae = pv.objectives.get("iwae", particles=7)(model, guide, x)
    torch.testing.assert_close(dreg, iwae, rtol=rounding_rtol(7 * 6 * 8), atol=0)
    # the tolerances are far below Monte Carlo noise: other draws are told apart
    pyro.set_rng_seed(5)
    other = pv.objectives.get("iwae", particles=7)(model, guide, x)
    assert abs(other.item() - iwae.item()) > 10 * rounding_rtol(7 * 6 * 8) * abs(iwae.item())


@pytest.mark.parametrize("name", ["diag_normal", "mixture", "iaf"])
def test_stl_gradient_is_total_gradient_minus_score(name):
    """For the same draws: grad(ELBO loss) - grad(STL loss) = grad_phi log q_phi(z) at fixed z (the score term)."""
    model = _model()
    guide = _guides(model)[name]
    x = model.sample_data(5, seed=2)
    params = list(guide.parameters())
    strata = getattr(guide, "strata", 1)  # a mixture: 3 stratified draws per component, each weighted by rho
    S = 3 * strata
    pyro.set_rng_seed(5)
    lw = log_weights(model, guide, x, particles=S, stratify=strata > 1)
    g_elbo = _grads(-iw_bound(lw, 1.0), params)
    pyro.set_rng_seed(5)
    g_stl = _grads(pv.objectives.get("stl", particles=3)(model, guide, x), params)
    z = lw.guide_trace.nodes["z"]["value"].detach()  # (S, 5, 2): the same draws
    rho = torch.ones(S, 5) if lw.log_rho is None else lw.log_rho.detach().exp()  # (S, 5)
    score = _grads((rho * _q(guide, x).log_prob(z)).sum() / S, params)
    torch.testing.assert_close(g_elbo - g_stl, score, rtol=1e-4, atol=1e-5)


def test_model_gradients_are_unchanged_and_dreg_with_one_particle_is_stl():
    model = _model()
    guide = _guides(model)["iaf"]
    x = model.sample_data(5, seed=3)
    theta = [model.W, model.b]
    for plain, estimator, k in (("iwae", "dreg", 6), ("elbo", "stl", 4)):
        pyro.set_rng_seed(6)
        g_plain = _grads(pv.objectives.get(plain, particles=k)(model, guide, x), theta)
        pyro.set_rng_seed(6)
        g_est = _grads(pv.objectives.get(estimator, particles=k)(model, guide, x), theta)
        torch.testing.assert_close(g_est, g_plain, rtol=1e-5, atol=1e-5)
    params = list(guide.parameters()) + theta
    pyro.set_rng_seed(7)
    g_dreg = _grads(pv.objectives.get("dreg", particles=1)(model, guide, x), params)
    pyro.set_rng_seed(7)
    g_stl = _grads(pv.objectives.get("stl", particles=1)(model, guide, x), params)
    torch.testing.assert_close(g_dreg, g_stl, rtol=1e-5, atol=1e-6)


def _gradient_draws(objective, model, guide, x, reps, seed):
    """``reps`` independent gradients of the loss over the batch ``x`` (each a sum over its rows), (reps, P)."""
    params = list(guide.parameters())
    pyro.set_rng_seed(seed)
    return torch.stack([_grads(objective(model, guide, x), params) for _ in range(reps)])


def _trained(name, steps=300):
    model = _model(learn=False)
    guide = _guides(model)[name]
    x = model.sample_data(256, seed=9)
    opt = torch.optim.Adam(guide.parameters(), lr=1e-2)
    obj = pv.objectives.get("elbo", particles=2)
    pyro.set_rng_seed(10)
    for i in range(steps):
        loss = obj(model, guide, x[(i * 32) % 256:(i * 32) % 256 + 32]) / 32
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, guide


@pytest.mark.parametrize("name", ["diag_normal", "iaf"])
def test_mean_gradients_match_and_variance_is_lower(name):
    """Over many draws, E[STL grad] = E[ELBO grad] and E[DReG grad] = E[IWAE grad] (K=8), per encoder parameter.

    Each of R = 30 repetitions sums the gradients of B = 80 copies of one
    datapoint, so the means below average 2400 independent draws; a
    difference is flagged beyond 5 combined standard errors (two-sided
    p < 1e-6 per parameter). Near the optimum the estimators' variance must be
    lower: the summed per-parameter variance is compared directly.
    """
    model, guide = _trained(name)
    x = model.sample_data(1, seed=11).expand(80, -1)
    R = 30
    results = {}
    for a, b, k in (("elbo", "stl", 1), ("iwae", "dreg", 8)):
        ga = _gradient_draws(pv.objectives.get(a, particles=k), model, guide, x, R, seed=12)
        gb = _gradient_draws(pv.objectives.get(b, particles=k), model, guide, x, R, seed=13)
        se = torch.sqrt(ga.var(0) / R + gb.var(0) / R)
        z = (ga.mean(0) - gb.mean(0)).abs() / se.clamp_min(1e-12)
        assert float(z.max()) < 5.0, (a, b, float(z.max()))
        results[(a, b)] = (float(ga.var(0).sum()), float(gb.var(0).sum()))
    for (a, b), (va, vb) in results.items():
        assert vb < 0.75 * va, f"{b} variance {vb:.4g} not below {a} variance {va:.4g}"


def test_user_guide_with_undetachable_distribution_gets_a_clear_error():
    import pyro.distributions as dist
    from pyro.distributions.transforms import Planar

    model = _model(learn=False)
    flow = Planar(2)

    def guide(x, y=None):
        pyro.module("flow", flow)
        with pyro.plate("data", x.shape[0]):
            base = dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1)
            pyro.sample("z", dist.TransformedDistribution(base, [flow]))

    x = model.sample_data(3)
    with pytest.raises(pv.ConfigError, match="cannot detach"):
        pv.objectives.get("stl")(model, guide, x)


def test_stop_gradient_scorer_detaches_user_normal_guides():
    """A plain Pyro guide with Normal sites: STL's log q has no gradient into its parameters at fixed z."""
    import pyro.distributions as dist

    model = _model(learn=False)
    loc = torch.zeros(2, requires_grad=True)
    log_scale = torch.zeros(2, requires_grad=True)

    def guide(x, y=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    x = model.sample_data(4)
    lw = log_weights(model, guide, x, particles=2, guide_log_prob=StopGradientScorer())
    z = lw.guide_trace.nodes["z"]["value"]
    (g,) = torch.autograd.grad(lw.log_q.sum(), [z], retain_graph=True)
    expected = -(z - loc) / log_scale.exp() ** 2  # d/dz log N(z; loc, scale), per draw
    torch.testing.assert_close(g, expected.detach())
    # Parameters are reached only through z = loc + exp(log_scale) * eps (pathwise): with eps = (z - loc) / scale,
    # d/dloc = sum(-eps / scale) and d/dlog_scale = sum(-eps^2); the score term (-1 per draw and dim) is absent.
    g_loc, g_ls = torch.autograd.grad(lw.log_q.sum(), [loc, log_scale])
    eps = ((z - loc) / log_scale.exp()).detach()
    torch.testing.assert_close(g_loc, (-eps / log_scale.exp()).sum((0, 1)).detach())
    torch.testing.assert_close(g_ls, (-(eps ** 2)).sum((0, 1)))


@pytest.mark.parametrize("guide_kind", ["mixture", "auto_mixture", "spline"])
@pytest.mark.parametrize("name,particles,beta", [("stl", 1, 1.0), ("stl", 2, 1.0), ("dreg", 3, 1.0),
                                                 ("dreg", 4, 0.7)])
def test_fast_path_equals_the_traced_path(guide_kind, name, particles, beta):
    """On pyrovi's own models stl/dreg take the fast path (mixture guides too: stl's draws stratified over the
    components, dreg's plain) with the traced path's draws, value and gradients."""
    from pyrovi import fastpath

    torch.manual_seed(0)
    model = pv.models.VAE(16, 3, hidden=(8,))
    guide = {"mixture": lambda: pv.guides.Mixture(model, components=3, hidden=(8,)),
             "auto_mixture": lambda: pv.guides.Auto(model, family="mixture", components=2, hidden=(8,)),
             "spline": lambda: pv.guides.Flow(model, flow="spline", depth=2, hidden=(8,))}[guide_kind]()
    x = (torch.rand(6, 16) < 0.5).float()
    assert fastpath.supported(model, guide, stratify=True)
    obj = pv.objectives.get(name, particles=particles, warm_start=0)
    obj.max_plate_nesting = 1
    params = list(guide.parameters()) + list(model.parameters())
    out = {}
    for fast in (True, False):
        obj.fast = fast
        pyro.set_rng_seed(11)
        loss = obj.loss(model, guide, (x,), beta=beta)
        out[fast] = loss, torch.autograd.grad(loss, params, allow_unused=True)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-4)
    for a, b in zip(out[True][1], out[False][1]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    if name == "stl":  # with beta != 1 too, the same value as the elbo's fast path on the same draws
        # (the traced path is not compared there: a guide wrapped to scale its sites by beta hides its strata)
        values = []
        for objective in (obj, pv.objectives.get("elbo", particles=particles)):
            objective.max_plate_nesting, objective.fast = 1, True
            pyro.set_rng_seed(11)
            values.append(objective.loss(model, guide, (x,), beta=0.5))
        torch.testing.assert_close(values[0], values[1], rtol=1e-6, atol=0)
