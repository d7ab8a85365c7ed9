"""The sample scores: confidence, entropies, classifier score and nearest-real distance."""

import math

import numpy as np
import pytest
import torch

from pyrovi.errors import ConfigError
from pyrovi.sample_quality import SampleScorer, fit_scorer


@pytest.fixture(scope="module")
def scorer():
    import pyrovi as pv

    grey = pv.data.load("digits", binarize=None)
    return fit_scorer(grey.train.x, grey.train.y), grey


def _with_probs(sc, probs):
    sc.probabilities = lambda x: np.asarray(probs)  # only the averages are under test here
    return sc


def test_uniform_and_one_hot_extremes(scorer):
    sc, grey = scorer
    x = grey.test.x[:10]
    s = _with_probs(fit_scorer(grey.train.x[:200], grey.train.y[:200]), np.full((10, 10), 0.1)).score(x)
    assert s["confidence"] == pytest.approx(0.1)
    assert s["item_entropy"] == pytest.approx(math.log(10))
    assert s["marginal_entropy"] == pytest.approx(math.log(10))
    assert s["classifier_score"] == pytest.approx(1.0)
    s = _with_probs(fit_scorer(grey.train.x[:200], grey.train.y[:200]), np.eye(10)).score(x)
    assert s["confidence"] == pytest.approx(1.0)
    assert s["item_entropy"] == pytest.approx(0.0, abs=1e-9)
    assert s["classifier_score"] == pytest.approx(10.0, rel=1e-6)


def test_nn_distance_is_rms_pixel_distance(scorer):
    sc, grey = scorer
    ref = sc.reference_[:3]
    np.testing.assert_allclose(sc.nn_distance(ref), 0.0, atol=1e-3)
    # an item shifted by c in one pixel of D is sqrt(c^2 / D) from its source (if that stays the nearest)
    shifted = ref.clone()
    shifted[:, 0] += 0.4
    d = sc.nn_distance(shifted)
    assert (d <= 0.4 / math.sqrt(64) + 1e-5).all()


def test_classifier_of_real_digits_is_accurate_and_confident(scorer):
    sc, grey = scorer
    assert sc.accuracy(grey.test.x, grey.test.y) > 0.9  # logistic regression on 8x8 digits: ~0.97
    assert sc.score(grey.test.x)["confidence"] > sc.score(torch.rand(200, 64))["confidence"]


def test_label_rates(scorer):
    sc, grey = scorer
    x, y = grey.test.x, grey.test.y
    rates = sc.label_rates(x, y)
    assert rates["mean"] > 0.9
    assert set(rates) == set(range(10)) | {"mean"}
    with pytest.raises(ConfigError, match="labels"):
        sc.label_rates(x, y[:5])


def test_errors():
    with pytest.raises(ConfigError, match="classifier"):
        SampleScorer("forest")
    with pytest.raises(ConfigError, match="fit"):
        SampleScorer().score(torch.zeros(2, 4))
