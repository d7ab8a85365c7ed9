"""A convolutional VAE trained from a folder of PNG images, streamed from disk, reported in bits/dim.

Writes the 8x8 digits as grey PNG files into DIR/images/<class>/ (a folder such as a user
has), loads it with ``pv.data.load("images:DIR?stream=1")`` (read by a DataLoader while
training), trains ``VAE(arch="conv", likelihood="logistic")`` (a discretized logistic per
pixel over 256 levels) and reports the held-out log p(x) in nats per image and bits/dim.

    python examples/conv_images.py [--quick] [--out DIR] [--precision bf16] [--device cuda]

Writes DIR/results.json, DIR/samples.png and the run directory DIR/run.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from PIL import Image

import pyrovi as pv
from pyrovi import plots

NAME = "conv_images"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny budget for a smoke test (numbers not meaningful)")
    p.add_argument("--out", default=os.path.join("runs", "examples", NAME), help="output directory")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 30; 1 with --quick)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default=None, help="None | bf16 | 16-mixed | tf32")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def write_folder(root: str, n_per_class: int) -> str:
    """The embedded digits as 8-bit grey PNGs, one subfolder per class; returns the folder."""
    from sklearn.datasets import load_digits

    d = load_digits()
    for c in range(10):
        os.makedirs(os.path.join(root, str(c)), exist_ok=True)
        for i, img in enumerate(d.images[d.target == c][:n_per_class]):
            Image.fromarray((img * (255 / 16)).round().astype(np.uint8)).save(os.path.join(root, str(c), f"{i}.png"))
    return root


def main(argv=None) -> dict:
    args = parse(argv)
    os.makedirs(args.out, exist_ok=True)
    epochs = args.epochs or (1 if args.quick else 30)
    folder = write_folder(os.path.join(args.out, "images"), 20 if args.quick else 200)
    data = pv.data.load(f"images:{folder}?stream=1&workers=1", seed=args.seed)
    torch.manual_seed(args.seed)
    model = pv.models.VAE(data.shape, 8, arch="conv", likelihood="logistic", image_shape=data.image_shape,
                          hidden=128, channels=32)
    run = pv.fit(model, None, data, epochs=epochs, batch_size=64, seed=args.seed, out=os.path.join(args.out, "run"),
                 overwrite=True, progress=False, figures=not args.quick, device=args.device, precision=args.precision)
    m = pv.evaluate(run, k=10 if args.quick else 500, save=False)
    results = {"epochs": epochs, "images": len(data.train) + len(data.val) + len(data.test),
               "test_log_likelihood_nats": m["log_likelihood"], "bits_per_dim": m["bits_per_dim"], "k": m["k"]}
    plots.samples(run.model.sample(32), data.image_shape, path=os.path.join(args.out, "samples.png"),
                  title=f"conv VAE, discretized logistic: {m['bits_per_dim']:.2f} bits/dim on held-out digits")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
