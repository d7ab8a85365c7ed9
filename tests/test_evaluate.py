"""pyrovi.evaluate: IWAE log p(x), ELBO, KL per dimension and active units against closed forms.

The reference is the linear-Gaussian model, whose log p(x), posterior and
mean-field optimum are known exactly (``pyrovi.models.LinearGaussian``).
Tolerances are Monte Carlo standard errors derived from the Gaussian algebra
in each test, never numbers read off a run.
"""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule

import pyrovi as pv
from pyrovi.errors import ConfigError
from pyrovi.evaluation import Tally, iw_log_likelihood
from pyrovi.weights import log_weights

# Columns 0 and 1 overlap: a correlated posterior (squared correlation 0.20) and a mean-field gap of
# 0.11 nats, below the 1/4 at which the mean-field optimum's weights stop having a finite variance
# (2 Lambda - diag(Lambda) must be positive definite). Column 2 is zero, so z_2 never affects x: its
# posterior is the prior (an inactive unit with KL = 0 exactly).
W_CORR = torch.tensor([[1.0, 0.3, 0.0], [0.3, 1.0, 0.0], [0.5, 0.5, 0.0], [0.3, -0.2, 0.0], [0.0, 0.4, 0.0],
                       [0.6, 0.1, 0.0]])
SIGMA = 0.5


class MeanFieldOptimum(PyroModule):
    """The best diagonal Gaussian for LinearGaussian: exact posterior mean, precision diag(Lambda)."""

    def __init__(self, model):
        super().__init__()
        self._m = [model]

    def scales(self):
        return torch.diagonal(self._m[0].posterior_precision()).rsqrt()  # (L,)

    def forward(self, x, y=None):
        mean, _ = self._m[0].exact_posterior(x)  # (B, L)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(mean, self.scales().expand_as(mean)).to_event(1))


class ExactFullCov(PyroModule):
    """q(z|x) = p(z|x) exactly, as a full-covariance Gaussian (its density does not factorize)."""

    def __init__(self, model):
        super().__init__()
        self._m = [model]

    def forward(self, x, y=None):
        mean, cov = self._m[0].exact_posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(mean, covariance_matrix=cov))


def _run(model, guide):
    return pv.Run(model, guide, pv.objectives.get("elbo"), {"model": model.config()}, device="cpu")


def _chi2_ratio(sigma_post, d_q):
    """rho = E_q[w^2] / p(x)^2 = |Dq|^1/2 |S|^-1 |2 S^-1 - Dq^-1|^-1/2 for p = N(m, S), q = N(m, Dq)."""
    a = 2 * torch.linalg.inv(sigma_post) - torch.linalg.inv(d_q)
    return float(torch.det(d_q).sqrt() / torch.det(sigma_post) / torch.det(a).sqrt())


def test_iwae_k5000_within_005_nats_of_exact_log_likelihood():
    model = pv.models.LinearGaussian(W_CORR, sigma=SIGMA)
    guide = MeanFieldOptimum(model)
    x = model.sample_data(200, seed=1)
    exact = model.exact_log_likelihood(x)  # (N,)
    gap = model.mean_field_gap()
    assert gap > 0.1  # twice the tolerance: the guide really is approximate, so the test is not trivial
    res = pv.evaluate(_run(model, guide), x, k=5000, batch_size=100, seed=0, save=False)
    err = res["log_likelihood"] - float(exact.mean())
    assert abs(err) < 0.05  # the "Done when" bar

    # Tighter, derived: IWAE-K of log p(x) has bias -(rho-1)/(2K) and sd sqrt((rho-1)/K) per datapoint.
    _, cov = model.exact_posterior(x)
    d_q = torch.diag(guide.scales() ** 2)
    rho = _chi2_ratio(cov.double(), d_q.double())
    K, N = 5000, x.shape[0]
    bias, se = -(rho - 1) / (2 * K), math.sqrt((rho - 1) / (K * N))
    assert abs(err - bias) < 5 * se + 1e-4  # 1e-4: float32 rounding of log densities

    # ELBO of the mean-field optimum = log p(x) - gap; per-draw sd of log w from the quadratic form.
    lam = model.posterior_precision().double()
    m = 0.5 * (torch.linalg.inv(d_q.double()) - lam) @ d_q.double()
    sd_logw = math.sqrt(2 * float(torch.trace(m @ m)))
    assert abs(res["elbo"] - (float(exact.mean()) - gap)) < 5 * sd_logw / math.sqrt(K * N) + 1e-4
    # the reported numbers satisfy ELBO = reconstruction - KL exactly
    assert res["elbo"] == pytest.approx(res["reconstruction"] - res["kl"], abs=1e-4)
    assert res["bits_per_dim"] == pytest.approx(-res["log_likelihood"] / (6 * math.log(2)))


def test_kl_per_dim_analytic_and_active_units_match_closed_form():
    model = pv.models.LinearGaussian(W_CORR, sigma=SIGMA)
    guide = MeanFieldOptimum(model)
    x = model.sample_data(400, seed=2)
    res = pv.evaluate(_run(model, guide), x, k=200, seed=0, save=False)
    lat = res["latents"]["z"]
    assert lat["kl_method"] == "analytic"
    # KL(N(m, s^2) || N(0, 1)) per dim, averaged over the data
    mean, _ = model.exact_posterior(x)
    s2 = guide.scales() ** 2
    kl = 0.5 * (mean ** 2 + s2 - torch.log(s2) - 1).mean(0)
    assert lat["kl_per_dim"] == pytest.approx(kl.tolist(), abs=1e-4)
    assert lat["kl_per_dim"][2] == pytest.approx(0.0, abs=1e-6)  # the zero column: q = prior
    # Cov_x E_q[z_d] from the Normal's own mean: the sample variance of the exact posterior means
    np.testing.assert_allclose(lat["mean_variance"], mean.var(0).tolist(), atol=1e-5)
    assert lat["mean_variance"][2] == 0.0 and lat["active_dims"] == [0, 1]  # dim 2 never moves: inactive
    assert res["active_units"] == 2 and res["latent_units"] == 3
    # MSE of E[x|z] = Wz + b: for z = m + s*eps, E|x - Wm - b - W s eps|^2 = |x - Wm - b|^2 + sum_d s_d^2 |W_d|^2.
    # 200 draws x 400 points: the Monte Carlo relative error is well under 1%; allow 2%.
    resid = x - mean @ model.W.T - model.b
    mse = ((resid ** 2).sum(1) + (s2 * (model.W ** 2).sum(0)).sum()).mean() / x.shape[1]
    assert res["mse"] == pytest.approx(float(mse), rel=0.02)


def test_exact_full_covariance_guide_gives_exact_log_likelihood_and_moment_matched_kl():
    model = pv.models.LinearGaussian(W_CORR, sigma=SIGMA)
    guide = ExactFullCov(model)
    x = model.sample_data(50, seed=3)
    exact = model.exact_log_likelihood(x)
    res = iw_log_likelihood(model, guide, x, k=3000, chunk=700, max_plate_nesting=1)
    # q = p(z|x): every weight equals p(x), so the estimate is exact up to float32 rounding
    assert torch.allclose(res["log_likelihood"], exact, atol=2e-4)
    assert torch.allclose(res["elbo"], exact, atol=2e-4)
    lat = res["latents"]["z"]
    assert lat["method"] == "moment_matched"  # MVN has no per-dimension density
    assert torch.equal(lat["mean_noise"], torch.zeros_like(lat["mean_noise"]))  # MVN knows its mean
    # q's marginals are Gaussian, so moment matching is exact: KL(N(m_d, S_dd) || N(0,1)), up to the MC error
    # of the mean/variance of 3000 draws (sd of the KL estimate < 0.05 nats here).
    mean, cov = model.exact_posterior(x)
    v = torch.diagonal(cov)
    kl = 0.5 * (mean ** 2 + v - torch.log(v) - 1)  # (B, L)
    assert torch.allclose(lat["kl_per_dim"], kl, atol=0.06)
    # the total MC KL equals the exact KL(N(m, S) || N(0, I)) within its Monte Carlo error
    kl_total = 0.5 * ((mean ** 2).sum(1) + torch.trace(cov) - torch.logdet(cov) - 3)
    assert float((res["kl"] - kl_total).mean()) == pytest.approx(0.0, abs=0.02)


def test_monte_carlo_kl_per_dim_for_pairs_without_closed_form():
    model = pv.models.LinearGaussian(W_CORR, sigma=SIGMA)

    def student_guide(x, y=None):
        mean, _ = model.exact_posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.StudentT(5.0, mean, 0.4 * torch.ones_like(mean)).to_event(1))

    x = model.sample_data(20, seed=4)
    res = iw_log_likelihood(model, student_guide, x, k=400, chunk=150, max_plate_nesting=1)
    lat = res["latents"]["z"]
    assert lat["method"] == "monte_carlo"
    # per-dimension log-ratios of the same draws sum to the per-draw log q - log p(z): identical estimates
    assert torch.allclose(lat["kl_per_dim"].sum(-1), res["kl"], atol=1e-4)


def test_tally_merges_chunks_exactly():
    model = pv.models.LinearGaussian(W_CORR, sigma=SIGMA)
    guide = MeanFieldOptimum(model)
    x = model.sample_data(7, seed=5)
    chunks = [log_weights(model, guide, x, particles=s, max_plate_nesting=1) for s in (3, 5, 1)]
    tally = Tally()
    for lw in chunks:
        tally.add(lw, 2)
    res = tally.result()
    all_w = torch.cat([c.log_w for c in chunks])  # (9, B)
    assert torch.allclose(res["log_likelihood"], torch.logsumexp(all_w, 0) - math.log(9), atol=1e-5)
    assert torch.allclose(res["elbo"], all_w.mean(0), atol=1e-5)
    # E_q[z|x] is the Normal's own mean (no Monte Carlo noise)
    assert torch.allclose(res["latents"]["z"]["mean"], model.exact_posterior(x)[0], atol=1e-5)
    assert not res["latents"]["z"]["mean_noise"].any()


def test_chunks_bound_memory(monkeypatch):
    import importlib

    ev = importlib.import_module("pyrovi.evaluation")  # the module behind pyrovi.evaluate
    model = pv.models.LinearGaussian(W_CORR, sigma=SIGMA)
    guide = MeanFieldOptimum(model)
    seen = []
    real = ev.log_weights

    def spy(*args, particles, **kw):
        seen.append(particles * args[2].shape[0])
        return real(*args, particles=particles, **kw)

    monkeypatch.setattr(ev, "log_weights", spy)
    x = model.sample_data(64, seed=0)
    pv.evaluate(_run(model, guide), x, k=5000, batch_size=32, chunk=100, save=False)
    assert max(seen) == 100 * 32 and sum(seen) == 5000 * 64  # every particle drawn, never more than a chunk at once


def test_global_latent_gives_clear_error():
    def model(x, y=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu.unsqueeze(-1) + torch.zeros_like(x), 1.0).to_event(1), obs=x)

    def guide(x, y=None):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    run = pv.Run(model, guide, pv.objectives.get("elbo"), {}, device="cpu")
    with pytest.raises(ConfigError, match=r"'mu'.*outside"):
        pv.evaluate(run, torch.zeros(4, 3), k=10, save=False)


def test_delta_guide_reports_what_applies():
    model = pv.models.LinearGaussian(W_CORR, sigma=SIGMA)

    def point_guide(x, y=None):
        mean, _ = model.exact_posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(mean, event_dim=1))

    res = pv.evaluate(_run(model, point_guide), model.sample_data(30, seed=0), k=5, save=False)
    assert res["latents"]["z"]["kl_method"] == "none" and res["latents"]["z"]["kl_per_dim"] is None
    assert math.isfinite(res["log_likelihood"]) and res["active_units"] == 2


@pytest.mark.parametrize("kw", [{"k": 0}, {"batch_size": -1}, {"chunk": 0}, {"k": 2.5}])
def test_bad_arguments(kw):
    model = pv.models.LinearGaussian(W_CORR, sigma=SIGMA)
    with pytest.raises(ConfigError, match=next(iter(kw))):
        pv.evaluate(_run(model, MeanFieldOptimum(model)), model.sample_data(4), save=False, **kw)


def test_active_units_from_draws_subtract_monte_carlo_noise():
    # A guide without a usable mean (a flow-like transformed Normal): E_q[z|x] comes from k draws, whose
    # sampling variance Var_q/k must not count as spread over x. Here q = prior for every x: inactive.
    from pyro.distributions.transforms import AffineTransform

    model = pv.models.LinearGaussian(W_CORR, sigma=SIGMA)

    def prior_like_guide(x, y=None):
        base = dist.Normal(torch.zeros(x.shape[0], 3), torch.ones(x.shape[0], 3))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.TransformedDistribution(base, [AffineTransform(0.0, 1.0)]).to_event(1))

    x = model.sample_data(300, seed=0)
    res = pv.evaluate(_run(model, prior_like_guide), x, k=20, save=False)
    lat = res["latents"]["z"]
    # without the correction every unit would show Cov ~ 1/k = 0.05 > 0.01 and count as active
    assert res["active_units"] == 0, lat["mean_variance"]
    assert max(lat["mean_variance"]) < 0.01


def test_report_names_each_uncertainty_and_what_log_likelihood_is():
    """The report's test table: the IWAE estimate for K > 1, a one-draw ELBO for K = 1; the Monte-Carlo error and
    the spread over datapoints on separate, named rows (issue 17, item 6); old metrics keep their one row."""
    from pyrovi.report import _test_section

    base = {"log_likelihood": -20.0, "log_likelihood_mc_se": 0.01, "log_likelihood_sd_over_data": 3.0,
            "log_likelihood_se_over_data": 0.1, "log_likelihood_se": 0.1, "elbo": -21.0, "n": 900}
    cfg = {"model": {"name": "vae"}}
    many = "\n".join(_test_section(dict(base, k=100), cfg))
    assert "| IWAE log p(x), K = 100 (nats) | -20.0000 |" in many
    assert "| Monte-Carlo standard error of that estimate (nats) | 0.0100 |" in many
    assert "| spread of log p(x) over datapoints, sd (nats) | 3.0000 |" in many
    assert "| standard error of the mean over datapoints, sd/sqrt(n) (nats) | 0.1000 |" in many
    assert "standard error over datapoints (nats)" not in many  # the former name is not shown twice
    one = "\n".join(_test_section(dict(base, k=1), cfg))
    assert "IWAE" not in one and "| log p(x) bound, K = 1: a one-draw ELBO estimate (nats) | -20.0000 |" in one
    old = {"log_likelihood": -20.0, "log_likelihood_se": 0.1, "k": 10}  # a metrics.json from before item 6
    assert "| standard error over datapoints (nats) | 0.1000 |" in "\n".join(_test_section(old, cfg))
