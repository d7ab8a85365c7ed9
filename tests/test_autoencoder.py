"""Autoencoder = flat prior + Delta guide: its ELBO is exactly the reconstruction log-likelihood."""

import math

import pytest
import torch
import torch.nn.functional as F

import pyrovi as pv
from pyrovi import guides, models, objectives


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def digits():
    return pv.data.load("digits")


def test_registry_config_and_default_guide(digits):
    m = models.Autoencoder(digits.shape, 4, hidden=(32,))
    cfg = m.config()
    assert cfg["name"] == "autoencoder"
    assert isinstance(models.build(cfg), models.Autoencoder)
    assert m.default_guide == "delta"
    g = guides.build(m, {"name": "delta", "hidden": [32]})
    assert isinstance(g, guides.Delta) and g.config()["name"] == "delta"


def test_bernoulli_loss_is_binary_cross_entropy(digits):
    m = models.Autoencoder(digits.shape, 4, hidden=(32,))
    g = guides.Delta(m, hidden=(32,))
    x = digits.train.x[:9]
    with torch.no_grad():
        z = g.encode(x)["z"][0]  # (B, L)
        bce = F.binary_cross_entropy_with_logits(m.decoder(z), x, reduction="sum")
        for name, particles in (("elbo", 1), ("elbo", 4), ("iwae", 5), ("meanfield", 2)):
            loss = objectives.get(name, particles=particles)(m, g, x)
            # every particle is the same point, so all bounds coincide with -log p(x | g(f(x)))
            torch.testing.assert_close(loss, bce, rtol=1e-5, atol=1e-4)


def test_gaussian_loss_is_scaled_squared_error():
    torch.manual_seed(0)
    sigma = 0.2
    m = models.Autoencoder(6, 3, hidden=(8,), likelihood="gaussian", sigma=sigma)
    g = guides.Delta(m, hidden=(8,))
    x = torch.rand(5, 6)
    with torch.no_grad():
        x_hat = m.decoder(g.encode(x)["z"][0])
        expect = ((x - x_hat) ** 2).sum() / (2 * sigma**2) + x.numel() * math.log(sigma * math.sqrt(2 * math.pi))
        torch.testing.assert_close(objectives.get("elbo")(m, g, x), expect, rtol=1e-5, atol=1e-4)


def test_delta_guide_encode_is_a_point_mass(digits):
    m = models.Autoencoder(digits.shape, 4, hidden=(16,))
    g = guides.Delta(m, hidden=(16,))
    point, scale = g.encode(digits.train.x[:3])["z"]
    assert point.shape == scale.shape == (3, 4)
    assert torch.count_nonzero(scale) == 0


def test_fit_trains_reconstruction_and_evaluate_reports_no_kl(digits, tmp_path):
    torch.manual_seed(0)
    m = models.Autoencoder(digits.shape, 8, image_shape=digits.image_shape)
    run = pv.fit(m, guides.Delta(m), digits, epochs=15, seed=0, progress=False, out=tmp_path / "ae")
    first, last = run.history[0]["val_loss"], run.history[-1]["val_loss"]
    # 64 pixels at chance cost 64 log 2 = 44.4 nats; training must do much better
    assert last < first and last < 0.6 * 64 * math.log(2), run.history
    metrics = pv.evaluate(run, digits, k=3, save=False)
    assert metrics["kl"] == 0.0
    assert metrics["log_likelihood"] == pytest.approx(metrics["reconstruction"], abs=1e-4)
    loaded = pv.load_run(tmp_path / "ae")
    assert isinstance(loaded.guide, guides.Delta)
    torch.testing.assert_close(pv.uses.reconstruct(loaded, digits.test.x[:4]),
                               pv.uses.reconstruct(run, digits.test.x[:4]))
    # "sampling" an autoencoder decodes z ~ N(0, I): the same draws a VAE would decode
    s = pv.uses.sample_prior(run, 10, seed=0)
    z = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(s, m.decode(z))


def test_cli_autoencoder_picks_the_delta_guide(tmp_path):
    from pyrovi.cli import main
    from pyrovi.checkpoint import read_json

    out = tmp_path / "ae"
    assert main(["train", "--model", "autoencoder", "--latent-dim", "4", "--hidden", "32", "--epochs", "1",
                 "--out", str(out), "--no-progress"]) == 0
    assert read_json(str(out / "config.json"), "config")["guide"]["name"] == "delta"


@pytest.mark.slow
def test_vae_prior_samples_beat_autoencoder_random_codes():
    """The seed's claim, measured: decoding z ~ N(0, I) gives digits from a VAE, garbage from an autoencoder.

    Same nets, data, seed and z draws for both (examples/ae_vs_vae.py, full budget, one seed). The
    nearest-real-digit distance is compared per sample with a two-sample z statistic; 10 standard
    errors leaves no room for chance. The classifier score must also favour the VAE.
    """
    import os
    import runpy

    from pyrovi.sample_quality import fit_scorer

    ex = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "examples", "ae_vs_vae.py"), run_name="x")
    data = pv.data.load("digits")
    grey = pv.data.load("digits", binarize=None)
    scorer = fit_scorer(grey.train.x, grey.train.y)
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        runs = ex["train_pair"](data, 100, 0, out, figures=False)
    images, _ = ex["decodes"](runs, data, 1000, 0)
    vae, ae = images[ex["ROWS"][1]], images[ex["ROWS"][2]]
    d_vae, d_ae = scorer.nn_distance(vae), scorer.nn_distance(ae)
    z = (d_ae.mean() - d_vae.mean()) / math.sqrt(d_ae.var() / len(d_ae) + d_vae.var() / len(d_vae))
    assert z > 10, z
    assert scorer.score(vae)["classifier_score"] > scorer.score(ae)["classifier_score"] + 0.5
