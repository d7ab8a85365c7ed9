"""Objectives on a linear-Gaussian model whose log p(x) and posterior are known in closed form.

With q_i = N(mu_post_i, 1 / Lambda_ii), the optimal mean-field guide, the ELBO equals
log p(x) - (sum_i log Lambda_ii - log det Lambda) / 2 exactly, for every x; the tests
compare Monte-Carlo estimates with these exact values within a few standard errors.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO
from pyro.nn import PyroModule

import pyrovi as pv
from pyrovi.errors import ConfigError
from pyrovi.weights import log_weights

# Nearly parallel columns: a strongly correlated posterior, so the mean-field gap is large.
W = torch.tensor([[1.0, 0.8], [1.0, 1.2], [0.9, 1.0], [1.1, 0.9], [1.0, 1.1]])
SIGMA = 0.5


class MeanFieldOptimum(PyroModule):
    """q(z|x) = N(exact posterior mean, 1/diag(Lambda)): the best diagonal Gaussian."""

    max_plate_nesting = 1

    def __init__(self, model):
        super().__init__()
        self._m = [model]

    def forward(self, x, y=None):
        m = self._m[0]
        mean, _ = m.exact_posterior(x)
        scale = m.posterior_precision().diagonal().rsqrt().expand_as(mean)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(mean, scale).to_event(1))


@pytest.fixture(scope="module")
def setup():
    model = pv.models.LinearGaussian(W, torch.zeros(5), sigma=SIGMA)
    x = model.sample_data(200, seed=1)
    return model, MeanFieldOptimum(model), x, model.exact_log_likelihood(x)


def _per_datapoint_bound(model, guide, x, K, reps, alpha=0.0):
    """reps independent IWAE-K estimates per datapoint: (reps, N)."""
    out = []
    with torch.no_grad():
        for _ in range(reps):
            lw = log_weights(model, guide, x, particles=K, max_plate_nesting=1).log_w  # (K, N)
            out.append(torch.logsumexp(lw, 0) - math.log(K))
    return torch.stack(out)


def test_gap_is_large_enough_to_matter(setup):
    model, *_ = setup
    assert model.mean_field_gap() > 0.3


def test_elbo_and_meanfield_bound_log_px_and_agree(setup):
    model, guide, x, exact = setup
    gap = model.mean_field_gap()
    n = x.shape[0]
    S = 400
    ests = {}
    for name in ("elbo", "meanfield"):
        obj = pv.objectives.get(name, particles=S)
        with torch.no_grad():
            vals = torch.stack([-obj(model, guide, x) / n for _ in range(5)])  # 5 estimates of mean ELBO
        ests[name] = vals
    # elbo's per-datapoint Monte-Carlo standard error, from the weights themselves
    lw = log_weights(model, guide, x, particles=S, max_plate_nesting=1).log_w.detach()
    se = float(lw.std(0).mean() / math.sqrt(S * n) / math.sqrt(5)) + 1e-4
    target = float(exact.mean()) - gap  # exact ELBO of the optimal mean-field guide
    for name, vals in ests.items():
        m = float(vals.mean())
        assert m <= float(exact.mean()) + 4 * se, name  # a lower bound
        assert abs(m - target) < 4 * se + 1e-3, (name, m, target, se)
    assert abs(float(ests["elbo"].mean() - ests["meanfield"].mean())) < 8 * se + 1e-3


# A milder correlation for IWAE: with mean-field q the bound closes like Var(w) / (2K),
# which is slow when q's tails are far too light (the strongly correlated W above).
W_IWAE = torch.tensor([[1.0, 0.5], [1.0, 1.2], [0.9, 1.0], [0.3, 0.9], [1.0, 0.2]])


def test_iwae_bound_grows_with_k_and_approaches_log_px():
    model = pv.models.LinearGaussian(W_IWAE, torch.zeros(5), sigma=SIGMA)
    guide = MeanFieldOptimum(model)
    x = model.sample_data(200, seed=1)
    exact_mean = float(model.exact_log_likelihood(x).mean())
    means, ses = {}, {}
    for K, reps in ((1, 200), (5, 40), (50, 8), (2000, 2)):
        b = _per_datapoint_bound(model, guide, x, K, reps).mean(1)  # (reps,)
        means[K], ses[K] = float(b.mean()), float(b.std() / math.sqrt(reps))
    gap = model.mean_field_gap()
    assert gap > 0.3
    assert abs(means[1] - (exact_mean - gap)) < 4 * ses[1] + 1e-3  # K = 1 is the ELBO
    assert means[1] + 3 * (ses[1] + ses[5]) < means[5]
    assert means[5] + 3 * (ses[5] + ses[50]) < means[50]
    assert means[50] < means[2000]
    assert means[2000] <= exact_mean + 0.01
    assert exact_mean - means[50] < 0.5 * gap  # the bound closes...
    assert exact_mean - means[2000] < 0.15 * gap  # ...towards log p(x) as K grows


def test_iwae_objective_equals_pyro_renyi_loss(setup):
    model, guide, x, _ = setup
    for K, alpha in ((1, 0.0), (7, 0.0), (7, 0.5)):
        pyro.set_rng_seed(3)
        ours = pv.objectives.get("renyi", alpha=alpha, particles=K)(model, guide, x).item()
        pyro.set_rng_seed(3)
        ref = RenyiELBO(alpha=alpha, num_particles=K, vectorize_particles=True, max_plate_nesting=1).loss(
            model, guide, x)
        assert ours == pytest.approx(ref, rel=1e-5, abs=1e-3)
    pyro.set_rng_seed(3)
    a = pv.objectives.get("iwae", particles=7)(model, guide, x).item()
    pyro.set_rng_seed(3)
    b = pv.objectives.get("renyi", alpha=0.0, particles=7)(model, guide, x).item()
    assert a == b


def test_iwae_is_differentiable():
    model = pv.models.VAE(8, 2, hidden=(8,))
    guide = pv.guides.DiagNormal(model, hidden=(8,))
    x = (torch.rand(4, 8) < 0.5).float()
    loss = pv.objectives.get("iwae", particles=5)(model, guide, x)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in guide.parameters())
    assert all(p.grad is not None for p in model.parameters())


def test_closed_form_kl_matches_seed_formula_and_monte_carlo():
    torch.manual_seed(0)
    mu, sigma = torch.randn(6, 4), torch.rand(6, 4) + 0.3
    q = dist.Normal(mu, sigma).to_event(1)
    p = dist.Normal(torch.zeros(4), torch.ones(4)).to_event(1)
    closed = torch.distributions.kl_divergence(q, p)  # what `meanfield` uses
    seed = 0.5 * (mu ** 2 + sigma ** 2 - torch.log(sigma ** 2) - 1).sum(-1)
    torch.testing.assert_close(closed, seed)
    z = q.sample((200_000,))
    lr = q.log_prob(z) - p.log_prob(z)  # (S, 6)
    mc, se = lr.mean(0), lr.std(0) / math.sqrt(z.shape[0])
    assert ((mc - closed).abs() < 4 * se).all()


def test_unknown_objective_and_bad_options():
    with pytest.raises(ConfigError, match="valid objectives: dreg, elbo, iwae, meanfield, renyi, stl"):
        pv.objectives.get("elbow")
    with pytest.raises(ConfigError, match="particles"):
        pv.objectives.get("iwae", particles=0)
    with pytest.raises(ConfigError, match="alpha"):
        pv.objectives.get("renyi", alpha=-1.0)
    with pytest.raises(ConfigError, match="does not take"):
        pv.objectives.get("elbo", alpha=0.5)
    o = pv.objectives.get({"name": "renyi", "alpha": 0.5, "particles": 3})
    assert o.config() == {"name": "renyi", "alpha": 0.5, "particles": 3}
    assert pv.objectives.get(o.config()).config() == o.config()
