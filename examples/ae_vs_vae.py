"""Autoencoder vs VAE as generators: decode random codes z ~ N(0, I) from both and score them.

Both models have the same encoder and decoder nets (64-256-8 / 8-256-64) and
the same Bernoulli likelihood; the autoencoder is trained on reconstruction
alone (``pyrovi.models.Autoencoder`` with the point-mass ``Delta`` guide), the
VAE on the ELBO. The decoded codes are scored by a logistic-regression
classifier trained on real grey digits (confidence, class entropies, the
classifier score exp(H_marginal - H_item)) and by the RMS pixel distance to
the nearest real training digit (``pyrovi.sample_quality``). Real held-out
digits give the reference row. A third row decodes the autoencoder at codes
drawn from a Gaussian fitted to its own training codes -- the usual repair,
which needs a density model that the autoencoder does not have.

    python examples/ae_vs_vae.py [--quick] [--out DIR] [--seeds 3]

Writes DIR/ae_vs_vae.png, DIR/results.json (per seed and mean) and DIR/results.md.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

import pyrovi as pv
from pyrovi import plots
from pyrovi.sample_quality import fit_scorer

NAME = "ae_vs_vae"
KEYS = ("confidence", "item_entropy", "marginal_entropy", "classifier_score", "nn_distance")
ROWS = ("real test digits", "VAE, z ~ N(0, I)", "AE, z ~ N(0, I)", "AE, z ~ N(mean, cov of its codes)")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny budget for a smoke test (numbers not meaningful)")
    p.add_argument("--out", default=os.path.join("runs", "examples", NAME), help="output directory")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 100; 2 with --quick)")
    p.add_argument("--seeds", type=int, default=None, help="independent repeats (default 3; 1 with --quick)")
    p.add_argument("--n", type=int, default=None, help="decoded codes scored per model (default 1000)")
    return p.parse_args(argv)


def train_pair(data, epochs: int, seed: int, out: str, figures: bool = True):
    """A VAE and an autoencoder with identical nets, trained on the same data with the same seed."""
    runs = {}
    for name, model_cls, guide_cls in (("vae", pv.models.VAE, pv.guides.DiagNormal),
                                       ("ae", pv.models.Autoencoder, pv.guides.Delta)):
        torch.manual_seed(seed)  # same initial weights for the shared architecture
        model = model_cls(data.shape, latent_dim=8, hidden=(256,), likelihood="bernoulli",
                          image_shape=data.image_shape)
        guide = guide_cls(model, hidden=(256,))
        runs[name] = pv.fit(model, guide, data, epochs=epochs, seed=seed, out=os.path.join(out, f"{name}-seed{seed}"),
                            overwrite=True, progress=False, figures=figures)
    return runs


def decodes(runs, data, n: int, seed: int) -> dict:
    """{row name: (n, D) decoded images} for one seed."""
    ae = runs["ae"].model
    codes = pv.uses.encode(runs["ae"], data.train.x)  # (N, L) the autoencoder's training codes
    cov = torch.cov(codes.T) + 1e-5 * torch.eye(codes.shape[1])  # (L, L), jitter keeps it positive definite
    fitted = torch.distributions.MultivariateNormal(codes.mean(0), cov)
    torch.manual_seed(seed + 10)
    return {
        ROWS[1]: pv.uses.sample_prior(runs["vae"], n, seed=seed + 1),
        ROWS[2]: pv.uses.sample_prior(runs["ae"], n, seed=seed + 1),  # the same z draws as the VAE's
        ROWS[3]: ae.decode(fitted.sample((n,))),
    }, codes


def main(argv=None) -> dict:
    args = parse(argv)
    os.makedirs(args.out, exist_ok=True)
    epochs = args.epochs or (2 if args.quick else 100)
    seeds = args.seeds or (1 if args.quick else 3)
    n = args.n or (200 if args.quick else 1000)
    data = pv.data.load("digits", seed=0)
    grey = pv.data.load("digits", seed=0, binarize=None)
    scorer = fit_scorer(grey.train.x, grey.train.y)

    per_seed, figure_images, code_norms = [], None, []
    for seed in range(seeds):
        runs = train_pair(data, epochs, seed, args.out, figures=not args.quick)
        images, codes = decodes(runs, data, n, seed)
        code_norms.append(float(codes.norm(dim=1).mean()))
        row = {ROWS[0]: scorer.score(grey.test.x)}
        row.update({k: scorer.score(v) for k, v in images.items()})
        row["test reconstruction (nats, AE / VAE)"] = [
            -pv.evaluate(runs["ae"], data, k=1, save=False)["reconstruction"],
            -pv.evaluate(runs["vae"], data, k=1 if args.quick else 100, save=False)["reconstruction"]]
        per_seed.append(row)
        if figure_images is None:
            figure_images = images
    mean = {r: {k: float(np.mean([s[r][k] for s in per_seed])) for k in KEYS} for r in ROWS}
    std = {r: {k: float(np.std([s[r][k] for s in per_seed])) for k in KEYS} for r in ROWS}
    results = {"epochs": epochs, "seeds": seeds, "n": n, "latent_dim": 8,
               "classifier_test_accuracy": scorer.accuracy(grey.test.x, grey.test.y),
               "ae_code_norm_mean": float(np.mean(code_norms)), "prior_norm_sqrt_L": 8 ** 0.5,
               "mean": mean, "std": std, "per_seed": per_seed}

    lines = ["| samples | confidence | item entropy (nats) | class entropy (nats) | classifier score | "
             "NN distance |", "| --- | --- | --- | --- | --- | --- |"]
    for r in ROWS:
        lines.append(f"| {r} | " + " | ".join(f"{mean[r][k]:.3f} ± {std[r][k]:.3f}" for k in KEYS) + " |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"{epochs} epochs, {seeds} seeds (mean ± std), {n} decoded codes per model and seed\n\n{table}\n")

    panels = {f"{name}\nconfidence {mean[name]['confidence']:.2f}, NN dist. {mean[name]['nn_distance']:.3f}":
              figure_images[name][:36] for name in ROWS[1:]}
    plots.image_panels(
        panels, data.image_shape, ncols=6,
        title=(f"Decoded random codes, same nets (L=8, {epochs} epochs); "
               f"scores: mean over {seeds} seed(s) x {n} codes\n"
               f"real test digits: confidence {mean[ROWS[0]]['confidence']:.2f}, "
               f"NN dist. {mean[ROWS[0]]['nn_distance']:.3f}"),
        path=os.path.join(args.out, "ae_vs_vae.png"))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(table)
    print(f"AE code norm {results['ae_code_norm_mean']:.2f} vs sqrt(L) = {8 ** 0.5:.2f}")
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)  # nets this small run faster on one thread than on two
    main()
