"""Character-level VQ-VAE on Python's own help texts, then a Transformer prior that writes new text.

The default corpus is ``pydoc_data.topics`` (about 465 KB of English and code
that ships with CPython), cut into items of 64 characters. The VQ-VAE codes
every 2 characters with one of K = 256 codes (32 codes per item); a causal
Transformer fitted to the training codes then generates code sequences that
the decoder turns back into characters. Held-out bits per character are
compared for the learned prior, the uniform prior, and a unigram model of the
characters.

    python examples/vqvae_text.py [--quick] [--out runs/examples/vqvae_text]

Writes ``bits_per_char.png``, ``samples.txt`` and ``metrics.json`` (plus ``run/``) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import torch  # noqa: E402

import pyrovi as pv  # noqa: E402
from pyrovi import plots, priors  # noqa: E402
from pyrovi.checkpoint import atomic_write, write_json  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/examples/vqvae_text")
    ap.add_argument("--quick", action="store_true", help="tiny budget on a slice of the corpus (a smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)  # small nets: on a 2-core CPU one thread is as fast, and safe when it is shared
    t0 = time.time()

    ds = pv.data.load("text", seed=args.seed)
    if args.quick:  # the first 320 training items only; validation and test stay whole
        ds.train = pv.data.Split(ds.train.x[:320], None)
    torch.manual_seed(args.seed)  # the weights' initial draw
    model = pv.models.VQVAE(ds.shape, 256, code_dim=16, downsample=1, channels=64, vocab=ds.vocab)
    guide = pv.guides.Codebook(model, restart_dead=1.0)
    run = pv.fit(model, guide, ds, epochs=1 if args.quick else 6, batch_size=128, lr=2e-3, seed=args.seed,
                 out=os.path.join(args.out, "run"), overwrite=True, progress=False, figures=not args.quick)
    vq = pv.vq_metrics(run, ds)
    prior = priors.fit_prior(run, ds, epochs=1 if args.quick else 6, d_model=64, heads=4, lr=2e-3,
                             seed=args.seed)
    m = prior.metrics

    fig, ax = plt.subplots(figsize=(5, 3))
    names = ["VQ-VAE +\nTransformer prior", "VQ-VAE +\nuniform prior", "unigram\n(characters)"]
    vals = [m["bits_per_dim_learned"], m["bits_per_dim_uniform"], m["bits_per_dim_unigram"]]
    ax.bar(names, vals, color=["tab:blue", "tab:gray", "tab:orange"])
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom")
    ax.set_ylabel("held-out bits per character")
    ax.set_title("pydoc topics, test split (lower is better)")
    plots.save(fig, os.path.join(args.out, "bits_per_char.png"))

    samples = priors.sample_run(run, prior, 8, temperature=0.8, seed=args.seed)
    atomic_write(os.path.join(args.out, "samples.txt"), "\n--------\n".join(samples) + "\n")
    out = {"vq_test": vq, "prior_test": {k: v for k, v in m.items() if k != "train"}, "samples": samples,
           "seconds": time.time() - t0, "quick": args.quick}
    write_json(os.path.join(args.out, "metrics.json"), out)
    print(f"test character accuracy of reconstructions {vq['char_accuracy']:.3f}; "
          f"code perplexity {vq['perplexity']:.1f} of K={vq['num_codes']}")
    print(f"held-out bits/char: Transformer prior {vals[0]:.3f}, uniform prior {vals[1]:.3f}, unigram {vals[2]:.3f}")
    print("samples (temperature 0.8):")
    for s in samples[:4]:
        print("  " + repr(s))
    print(json.dumps({"out": args.out, "seconds": round(out["seconds"], 1)}))
    return out


if __name__ == "__main__":
    main()
