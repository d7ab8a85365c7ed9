"""VQ-VAE on the embedded 8x8 digits, then a class-conditional Transformer prior over its codes.

Trains the VQ-VAE (a 4x4 grid of codes from K = 16), reports reconstruction
and codebook use, fits a causal Transformer over the training codes given the
digit label, compares held-out bits/dim under that prior and the uniform one,
draws digits of each class and checks them with a logistic-regression
classifier trained on the same data.

    python examples/vqvae_digits.py [--quick] [--out runs/examples/vqvae_digits]

Writes ``reconstructions.png``, ``samples_by_label.png``, ``uniform_prior_samples.png``
and ``metrics.json`` (plus the run directory ``run/``) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import pyrovi as pv
from pyrovi import plots, priors
from pyrovi.checkpoint import write_json


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/examples/vqvae_digits")
    ap.add_argument("--quick", action="store_true", help="tiny budget (a smoke test, not a result)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)  # small nets: on a 2-core CPU one thread is as fast, and safe when it is shared
    t0 = time.time()

    ds = pv.data.load("digits", seed=args.seed)
    torch.manual_seed(args.seed)  # the weights' initial draw
    model = pv.models.VQVAE(ds.shape, 16, code_dim=16, downsample=1, channels=64, image_shape=ds.image_shape)
    guide = pv.guides.Codebook(model)  # k-means initialisation on the first batch, codebook loss, beta = 0.25
    run = pv.fit(model, guide, ds, epochs=2 if args.quick else 20, batch_size=64, lr=2e-3, seed=args.seed,
                 out=os.path.join(args.out, "run"), overwrite=True, progress=False, figures=not args.quick)
    vq = pv.vq_metrics(run, ds)  # test split

    with run.scope(), torch.no_grad():
        x = ds.test.x[:16]
        rec = model.decode(guide.quantize(x).z_q)
    plots.reconstructions(x, rec, ds.image_shape, path=os.path.join(args.out, "reconstructions.png"))

    prior = priors.fit_prior(run, ds, epochs=2 if args.quick else 30, d_model=64, heads=2, lr=2e-3, seed=args.seed)
    per = 3 if args.quick else 10  # matplotlib draws one axes per image: keep the quick grid small
    rows, names = [], []
    for c in range(10):
        rows.append(priors.sample_run(run, prior, per, label=c, temperature=0.7, seed=args.seed + c))
        names.append(f"label {c}")
    plots.image_grid(torch.cat(rows), ds.image_shape, ncols=per, row_labels=names,
                     title="VQ-VAE + class-conditional Transformer prior (temperature 0.7)",
                     path=os.path.join(args.out, "samples_by_label.png"))
    plots.samples(priors.sample_run(run, None, 8 if args.quick else 40, seed=args.seed), ds.image_shape,
                  title="Codes from the uniform prior, decoded",
                  path=os.path.join(args.out, "uniform_prior_samples.png"))
    acc = {t: priors.conditional_accuracy(run, prior, ds, n=20 if args.quick else 100, temperature=t, seed=args.seed)
           for t in (1.0, 0.7)}

    out = {"vq_test": vq, "prior_test": {k: v for k, v in prior.metrics.items() if k != "train"},
           "class_conditional": {f"temperature_{t}": a for t, a in acc.items()},
           "seconds": time.time() - t0, "quick": args.quick}
    write_json(os.path.join(args.out, "metrics.json"), out)
    print(f"test reconstruction {vq['reconstruction']:.2f} nats, MSE/pixel {vq['recon_mse']:.4f}; "
          f"perplexity {vq['perplexity']:.1f} of K={vq['num_codes']}, dead codes {vq['dead_codes']}")
    print(f"held-out bits/dim: learned prior {prior.metrics['bits_per_dim_learned']:.3f}, "
          f"uniform prior {prior.metrics['bits_per_dim_uniform']:.3f}")
    print(f"class-conditional samples classified as their label: {acc[1.0]['rate']:.2f} at temperature 1, "
          f"{acc[0.7]['rate']:.2f} at 0.7 (chance {acc[1.0]['chance']:.2f}; the classifier scores "
          f"{acc[1.0]['classifier_test_accuracy']:.2f} on real test digits)")
    print(json.dumps({"out": args.out, "seconds": round(out["seconds"], 1)}))
    return out


if __name__ == "__main__":
    main()
