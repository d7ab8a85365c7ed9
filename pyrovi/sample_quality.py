"""Scores for generated images: a classifier trained on real data, and distance to the nearest real image.

Used to compare generators that have no common likelihood (a VAE against an
autoencoder, whose "samples" are decodes of random codes). For samples
:math:`x_1..x_n` and a classifier :math:`p(c \\mid x)` trained on real data:

.. math::

    \\text{confidence} = \\frac1n \\sum_i \\max_c p(c \\mid x_i), \\qquad
    H_{\\text{item}} = \\frac1n \\sum_i H[p(\\cdot \\mid x_i)], \\qquad
    H_{\\text{marginal}} = H\\Big[\\frac1n \\sum_i p(\\cdot \\mid x_i)\\Big]

(entropies in nats; :math:`\\log C` is the maximum). Good samples look like
one class each (high confidence, low :math:`H_{\\text{item}}`) and cover all
classes (:math:`H_{\\text{marginal}}` near :math:`\\log C`). The two combine
into the classifier ("Inception") score of Salimans et al. 2016,
:math:`\\exp(H_{\\text{marginal}} - H_{\\text{item}})`, between 1 and C.

A classifier can be confident on images unlike any real one, so a second,
classifier-free measure is reported: the root-mean-square pixel distance from
each sample to its nearest real training image,
:math:`\\frac1n\\sum_i \\min_j \\lVert x_i - r_j \\rVert_2 / \\sqrt D`
(pixel units, data in [0, 1]). Real held-out images give the reference value.

The classifier is scikit-learn's multinomial logistic regression (or an MLP);
nothing here is written by hand except the three averages above.
"""

from __future__ import annotations

import math
import numpy as np
import torch

from .errors import ConfigError, lookup

__all__ = ["SampleScorer", "fit_scorer", "CLASSIFIERS"]


def _logistic(seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=3000, C=1.0, random_state=seed)


def _mlp(seed: int):
    from sklearn.neural_network import MLPClassifier

    return MLPClassifier(hidden_layer_sizes=(128,), max_iter=600, random_state=seed)


#: name -> factory(seed) of an unfitted scikit-learn classifier
CLASSIFIERS = {"logistic": _logistic, "mlp": _mlp}


def _np(x) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], -1)


class SampleScorer:
    """A classifier and a nearest-neighbour reference built from real, labelled data.

    Args:
        classifier: ``"logistic"`` (default) or ``"mlp"``.
        seed: seeds the classifier's fit.

    After :meth:`fit`: ``classes_`` (the label values, ``(C,)``) and
    ``reference_`` (the real images, ``(N, D)``).
    """

    def __init__(self, classifier: str = "logistic", *, seed: int = 0):
        self.classifier = classifier
        self.seed = seed
        self._factory = lookup(CLASSIFIERS, classifier, "classifier")

    def fit(self, x, y) -> "SampleScorer":
        """Train the classifier on real images ``x`` ``(N, D)`` in [0, 1] with labels ``y`` ``(N,)``; keep ``x``."""
        x, y = _np(x), np.asarray(torch.as_tensor(y).cpu()).reshape(-1)
        if x.shape[0] != y.shape[0] or x.shape[0] < 2:
            raise ConfigError(f"SampleScorer.fit needs one label per row and >= 2 rows; got x {x.shape}, y {y.shape}")
        self.clf_ = self._factory(self.seed).fit(x, y)
        self.classes_ = self.clf_.classes_
        self.reference_ = torch.as_tensor(x, dtype=torch.float32)
        return self

    def _check(self, x) -> np.ndarray:
        if not hasattr(self, "clf_"):
            raise ConfigError("call SampleScorer.fit(x, y) on real data first")
        x = _np(x)
        if x.shape[1] != self.reference_.shape[1]:
            raise ConfigError(f"items have {x.shape[1]} values, the scorer was fitted on {self.reference_.shape[1]}")
        return x

    def accuracy(self, x, y) -> float:
        """Share of real items ``x`` ``(N, D)`` whose predicted class is ``y`` ``(N,)``; in [0, 1]."""
        x = self._check(x)
        return float(self.clf_.score(x, np.asarray(torch.as_tensor(y).cpu()).reshape(-1)))

    def probabilities(self, x) -> np.ndarray:
        """Class probabilities p(c | x), shape ``(N, C)``, columns in the order of ``classes_``."""
        x = self._check(x)
        return self.clf_.predict_proba(x)

    def predict(self, x) -> np.ndarray:
        """Most probable class of each item, shape ``(N,)``."""
        x = self._check(x)
        return self.clf_.predict(x)

    def nn_distance(self, x) -> np.ndarray:
        """RMS pixel distance of each item to its nearest reference image, shape ``(N,)`` (pixel units)."""
        xt = torch.as_tensor(self._check(x), dtype=torch.float32)
        d = torch.cdist(xt, self.reference_).min(dim=1).values  # (N,)
        return (d / math.sqrt(xt.shape[1])).numpy()

    def score(self, x) -> dict:
        """Scores of the items ``x`` ``(N, D)``; all floats.

        Returns ``confidence`` (mean max probability, in [1/C, 1]),
        ``item_entropy`` and ``marginal_entropy`` (nats, in [0, log C]),
        ``classifier_score`` (:math:`\\exp(H_{marginal} - H_{item})`, in [1, C]),
        ``nn_distance`` (mean RMS pixel distance to the nearest real image) and ``n``.
        """
        p = np.clip(self.probabilities(x), 1e-12, 1.0)  # (N, C)
        item_h = float(-(p * np.log(p)).sum(1).mean())
        marg = p.mean(0)
        marg_h = float(-(marg * np.log(marg)).sum())
        return {
            "confidence": float(p.max(1).mean()),
            "item_entropy": item_h,
            "marginal_entropy": marg_h,
            "classifier_score": float(math.exp(marg_h - item_h)),
            "nn_distance": float(self.nn_distance(x).mean()),
            "n": int(p.shape[0]),
        }

    def label_rates(self, x, labels) -> dict:
        """Per requested label, the share of items ``x`` ``(N, D)`` the classifier assigns to it.

        ``labels``: ``(N,)``, the class each item was generated for. Returns
        ``{label: rate in [0, 1]}`` for every label present, plus ``"mean"``
        (the unweighted mean over labels; 1/C when the labels are ignored).
        """
        labels = np.asarray(torch.as_tensor(labels).cpu()).reshape(-1)
        pred = self.predict(x)
        if pred.shape[0] != labels.shape[0]:
            raise ConfigError(f"got {pred.shape[0]} items but {labels.shape[0]} labels")
        rates = {int(c): float((pred[labels == c] == c).mean()) for c in np.unique(labels)}
        rates["mean"] = float(np.mean(list(rates.values())))
        return rates


def fit_scorer(x, y, classifier: str = "logistic", seed: int = 0) -> SampleScorer:
    """A :class:`SampleScorer` trained on real images ``x`` ``(N, D)`` with labels ``y`` ``(N,)``."""
    return SampleScorer(classifier, seed=seed).fit(x, y)

