"""Reconstruction: encode held-out digits to their posterior mean code and decode them.

x -> mu(x) = E_q[z | x] -> E[x | z = mu(x)]. Trains a Bernoulli VAE on the
embedded 8x8 digits, reconstructs one test digit of each class, and reports
the held-out reconstruction term E_q[log p(x|z)] and the ELBO (nats per digit).

    python examples/reconstruction.py [--quick] [--out DIR]

Writes DIR/reconstructions.png, DIR/results.json and the run directory DIR/run.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import pyrovi as pv
from pyrovi import plots

NAME = "reconstruction"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny budget for a smoke test (figure not meaningful)")
    p.add_argument("--out", default=os.path.join("runs", "examples", NAME), help="output directory")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 150; 2 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def one_per_class(y: torch.Tensor, classes: int = 10) -> torch.Tensor:
    """Index of the first item of each class 0..classes-1, shape (classes,)."""
    return torch.stack([(y == c).nonzero()[0, 0] for c in range(classes)])


def main(argv=None) -> dict:
    args = parse(argv)
    os.makedirs(args.out, exist_ok=True)
    epochs = args.epochs or (2 if args.quick else 150)
    torch.manual_seed(args.seed)  # the nets' initial weights come from torch's global RNG
    data = pv.data.load("digits", seed=args.seed)  # binarized once, seeded
    model = pv.models.VAE(data.shape, latent_dim=8, likelihood="bernoulli", image_shape=data.image_shape)
    guide = pv.guides.DiagNormal(model)
    run = pv.fit(model, guide, data, epochs=epochs, seed=args.seed, out=os.path.join(args.out, "run"),
                 overwrite=True, progress=False, figures=not args.quick)

    idx = one_per_class(data.test.y)
    x = data.test.x[idx]  # (10, 64)
    x_hat = pv.uses.reconstruct(run, x)  # (10, 64), pixel probabilities
    metrics = pv.evaluate(run, data, k=1 if args.quick else 200, save=False)
    results = {"epochs": epochs, "test_elbo_nats": metrics["elbo"],
               "test_reconstruction_nats": metrics["reconstruction"], "test_kl_nats": metrics["kl"],
               "test_log_likelihood_nats": metrics["log_likelihood"], "k": metrics["k"],
               "mean_abs_pixel_error": float((x_hat - x).abs().mean())}
    grey = pv.data.load("digits", seed=args.seed, binarize=None).test.x[idx]  # same split, grey levels
    plots.image_panels(
        {"": torch.cat([grey, x, x_hat])}, data.image_shape, ncols=10,
        row_labels=["grey original", "binarized\ninput x", "reconstruction\nE[x | z=mu(x)]"],
        col_labels=[f"class {int(c)}" for c in data.test.y[idx]],
        title=f"Bernoulli VAE, L=8, {epochs} epochs: test ELBO {metrics['elbo']:.1f} nats, "
              f"reconstruction term {metrics['reconstruction']:.1f} nats",
        path=os.path.join(args.out, "reconstructions.png"))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)  # nets this small run faster on one thread than on two
    main()
