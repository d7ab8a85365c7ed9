"""The fast path gives the same loss values as Pyro's plain path on the same seed."""

import pyro
import pytest
import torch

import pyrovi as pv
from pyrovi import fastpath


def _pair(kind):
    if kind == "vae":
        m = pv.models.VAE(64, 4, hidden=(32,))
        return m, pv.guides.DiagNormal(m, hidden=(32,)), (torch.rand(10, 64) < 0.5).float()
    if kind == "gaussian_vae":
        m = pv.models.VAE(64, 3, hidden=(16,), likelihood="gaussian", sigma=0.3, learn_sigma=True)
        return m, pv.guides.DiagNormal(m, hidden=(16,)), torch.rand(10, 64)
    if kind == "conditional_vae":
        m = pv.models.ConditionalVAE(64, 3, num_classes=4, hidden=(16,))
        return m, pv.guides.DiagNormal(m, hidden=(16,)), ((torch.rand(10, 64) < 0.5).float(),
                                                          torch.arange(10) % 4)
    m = pv.models.LinearGaussian(input_dim=5, latent_dim=2, sigma=0.5)
    return m, pv.guides.DiagNormal(m, hidden=(8,)), m.sample_data(12)


@pytest.mark.parametrize("kind", ["vae", "gaussian_vae", "linear_gaussian", "conditional_vae"])
@pytest.mark.parametrize("name, particles", [("elbo", 1), ("elbo", 4), ("meanfield", 1), ("meanfield", 3),
                                             ("iwae", 6), ("renyi", 5)])
def test_fast_path_equals_pyro_path(kind, name, particles):
    torch.manual_seed(0)
    model, guide, x = _pair(kind)
    x = x if isinstance(x, tuple) else (x,)
    assert fastpath.supported(model, guide)
    obj = pv.objectives.get(name, particles=particles, **({"alpha": 0.5} if name == "renyi" else {}))
    obj.max_plate_nesting = 1
    pyro.set_rng_seed(7)
    fast = obj(model, guide, *x)
    obj.fast = False
    pyro.set_rng_seed(7)
    plain = obj(model, guide, *x)
    torch.testing.assert_close(fast, plain, rtol=2e-6, atol=1e-4)
    # and the gradients agree too
    gf = torch.autograd.grad(_loss(obj, True, model, guide, x), list(guide.parameters()))
    gp = torch.autograd.grad(_loss(obj, False, model, guide, x), list(guide.parameters()))
    for a, b in zip(gf, gp):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _loss(obj, fast, model, guide, x):
    obj.fast = fast
    pyro.set_rng_seed(11)
    return obj(model, guide, *x)


def test_subclass_overriding_forward_falls_back_to_pyro():
    class Other(pv.models.VAE):
        def forward(self, x, y=None):
            return super().forward(x, y)

    m = Other(8, 2, hidden=(4,))
    g = pv.guides.DiagNormal(m, hidden=(4,))
    assert not fastpath.supported(m, g)

    def plain_guide(x, y=None):
        return g(x, y)

    assert not fastpath.supported(pv.models.VAE(8, 2, hidden=(4,)), plain_guide)
