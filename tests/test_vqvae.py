"""VQ-VAE model + Codebook guide: gradient routing, the ELBO identity, codebook updates, metrics."""

import math

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

import pyrovi as pv
from pyrovi.guides.codebook import Codebook
from pyrovi.models.vqvae import VQVAE
from pyrovi.run import discover_params
from pyrovi.vq_evaluation import code_usage, vq_metrics, vq_terms


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(digits, **guide_opts):
    model = VQVAE(digits.shape, 8, code_dim=4, downsample=1, channels=8, image_shape=digits.image_shape)
    guide = Codebook(model, **guide_opts)
    return model, guide


def _loss(model, guide, x):
    return Trace_ELBO(num_particles=1, vectorize_particles=True, max_plate_nesting=1).differentiable_loss(
        model, guide, x)


def _grads(term, params):
    return torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)


# --------------------------------------------------------------------------- structure


def test_shapes_sites_and_config_roundtrip(digits):
    model, guide = _tiny(digits)
    x = digits.train.x[:5]
    assert model.latent_sites == {"z": (16, 4)}  # 8x8 -> 4x4 grid of 4-d codes
    tr = pyro.poutine.trace(guide).get_trace(x)
    assert tr.nodes["z"]["value"].shape == (5, 16, 4)
    assert type(tr.nodes["z"]["fn"]).__name__ == "Delta"
    out = pyro.poutine.replay(model, trace=tr)(x)
    assert out.shape == (5, 64)
    m2 = pv.models.build(model.config())
    g2 = pv.guides.build(m2, guide.config())
    assert m2.config() == model.config() and g2.config() == guide.config()
    assert set(m2.state_dict()) == set(model.state_dict()) and set(g2.state_dict()) == set(guide.state_dict())


def test_vectorized_particles_give_identical_draws(digits):
    model, guide = _tiny(digits)
    guide.eval()
    lw = pv.weights.log_weights(model, guide, digits.train.x[:6], particles=4, max_plate_nesting=1)
    assert lw.log_w.shape == (4, 6)
    assert torch.equal(lw.log_w, lw.log_w[:1].expand(4, 6))  # a point mass: every particle the same


def test_bad_options_raise(digits):
    model = VQVAE(digits.shape, 8, code_dim=4, image_shape=digits.image_shape)
    with pytest.raises(pv.ConfigError, match="codebook_weight has no effect with ema_decay"):
        Codebook(model, ema_decay=0.99, codebook_weight=2.0)
    with pytest.raises(pv.ConfigError, match="ema_eps only applies"):
        Codebook(model, ema_eps=1e-3)
    with pytest.raises(pv.ConfigError, match="kmeans_iters only applies"):
        Codebook(model, kmeans_init=False, kmeans_iters=5)
    with pytest.raises(pv.ConfigError, match="ema_decay must be"):
        Codebook(model, ema_decay=1.5)
    with pytest.raises(pv.ConfigError, match="restart_dead"):
        Codebook(model, restart_dead=-1.0)
    with pytest.raises(pv.ConfigError, match="needs a VQ model"):
        Codebook(pv.models.VAE(digits.shape))
    with pytest.raises(pv.ConfigError, match="exactly one layout"):
        VQVAE(digits.shape, 8)
    with pytest.raises(pv.ConfigError, match="not divisible"):
        VQVAE(digits.shape, 8, downsample=4, image_shape=(8, 8))
    with pytest.raises(pv.ConfigError, match="unknown likelihood"):
        VQVAE(digits.shape, 8, image_shape=(8, 8), likelihood="poisson")


# --------------------------------------------------------------------------- gradient routing (Done-when 1)


def test_gradient_routing_is_exact(digits):
    """Decoder <- reconstruction only; encoder <- reconstruction (straight-through) + commitment;
    codebook <- codebook term only; and Pyro's Trace_ELBO gradient is exactly the sum of those parts."""
    model, guide = _tiny(digits, kmeans_init=False)
    model.train(), guide.train()
    x = digits.train.x[:32]
    groups = {"encoder": list(guide.encoder.parameters()), "decoder": list(model.decoder.parameters()),
              "codebook": [model.codebook]}
    params = [p for g in groups.values() for p in g]

    q = guide.quantize(x)
    recon = -model.likelihood(model.decoder(q.z_q)).log_prob(x).sum()  # -log p(x | z_q)
    terms = {"recon": recon, "codebook": q.codebook_loss.sum(), "commitment": 0.25 * q.commitment_loss.sum()}
    expect = {  # which parameter groups each term reaches
        "recon": {"encoder", "decoder"},
        "codebook": {"codebook"},
        "commitment": {"encoder"},
    }
    parts = {}
    for name, term in terms.items():
        grads = dict(zip(map(id, params), _grads(term, params)))
        for gname, ps in groups.items():
            reached = [grads[id(p)] is not None and bool(grads[id(p)].abs().sum() > 0) for p in ps]
            if gname in expect[name]:
                assert any(reached), f"{name} term should reach the {gname}"
            else:  # no autograd path at all: exactly zero, not merely small
                assert all(grads[id(p)] is None for p in ps), f"{name} term must not reach the {gname}"
        parts[name] = grads

    loss = _loss(model, guide, x)  # same parameters, deterministic encoder: same quantization
    total = dict(zip(map(id, params), _grads(loss, params)))
    for p in params:
        want = sum(parts[n][id(p)] for n in terms if parts[n][id(p)] is not None)
        torch.testing.assert_close(total[id(p)], want, rtol=1e-5, atol=1e-6)


def test_straight_through_passes_decoder_gradient_unchanged(digits):
    model, guide = _tiny(digits, kmeans_init=False)
    x = digits.train.x[:16]
    z_e = guide.encode_e(x)
    q = guide.quantize(x, z_e)
    g_st = torch.autograd.grad(-model.likelihood(model.decoder(q.z_q)).log_prob(x).sum(), z_e)[0]
    e = model.codebook.detach()[q.codes].clone().requires_grad_(True)  # the decoder's input, as a leaf
    g_e = torch.autograd.grad(-model.likelihood(model.decoder(e)).log_prob(x).sum(), e)[0]
    torch.testing.assert_close(g_st, g_e)
    torch.testing.assert_close(q.z_q, e.detach())  # forward value is the code vector


def test_codebook_is_optimized_exactly_once(digits):
    model, guide = _tiny(digits)
    x = digits.train.x[:4]
    obj = pv.objectives.get("elbo")
    with pyro.get_param_store().scope(pv.run.empty_param_state()):
        params = discover_params(model, guide, lambda: obj(model, guide, x))
    assert sum(p is model.codebook for p in params) == 1
    assert len({p.data_ptr() for p in params}) == len(params)  # no tensor twice under another name
    assert not bool(guide.initialized)  # the parameter-only probe must not run k-means


# --------------------------------------------------------------------------- the ELBO identity (Done-when 2)


def test_elbo_equals_reconstruction_minus_L_log_K_exactly(digits):
    model, guide = _tiny(digits, kmeans_init=False)  # no k-means step between the two traces below
    model.double(), guide.double()
    x = digits.test.x[:20].double()
    t = vq_terms(model, guide, x)
    L, K = model.length, model.num_codes
    # log p(z) sums L terms of -log K; L * log K multiplies: equal to float64 rounding, not bit for bit
    rtol = 4 * torch.finfo(torch.float64).eps * L
    torch.testing.assert_close(t.kl, torch.full_like(t.kl, L * math.log(K)), rtol=rtol, atol=0)
    torch.testing.assert_close(t.elbo, t.reconstruction - L * math.log(K), rtol=rtol,
                               atol=rtol * float(t.reconstruction.abs().max()))
    # Pyro's own Trace_ELBO agrees: eval mode -> the ELBO; training mode -> ELBO minus the VQ penalty.
    guide.eval()
    torch.testing.assert_close(-_loss(model, guide, x), t.elbo.sum(), rtol=1e-12, atol=1e-9)
    guide.train()
    torch.testing.assert_close(-_loss(model, guide, x), (t.elbo - t.vq_loss).sum(), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(t.vq_loss, t.codebook_loss + 0.25 * t.commitment_loss)
    assert bool((t.vq_loss > 0).all())  # reported separately, and not zero


def test_evaluate_on_a_vq_run_reports_the_elbo(digits):
    model, guide = _tiny(digits)
    run = pv.fit(model, guide, digits, epochs=1, batch_size=128, progress=False)
    res = pv.evaluate(run, digits, k=50)
    L, K = model.length, model.num_codes
    assert res["k"] == 1  # one-hot q: the IWAE estimate is the ELBO
    assert res["log_likelihood"] == pytest.approx(res["elbo"], abs=1e-9)
    assert res["kl"] == pytest.approx(L * math.log(K), rel=1e-6)
    assert res["elbo"] == pytest.approx(res["reconstruction"] - L * math.log(K), rel=1e-6)
    vq = vq_metrics(run, digits)
    assert vq["elbo"] == pytest.approx(res["elbo"], rel=1e-5)
    assert vq["bits_per_dim"] == pytest.approx(res["bits_per_dim"], rel=1e-5)
    # fit's validation loss is -ELBO (eval mode), its training loss also carries the VQ penalty
    assert run.history[-1]["val_loss"] == pytest.approx(-vq_metrics(run, digits.val, save=False)["elbo"], rel=1e-5)
    # the report says what that number is: the ELBO with K = 1, exact for the point-mass q, not an IWAE estimate
    from pyrovi.report import _test_section

    text = "\n".join(_test_section(res, {"model": {"name": "vqvae"}}))
    assert "IWAE" not in text and "| log p(x) bound, K = 1: the ELBO, exact for this q" in text
    assert "| Monte-Carlo standard error of that estimate (nats) | 0.0000 |" in text


# --------------------------------------------------------------------------- codebook updates


def test_ema_updates_follow_the_formula_and_take_no_gradient(digits):
    model, guide = _tiny(digits, ema_decay=0.9, kmeans_init=False)
    assert "codebook" not in dict(model.named_parameters()) and "codebook" in dict(model.named_buffers())
    x = digits.train.x[:64]
    before = model.codebook.clone()
    count0, sum0 = guide.ema_count.clone(), guide.ema_sum.clone()
    with torch.no_grad():
        q = guide.quantize(x)
    loss = _loss(model, guide, x)  # training mode: one EMA step
    loss.backward()
    assert model.codebook.grad is None and not model.codebook.requires_grad
    K = model.num_codes
    counts = torch.bincount(q.codes.reshape(-1), minlength=K).float()
    sums = torch.zeros(K, 4).index_add_(0, q.codes.reshape(-1), q.z_e.reshape(-1, 4))
    count1, sum1 = 0.9 * count0 + 0.1 * counts, 0.9 * sum0 + 0.1 * sums
    n = count1.sum()
    expected = sum1 / ((count1 + 1e-5) / (n + K * 1e-5) * n)[:, None]
    torch.testing.assert_close(model.codebook, expected)
    assert not torch.equal(model.codebook, before)
    # the objective has no codebook term under EMA, only the commitment
    guide.eval()
    t = vq_terms(model, guide, x)
    torch.testing.assert_close(t.vq_loss, 0.25 * t.commitment_loss)


def test_ema_state_survives_a_run_directory(digits, tmp_path):
    model, guide = _tiny(digits, ema_decay=0.9, restart_dead=0.5)
    run = pv.fit(model, guide, digits, epochs=1, progress=False, out=str(tmp_path / "r"), figures=False)
    back = pv.load_run(str(tmp_path / "r"))
    assert isinstance(back.guide, Codebook) and back.guide.cfg.ema_decay == 0.9
    for name in ("ema_count", "ema_sum", "usage", "updates", "initialized"):
        assert torch.equal(getattr(back.guide, name), getattr(run.guide, name)), name
    assert torch.equal(back.model.codebook, run.model.codebook)
    assert int(back.guide.updates) == 12  # ceil(1437 / 128) training calls, none from probes or validation


def test_kmeans_init_runs_once_on_the_first_training_batch(digits):
    model, guide = _tiny(digits)  # kmeans_init is on by default
    x = digits.train.x[:64]  # 64 * 16 = 1024 encoder vectors for K = 8 codes
    guide.eval()
    guide(x)
    assert not bool(guide.initialized)  # eval mode never touches the codebook
    guide.train()
    with torch.no_grad():
        guide(x)
    assert not bool(guide.initialized)  # neither does a call without gradients
    err_before = guide.quantize(x).codebook_loss.sum()
    guide(x)
    assert bool(guide.initialized)
    q = guide.quantize(x)
    assert code_usage(q.codes, 8)["codes_used"] == 8  # k-means centres: every code owns vectors
    assert q.codebook_loss.sum() < err_before


@pytest.mark.parametrize("seed", [0, 1])
def test_dead_code_restart_leaves_fewer_unused_codes(digits, seed):
    """Done-when 3 (fast version): same run with and without restarts, codes never used on the training set."""
    dead = {}
    for restart in (None, 1.0):
        model = VQVAE(digits.shape, 128, code_dim=8, downsample=1, channels=16, image_shape=digits.image_shape)
        guide = Codebook(model, restart_dead=restart, usage_decay=0.9)
        run = pv.fit(model, guide, digits, epochs=3, batch_size=64, lr=2e-3, seed=seed, progress=False)
        dead[restart] = vq_metrics(run, digits.train)["dead_codes"]
    assert dead[1.0] < dead[None]


def test_code_usage_perplexity():
    assert code_usage(torch.arange(8).repeat(5), 8)["perplexity"] == pytest.approx(8.0)
    u = code_usage(torch.zeros(10, dtype=torch.long), 4)
    assert u["perplexity"] == pytest.approx(1.0) and u["dead_codes"] == 3 and u["usage"] == 0.25
