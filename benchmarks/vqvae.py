"""VQ-VAE quality benchmark: reconstructions vs a DiagNormal VAE, codebook use, dead-code restarts,
learned vs uniform prior, class-conditional samples, and the character-level model on pydoc topics.

    PYTHONPATH=. python benchmarks/vqvae.py --part all --out runs/benchmarks/vqvae.json

Each part prints a Markdown table; all numbers are on the test split of the
named dataset (never seen in training), one seed, one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

import pyrovi as pv
from pyrovi import priors
from pyrovi.checkpoint import write_json
from pyrovi.vq_evaluation import vq_metrics


def _params(*mods) -> int:
    return sum(p.numel() for m in mods for p in m.parameters()) + sum(
        b.numel() for m in mods for n, b in m.named_buffers() if n == "codebook")


def _vae_recon(run, split) -> dict:
    """Test reconstruction of a DiagNormal VAE: decode the posterior mean; E_q log p(x|z) from evaluate."""
    with run.scope(), torch.no_grad():
        mu = run.guide.encode(split.x)["z"][0]
        mse = float(((run.model.decode(mu) - split.x) ** 2).mean())
        rec_mu = float(run.model.likelihood(run.model.decoder(mu)).log_prob(split.x).mean())
    ev = pv.evaluate(run, split, k=1000, save=False)
    return {"recon_mse": mse, "reconstruction_at_mean": rec_mu, "reconstruction": ev["reconstruction"],
            "elbo": ev["elbo"], "log_likelihood_iwae1000": ev["log_likelihood"], "bits_per_dim": ev["bits_per_dim"]}


def part_recon(name: str, epochs: int, seed: int) -> dict:
    ds = pv.data.load(name, seed=seed)
    t = time.time()
    s = 1 if name == "digits" else 2
    torch.manual_seed(seed)  # the weights' initial draw, here and before every model below
    vq = pv.models.VQVAE(ds.shape, 16 if name == "digits" else 64, code_dim=16, downsample=s, channels=64,
                         image_shape=ds.image_shape)
    vg = pv.guides.Codebook(vq, **({} if name == "digits" else {"ema_decay": 0.99}))
    vrun = pv.fit(vq, vg, ds, epochs=epochs, batch_size=64, lr=2e-3, seed=seed, progress=False)
    vm = vq_metrics(vrun, ds, save=False)
    vq_s = time.time() - t
    t = time.time()
    # A DiagNormal VAE of the same size: one hidden layer h in encoder and decoder, latent 16, so
    # params = h (2D + 3*16 + 2) + 2*16 + D; solve for h.
    D = ds.shape[0]
    h = max(8, round((_params(vq, vg) - 32 - D) / (2 * D + 50)))
    torch.manual_seed(seed)
    vae = pv.models.VAE(ds.shape, 16, hidden=(h,), image_shape=ds.image_shape)
    dg = pv.guides.DiagNormal(vae, hidden=(h,))
    arun = pv.fit(vae, dg, ds, epochs=epochs, batch_size=64, lr=2e-3, seed=seed, progress=False)
    am = _vae_recon(arun, ds.test)
    vae_s = time.time() - t
    rows = {
        "vqvae": {"params": _params(vq, vg), "recon_mse": vm["recon_mse"], "reconstruction": vm["reconstruction"],
                  "elbo_uniform": vm["elbo"], "bits_per_dim_uniform": vm["bits_per_dim"],
                  "perplexity": vm["perplexity"], "codes_used": vm["codes_used"], "K": vm["num_codes"],
                  "L": vm["positions"], "seconds": vq_s},
        "vae_diag_normal": {"params": _params(vae, dg), **am, "seconds": vae_s},
    }
    print(f"\n### {name}: test reconstructions, {epochs} epochs each\n")
    print("| model | params | recon MSE/pixel | log p(x given z) (nats) | ELBO (nats) | bits/dim | codebook |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    r = rows["vqvae"]
    print(f"| VQ-VAE (K={r['K']}, L={r['L']}) | {r['params']} | {r['recon_mse']:.4f} | "
          f"{r['reconstruction']:.2f} | {r['elbo_uniform']:.2f} (uniform prior) | "
          f"{r['bits_per_dim_uniform']:.3f} | perplexity {r['perplexity']:.1f}, {r['codes_used']}/{r['K']} used |")
    r = rows["vae_diag_normal"]
    print(f"| VAE + DiagNormal (latent 16, hidden {h}) | {r['params']} | {r['recon_mse']:.4f} | "
          f"{r['reconstruction']:.2f} (at the mean: {r['reconstruction_at_mean']:.2f}) | {r['elbo']:.2f} "
          f"(IWAE-1000 {r['log_likelihood_iwae1000']:.2f}) | {r['bits_per_dim']:.3f} | - |")
    return rows


def part_restart(epochs: int, seed: int) -> dict:
    ds = pv.data.load("digits", seed=seed)
    rows = {}
    for label, opts in (("paper init, no restart", {"kmeans_init": False}),
                        ("k-means init, no restart", {}),
                        ("k-means init + restart_dead=1", {"restart_dead": 1.0}),
                        ("EMA 0.99, no restart", {"ema_decay": 0.99}),
                        ("EMA 0.99 + restart_dead=1", {"ema_decay": 0.99, "restart_dead": 1.0})):
        torch.manual_seed(seed)
        m = pv.models.VQVAE(ds.shape, 512, code_dim=16, downsample=1, channels=64, image_shape=ds.image_shape)
        run = pv.fit(m, pv.guides.Codebook(m, **opts), ds, epochs=epochs, batch_size=64, lr=2e-3, seed=seed,
                     progress=False)
        tr, te = vq_metrics(run, ds.train, save=False), vq_metrics(run, ds, save=False)
        rows[label] = {"dead_codes_train": tr["dead_codes"], "codes_used_train": tr["codes_used"],
                       "perplexity_test": te["perplexity"], "recon_mse_test": te["recon_mse"],
                       "reconstruction_test": te["reconstruction"]}
    print(f"\n### digits, K = 512 (the CLI default), L = 16, {epochs} epochs: dead codes\n")
    print("| codebook options | unused codes (train split) | test perplexity | test recon MSE/pixel |")
    print("| --- | --- | --- | --- |")
    for k, r in rows.items():
        print(f"| {k} | {r['dead_codes_train']} / 512 | {r['perplexity_test']:.1f} | {r['recon_mse_test']:.4f} |")
    return rows


def part_prior(epochs: int, prior_epochs: int, seed: int) -> dict:
    ds = pv.data.load("digits", seed=seed)
    torch.manual_seed(seed)
    m = pv.models.VQVAE(ds.shape, 16, code_dim=16, downsample=1, channels=64, image_shape=ds.image_shape)
    run = pv.fit(m, pv.guides.Codebook(m), ds, epochs=epochs, batch_size=64, lr=2e-3, seed=seed, progress=False)
    out = {}
    for cond in (False, True):
        prior = priors.fit_prior(run, ds, conditional=cond, epochs=prior_epochs, d_model=64, heads=2, lr=2e-3,
                                 seed=seed, save=False)
        out["conditional" if cond else "unconditional"] = {k: v for k, v in prior.metrics.items() if k != "train"}
        if cond:
            out["class_rate"] = {str(t): priors.conditional_accuracy(run, prior, ds, n=100, temperature=t, seed=seed)
                                 for t in (1.0, 0.7)}
    print(f"\n### digits, K = 16, L = 16: Transformer prior over codes ({prior_epochs} epochs)\n")
    print("| prior | held-out bits/dim | nats per code |")
    print("| --- | --- | --- |")
    u = out["unconditional"]
    print(f"| uniform | {u['bits_per_dim_uniform']:.3f} | {u['nats_per_code_uniform']:.3f} |")
    for k in ("unconditional", "conditional"):
        print(f"| Transformer, {k} | {out[k]['bits_per_dim_learned']:.3f} | {out[k]['nats_per_code_learned']:.3f} |")
    for t, r in out["class_rate"].items():
        print(f"\nClass-conditional samples (100 per label, temperature {t}) classified as their label by "
              f"LogisticRegression: **{r['rate']:.3f}** (chance {r['chance']:.1f}; classifier on real test digits "
              f"{r['classifier_test_accuracy']:.3f}); per label "
              + ", ".join(f"{k}: {v:.2f}" for k, v in r["per_label"].items()))
    return out


def part_text(epochs: int, prior_epochs: int, seed: int) -> dict:
    ds = pv.data.load("text", seed=seed)
    torch.manual_seed(seed)
    m = pv.models.VQVAE(ds.shape, 256, code_dim=16, downsample=1, channels=64, vocab=ds.vocab)
    run = pv.fit(m, pv.guides.Codebook(m, restart_dead=1.0), ds, epochs=epochs, batch_size=128, lr=2e-3,
                 seed=seed, progress=False)
    vm = vq_metrics(run, ds, save=False)
    prior = priors.fit_prior(run, ds, epochs=prior_epochs, d_model=128, heads=4, lr=2e-3, seed=seed, save=False)
    pm = {k: v for k, v in prior.metrics.items() if k != "train"}
    samples = priors.sample_run(run, prior, 4, temperature=0.8, seed=seed)
    print(f"\n### text (pydoc_data.topics, 64-character items, K = 256, L = 32): {epochs} + {prior_epochs} epochs\n")
    print(f"Test reconstructions: character accuracy {vm['char_accuracy']:.3f}, code perplexity "
          f"{vm['perplexity']:.1f}, {vm['codes_used']}/256 codes used.\n")
    print("| model | held-out bits/char |")
    print("| --- | --- |")
    print(f"| VQ-VAE + Transformer prior | {pm['bits_per_dim_learned']:.3f} |")
    print(f"| VQ-VAE + uniform prior | {pm['bits_per_dim_uniform']:.3f} |")
    print(f"| unigram over characters (train frequencies) | {pm['bits_per_dim_unigram']:.3f} |")
    print("\nSamples (temperature 0.8):\n")
    for s in samples:
        print("    " + repr(s))
    return {"vq": vm, "prior": pm, "samples": samples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="all", choices=["all", "recon", "mnist", "restart", "prior", "text"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/benchmarks/vqvae.json")
    args = ap.parse_args()
    torch.set_num_threads(1)  # small nets on a shared CPU: one thread is the fastest
    res = {"threads": 1}
    t0 = time.time()
    if args.part in ("all", "recon"):
        res["recon_digits"] = part_recon("digits", 20, args.seed)
    if args.part in ("all", "mnist"):
        res["recon_mnist5k"] = part_recon("mnist5k", 10, args.seed)
    if args.part in ("all", "restart"):
        res["restart"] = part_restart(20, args.seed)
    if args.part in ("all", "prior"):
        res["prior"] = part_prior(20, 30, args.seed)
    if args.part in ("all", "text"):
        res["text"] = part_text(8, 8, args.seed)
    res["seconds"] = time.time() - t0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json(args.out, res)
    print(f"\n(total {res['seconds']:.0f} s; JSON in {args.out}; log(2) = {math.log(2):.4f})")


if __name__ == "__main__":
    main()
