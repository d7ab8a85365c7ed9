"""Bring your own Pyro code: ``pyrovi.fit`` vs plain ``SVI`` + ``Trace_ELBO`` on the user's model/guide.

The user's code is a tutorial-style VAE (``pyro.module`` inside plain
functions, its own encoder guide; ``tests/byo_code.py``). Both trainers run
the same epochs, batch size and learning rate on the digits training split,
interleaved in one process (pyrovi, SVI, pyrovi, SVI, ...) after one
warm-up of each, with one torch thread. Reported: median wall-clock seconds
per training run and the ratio pyrovi / SVI (< 1: pyrovi faster). pyrovi's
time includes its per-epoch validation pass; SVI's loop has none.

``--spread`` instead measures the held-out ELBO (Pyro's ``Trace_ELBO``, 200
particles, digits test split) of both trainers over seeds 0..9: the
seed-to-seed spread quoted by ``tests/test_byo_isolation.py``.

    python benchmarks/bench_byo.py                 # timing
    python benchmarks/bench_byo.py --spread        # quality spread over seeds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import pyro
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import pyrovi as pv  # noqa: E402
from byo_code import heldout_elbo, train_svi, tutorial_vae  # noqa: E402


def _pyrovi(ds, args, seed):
    model, guide, _, _ = tutorial_vae(seed, hidden_dim=args.hidden, z_dim=args.latent)
    t = time.perf_counter()
    pv.fit(model, guide, ds, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed,
           progress=False, device="cpu")
    return time.perf_counter() - t, model, guide


def _svi(ds, args, seed):
    pyro.clear_param_store()
    model, guide, _, _ = tutorial_vae(seed, hidden_dim=args.hidden, z_dim=args.latent)
    t = time.perf_counter()
    train_svi(model, guide, ds.train.x, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed)
    return time.perf_counter() - t, model, guide


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--latent", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--spread", action="store_true", help="held-out ELBO over seeds 0..9 instead of timing")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    ds = pv.data.load("digits")
    print(f"tutorial VAE 64-{args.hidden}-{args.latent} on digits ({len(ds.train)} train rows), "
          f"epochs={args.epochs}, batch_size={args.batch_size}, lr={args.lr}, torch threads=1")
    if args.spread:
        rows = {"pyrovi.fit": [], "SVI": []}
        for seed in range(10):
            for name, trainer in (("pyrovi.fit", _pyrovi), ("SVI", _svi)):
                _, model, guide = trainer(ds, args, seed)
                rows[name].append(heldout_elbo(model, guide, ds.test.x))
            print(f"seed {seed}: pyrovi {rows['pyrovi.fit'][-1]:.3f}  SVI {rows['SVI'][-1]:.3f}")
        for name, v in rows.items():
            print(f"{name:11s} held-out ELBO mean {statistics.mean(v):.3f} sd {statistics.stdev(v):.3f} nats")
        return
    _pyrovi(ds, args, 0), _svi(ds, args, 0)  # warm-up: imports, allocator, first-call costs
    times = {"pyrovi.fit": [], "SVI": []}
    for r in range(args.repeats):
        times["pyrovi.fit"].append(_pyrovi(ds, args, r)[0])
        times["SVI"].append(_svi(ds, args, r)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    steps = args.epochs * -(-len(ds.train) // args.batch_size)
    for k, v in times.items():
        print(f"{k:11s} median {med[k]:.3f} s ({1e3 * med[k] / steps:.2f} ms/step)  runs {[round(t, 3) for t in v]}")
    print(f"ratio pyrovi.fit / SVI = {med['pyrovi.fit'] / med['SVI']:.3f}")


if __name__ == "__main__":
    main()
