"""``Objective.loss(model, guide, args, kwargs, beta=)``: beta (KL warm-up, beta-VAE) inside the objective,
the same on the fast path and on Pyro's traced path, and ``path_counts`` saying which path ran."""

import pyro
import pytest
import torch

import pyrovi as pv
from pyrovi import fastpath
from pyrovi.weights import log_weights

pytestmark = pytest.mark.usefixtures("one_thread")

EPS32 = torch.finfo(torch.float32).eps  # relative rounding error of one float32 operation
FAST = [("elbo", {}), ("meanfield", {}), ("iwae", {}), ("renyi", {"alpha": 0.5})]
ALL = FAST + [("stl", {}), ("dreg", {})]


def _pair():
    torch.manual_seed(0)
    model = pv.models.VAE(16, 3, hidden=(8,))
    guide = pv.guides.DiagNormal(model, hidden=(8,))
    x = (torch.rand(10, 16) < 0.5).float()
    return model, guide, x


def _obj(name, options, particles=4, fast=True):
    obj = pv.objectives.get(name, particles=particles, **options)
    obj.max_plate_nesting = 1
    obj.fast = fast
    return obj


def _rtol(particles, rows, numbers):
    """Worst-case relative rounding of two float32 sums of particles x rows x numbers terms, summed differently."""
    return 4 * EPS32 * particles * rows * numbers


@pytest.mark.parametrize("name, options", FAST, ids=[n for n, _ in FAST])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0, 2.0])
def test_beta_is_the_same_on_the_fast_and_the_traced_path(name, options, beta):
    model, guide, x = _pair()
    assert fastpath.supported(model, guide)
    fast, traced = _obj(name, options), _obj(name, options, fast=False)
    pyro.set_rng_seed(1)
    a = fast.loss(model, guide, (x,), beta=beta)
    pyro.set_rng_seed(1)
    b = traced.loss(model, guide, (x,), beta=beta)
    assert fast.path_counts == {"fast": 1, "traced": 0} and traced.path_counts == {"fast": 0, "traced": 1}
    torch.testing.assert_close(a, b, rtol=_rtol(4, 10, 16 + 3), atol=1e-4)
    ga = torch.autograd.grad(a, list(guide.parameters()) + list(model.parameters()))
    gb = torch.autograd.grad(b, list(guide.parameters()) + list(model.parameters()))
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "traced"])
@pytest.mark.parametrize("name, options", [("elbo", {}), ("iwae", {}), ("stl", {}), ("dreg", {})],
                         ids=["elbo", "iwae", "stl", "dreg"])
def test_beta_weights_the_latent_terms(name, options, fast):
    """loss(beta) = -bound of log w = log p(x|z) + beta (log p(z) - log q(z|x)), for the same draws."""
    model, guide, x = _pair()
    beta = 0.25
    pyro.set_rng_seed(2)
    lw = log_weights(model, guide, x, particles=4, max_plate_nesting=1)
    lw_beta = lw.log_lik + beta * (lw.log_p - lw.log_lik - lw.log_q)  # (S, B)
    per_row = lw_beta.mean(0) if name in ("elbo", "stl") else torch.logsumexp(lw_beta, 0) - torch.log(torch.tensor(4.0))
    obj = _obj(name, options, fast=fast)
    pyro.set_rng_seed(2)
    loss = obj.loss(model, guide, (x,), beta=beta)
    torch.testing.assert_close(loss.detach(), -per_row.sum().detach(), rtol=_rtol(4, 10, 16 + 3), atol=1e-4)
    took_fast = fast and obj.has_fast_path
    assert obj.path_counts == {"fast": int(took_fast), "traced": int(not took_fast)}


def test_meanfield_beta_zero_is_the_expected_log_likelihood():
    model, guide, x = _pair()
    for fast in (True, False):
        pyro.set_rng_seed(3)
        loss = _obj("meanfield", {}, fast=fast).loss(model, guide, (x,), beta=0.0)
        pyro.set_rng_seed(3)
        lw = log_weights(model, guide, x, particles=4, max_plate_nesting=1)
        torch.testing.assert_close(loss, -lw.log_lik.mean(0).sum(), rtol=_rtol(4, 10, 16), atol=1e-4)


@pytest.mark.parametrize("name, options", ALL, ids=[n for n, _ in ALL])
def test_call_is_loss_with_beta_one_and_counts_paths(name, options):
    model, guide, x = _pair()
    obj = _obj(name, options)
    pyro.set_rng_seed(4)
    a = obj(model, guide, x)
    pyro.set_rng_seed(4)
    b = obj.loss(model, guide, [x], None)
    pyro.set_rng_seed(4)
    c = obj.loss(model, guide, (x,), {}, beta=1.0)
    torch.testing.assert_close(a, b, rtol=_rtol(4, 10, 19), atol=0)
    torch.testing.assert_close(a, c, rtol=_rtol(4, 10, 19), atol=0)
    path = "fast" if obj.has_fast_path else "traced"
    assert obj.path_counts[path] == 3 and sum(obj.path_counts.values()) == 3
    assert obj.data_plate == "data" and "data_plate" not in obj.config() and "path_counts" not in obj.config()


def test_a_wrapped_model_takes_the_traced_path():
    """fastpath.supported sees through nothing: a Messenger-wrapped model is traced (what beta used to cause)."""
    model, guide, x = _pair()
    obj = _obj("elbo", {})
    obj(pyro.poutine.scale(model, 1.0), guide, x)
    obj(model, guide, x)
    assert obj.path_counts == {"fast": 1, "traced": 1}
