"""Interpolation between two digits' codes: linear z = a z1 + (1 - a) z2, and spherical (slerp).

Trains a Bernoulli VAE on the embedded 8x8 digits, encodes pairs of test
digits of different classes to their posterior means z1, z2, and decodes the
path between them with both methods. A second figure shows the norm of the
code along the path (a straight line cuts through the low-norm middle of the
Gaussian prior; slerp stays on the arc between the two norms).

    python examples/interpolation.py [--quick] [--out DIR]

Writes DIR/interpolation.png, DIR/interpolation_norms.png, DIR/results.json
and the run directory DIR/run (which ``pyrovi interpolate DIR/run`` also reads).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import pyrovi as pv
from pyrovi import plots
from pyrovi.sample_quality import fit_scorer

NAME = "interpolation"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny budget for a smoke test (figure not meaningful)")
    p.add_argument("--out", default=os.path.join("runs", "examples", NAME), help="output directory")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 150; 2 with --quick)")
    p.add_argument("--steps", type=int, default=10, help="points per path, end points included")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    os.makedirs(args.out, exist_ok=True)
    epochs = args.epochs or (2 if args.quick else 150)
    torch.manual_seed(args.seed)  # the nets' initial weights come from torch's global RNG
    data = pv.data.load("digits", seed=args.seed)
    L = 8
    model = pv.models.VAE(data.shape, latent_dim=L, likelihood="bernoulli", image_shape=data.image_shape)
    run = pv.fit(model, pv.guides.DiagNormal(model), data, epochs=epochs, seed=args.seed,
                 out=os.path.join(args.out, "run"), overwrite=True, progress=False, figures=not args.quick)

    # many pairs for the statistics, the first six for the figure
    i1, i2 = pv.uses.pick_pairs(data.test.y, 20 if args.quick else 80, seed=args.seed)
    x1, x2 = data.test.x[i1], data.test.x[i2]
    alpha = pv.uses.interpolation_weights(args.steps)  # (A,) from 1 to 0
    z1, z2 = pv.uses.encode(run, x1), pv.uses.encode(run, x2)  # (P, L)
    paths = {m: pv.uses.interpolate(run, x1, x2, steps=args.steps, method=m) for m in ("linear", "slerp")}
    norms = {m: pv.uses.interpolate_codes(z1, z2, args.steps, m).norm(dim=-1).T for m in ("linear", "slerp")}

    grey = pv.data.load("digits", seed=args.seed, binarize=None)
    scorer = fit_scorer(grey.train.x, grey.train.y, seed=args.seed)
    mid = args.steps // 2
    results = {"epochs": epochs, "pairs": len(i1), "steps": args.steps, "latent_dim": L,
               "end_point_norm_mean": float(torch.cat([z1, z2]).norm(dim=-1).mean())}
    for m in paths:
        results[m] = {"midpoint_norm_mean": float(norms[m][:, mid].mean()),
                      "midpoint_confidence": scorer.score(paths[m][:, mid])["confidence"],
                      "path_confidence": scorer.score(paths[m].reshape(-1, paths[m].shape[-1]))["confidence"]}

    show = 6
    labels = [f"{int(a)} to {int(b)}" for a, b in zip(data.test.y[i1[:show]], data.test.y[i2[:show]])]
    plots.image_panels(
        {r"linear: $z = \alpha z_1 + (1-\alpha) z_2$": paths["linear"][:show].reshape(-1, paths["linear"].shape[-1]),
         "spherical (slerp)": paths["slerp"][:show].reshape(-1, paths["slerp"].shape[-1])},
        data.image_shape, ncols=args.steps, row_labels=labels, col_labels=[f"$\\alpha$={a:.2f}" for a in alpha],
        title=f"Decoded interpolations between test digits' posterior means (Bernoulli VAE, L={L}, {epochs} epochs)",
        path=os.path.join(args.out, "interpolation.png"))
    plots.interpolation_norms(alpha, {m: v for m, v in norms.items()}, latent_dim=L,
                                 path=os.path.join(args.out, "interpolation_norms.png"))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)  # nets this small run faster on one thread than on two
    main()
