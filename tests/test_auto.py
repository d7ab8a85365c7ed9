"""Auto: an amortized guide for user-written Pyro models, found by tracing them.

Two non-VAE models with known posteriors (done-when item 4):

* ``factor_model``: linear-Gaussian factor model with two latent sites, ``a``
  (2-vector) and ``b`` (scalar). The posterior over ``u = (a, b)`` is Gaussian
  with precision ``Lambda = I + M^T M / sigma^2``. A factorized Gaussian q (what
  Auto's default family is) recovers the exact posterior *means*, and its
  optimal standard deviations are ``Lambda_ii^{-1/2}`` (the mean-field optimum,
  10% below the exact marginal sd here, so the test tells them apart).
* ``scale_model``: per-datapoint precision ``tau ~ Gamma(a0, b0)`` (positive
  support: Auto maps a Normal through ``exp``) and mean ``m | tau ~ N(0, 1/(kappa
  tau))``, ``x_d ~ N(m, 1/tau)``. The exact posterior is Normal-Gamma:
  ``E[m|x] = D xbar / (kappa + D)``, ``E[tau|x] = a_n / b_n``. For a factorized
  q both are also the mean-field optimum (the optimal q(m) has the exact mean;
  the optimal q(tau), Gamma or log-normal, has mean a_n/b_n).

The tolerances bound the amortization/training error of a small encoder
trained for a few seconds; the slow variants train longer and use tighter ones.
"""

import json

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyrovi as pv

M = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [1.0, 1.0, 0.0], [0.5, -0.5, 1.0], [0.0, 0.5, 1.0]])
SIG = 0.5
A0, B0, KAPPA, D = 3.0, 3.0, 1.0, 8


pytestmark = pytest.mark.usefixtures("one_thread")


def factor_model(x):
    with pyro.plate("data", x.shape[0]):
        a = pyro.sample("a", dist.Normal(x.new_zeros(2), 1.0).to_event(1))  # (S?, B, 2)
        b = pyro.sample("b", dist.Normal(x.new_zeros(()), 1.0))  # (S?, B)
        mean = a @ M[:, :2].T + b[..., None] * M[:, 2]  # (S?, B, 5)
        pyro.sample("x", dist.Normal(mean, SIG).to_event(1), obs=x)


def factor_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g) @ M.T + SIG * torch.randn(n, 5, generator=g)


def scale_model(x):
    with pyro.plate("data", x.shape[0]):
        tau = pyro.sample("tau", dist.Gamma(x.new_tensor(A0), x.new_tensor(B0)))  # (S?, B), positive
        m = pyro.sample("m", dist.Normal(0.0, (KAPPA * tau).rsqrt()))  # (S?, B)
        loc = m[..., None].expand(m.shape + (D,))
        scale = tau.rsqrt()[..., None].expand(tau.shape + (D,))
        pyro.sample("x", dist.Normal(loc, scale).to_event(1), obs=x)


def scale_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    tau = torch.distributions.Gamma(A0, B0).sample((n,))  # seeded by the caller's torch.manual_seed
    m = torch.randn(n, generator=g) / (KAPPA * tau).sqrt()
    return m[:, None] + torch.randn(n, D, generator=g) / tau.sqrt()[:, None]


def _moments(guide, x, draws=4000):
    with torch.no_grad():
        return {k: (v.mean(0), v.std(0)) for k, v in
                ((k, q.sample((draws,))) for k, q in guide.distributions(x).items())}


def _check_factor_model(epochs, hidden, mean_tol, sd_tol):
    x, xt = factor_data(1000, 1), factor_data(300, 2)
    guide = pv.guides.Auto(factor_model, example=x[:2], hidden=hidden)
    assert set(guide.sites) == {"a", "b"}
    pv.fit(factor_model, guide, x, objective="stl", epochs=epochs, lr=0.01, batch_size=64, lr_schedule="cosine",
           progress=False, figures=False)
    lam = torch.eye(3) + M.T @ M / SIG ** 2
    exact_mean = xt @ M @ torch.linalg.inv(lam).T / SIG ** 2  # (N, 3)
    exact_sd = torch.linalg.inv(lam).diagonal().sqrt()
    mf_sd = lam.diagonal().rsqrt()
    mom = _moments(guide, xt)
    q_mean = torch.cat([mom["a"][0], mom["b"][0][:, None]], -1)
    q_sd = torch.cat([mom["a"][1], mom["b"][1][:, None]], -1).mean(0)
    rms = ((q_mean - exact_mean) ** 2).mean(0).sqrt()
    assert (rms < mean_tol * exact_sd).all(), (rms, exact_sd)
    assert ((q_sd / mf_sd - 1).abs() < sd_tol).all(), (q_sd, mf_sd)
    assert (q_sd < exact_sd).all()  # a factorized q underestimates the marginal spread


def _check_scale_model(epochs, hidden, m_tol, tau_tol, tau_bias):
    torch.manual_seed(0)
    x, xt = scale_data(1000, 1), scale_data(300, 2)
    guide = pv.guides.Auto(scale_model, example=x[:2], hidden=hidden)
    pv.fit(scale_model, guide, x, objective="stl", epochs=epochs, lr=0.01, batch_size=64, lr_schedule="cosine",
           progress=False, figures=False)
    xbar = xt.mean(1)
    a_n = A0 + D / 2
    b_n = B0 + 0.5 * ((xt - xbar[:, None]) ** 2).sum(1) + KAPPA * D * xbar ** 2 / (2 * (KAPPA + D))
    e_m, e_tau = D * xbar / (KAPPA + D), a_n / b_n
    sd_m = (b_n / (a_n * (KAPPA + D))).sqrt()  # sd of m given x at tau = E[tau|x]
    mom = _moments(guide, xt)
    assert (mom["tau"][0] > 0).all()
    m_err = (((mom["m"][0] - e_m) / sd_m) ** 2).mean().sqrt()
    rel = (mom["tau"][0] - e_tau) / e_tau
    assert m_err < m_tol, m_err
    assert (rel ** 2).mean().sqrt() < tau_tol, rel
    assert rel.mean().abs() < tau_bias, rel.mean()


def test_auto_recovers_factor_model_posterior():
    _check_factor_model(epochs=15, hidden=(64,), mean_tol=0.25, sd_tol=0.06)


def test_auto_recovers_scale_model_posterior():
    _check_scale_model(epochs=25, hidden=(64,), m_tol=0.25, tau_tol=0.3, tau_bias=0.06)


@pytest.mark.slow
def test_auto_recovers_factor_model_posterior_long():
    _check_factor_model(epochs=60, hidden=(128,), mean_tol=0.12, sd_tol=0.03)


@pytest.mark.slow
def test_auto_recovers_scale_model_posterior_long():
    _check_scale_model(epochs=100, hidden=(128,), m_tol=0.12, tau_tol=0.13, tau_bias=0.03)


def test_auto_families_shapes_and_supports():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            w = pyro.sample("w", dist.Dirichlet(x.new_ones(3)))  # simplex, (B, 3)
            z = pyro.sample("z", dist.Normal(x.new_zeros(2, 2), 1.0).to_event(2))  # (B, 2, 2)
            s = pyro.sample("s", dist.LogNormal(x.new_zeros(()), 1.0))  # positive scalar
            mean = (w[..., :2, None] * z).sum((-1, -2)) + s
            pyro.sample("x", dist.Normal(mean[..., None], 1.0).to_event(1), obs=x)

    x = torch.randn(6, 1)
    for family, opts in (("diag_normal", {}), ("mixture", {"components": 2}), ("flow", {"flow": "planar", "depth": 2})):
        guide = pv.guides.Auto(model, family=family, example=x, hidden=(8,), **opts)
        assert guide.sites["z"].event_shape == (2, 2) and guide.sites["w"].unconstrained_shape == (2,)
        for obj in ("elbo", "iwae", "stl", "dreg"):
            loss = pv.objectives.get(obj, particles=3)(model, guide, x)
            assert torch.isfinite(loss)
            loss.backward()
        tr = pyro.poutine.trace(guide).get_trace(x)
        w = tr.nodes["w"]["value"]
        assert w.shape == (6, 3) and torch.allclose(w.sum(-1), torch.ones(6)) and (w > 0).all()
        assert tr.nodes["z"]["value"].shape == (6, 2, 2) and (tr.nodes["s"]["value"] > 0).all()
        cfg = guide.config()
        json.dumps(cfg)
        again = pv.guides.build(model, cfg)  # rebuilt from the example *shapes* in the config
        again.load_state_dict(guide.state_dict())
        assert again.config() == cfg


def test_auto_errors_name_the_problem():
    def discrete(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(c[..., None], 1.0).to_event(1), obs=x)

    def global_latent(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0).expand([x.shape[0], x.shape[1]]).to_event(1), obs=x)

    def nested(x):
        with pyro.plate("data", x.shape[0], dim=-2), pyro.plate("feat", x.shape[1], dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def no_plate(x):
        z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(2))
        pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(2), obs=x)

    x = torch.randn(4, 3)
    with pytest.raises(pv.ConfigError, match="'c'.*discrete"):
        pv.guides.Auto(discrete, example=x)
    with pytest.raises(pv.ConfigError, match="'mu'.*outside the plate 'data'"):
        pv.guides.Auto(global_latent, example=x)
    with pytest.raises(pv.ConfigError, match="'z'.*plate\\(s\\) \\['feat'\\]"):
        pv.guides.Auto(nested, example=x)
    with pytest.raises(pv.ConfigError, match="outside the plate"):
        pv.guides.Auto(no_plate, example=x)
    lazy = pv.guides.Auto(factor_model)  # no example: the sites are found by setup() or the first call
    with pytest.raises(pv.ConfigError, match="has not found the latent sites.*example=x\\[:2\\]"):
        lazy.setup()  # ... which needs the model's inputs
    with pytest.raises(pv.ConfigError, match="valid familys|valid family"):
        pv.guides.Auto(factor_model, example=x, family="gaussian")
    with pytest.raises(pv.ConfigError, match="does not take \\['depth'\\]"):
        pv.guides.Auto(factor_model, example=factor_data(2, 0), depth=3)


def test_auto_encodes_only_the_per_datapoint_inputs():
    def regression(design, x):  # design (D, 2) is shared; x (B, D) is per datapoint
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ design.T, 1.0).to_event(1), obs=x)

    design, x = torch.randn(5, 2), torch.randn(6, 5)
    guide = pv.guides.Auto(regression, example=(design, x), hidden=(8,))
    assert guide.body[0].in_features == 5  # x only
    assert guide.config()["example"] == [{"shape": [2], "dtype": "float32"}, {"shape": [5], "dtype": "float32"}]
    loss = pv.objectives.get("elbo", particles=2)(regression, guide, design, x)
    assert torch.isfinite(loss)


def test_auto_leaves_the_param_store_alone():
    net = torch.nn.Linear(2, 5)

    def model(x):
        pyro.module("decoder", net)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(net(z), 1.0).to_event(1), obs=x)

    pv.guides.Auto(model, example=torch.randn(3, 5))
    assert len(pyro.get_param_store()) == 0


def test_fit_with_guide_none_builds_auto_and_load_run_rebuilds_it(tmp_path):
    x = factor_data(200, 3)
    run = pv.fit(factor_model, None, x, epochs=2, batch_size=50, out=tmp_path / "run", progress=False,
                 figures=False)
    assert isinstance(run.guide, pv.guides.Auto) and run.config["guide"]["name"] == "auto"
    assert run.config["guide"]["example"] == [{"shape": [5], "dtype": "float32"}]
    loaded = pv.load_run(tmp_path / "run", model=factor_model)
    assert isinstance(loaded.guide, pv.guides.Auto)
    q1, q2 = run.guide.distributions(x[:4])["a"], loaded.guide.distributions(x[:4])["a"]
    z = q1.sample()
    torch.testing.assert_close(q1.log_prob(z), q2.log_prob(z))
    metrics = pv.evaluate(loaded, x[:20], k=50)
    assert metrics["log_likelihood"] >= metrics["elbo"]
