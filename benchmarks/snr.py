"""Gradient signal-to-noise ratio of the estimators ``elbo``, ``stl``, ``iwae``, ``dreg``.

For a VAE trained on ``digits``, one fixed minibatch is differentiated ``--reps``
times with fresh draws; per parameter, SNR = |mean gradient| / std of the
gradient (Rainforth et al. 2018, "Tighter variational bounds are not
necessarily better"). Reported: the median over the encoder's (guide's)
parameters and over the decoder's (model's). IWAE's encoder SNR falls as K
grows; DReG's should not (Tucker et al. 2018); STL's beats ELBO's near the
optimum (Roeder et al. 2017).

    python benchmarks/snr.py              # table in markdown, ~2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import time

import pyro
import torch

import pyrovi as pv


def gradients(obj, model, guide, x, reps: int, params) -> torch.Tensor:
    """(reps, P) gradients of the per-datapoint loss, fresh draws each time."""
    out = []
    for _ in range(reps):
        loss = obj(model, guide, x) / x.shape[0]
        out.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(out)


def snr(g: torch.Tensor) -> torch.Tensor:
    return g.mean(0).abs() / g.std(0).clamp_min(1e-12)  # (P,)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30, help="training epochs before measuring (elbo)")
    p.add_argument("--reps", type=int, default=200, help="gradient draws per estimator and K")
    p.add_argument("--batch", type=int, default=64, help="minibatch size")
    p.add_argument("--ks", default="1,8,64", help="particle counts K")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds = pv.data.load("digits")
    model = pv.models.VAE(ds.shape, latent_dim=8, hidden=(128,))
    guide = pv.guides.DiagNormal(model, hidden=(128,))
    pv.fit(model, guide, ds, objective="elbo", epochs=args.epochs, progress=False, figures=False)
    x = ds.test.x[: args.batch]
    enc = [q for q in guide.parameters()]
    dec = [q for q in model.parameters()]
    print(f"VAE 64-128-8 on digits, trained {args.epochs} epochs (elbo); minibatch {args.batch}, "
          f"{args.reps} draws; median SNR over parameters")
    print()
    print("| estimator | K | encoder SNR (median) | decoder SNR (median) | ms / gradient |")
    print("|---|---|---|---|---|")
    for k in (int(s) for s in args.ks.split(",")):
        for name in ("elbo", "stl", "iwae", "dreg"):
            obj = pv.objectives.get(name, particles=k)
            pyro.set_rng_seed(1)
            t0 = time.perf_counter()
            g = gradients(obj, model, guide, x, args.reps, enc + dec)
            ms = 1000 * (time.perf_counter() - t0) / args.reps
            n_enc = sum(q.numel() for q in enc)
            s_enc, s_dec = snr(g[:, :n_enc]), snr(g[:, n_enc:])
            print(f"| {name} | {k} | {float(s_enc.median()):.3f} | {float(s_dec.median()):.3f} | {ms:.1f} |")


if __name__ == "__main__":
    main()
