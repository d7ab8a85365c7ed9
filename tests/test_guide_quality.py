"""Richer guides close the gaps a diagonal Gaussian cannot (done-when items 1 and 2).

Item 1, linear-Gaussian model: the exact posterior N(., Lambda^{-1}) is
correlated, so the best diagonal Gaussian falls short of log p(x) by exactly
``mean_field_gap() = (sum_i log Lambda_ii - log det Lambda) / 2`` nats, while a
flow can represent it (one IAF layer already gives a full lower-triangular
affine map). Item 2, ``x ~ N(|z|, sigma^2)``: the posterior has two mirror-image
modes at about +-x, each nearly Gaussian; a single Gaussian covers one and
loses log 2 nats, a two-component mixture covers both.

ELBOs are estimated on held-out rows with ``k`` draws per row; with the gaps'
per-row spread below 1 nat, the standard error of the means is < 0.01 nats.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule

import pyrovi as pv

W = torch.tensor([[1.0, 0.8], [0.9, 1.0], [1.0, 1.1], [0.8, 0.9]])  # nearly parallel columns: correlated posterior


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _fit(model, guide, x, objective, epochs, batch_size=128, lr=0.01, seed=0):
    return pv.fit(model, guide, x, objective=objective, epochs=epochs, lr=lr, batch_size=batch_size,
                  lr_schedule="cosine", seed=seed, progress=False, figures=False)


def _elbo(run, x, k=200):
    return pv.evaluate(run, x, k=k)["elbo"]


def _linear_gaussian_gaps(guides, epochs, n):
    model = pv.models.LinearGaussian(W, sigma=1.0)
    x, xt = model.sample_data(n, seed=1), model.sample_data(500, seed=2)
    exact = float(model.exact_log_likelihood(xt).mean())
    out = {}
    for name, guide in guides(model).items():
        out[name] = exact - _elbo(_fit(model, guide, x, "stl", epochs), xt)
    return model.mean_field_gap(), out


def test_flow_closes_the_mean_field_gap_of_a_correlated_posterior():
    torch.manual_seed(0)
    gap, got = _linear_gaussian_gaps(lambda m: {"diag": pv.guides.DiagNormal(m, hidden=(64,)),
                                                "iaf": pv.guides.Flow(m, flow="iaf", depth=2, hidden=(64,))},
                                     epochs=25, n=1000)
    assert gap > 0.3  # clearly correlated: the bar below is meaningful
    assert abs(got["diag"] - gap) < 0.05, (got, gap)
    assert got["iaf"] < 0.05, got


@pytest.mark.slow
def test_flow_closes_the_mean_field_gap_long():
    torch.manual_seed(0)
    gap, got = _linear_gaussian_gaps(
        lambda m: {"diag": pv.guides.DiagNormal(m, hidden=(64,)),
                   "iaf": pv.guides.Flow(m, flow="iaf", depth=2, hidden=(64,)),
                   "spline": pv.guides.Flow(m, flow="spline", depth=2, hidden=(64,))},
        epochs=40, n=2000)
    assert abs(got["diag"] - gap) < 0.03, (got, gap)
    assert got["iaf"] < 0.03 and got["spline"] < 0.05, got


class AbsModel(PyroModule):
    """z ~ N(0, 1), x ~ N(|z|, sigma^2): symmetric bimodal posterior at z ~ +-x."""

    max_plate_nesting = 1
    obs_shape = (1,)

    @property
    def latent_sites(self):
        return {"z": (1,)}

    def __init__(self, sigma=0.25):
        super().__init__()
        self.sigma = sigma

    def forward(self, x, y=None):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(1), 1.0).to_event(1))  # (S?, B, 1)
            pyro.sample("x", dist.Normal(z.abs(), self.sigma).to_event(1), obs=x)

    def exact_log_likelihood(self, x):
        """log p(x) by quadrature on a fine grid (the integrand is smooth and negligible beyond |z| = 8)."""
        z = torch.linspace(-8, 8, 32001)
        lp = dist.Normal(0.0, 1.0).log_prob(z) + dist.Normal(z.abs(), self.sigma).log_prob(x)  # (N, G)
        return torch.logsumexp(lp, -1) + math.log(float(z[1] - z[0]))


def _abs_data(n, seed, sigma=0.25):
    """Rows whose |z| lies in [1, ~2.5], so the two posterior modes are well separated."""
    g = torch.Generator().manual_seed(seed)
    z = 1.0 + 0.5 * torch.randn(n, 1, generator=g).abs()
    return z + sigma * torch.randn(n, 1, generator=g)


def _bimodal(make_guides, epochs, seed=0):
    torch.manual_seed(seed)
    model = AbsModel()
    x, xt = _abs_data(1000, 1), _abs_data(500, 2)
    exact = float(model.exact_log_likelihood(xt).mean())
    return {name: exact - _elbo(_fit(model, g, x, "elbo", epochs, batch_size=32, lr=0.005, seed=seed), xt)
            for name, g in make_guides(model).items()}


def test_mixture_covers_both_modes_of_a_bimodal_posterior():
    gaps = _bimodal(lambda m: {"diag": pv.guides.DiagNormal(m, hidden=(64,)),
                               "mix": pv.guides.Mixture(m, components=2, learn_weights=False, hidden=(64,))},
                    epochs=6)
    assert abs(gaps["diag"] - math.log(2)) < 0.1, gaps  # one mode: log 2 lost
    assert gaps["diag"] - gaps["mix"] > 0.5, gaps
    assert gaps["mix"] < 0.15, gaps


@pytest.mark.slow
def test_mixture_with_learned_weights_covers_both_modes_in_most_runs():
    """With learned weights the outcome depends on the run (see pyrovi.guides.mixture: the weights' pathwise
    gradient vanishes between separated modes). Measured: seeds 0 and 2 beat DiagNormal by > 0.5 nats, seed 1
    collapsed onto one mode. The test pins that most runs succeed and a collapsed run is no worse than DiagNormal."""
    wins = 0
    for seed in (0, 1, 2):
        gaps = _bimodal(lambda m: {"diag": pv.guides.DiagNormal(m, hidden=(64,)),
                                   "mix": pv.guides.Mixture(m, components=2, hidden=(64,))},
                        epochs=40, seed=seed)
        wins += gaps["diag"] - gaps["mix"] > 0.5
        assert gaps["mix"] < gaps["diag"] + 0.05, gaps
    assert wins >= 2
