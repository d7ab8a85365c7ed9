"""ConditionalVAE: labels reach encoder and decoder; class-conditional samples carry the requested class."""

import pytest
import torch

import pyrovi as pv
from pyrovi import models, objectives
from pyrovi.errors import ConfigError, DataError
from pyrovi.sample_quality import fit_scorer


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def digits():
    return pv.data.load("digits")


@pytest.fixture(scope="module")
def grey():
    return pv.data.load("digits", binarize=None)


def test_config_round_trip_and_registry(digits):
    m = models.ConditionalVAE(digits.shape, 4, num_classes=10, hidden=(32,), image_shape=digits.image_shape)
    cfg = m.config()
    assert cfg["name"] == "conditional_vae" and cfg["num_classes"] == 10
    rebuilt = models.build(cfg)
    assert isinstance(rebuilt, models.ConditionalVAE) and rebuilt.config() == cfg
    assert m.uses_labels and m.num_classes == 10
    assert "conditional_vae" in models.names()
    # the decoder reads [z, onehot(y)]: L + C inputs
    assert m.decoder[0].in_features == 4 + 10


@pytest.mark.parametrize("bad", [1, 0, 2.5, True])
def test_num_classes_validated(bad):
    with pytest.raises(ConfigError, match="num_classes"):
        models.ConditionalVAE(64, 4, num_classes=bad)


def test_build_without_num_classes_is_a_config_error():
    with pytest.raises(ConfigError, match="ConditionalVAE"):
        models.build({"name": "conditional_vae", "input_dim": 64, "latent_dim": 4})


def test_label_is_broadcast_over_particles():
    m = models.ConditionalVAE(6, 3, num_classes=4, hidden=(8,))
    z = torch.randn(5, 2, 3)  # (S, B, L)
    y = torch.tensor([0, 3])  # (B,)
    out = m.decoder_out(z, y)  # (S, B, D)
    assert out.shape == (5, 2, 6)
    # the same as decoding each particle with an explicit one-hot
    onehot = torch.nn.functional.one_hot(y, 4).float().expand(5, 2, 4)
    torch.testing.assert_close(out, m.decoder(torch.cat([z, onehot], -1)))
    # and the label matters: another label gives another decoder output
    assert not torch.allclose(out, m.decoder_out(z, torch.tensor([1, 2])))


def test_vectorized_objective_runs_with_labels(digits):
    m = models.ConditionalVAE(digits.shape, 4, num_classes=10, hidden=(16,))
    g = pv.guides.DiagNormal(m, hidden=(16,))
    x, y = digits.train.x[:7], digits.train.y[:7]
    for name in ("elbo", "iwae"):
        loss = objectives.get(name, particles=3)(m, g, x, y)
        assert loss.shape == () and torch.isfinite(loss)


def test_missing_or_bad_labels_are_clear_errors(digits):
    m = models.ConditionalVAE(digits.shape, 4, num_classes=10, hidden=(16,))
    with pytest.raises(ConfigError, match="model\\(x, y\\)"):
        m(digits.train.x[:3])
    with pytest.raises(ConfigError, match=r"\[0, 10\)"):
        m.sample(3, label=10)
    with pytest.raises(ConfigError, match="n=3"):
        m.sample(3, label=[1, 2])
    with pytest.raises(ConfigError, match="integers"):
        m.sample(2, label=torch.tensor([0.5, 1.0]))
    with pytest.raises(DataError, match="labels"):
        pv.fit(m, None, digits.train.x, epochs=1, progress=False)  # no labels to condition on


def test_sample_labels_and_reproducibility():
    m = models.ConditionalVAE(6, 3, num_classes=4, hidden=(8,))
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = m.sample(8, generator=g())  # labels 0,1,2,3,0,1,2,3
    b = m.sample(8, label=torch.arange(8) % 4, generator=g())
    torch.testing.assert_close(a, b)
    assert m.sample(5, label=2).shape == (5, 6)
    assert ((a >= 0) & (a <= 1)).all()  # Bernoulli means are probabilities


def test_conditional_samples_are_classified_as_their_label(digits, grey, tmp_path):
    """A classifier of real digits calls samples drawn for label c "c" far above chance.

    If the model ignored labels, the expected mean over classes of the match rate would be exactly
    sum_c P(classifier says c) / C = 1/C = 0.1, whatever the samples look like. With 100 samples per
    class the mean rate has standard error <= sqrt(0.25 / 1000) = 0.016, so 0.5 is > 25 standard
    errors above chance. The control scores the same samples against the wrong label (c + 1).
    """
    torch.manual_seed(0)
    m = models.ConditionalVAE(digits.shape, 8, num_classes=10, image_shape=digits.image_shape)
    run = pv.fit(m, pv.guides.DiagNormal(m), digits, epochs=20, seed=0, progress=False, out=tmp_path / "cvae")
    scorer = fit_scorer(grey.train.x, grey.train.y)
    y = torch.arange(10).repeat_interleave(100)
    x = pv.uses.sample_prior(run, y.shape[0], label=y, seed=1)
    rates = scorer.label_rates(x, y)
    assert rates["mean"] > 0.5, rates
    wrong = scorer.label_rates(x, (y + 1) % 10)
    assert wrong["mean"] < 0.2, wrong

    # the run directory rebuilds the same conditional model (num_classes stored in config.json)
    loaded = pv.load_run(tmp_path / "cvae")
    assert isinstance(loaded.model, models.ConditionalVAE)
    torch.testing.assert_close(pv.uses.sample_prior(loaded, 20, label=7, seed=5),
                               pv.uses.sample_prior(run, 20, label=7, seed=5))


def test_cli_train_conditional_and_sample_by_label(tmp_path, capsys):
    from pyrovi.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", "conditional_vae", "--latent-dim", "4", "--hidden", "32", "--epochs", "1",
                 "--out", str(out), "--no-progress"]) == 0
    assert main(["sample", str(out), "--label", "3", "--n", "8", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["sample", str(out), "--label", "10"]) == 2
    assert "[0, 10)" in capsys.readouterr().err
