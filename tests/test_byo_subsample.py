"""Global plus subsampled local latents: pyrovi's loss is Pyro's subsampled ELBO, to float precision."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch import nn
from torch.distributions import constraints

import pyrovi as pv
from pyrovi.train import BatchLoss

N, B, D = 60, 12, 2


def _data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(N, D, generator=g) + 1.5


def _pair(subsample: str):
    """Model/guide with a global latent ``mu`` and per-datapoint latents ``z``.

    ``subsample``: "self" -> pyro.plate("data", len(x), subsample_size=B) (the model subsamples);
    "given" -> pyro.plate("data", N, subsample=idx) (Pyro's explicit subsampling, the reference);
    "none" -> pyro.plate("data", len(x)) (pyrovi slices the minibatch).
    """
    torch.manual_seed(0)
    enc = nn.Linear(D, 2 * D)

    def plate(x, idx=None):
        if subsample == "self":  # min(): the validation split may hold fewer than B rows
            return pyro.plate("data", len(x), subsample_size=min(B, len(x)))
        if subsample == "given":
            return pyro.plate("data", N, subsample=idx)
        return pyro.plate("data", len(x))

    def model(x, idx=None):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(D), 2.0).to_event(1))  # global
        with plate(x, idx) as i:
            z = pyro.sample("z", dist.Normal(mu, 1.0).to_event(1))  # local, (S?, b, D)
            pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x[i])

    def guide(x, idx=None):
        loc = pyro.param("mu_loc", torch.full((D,), 0.3))
        scale = pyro.param("mu_scale", torch.full((D,), 0.7), constraint=constraints.positive)
        pyro.sample("mu", dist.Normal(loc, scale).to_event(1))
        pyro.module("enc", enc)
        with plate(x, idx) as i:
            h = enc(x[i])
            pyro.sample("z", dist.Normal(h[..., :D], F.softplus(h[..., D:]) + 0.1).to_event(1))

    return model, guide


def _objective(particles):
    obj = pv.objectives.get("elbo", particles=particles)
    obj.max_plate_nesting = 1  # as fit sets it; Pyro would otherwise spend draws guessing it
    return obj


@pytest.mark.parametrize("particles", [1, 4])
def test_full_data_mode_equals_trace_elbo_on_same_draws(particles):
    x = _data()
    model, guide = _pair("self")
    loss = BatchLoss(_objective(particles), model, guide, global_sites=True, full=True)
    with pyro.get_param_store().scope():
        pyro.set_rng_seed(7)
        ours = loss(x, None, N) * N  # nats per datapoint -> nats for the data set
        pyro.set_rng_seed(7)
        ref = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1).loss(model, guide, x)
    assert ours.item() == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("particles", [1, 4])
def test_minibatch_mode_equals_pyro_subsample_plate(particles):
    """fit slices B rows and weights the plate by N/B: exactly pyro.plate("data", N, subsample=idx)."""
    x = _data()
    idx = torch.randperm(N, generator=torch.Generator().manual_seed(1))[:B]
    model, guide = _pair("none")
    ref_model, ref_guide = _pair("given")
    loss = BatchLoss(_objective(particles), model, guide, global_sites=True)
    ref_elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    with pyro.get_param_store().scope() as state:
        pyro.set_rng_seed(11)
        ours = loss(x[idx], None, N) * N
        params = [pyro.param("mu_loc").unconstrained(), pyro.param("mu_scale").unconstrained()]
        g_ours = torch.autograd.grad(ours, params)
    with pyro.get_param_store().scope(state):  # same parameter values
        pyro.set_rng_seed(11)
        ref = ref_elbo.differentiable_loss(ref_model, ref_guide, x, idx)
        g_ref = torch.autograd.grad(ref, params)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and the naive minibatch loss (no N/B weighting) is a different objective
    with pyro.get_param_store().scope(state):
        pyro.set_rng_seed(11)
        naive = Trace_ELBO(max_plate_nesting=1).loss(model, guide, x[idx]) if particles == 1 else None
    if naive is not None:
        assert abs(naive - ours.item()) > 10


def test_all_local_shortcut_is_exact():
    """Without global sites BatchLoss skips the handler and divides by B: the same number."""
    x = _data()
    idx = torch.arange(B)

    def model(x, idx=None):
        with pyro.plate("data", N, subsample=idx) if idx is not None else pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x if idx is None else x[idx])

    def guide(x, idx=None):
        loc = pyro.param("loc", torch.zeros(D))
        with pyro.plate("data", N, subsample=idx) if idx is not None else pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    loss = BatchLoss(_objective(1), model, guide, global_sites=False)
    pyro.set_rng_seed(5)
    ours = loss(x[idx], None, N).item() * N
    pyro.set_rng_seed(5)
    ref = Trace_ELBO(max_plate_nesting=1).loss(model, guide, x, idx)
    assert ours == pytest.approx(ref, rel=1e-6)


def test_fit_full_data_mode_lets_the_model_subsample():
    x = _data()
    model, guide = _pair("self")
    run = pv.fit(model, guide, x, batch_size=None, epochs=3, lr=0.05, progress=False, device="cpu")
    n_train = run.config["data"]["n_train"]
    assert run.config["train"]["batch_size"] is None
    assert run.metrics["steps"] == 3 * math.ceil(n_train / B)  # an epoch is N/B subsampled steps
    # trained: the global posterior mean moved from its init towards the data mean (~1.5)
    with run.scope():
        loc = pyro.param("mu_loc").detach()
    assert (loc - 0.3).abs().min() > 0.05
    assert all(math.isfinite(h["val_loss"]) for h in run.history)


def test_minibatch_needs_a_data_plate():
    x = _data()

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(mu, 1.0).expand(x.shape).to_event(2), obs=x)

    guide = AutoNormal(model)
    with pytest.raises(pv.ConfigError, match="no plate named 'data'.*batch_size=None"):
        pv.fit(model, guide, x, batch_size=8, epochs=1, progress=False)
    run = pv.fit(model, AutoNormal(model), x, batch_size=None, epochs=2, progress=False)
    assert run.metrics["steps"] == 2


@pytest.mark.parametrize("subsample,batch_size", [("none", 8), ("self", None)])
def test_autoguide_for_local_latents_is_refused(subsample, batch_size):
    """An autoguide's per-datapoint parameters can neither follow shuffled minibatches nor score held-out rows."""
    model, _ = _pair(subsample)
    with pytest.raises(pv.ConfigError, match=r"AutoNormal keeps one set of parameters per training datapoint.*\['z'\]"):
        pv.fit(model, AutoNormal(model), _data(), batch_size=batch_size, epochs=1, progress=False)
