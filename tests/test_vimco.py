"""VIMCO: importance-weighted objectives with discrete guide sites (Mnih & Rezende 2016)."""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyrovi as pv
from pyrovi import objectives
from pyrovi.errors import ConfigError
from pyrovi.vimco import vimco_bound
from pyrovi.weights import log_weights


def toy_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Bernoulli(0.5 * torch.ones(x.shape[0])))
        pyro.sample("x", dist.Normal(3.0 * z, 1.0), obs=x[:, 0])


def toy_guide(x):
    a = pyro.param("a", torch.tensor(0.0))
    b = pyro.param("b", torch.tensor(0.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Bernoulli(logits=a * x[:, 0] + b))


def toy_data(n=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.bernoulli(0.5 * torch.ones(n), generator=g)
    return (3.0 * z + torch.randn(n, generator=g)).unsqueeze(1)


@pytest.mark.parametrize("objective,options", [("iwae", {}), ("renyi", {"alpha": 0.5})])
def test_discrete_toy_reaches_exact_posterior(objective, options):
    # exact posterior: q(z=1|x) = N(x; 3, 1) / (N(x; 0, 1) + N(x; 3, 1)) = sigmoid(3x - 4.5), inside the family,
    # so every bound is maximized there; without the score term the posterior inverted (a = -6.6, b = 8.9)
    run = pv.fit(toy_model, toy_guide, toy_data(), objective=objective, particles=8, epochs=40, batch_size=100,
                 lr=0.2, lr_schedule="cosine", seed=0, progress=False, figures=False, **options)
    with run.scope():
        a, b = float(pyro.param("a").detach()), float(pyro.param("b").detach())
    assert abs(a - 3.0) < 0.5 and abs(b + 4.5) < 0.5, (a, b)


def _exact_iwae_and_grad(x, logits, S, alpha):
    """E_q[bound] over every joint draw of S Bernoulli particles, and its gradient in the logits."""
    logits = logits.clone().requires_grad_(True)
    q = dist.Bernoulli(logits=logits)
    total = 0.0
    for zs in itertools.product([0.0, 1.0], repeat=S):
        z = torch.tensor(zs)
        log_q = q.log_prob(z)
        log_w = math.log(0.5) + dist.Normal(3.0 * z, 1.0).log_prob(x) - log_q  # (S,)
        if alpha == 1.0:
            bound = log_w.mean()
        else:
            bound = (torch.logsumexp((1 - alpha) * log_w, 0) - math.log(S)) / (1 - alpha)
        total = total + log_q.sum().exp() * bound
    total.backward()
    return float(total.detach()), float(logits.grad.sum())


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_vimco_value_is_the_bound_and_gradient_unbiased(alpha):
    S, B, x0, logit0 = 3, 20000, 1.2, -0.3

    def guide(x):
        c = pyro.param("c", torch.tensor(logit0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=c.expand(x.shape[0])))

    x = torch.full((B, 1), x0)  # B copies of one datapoint: B independent VIMCO estimates at once
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    lw = log_weights(toy_model, guide, x, particles=S, max_plate_nesting=1)
    assert lw.score_sites == ("z",) and lw.log_q_score.shape == (S, B)
    value = vimco_bound(lw, alpha)
    plain = objectives.iw_bound(lw, alpha)
    assert torch.allclose(value, plain, rtol=1e-6)  # an estimator changes the gradient, never the value
    value.backward()
    c = pyro.param("c")
    est = float(c.grad) / B
    exact_value, exact_grad = _exact_iwae_and_grad(torch.tensor(x0), torch.full((S,), logit0), S, alpha)
    assert abs(float(plain) / B - exact_value) < 0.05, (float(plain) / B, exact_value)
    # per-datapoint gradients are i.i.d.; their spread gives the standard error of the mean
    se = _grad_se(toy_model, guide, S, alpha, x0)
    assert abs(est - exact_grad) < 5 * se / math.sqrt(B), (est, exact_grad, se)


def _grad_se(model, guide, S, alpha, x0, n=200):
    grads = []
    x = torch.full((1, 1), x0)
    for _ in range(n):
        c = pyro.param("c")
        c.grad = None
        vimco_bound(log_weights(model, guide, x, particles=S, max_plate_nesting=1), alpha).backward()
        grads.append(float(c.grad))
    return float(torch.tensor(grads).std())


def test_vimco_needs_two_particles():
    with pytest.raises(ConfigError, match=r"\['z'\].*particles >= 2"):
        pv.fit(toy_model, toy_guide, toy_data(100), objective="iwae", particles=1, epochs=1, batch_size=50,
               progress=False, figures=False)


def test_stl_dreg_meanfield_refuse_discrete_guide_site():
    for name in ("stl", "dreg"):
        with pytest.raises(ConfigError, match="Bernoulli"):
            pv.fit(toy_model, toy_guide, toy_data(100), objective=name, particles=2, epochs=1, batch_size=50,
                   progress=False, figures=False)
    with pytest.raises(ConfigError, match=r"meanfield.*\['z'\] without rsample"):
        pv.fit(toy_model, toy_guide, toy_data(100), objective="meanfield", epochs=1, batch_size=50,
               progress=False, figures=False)
