"""Compare guides on the embedded 8x8 digits: held-out ELBO, IWAE log-likelihood, time per epoch.

Same VAE (64-128-8, Bernoulli), same encoder body, same epochs and seed for
every guide; only q(z|x) changes. Held-out numbers are on the test split, in
nats per image (higher is better); the IWAE log-likelihood uses ``--k``
importance samples per image.

    python examples/compare_guides.py [--quick] [--out runs/examples/compare_guides]

Writes ``table.md``, ``metrics.json`` and ``training_curves.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import pyrovi as pv
from pyrovi import plots
from pyrovi.checkpoint import atomic_write, write_json

GUIDES = {
    "DiagNormal": lambda m, h: pv.guides.DiagNormal(m, hidden=h),
    "Mixture(3)": lambda m, h: pv.guides.Mixture(m, components=3, hidden=h),
    "Flow(iaf, 2)": lambda m, h: pv.guides.Flow(m, flow="iaf", depth=2, hidden=h),
    "Flow(planar, 4)": lambda m, h: pv.guides.Flow(m, flow="planar", depth=4, hidden=h),
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/examples/compare_guides")
    ap.add_argument("--quick", action="store_true", help="tiny budget (a smoke test, not a result)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--objective", default="elbo", help="training objective for every guide (default: elbo)")
    ap.add_argument("--k", type=int, default=500, help="importance samples for the IWAE log-likelihood")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    epochs, k = (1, 10) if args.quick else (args.epochs, args.k)

    ds = pv.data.load("digits", seed=args.seed)
    hidden = (128,)
    rows, histories = {}, {}
    for name, make in GUIDES.items():
        torch.manual_seed(args.seed)
        model = pv.models.VAE(ds.shape, latent_dim=8, hidden=hidden, image_shape=ds.image_shape)
        guide = make(model, hidden)
        t0 = time.perf_counter()
        run = pv.fit(model, guide, ds, objective=args.objective, epochs=epochs, lr=2e-3, seed=args.seed,
                     progress=False, figures=False)
        per_epoch = (time.perf_counter() - t0) / epochs
        m = pv.evaluate(run, ds, k=k)
        rows[name] = {"test_elbo": m["elbo"], "test_log_likelihood": m["log_likelihood"],
                      "gap": m["log_likelihood"] - m["elbo"], "seconds_per_epoch": per_epoch}
        histories[name] = run.history
        print(f"{name:16s} ELBO {m['elbo']:9.3f}  IWAE-{k} {m['log_likelihood']:9.3f}  {per_epoch:.2f} s/epoch",
              flush=True)

    lines = [f"digits, VAE 64-128-8, {epochs} epochs of `{args.objective}`, test split; nats per image",
             "", f"| guide | test ELBO | test log p(x) (IWAE k={k}) | gap | s / epoch |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {r['test_elbo']:.3f} | {r['test_log_likelihood']:.3f} | {r['gap']:.3f} | "
              f"{r['seconds_per_epoch']:.2f} |" for n, r in rows.items()]
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    atomic_write(os.path.join(args.out, "table.md"), table)
    write_json(os.path.join(args.out, "metrics.json"), {"epochs": epochs, "k": k, "objective": args.objective,
                                                        "guides": rows})
    plots.training_curves(histories, path=os.path.join(args.out, "training_curves.png"))
    return rows


if __name__ == "__main__":
    main()
