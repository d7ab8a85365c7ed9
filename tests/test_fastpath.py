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


@pytest.mark.parametrize("flow", ["iaf", "planar", "spline"])
@pytest.mark.parametrize("name, particles", [("elbo", 1), ("meanfield", 2), ("iwae", 5)])
def test_flow_guide_fast_path_equals_pyro_path(flow, name, particles):
    """Flow guides on pyrovi's models take the fast path with the same draws, values and gradients."""
    torch.manual_seed(0)
    model = pv.models.VAE(16, 3, hidden=(8,))
    guide = pv.guides.Flow(model, flow=flow, depth=2, hidden=(8,))
    x = (torch.rand(6, 16) < 0.5).float()
    assert fastpath.supported(model, guide)
    obj = pv.objectives.get(name, particles=particles)
    obj.max_plate_nesting = 1
    fast, plain = _loss(obj, True, model, guide, (x,)), _loss(obj, False, model, guide, (x,))
    torch.testing.assert_close(fast, plain, rtol=2e-6, atol=1e-4)
    params = list(guide.parameters())
    gf = torch.autograd.grad(fast, params, allow_unused=True)
    gp = torch.autograd.grad(plain, params, allow_unused=True)
    assert sum(g is not None for g in gf) == sum(g is not None for g in gp) > len(params) // 2
    for a, b in zip(gf, gp):
        if a is not None:
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

    class OtherFlow(pv.guides.Flow):  # Flow's posterior mirrors the forward it inherits; an override may not
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    model = pv.models.VAE(8, 2, hidden=(4,))
    assert fastpath.supported(model, pv.guides.Flow(model, depth=1, hidden=(4,)))
    assert not fastpath.supported(model, OtherFlow(model, depth=1, hidden=(4,)))


# --------------------------------------------------------------------------- pyrovi.distributions


def test_diagonal_normal_equals_torch_normal():
    import pyro.distributions as dist

    from pyrovi.distributions import DiagonalNormal

    torch.manual_seed(1)
    loc, scale = torch.randn(5, 3, 4), torch.rand(5, 3, 4) + 0.1
    value = torch.randn(2, 5, 3, 4)
    for n in (1, 2):
        torch.testing.assert_close(DiagonalNormal(loc, scale, n).log_prob(value),
                                   dist.Normal(loc, scale).to_event(n).log_prob(value), rtol=1e-6, atol=1e-5)
    # a per-pixel sigma (D,) against means (S, B, D), as the Gaussian likelihood builds it
    sigma = torch.rand(4) + 0.2
    torch.testing.assert_close(DiagonalNormal(loc, sigma).log_prob(value),
                               dist.Normal(loc, sigma).to_event(1).log_prob(value), rtol=1e-6, atol=1e-5)
    # expand (what a plate does) keeps the class and the value
    q = DiagonalNormal(loc[0], scale[0]).expand([2, 3])
    assert isinstance(q, DiagonalNormal) and q.batch_shape == (2, 3)
    torch.testing.assert_close(q.log_prob(value[:, 0]), dist.Normal(loc[0], scale[0]).to_event(1).log_prob(value[:, 0]))


def test_rsample_and_log_prob_is_rsample_then_log_prob():
    """Same draw as rsample under one seed; same log q and the same gradient as scoring z by log_prob."""
    import pyro.distributions as dist

    from pyrovi.distributions import DiagonalNormal

    torch.manual_seed(2)
    loc = torch.randn(6, 3, requires_grad=True)
    raw = torch.randn(6, 3, requires_grad=True)
    scale = torch.nn.functional.softplus(raw) + 1e-4
    torch.manual_seed(5)
    z, lq = DiagonalNormal(loc, scale).rsample_and_log_prob((4,))
    torch.manual_seed(5)
    plain = dist.Normal(loc, scale).to_event(1)
    z0 = plain.rsample((4,))
    lq0 = plain.log_prob(z0)
    assert lq.shape == (4, 6)
    eps = torch.finfo(torch.float32).eps  # z = loc + scale * noise: a few roundings, in either order
    torch.testing.assert_close(z, z0, rtol=4 * eps, atol=4 * eps * float(z0.detach().abs().max()))
    torch.testing.assert_close(lq, lq0, rtol=1e-6, atol=1e-5)
    g = torch.autograd.grad(lq.sum() + (z ** 2).sum(), (loc, raw), retain_graph=True)
    g0 = torch.autograd.grad(lq0.sum() + (z0 ** 2).sum(), (loc, raw))
    for a, b in zip(g, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_standard_normal_and_its_kl():
    import pyro.distributions as dist
    from torch.distributions import kl_divergence

    from pyrovi.distributions import DiagonalNormal, StandardNormal

    torch.manual_seed(3)
    p = StandardNormal((4,))
    ref = dist.Normal(0.0, 1.0).expand([4]).to_event(1)
    z = torch.randn(3, 5, 4) * 3
    torch.testing.assert_close(p.log_prob(z), ref.log_prob(z), rtol=1e-6, atol=1e-5)
    pb = p.expand([5])  # the data plate's expansion keeps the class; a value without batch dims broadcasts
    assert isinstance(pb, StandardNormal) and pb.log_prob(z[0, 0]).shape == (5,)
    loc, scale = torch.randn(5, 4), torch.rand(5, 4) + 0.05
    kl = kl_divergence(DiagonalNormal(loc, scale), pb)
    torch.testing.assert_close(kl, kl_divergence(dist.Normal(loc, scale).to_event(1), ref.expand([5])),
                               rtol=1e-6, atol=1e-6)
    z64 = torch.zeros(2, dtype=torch.float64)
    assert StandardNormal((2,), dtype=torch.float64).log_prob(z64).dtype == torch.float64


def test_bernoulli_logits_matches_torch_to_float_rounding():
    """Summing the cross-entropy before negating gives torch's value and gradient, to float32 rounding."""
    import pyro.distributions as dist

    from pyrovi.distributions import BernoulliLogits

    torch.manual_seed(4)
    logits = (torch.randn(3, 5, 16) * 4).requires_grad_()
    x = torch.rand(5, 16)  # grey levels are allowed (cross-entropy), broadcast over particles
    x[:, :8] = x[:, :8].round()
    lp = BernoulliLogits(logits).log_prob(x)
    ref = dist.Bernoulli(logits=logits, validate_args=False).to_event(1).log_prob(x)
    # 16 cross-entropies summed per row: rounding of at most a few eps per term, in any summation order
    eps = torch.finfo(torch.float32).eps
    tol = dict(rtol=4 * eps * 16, atol=4 * eps * 16 * float(ref.detach().abs().max()))
    assert lp.shape == (3, 5)
    torch.testing.assert_close(lp, ref, **tol)
    g, = torch.autograd.grad(lp.sum(), logits)
    g0, = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g, g0, rtol=4 * eps, atol=4 * eps)  # elementwise: sigmoid(l) - x
    torch.testing.assert_close(BernoulliLogits(logits[0]).expand([5]).log_prob(x), ref[0], **tol)


def test_vae_prior_is_cached_per_dtype():
    m = pv.models.VAE(8, 3, hidden=(4,))
    x = torch.zeros(2, 8)
    assert m.prior(2, x) is m.prior(5, x)
    p64 = m.prior(2, x.double())
    assert p64 is not m.prior(2, x) and p64.log_prob(torch.zeros(3, dtype=torch.float64)).dtype == torch.float64


def test_fused_adam_is_adam():
    """fit's optimizer (fused kernel) takes the same steps as torch's default Adam, up to rounding."""
    from pyrovi.train import adam

    torch.manual_seed(6)
    w0 = torch.randn(50, 20)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    oa, ob = adam([a], lr=1e-2, weight_decay=1e-3), torch.optim.Adam([b], lr=1e-2, weight_decay=1e-3)
    assert oa.param_groups[0]["fused"]
    for _ in range(20):
        g = torch.randn(50, 20)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert not torch.equal(a, w0)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, particles", [("elbo", 3), ("meanfield", 2), ("iwae", 4)])
def test_vae_loss_equals_plain_pyro_distributions(name, particles):
    """pyrovi's VAE + DiagNormal loss (fast path, lean distributions) equals the same model written with
    Pyro's stock distributions and Pyro's own ELBO, on the same seed."""
    import pyro.distributions as dist
    from pyro.infer import RenyiELBO, Trace_ELBO, TraceMeanField_ELBO

    torch.manual_seed(0)
    model = pv.models.VAE(12, 3, hidden=(8,))
    guide = pv.guides.DiagNormal(model, hidden=(8,))
    x = (torch.rand(5, 12) < 0.4).float()

    def plain_model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=model.decoder(z), validate_args=False).to_event(1), obs=x)

    def plain_guide(x):
        loc, raw = guide.heads["z"](guide.body(x)).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, torch.nn.functional.softplus(raw) + guide.min_scale).to_event(1))

    obj = pv.objectives.get(name, particles=particles)
    obj.max_plate_nesting = 1
    pyro.set_rng_seed(3)
    mine = obj(model, guide, x)
    kw = dict(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    pyro.set_rng_seed(3)
    if name == "iwae":  # RenyiELBO(alpha=0) is the IWAE bound; it has no differentiable_loss, only its value
        ref = torch.tensor(RenyiELBO(alpha=0.0, **kw).loss(plain_model, plain_guide, x))
        mine = mine.detach()
    else:
        ref = (Trace_ELBO if name == "elbo" else TraceMeanField_ELBO)(**kw).differentiable_loss(
            plain_model, plain_guide, x)
    torch.testing.assert_close(mine, ref, rtol=2e-6, atol=1e-4)
