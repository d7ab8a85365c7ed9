"""Models that cannot take a leading particle dim: probed, looped, and said so in one line."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch import nn

import pyrovi as pv
from pyrovi.errors import ConfigError
from pyrovi.particles import ParticleLoopWarning, vectorizes

D, Z = 6, 2


class MaskedCVAE(nn.Module):
    """The CVAE example's pattern: the model scores only the masked part of y, picked by indexing with a mask."""

    def __init__(self):
        super().__init__()
        self.dec = nn.Linear(Z, D)
        self.enc = nn.Linear(2 * D, 2 * Z)

    def model(self, x, y=None):
        pyro.module("cvae", self)
        b = x.shape[0]
        with pyro.plate("data", b):
            z = pyro.sample("z", dist.Normal(torch.zeros(b, Z), 1.0).to_event(1))
            loc = self.dec(z)
            if y is not None:
                mask = x == -1  # (B, D), the same count in every row
                pyro.sample("y", dist.Normal(loc[mask].view(b, -1), 1.0).to_event(1), obs=y[mask].view(b, -1))

    def guide(self, x, y=None):
        pyro.module("cvae", self)
        h = self.enc(torch.cat([x, torch.zeros_like(x) if y is None else y], -1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(h[:, :Z], nn.functional.softplus(h[:, Z:]) + 1e-3).to_event(1))


def cvae_data(n=60):
    g = torch.Generator().manual_seed(1)
    y = torch.randn(n, D, generator=g)
    x = y.clone()
    x[:, D // 2:] = -1.0  # the hidden part the model predicts
    return x, y


@pytest.fixture(scope="module")
def cvae_run():
    torch.manual_seed(0)
    net = MaskedCVAE()
    x, y = cvae_data()
    with pytest.warns(ParticleLoopWarning, match=r"fit: the model cannot take a leading particle dim \(IndexError"):
        run = pv.fit(net.model, net.guide, (x, y), objective="iwae", particles=3, epochs=2, batch_size=20,
                     lr=1e-2, seed=0, progress=False, figures=False)
    return run, net


def test_probe_names_the_reason():
    net = MaskedCVAE()
    x, y = cvae_data(4)
    assert "IndexError" in vectorizes(net.model, net.guide, (x, y), {}, 1)
    assert vectorizes(net.model, net.guide, (x,), {}, 1) is None  # without y nothing is indexed


def test_fit_loops_particles_and_records_it(cvae_run):
    run, _ = cvae_run
    assert run.config["objective"] == {"name": "iwae", "particles": 3, "vectorize": False}
    assert math.isfinite(run.metrics["train_loss"])


def test_evaluate_matches_a_hand_written_loop(cvae_run):
    run, net = cvae_run
    x, y = cvae_data()
    K, seed = 7, 3
    with pytest.warns(ParticleLoopWarning, match=r"evaluate: .*\(found when the run was fit\); its 7 particles are drawn one at a time"):
        r = pv.evaluate(run, (x, y), k=K, seed=seed, save=False, vectorize=None)
    assert r["particles_vectorized"] is False
    with run.scope(), torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        log_w = []
        for _ in range(K):  # one draw of z ~ q(z | x, y) per pass, no particle plate
            g = poutine.trace(net.guide).get_trace(x, y)
            m = poutine.trace(poutine.replay(net.model, trace=g)).get_trace(x, y)
            log_w.append(m.nodes["z"]["fn"].log_prob(m.nodes["z"]["value"])
                         + m.nodes["y"]["fn"].log_prob(m.nodes["y"]["value"])
                         - g.nodes["z"]["fn"].log_prob(g.nodes["z"]["value"]))
        hand = (torch.logsumexp(torch.stack(log_w), 0) - math.log(K)).mean()
    # the same draws summed in another order: float32 rounding of ~10 nats over 60 rows and 7 particles
    assert r["log_likelihood"] == pytest.approx(float(hand), abs=1e-4)


def test_diagnose_through_the_particle_loop(cvae_run):
    run, _ = cvae_run
    x, y = cvae_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pv.diagnostics.FewParticlesWarning)
        warnings.simplefilter("ignore", pv.diagnostics.DiagnosticWarning)  # a 2-epoch fit: k-hat is high, as expected
        idata = pv.diagnose(run, (x, y), n=5, particles=20, save=False, vectorize=False)
    assert idata.posterior["z"].shape == (1, 20, 5, Z)
    assert idata.sample_stats["log_weight"].shape == (1, 20, 5)


def test_dreg_refuses_looped_particles():
    net = MaskedCVAE()
    with pytest.raises(ConfigError, match="dreg.*one at a time"):
        pv.fit(net.model, net.guide, cvae_data(), objective="dreg", particles=2, epochs=1, batch_size=20,
               vectorize=False, progress=False, figures=False)


class GlobalMasked(MaskedCVAE):
    """The masked model with a global latent scale: evaluate must say so before any particle runs."""

    def model(self, x, y=None):
        pyro.module("cvae", self)
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        b = x.shape[0]
        with pyro.plate("data", b):
            z = pyro.sample("z", dist.Normal(torch.zeros(b, Z), 1.0).to_event(1))
            loc = self.dec(z)
            mask = x == -1
            pyro.sample("y", dist.Normal(loc[mask].view(b, -1), s).to_event(1), obs=y[mask].view(b, -1))

    def guide(self, x, y=None):
        pyro.sample("s", dist.LogNormal(pyro.param("s_loc", torch.tensor(0.0)), 0.5))
        super().guide(x, y)


def test_evaluate_checks_global_latents_before_any_particle():
    net = GlobalMasked()
    run = pv.fit(net.model, net.guide, cvae_data(), objective="elbo", epochs=1, batch_size=None, progress=False,
                 figures=False)
    with pytest.raises(ConfigError, match=r"site\(s\) \['s'\] outside it"):
        pv.evaluate(run, cvae_data(), k=4, save=False)
    with pytest.raises(ConfigError, match=r"site\(s\) \['s'\] outside it"):
        pv.diagnose(run, cvae_data(), n=3, particles=4, save=False)


def test_a_looped_run_config_rebuilds_a_looping_objective():
    from pyrovi import objectives

    assert objectives.get({"name": "iwae", "particles": 3, "vectorize": False}).vectorize is False
    assert objectives.get("iwae").vectorize is True
    with pytest.raises(ConfigError, match="vectorize must be True or False"):
        objectives.get({"name": "iwae", "vectorize": "no"})


def test_regression_tutorial_with_sampled_linear_weights():
    """Pyro's Bayesian-regression tutorial: nn.Linear with PyroSample weights cannot take a particle dim."""
    from pyro.infer.autoguide import AutoDiagonalNormal
    from pyro.nn import PyroModule, PyroSample

    class BayesianRegression(PyroModule):
        def __init__(self, in_features, out_features):
            super().__init__()
            self.linear = PyroModule[nn.Linear](in_features, out_features)
            self.linear.weight = PyroSample(dist.Normal(0., 1.).expand([out_features, in_features]).to_event(2))
            self.linear.bias = PyroSample(dist.Normal(0., 10.).expand([out_features]).to_event(1))

        def forward(self, x, y=None):
            sigma = pyro.sample("sigma", dist.Uniform(0., 10.))
            mean = self.linear(x).squeeze(-1)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Normal(mean, sigma), obs=y)
            return mean

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 * torch.randn(50, generator=g)
    model = BayesianRegression(3, 1)
    with pytest.warns(ParticleLoopWarning, match="RuntimeError"):
        run = pv.fit(model, AutoDiagonalNormal(model), (x, y), objective="iwae", particles=4, epochs=3,
                     batch_size=None, lr=0.05, progress=False, figures=False)
    assert math.isfinite(run.metrics["train_loss"])
    # its latents are global: evaluate says so by name, before any particle runs
    with pytest.raises(ConfigError, match=r"\['sigma', 'linear.weight', 'linear.bias', '_AutoDiagonalNormal_latent'\]"):
        pv.evaluate(run, (x, y), k=10, save=False)
