"""Guides and objectives on mnist5k: test IWAE log-likelihood (done-when item 5).

Same VAE (784-256-16 decoder, Bernoulli likelihood), same encoder body
(784-256), same epochs, batch size, learning rate and seed for every row; only
the guide family and the objective change. Test log p(x) is the IWAE estimate
with ``--k`` importance samples on the 500-image test split (static
binarization), via ``pyrovi.evaluate``.

    python benchmarks/guides_mnist.py --epochs 40 --k 1000
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import pyrovi as pv

ROWS = [
    ("DiagNormal", "elbo", 1, lambda m, h: pv.guides.DiagNormal(m, hidden=h)),
    ("DiagNormal", "iwae", 8, lambda m, h: pv.guides.DiagNormal(m, hidden=h)),
    ("Flow(iaf, depth 4)", "elbo", 1, lambda m, h: pv.guides.Flow(m, flow="iaf", depth=4, hidden=h)),
    ("Mixture(5)", "elbo", 1, lambda m, h: pv.guides.Mixture(m, components=5, hidden=h)),
]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--k", type=int, default=1000, help="importance samples for the test log-likelihood")
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--rows", default="0,1,2,3", help="which rows of the table to run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds = pv.data.load("mnist5k")
    h = (args.hidden,)
    results = []
    for i in (int(s) for s in args.rows.split(",")):
        guide_name, objective, k_train, make = ROWS[i]
        torch.manual_seed(0)
        model = pv.models.VAE(ds.shape, latent_dim=args.latent, hidden=h)
        guide = make(model, h)
        t0 = time.perf_counter()
        run = pv.fit(model, guide, ds, objective=objective, particles=k_train, epochs=args.epochs, lr=1e-3,
                     batch_size=128, seed=0, progress=False, figures=False)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        m = pv.evaluate(run, ds, k=args.k)
        eval_s = time.perf_counter() - t0
        row = {"guide": guide_name, "objective": f"{objective}" + (f" K={k_train}" if k_train > 1 else ""),
               "test_log_likelihood": m["log_likelihood"], "test_elbo": m["elbo"], "kl": m["kl"],
               "best_val_loss": run.metrics["val_loss"], "s_per_epoch": train_s / args.epochs, "eval_s": eval_s}
        results.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(f"mnist5k, {args.epochs} epochs, latent {args.latent}, hidden {args.hidden}, test IWAE k={args.k} "
          "(nats per image, higher is better)")
    print()
    print("| guide | objective | test log p(x) (IWAE k) | test ELBO | KL | s / epoch |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['guide']} | {r['objective']} | {r['test_log_likelihood']:.2f} | {r['test_elbo']:.2f} | "
              f"{r['kl']:.2f} | {r['s_per_epoch']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
