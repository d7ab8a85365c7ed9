"""Conditional generation: a ConditionalVAE draws digits of a requested class.

The label y is given to the encoder, q(z | x, y), and to the decoder,
p(x | z, y); the prior p(z) = N(0, I) ignores it. Fixing y and drawing
z ~ p(z) generates a digit of class y. An independent logistic-regression
classifier, trained on real grey digits, checks that it does: the share of
samples drawn for label y that it calls y, per class (chance is 1/10).

    python examples/conditional_grid.py [--quick] [--out DIR]

Writes DIR/conditional_grid.png (one row per label), DIR/results.json and the
run directory DIR/run (``pyrovi sample DIR/run --label 3`` reads it).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import pyrovi as pv
from pyrovi import plots
from pyrovi.sample_quality import fit_scorer

NAME = "conditional_grid"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny budget for a smoke test (figure not meaningful)")
    p.add_argument("--out", default=os.path.join("runs", "examples", NAME), help="output directory")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 150; 2 with --quick)")
    p.add_argument("--per-class", type=int, default=None, help="samples scored per label (default 500; 20 quick)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def label_rates(run, scorer, per_class: int, classes: int, seed: int) -> dict:
    """Share of ``per_class`` samples for each label that ``scorer`` assigns to that label, plus "mean"."""
    y = torch.arange(classes).repeat_interleave(per_class)  # (classes * per_class,)
    x = pv.uses.sample_prior(run, y.shape[0], label=y, seed=seed)  # (N, D)
    return scorer.label_rates(x, y)


def main(argv=None) -> dict:
    args = parse(argv)
    os.makedirs(args.out, exist_ok=True)
    epochs = args.epochs or (2 if args.quick else 150)
    per_class = args.per_class or (20 if args.quick else 500)
    torch.manual_seed(args.seed)  # the nets' initial weights come from torch's global RNG
    data = pv.data.load("digits", seed=args.seed)
    C = data.num_classes
    model = pv.models.ConditionalVAE(data.shape, latent_dim=8, num_classes=C, image_shape=data.image_shape)
    run = pv.fit(model, pv.guides.DiagNormal(model), data, epochs=epochs, seed=args.seed,
                 out=os.path.join(args.out, "run"), overwrite=True, progress=False, figures=not args.quick)

    grey = pv.data.load("digits", seed=args.seed, binarize=None)
    scorer = fit_scorer(grey.train.x, grey.train.y, seed=args.seed)
    rates = label_rates(run, scorer, per_class, C, args.seed + 1)
    results = {"epochs": epochs, "per_class": per_class, "chance": 1.0 / C,
               "classifier_test_accuracy": scorer.accuracy(grey.test.x, grey.test.y),
               "rate_per_label": {str(k): v for k, v in rates.items()}}

    cols = 10
    # the same z in every column: the label changes the class, z keeps the style (slant, width)
    z = torch.randn(cols, 8, generator=torch.Generator().manual_seed(args.seed + 2))  # (cols, L)
    grid = model.decode(z.repeat(C, 1), torch.arange(C).repeat_interleave(cols))  # (C * cols, D)
    plots.image_panels(
        {"": grid}, data.image_shape, ncols=cols,
        row_labels=[f"label {c}\n{100 * rates[c]:.0f}% as {c}" for c in range(C)],
        col_labels=[f"z draw {j + 1}" for j in range(cols)],
        title=(f"ConditionalVAE samples E[x | z, y]: one row per label y, "
               f"one z ~ N(0, I_8) per column ({epochs} epochs)\n"
               f"left: share of {per_class} samples per label that a classifier of real digits calls y "
               f"(mean {100 * rates['mean']:.1f}%, chance 10%)"),
        path=os.path.join(args.out, "conditional_grid.png"))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)  # nets this small run faster on one thread than on two
    main()
