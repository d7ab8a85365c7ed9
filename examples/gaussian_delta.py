"""Gaussian likelihood on grey digits: the observation noise delta trades reconstruction against samples.

p(x | z) = N(x; g(z), delta^2 I) on the 8x8 digits scaled to [0, 1] (not
binarized). The reconstruction term is -||x - g(z)||^2 / (2 delta^2) - D log(delta sqrt(2 pi)),
so delta sets how much one unit of squared error is worth against the KL
term. A large delta lets the KL win (posterior collapse: every
reconstruction is the mean digit); a small one buys sharp reconstructions
with codes far from the prior, whose prior samples look worse. A learned
delta (one per pixel) moves towards each pixel's reconstruction RMSE.

For each delta (fixed 1, 0.3, 0.1, 0.03; learned from 1): test
reconstruction MSE of E[x | z = mu(x)], KL(q || p) in nats, active units,
and prior-sample quality (classifier confidence and nearest-real-digit
distance, ``pyrovi.sample_quality``).

    python examples/gaussian_delta.py [--quick] [--out DIR]

Writes DIR/gaussian_delta.png, DIR/gaussian_delta_tradeoff.png, DIR/results.json and DIR/results.md.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import pyrovi as pv
from pyrovi import plots
from pyrovi.sample_quality import fit_scorer

NAME = "gaussian_delta"
SETTINGS = (("delta=1 fixed", 1.0, False), ("delta=0.3 fixed", 0.3, False), ("delta=0.1 fixed", 0.1, False),
            ("delta=0.03 fixed", 0.03, False), ("delta learned (from 1)", 1.0, True))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny budget for a smoke test (numbers not meaningful)")
    p.add_argument("--out", default=os.path.join("runs", "examples", NAME), help="output directory")
    p.add_argument("--epochs", type=int, default=None, help="training epochs per model (default 100; 2 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def active_units(run, x: torch.Tensor, threshold: float = 0.01) -> int:
    """Burda et al. 2016: latent dimensions whose posterior mean varies across data, Var_x E_q[z_d] > threshold."""
    return int((pv.uses.encode(run, x).var(0) > threshold).sum())


def main(argv=None) -> dict:
    args = parse(argv)
    os.makedirs(args.out, exist_ok=True)
    epochs = args.epochs or (2 if args.quick else 100)
    data = pv.data.load("digits", seed=args.seed, binarize=None)  # grey levels in [0, 1]
    scorer = fit_scorer(data.train.x, data.train.y, seed=args.seed)
    show = data.test.x[:8]
    recon_rows, sample_rows, results = [show], [data.val.x[:8]], {"epochs": epochs, "settings": {}}
    for label, sigma, learn in SETTINGS:
        torch.manual_seed(args.seed)  # same initial nets for every delta
        model = pv.models.VAE(data.shape, latent_dim=8, likelihood="gaussian", sigma=sigma, learn_sigma=learn,
                              image_shape=data.image_shape)
        run = pv.fit(model, pv.guides.DiagNormal(model), data, epochs=epochs, seed=args.seed, progress=False)
        x_hat = pv.uses.reconstruct(run, data.test.x)  # (N, D) decoder means
        samples = pv.uses.sample_prior(run, 1000, seed=args.seed + 1).clamp(0, 1)  # pixels live in [0, 1]
        metrics = pv.evaluate(run, data, k=1 if args.quick else 20, save=False)
        delta = model.log_sigma.detach().exp()
        results["settings"][label] = {
            "test_mse": float(((x_hat - data.test.x) ** 2).mean()),
            "reconstructions_classified_correctly": scorer.accuracy(x_hat, data.test.y),
            "kl_nats": metrics["kl"], "active_units": active_units(run, data.train.x),
            "samples": scorer.score(samples),
            "delta_median": float(delta.median()), "delta_min": float(delta.min()), "delta_max": float(delta.max())}
        recon_rows.append(x_hat[:8])
        sample_rows.append(samples[:8])
    real = scorer.score(data.test.x)
    results["real_test_digits"] = real

    names = ["data"] + [s[0].replace("delta", "δ").replace(" (", "\n(") for s in SETTINGS]
    plots.image_panels(
        {"reconstructions E[x | z = mu(x)] of test digits": torch.cat(recon_rows),
         "prior samples E[x | z], z ~ N(0, I) (top row: other real digits)": torch.cat(sample_rows)},
        data.image_shape, ncols=8, row_labels=names,
        title=f"Gaussian VAE on grey digits (L=8, {epochs} epochs): the observation noise δ",
        path=os.path.join(args.out, "gaussian_delta.png"))
    plots.labeled_scatter(
        {s[0].replace("delta", "δ"): (results["settings"][s[0]]["test_mse"],
                                      results["settings"][s[0]]["samples"]["nn_distance"]) for s in SETTINGS},
        xlabel="test reconstruction MSE (pixel units², lower = sharper)",
        ylabel="prior samples: RMS distance to nearest real digit",
        title="Reconstruction vs sample quality as δ varies", reference=("real test digits", real["nn_distance"]),
        path=os.path.join(args.out, "gaussian_delta_tradeoff.png"))

    lines = ["| setting | test MSE | recon. classified correctly | KL (nats) | active units | sample confidence | "
             "sample NN distance | learned δ (median, min-max) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, _, learn in SETTINGS:
        r = results["settings"][label]
        d = f"{r['delta_median']:.3f} ({r['delta_min']:.3f}-{r['delta_max']:.3f})" if learn else "fixed"
        lines.append(f"| {label} | {r['test_mse']:.4f} | {r['reconstructions_classified_correctly']:.3f} | "
                     f"{r['kl_nats']:.2f} | {r['active_units']} | {r['samples']['confidence']:.3f} | "
                     f"{r['samples']['nn_distance']:.3f} | {d} |")
    lines.append(f"| real test digits | 0 | {scorer.accuracy(data.test.x, data.test.y):.3f} | | | "
                 f"{real['confidence']:.3f} | {real['nn_distance']:.3f} | |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"{epochs} epochs per model, seed {args.seed}\n\n{table}\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(table)
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)  # nets this small run faster on one thread than on two
    main()
