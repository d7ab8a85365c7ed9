"""Convolutional vs MLP VAEs on mnist5k: test log p(x) at the same number of epochs.

mnist5k (the 5000-image MNIST subset), seeded split 4000 train / 500 validation /
500 test, static binarization, Bernoulli likelihood, latent 16, batch 100, Adam
lr 1e-3, seed 0; test log p(x) is the IWAE estimate with ``--k`` importance
samples on the 500 test images (``pyrovi.evaluate``), nats per image.

Rows: the MLP VAE (784-256-16, the encoder 784-256), the conv VAE
(``arch="conv"``: 32 channels, two stride-2 stages 28 -> 14 -> 7, a 256-wide
layer between the grid and the latent, on both sides) with the ELBO, and the
same conv VAE trained with IWAE (K=5).

    OMP_NUM_THREADS=1 python -m benchmarks.conv_mnist --epochs 10 --k 1000 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import pyrovi as pv

ROWS = [
    ("mlp", "elbo", 1),
    ("conv", "elbo", 1),
    ("conv", "iwae", 5),
]


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--k", type=int, default=1000, help="importance samples for the test log-likelihood")
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--rows", default="0,1,2", help="which rows of the table to run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default=None, help="None | bf16 | 16-mixed (fit's precision=)")
    p.add_argument("--test-rows", type=int, default=None,
                   help="evaluate on the first N test images only (default: all 500); a shared CPU's budget")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds = pv.data.load("mnist5k")
    results = []
    for i in (int(s) for s in args.rows.split(",")):
        arch, objective, k_train = ROWS[i]
        torch.manual_seed(0)
        model = pv.models.VAE(ds.shape, latent_dim=args.latent, hidden=args.hidden, arch=arch,
                              channels=args.channels, image_shape=ds.image_shape)
        guide = pv.guides.DiagNormal(model, hidden=args.hidden)
        t0 = time.perf_counter()
        kw = {"precision": args.precision} if args.precision else {}
        run = pv.fit(model, guide, ds, objective=objective, particles=k_train, epochs=args.epochs, lr=1e-3,
                     batch_size=100, seed=0, progress=False, figures=False, device=args.device, **kw)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        test = ds.test if args.test_rows is None else pv.data.Split(ds.test.x[:args.test_rows], ds.test.y[:args.test_rows])
        m = pv.evaluate(run, test, k=args.k)
        eval_s = time.perf_counter() - t0
        row = {"arch": arch, "objective": objective + (f" K={k_train}" if k_train > 1 else ""),
               "test_log_likelihood": m["log_likelihood"], "test_elbo": m["elbo"], "kl": m["kl"],
               "params": sum(t.numel() for t in list(model.parameters()) + list(guide.parameters())),
               "s_per_epoch": train_s / args.epochs, "eval_s": eval_s}
        results.append(row)
        print(json.dumps(row), flush=True)
    print()
    n_test = len(ds.test) if args.test_rows is None else args.test_rows
    print(f"mnist5k (4000 train / {n_test} test images), {args.epochs} epochs, batch 100, latent {args.latent}, "
          f"test IWAE k={args.k} (nats per image, higher is better)")
    print()
    print("| model | objective | test log p(x) | test ELBO | KL | parameters | s / epoch |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['arch']} VAE | {r['objective']} | {r['test_log_likelihood']:.2f} | {r['test_elbo']:.2f} | "
              f"{r['kl']:.2f} | {r['params']:,} | {r['s_per_epoch']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
