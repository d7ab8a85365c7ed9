"""pyrovi.diagnose: InferenceData layout, PSIS k-hat bands against theory, netCDF round trip, collapse warnings.

k-hat reference: for a Gaussian posterior with sd s and a Gaussian q with the
same mean and sd c*s, the weight w = p/q under q has a power-law tail
P(w > t) ~ t^(-1/k) with k = 1 - c^2 when c < 1 (q too narrow), and is bounded
(k <= 0) when c >= 1 (q at least as wide as p). Yao et al. (2018).
"""

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule

import pyrovi as pv
from pyrovi.diagnostics import (
    FewParticlesWarning,
    PosteriorCollapseWarning,
    is_ess,
    khat_bands,
    load_netcdf,
    min_particles,
    save_netcdf,
    summarize,
)
from pyrovi.errors import ConfigError

# Orthogonal columns: the exact posterior covariance (I + W^T W / sigma^2)^-1 is diagonal,
# so a diagonal Gaussian guide can equal it exactly.
W_ORTH = torch.tensor([[2.0, 0.0], [0.0, 1.5], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
SIGMA = 0.5


class ScaledPosterior(PyroModule):
    """Diagonal q(z|x): the exact posterior mean and ``widen`` times its standard deviations."""

    def __init__(self, model, widen=1.0):
        super().__init__()
        self._m = [model]
        self.widen = widen

    def forward(self, x, y=None):
        mean, cov = self._m[0].exact_posterior(x)
        sd = torch.diagonal(cov).sqrt() * self.widen  # (L,)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(mean, sd.expand_as(mean)).to_event(1))


def _run(model, guide):
    return pv.Run(model, guide, pv.objectives.get("elbo"), {"model": model.config()}, device="cpu")


@pytest.fixture(scope="module")
def lg():
    model = pv.models.LinearGaussian(W_ORTH, sigma=SIGMA)
    return model, model.sample_data(40, seed=7)


def _diag(model, x, widen, particles=2500, **kw):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        idata = pv.diagnose(_run(model, ScaledPosterior(model, widen)), x, particles=particles, **kw)
    return idata, [r for r in rec if issubclass(r.category, UserWarning)]


def test_khat_good_when_guide_is_exact_posterior(lg):
    model, x = lg
    idata, rec = _diag(model, x, 1.0)
    k = idata.sample_stats["pareto_k"].values
    assert (k < 0.5).all()
    assert khat_bands(k) == {"good": 40, "fair": 0, "bad": 0}
    # every weight equals p(x): the IWAE estimate is exact and the ESS is all draws
    exact = model.exact_log_likelihood(x).numpy()
    np.testing.assert_allclose(idata.sample_stats["iw_log_likelihood"].values, exact, atol=1e-4)
    np.testing.assert_allclose(idata.sample_stats["ess"].values, 2500, rtol=1e-3)
    assert not [r for r in rec if issubclass(r.category, (FewParticlesWarning, PosteriorCollapseWarning))]


def test_khat_good_when_guide_is_wider_than_posterior(lg):
    # c = 1.25: bounded weights, so ArviZ's Pareto fit (not the all-equal shortcut) must land below 0.5
    model, x = lg
    idata, _ = _diag(model, x, 1.25)
    k = idata.sample_stats["pareto_k"].values
    assert np.isfinite(k).all() and (k < 0.5).all()


def test_khat_bad_when_guide_is_badly_too_narrow(lg):
    # c = 0.25: theory k = 1 - c^2 = 0.94. With S = 2500 the fit uses M = 3 sqrt(S) = 150 tail draws,
    # sd(k-hat) ~ (1 + k) / sqrt(M) ~ 0.16, so P(k-hat <= 0.7) ~ 7% per datapoint.
    model, x = lg
    idata, rec = _diag(model, x, 0.25)
    s = summarize(idata)
    assert s.khat_median > 0.7
    assert s.khat_bands["bad"] >= 0.75 * 40
    assert any("k-hat > 0.7" in str(r.message) for r in rec)


def test_inference_data_layout_and_consistency(lg):
    model, x = lg
    idata, _ = _diag(model, x[:6], 0.8, particles=300)
    for g in ("posterior", "log_likelihood", "sample_stats", "observed_data"):
        assert g in idata.groups()
    z = idata.posterior["z"]
    assert z.dims == ("chain", "draw", "datapoint", "z_dim_0") and z.shape == (1, 300, 6, 2)
    # log_likelihood is log N(x; W z + b, sigma^2 I) of the very draws in the posterior group
    zt = torch.as_tensor(z.values[0])  # (S, B, L)
    xt = torch.as_tensor(idata.observed_data["x"].values)
    assert torch.equal(xt, x[:6])
    ll = dist.Normal(zt @ model.W.T + model.b, SIGMA).log_prob(xt).sum(-1)  # (S, B)
    np.testing.assert_allclose(idata.log_likelihood["x"].values[0], ll.numpy(), atol=1e-4)
    ss = idata.sample_stats
    np.testing.assert_allclose(ss["log_weight"].values, ss["log_joint"].values - ss["log_q"].values, atol=1e-4)
    assert ss["pareto_k"].dims == ("datapoint",) and ss["ess"].dims == ("datapoint",)


def test_particle_warning_and_threshold(lg):
    model, x = lg
    assert min_particles() == 2155  # 10^(1/0.3) rounded up
    _, rec = _diag(model, x[:4], 1.0, particles=200)
    assert any(issubclass(r.category, FewParticlesWarning) for r in rec)


def test_deterministic_sites_go_to_posterior():
    W = torch.eye(3)[:, :2]

    def model(x, y=None):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            mean = pyro.deterministic("mean", z @ W.T)  # (S, B, 3)
            pyro.sample("x", dist.Normal(mean, 1.0).to_event(1), obs=x)

    def guide(x, y=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x[:, :2] / 2, 0.7 * torch.ones(x.shape[0], 2)).to_event(1))

    run = pv.Run(model, guide, pv.objectives.get("elbo"), {}, device="cpu")
    idata = pv.diagnose(run, torch.randn(5, 3), particles=50, warn=False)
    m = idata.posterior["mean"]
    assert m.dims == ("chain", "draw", "datapoint", "mean_dim_0") and m.shape == (1, 50, 5, 3)
    np.testing.assert_allclose(m.values, idata.posterior["z"].values @ W.T.numpy(), atol=1e-6)


def test_netcdf_round_trip_and_arviz_functions(lg, tmp_path):
    import arviz as az
    import matplotlib

    matplotlib.use("Agg")
    model, x = lg
    idata, _ = _diag(model, x[:8], 0.6, particles=400)
    path = save_netcdf(idata, str(tmp_path / "d.nc"))
    back = load_netcdf(path)
    for g in idata.groups():
        assert back[g].equals(idata[g]), g
    assert summarize(back) == summarize(idata)
    table = az.summary(back, var_names=["z"])
    assert table.shape[0] == 8 * 2 and np.isfinite(table["mean"]).all()
    # each posterior mean of the draws is near the exact posterior mean (sd of the estimate 0.6 s / sqrt(400))
    mean, cov = model.exact_posterior(x[:8])
    est = back.posterior["z"].mean(("chain", "draw")).values
    assert np.abs(est - mean.numpy()).max() < 5 * 0.6 * float(torch.diagonal(cov).sqrt().max()) / 20
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ArviZ prefers ELPDData, a LOO object
        ax = az.plot_khat(back.sample_stats["pareto_k"], show_hlines=True)
    assert ax is not None


def test_summary_helpers():
    assert khat_bands([0.1, 0.5, 0.7, 0.71, float("nan"), -np.inf]) == {"good": 2, "fair": 2, "bad": 2}
    lw = np.zeros((2, 100))
    lw[1, 0] = 50.0  # one draw dominates
    np.testing.assert_allclose(is_ess(lw), [100.0, 1.0], rtol=1e-6)


def test_bad_indices(lg):
    model, x = lg
    with pytest.raises(ConfigError, match="indices"):
        pv.diagnose(_run(model, ScaledPosterior(model)), x, indices=[0, 99], particles=10, warn=False)


# --------------------------------------------------------------------------- posterior collapse


def _fit_vae(digits, *, latent_dim, beta, epochs):
    torch.manual_seed(0)
    model = pv.models.VAE(digits.shape, latent_dim=latent_dim, hidden=(64,), image_shape=digits.image_shape)
    guide = pv.guides.DiagNormal(model, hidden=(64,))
    return pv.fit(model, guide, digits, epochs=epochs, batch_size=64, lr=3e-3, beta=beta, progress=False)


def _collapse_warnings(run, digits):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        idata = pv.diagnose(run, digits, n=150, particles=100)
    return summarize(idata), [r for r in rec if issubclass(r.category, PosteriorCollapseWarning)]


def test_collapse_warning_fires_on_kl_dominated_training(digits):
    # beta = 100: the KL term outweighs the reconstruction so q(z|x) -> p(z) for every unit
    run = _fit_vae(digits, latent_dim=4, beta=100.0, epochs=6)
    summary, rec = _collapse_warnings(run, digits)
    assert len(rec) == 1 and "all 4 latent units" in str(rec[0].message)
    assert summary.active_units == 0 and summary.collapsed == {"z": [0, 1, 2, 3]}
    ev = pv.evaluate(run, digits, k=50, save=False)
    assert ev["active_units"] == 0 and max(ev["latents"]["z"]["kl_per_dim"]) < 0.01


def test_no_collapse_warning_on_healthy_run(digits):
    run = _fit_vae(digits, latent_dim=2, beta=1.0, epochs=6)
    summary, rec = _collapse_warnings(run, digits)
    assert rec == []
    assert summary.active_units == 2 and summary.collapsed == {}
    assert min(summary.latents["z"]["kl_per_dim"]) > 0.1
