"""Sampling from the prior: draw z ~ N(0, I) and decode it, E[x | z].

Trains a Bernoulli VAE on the embedded 8x8 digits, decodes 64 prior draws,
and scores 1000 of them with a logistic-regression classifier trained on real
(grey) digits: mean max-probability and the entropy of the class histogram
(see ``pyrovi.sample_quality``).

    python examples/prior_samples.py [--quick] [--out DIR]

Writes DIR/prior_samples.png, DIR/results.json and the run directory DIR/run.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import torch

import pyrovi as pv
from pyrovi import plots
from pyrovi.sample_quality import fit_scorer

NAME = "prior_samples"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny budget for a smoke test (figure not meaningful)")
    p.add_argument("--out", default=os.path.join("runs", "examples", NAME), help="output directory")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 150; 2 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    os.makedirs(args.out, exist_ok=True)
    epochs = args.epochs or (2 if args.quick else 150)
    n_score = 100 if args.quick else 1000
    torch.manual_seed(args.seed)  # the nets' initial weights come from torch's global RNG
    data = pv.data.load("digits", seed=args.seed)
    model = pv.models.VAE(data.shape, latent_dim=8, likelihood="bernoulli", image_shape=data.image_shape)
    run = pv.fit(model, pv.guides.DiagNormal(model), data, epochs=epochs, seed=args.seed,
                 out=os.path.join(args.out, "run"), overwrite=True, progress=False, figures=not args.quick)

    grey = pv.data.load("digits", seed=args.seed, binarize=None)
    scorer = fit_scorer(grey.train.x, grey.train.y, seed=args.seed)
    x = pv.uses.sample_prior(run, n_score, seed=args.seed + 1)  # (n, 64) pixel probabilities
    scores = scorer.score(x)
    counts = np.bincount(scorer.predict(x), minlength=10)
    results = {"epochs": epochs, "classifier_test_accuracy": scorer.accuracy(grey.test.x, grey.test.y),
               "samples": scores, "real_test_digits": scorer.score(grey.test.x),
               "predicted_class_counts": counts.tolist()}
    prob = scorer.probabilities(x[:64])  # (64, 10)
    pred = prob.argmax(1)
    plots.image_panels(
        {"": x[:64]}, data.image_shape, ncols=8,
        item_titles={"": [f"{c}: p={p:.2f}" for c, p in zip(pred, prob.max(1))]},
        title=(f"64 prior samples E[x | z], z ~ N(0, I_8), {epochs} epochs\n"
               f"above each: class and p(class | x) of a classifier of real digits\n"
               f"mean confidence {scores['confidence']:.2f}, class entropy "
               f"{scores['marginal_entropy']:.2f} of max {math.log(10):.2f} nats"),
        path=os.path.join(args.out, "prior_samples.png"))
    results["first_row_predicted"] = pred[:8].tolist()
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)  # nets this small run faster on one thread than on two
    main()
