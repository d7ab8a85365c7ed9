"""The ``pyrovi`` command: a thin layer over the Python API.

Each subcommand parses its arguments into the same config dicts and
keyword arguments the API takes (``models.build``, ``guides.build``,
``objectives.get``, ``fit``), calls the API, and prints the result. Errors a
user can cause (:class:`pyrovi.PyroviError`) are printed as one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

from . import __version__

__all__ = ["main", "build_parser", "COMMANDS"]

#: name -> (add_arguments(parser), run(args) -> exit code, help)
COMMANDS: dict = {}


def _ints(text: str) -> tuple:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 256,128, got {text!r}") from None


def _names_line() -> str:
    from . import data, guides, models, objectives

    return (f"datasets: {', '.join(data.names())}\n"
            f"models: {', '.join(models.names())}\n"
            f"guides: {', '.join(guides.names())}\n"
            f"objectives: {', '.join(objectives.names())}")


# --------------------------------------------------------------------------- train


def _train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="digits", help="dataset name or kind:PATH (default: digits)")
    g.add_argument("--binarize", default="default", choices=["default", "static", "dynamic", "none"],
                   help="binarization of [0,1] data (default: static for built-in image sets, none for files)")
    g = p.add_argument_group("model and guide")
    g.add_argument("--model", default="vae", help="model name (default: vae)")
    g.add_argument("--latent-dim", type=int, default=16, help="latent dimension L (default: 16)")
    g.add_argument("--hidden", type=_ints, default=(256,), help="hidden widths, e.g. 400 or 512,256 (default: 256)")
    g.add_argument("--likelihood", default="bernoulli", help="bernoulli | gaussian (default: bernoulli)")
    g.add_argument("--sigma", type=float, default=1.0, help="Gaussian observation std delta (default: 1.0)")
    g.add_argument("--learn-sigma", action="store_true", help="learn the Gaussian std per pixel")
    g.add_argument("--guide", default="diag_normal", help="guide name (default: diag_normal)")
    _vq_train_args(p)
    g = p.add_argument_group("objective")
    g.add_argument("--objective", default="elbo", help="objective name (default: elbo)")
    g.add_argument("--particles", type=int, default=None, help="vectorized particles S (objective's default)")
    g.add_argument("--alpha", type=float, default=None, help="Renyi order for --objective renyi")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=20)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--patience", type=int, default=None, help="early stopping patience in epochs (default: off)")
    g.add_argument("--beta", type=float, default=1.0, help="weight of the KL terms (beta-VAE)")
    g.add_argument("--warmup", type=int, default=0, help="epochs of linear KL warm-up")
    g.add_argument("--clip-norm", type=float, default=None, help="gradient-norm clipping")
    g.add_argument("--lr-schedule", default="constant", help="constant | cosine | exponential")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="run directory (default: runs/<time>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    g.add_argument("--evaluate-k", type=int, default=0,
                   help="after training, evaluate on the test split with K importance samples (0: skip)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _vq_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("VQ-VAE (--model vqvae; guide: codebook)")
    g.add_argument("--codebook", type=int, default=512, help="number of codes K (default: 512)")
    g.add_argument("--code-dim", type=int, default=16, help="size d of one code vector (default: 16)")
    g.add_argument("--downsample", type=int, default=1, help="stride-2 stages data -> code grid (default: 1)")
    g.add_argument("--channels", type=int, default=64, help="conv width (default: 64)")
    g.add_argument("--commitment", type=float, default=0.25, help="commitment weight beta (default: 0.25)")
    g.add_argument("--ema-decay", type=float, default=None, help="EMA codebook updates, e.g. 0.99 (default: off)")
    g.add_argument("--no-kmeans-init", action="store_true",
                   help="keep the initial codebook instead of k-means on the first batch")
    g.add_argument("--restart-dead", type=float, default=None,
                   help="restart codes used less than this many times per batch on average (default: off)")


def _vq_model_config(args, dataset) -> dict:
    vocab = getattr(dataset, "vocab", None)
    return {"name": "vqvae", "input_dim": dataset.shape[0], "num_codes": args.codebook, "code_dim": args.code_dim,
            "downsample": args.downsample, "channels": args.channels,
            "likelihood": "categorical" if vocab else args.likelihood, "sigma": args.sigma,
            "image_shape": dataset.image_shape, "vocab": vocab}


def model_config(args, dataset) -> dict:
    """The model config dict the CLI's flags describe (the same dict ``config.json`` stores)."""
    if args.model.strip().lower() == "vqvae":
        return _vq_model_config(args, dataset)
    return {"name": args.model, "input_dim": dataset.shape[0], "latent_dim": args.latent_dim,
            "hidden": list(args.hidden), "likelihood": args.likelihood, "sigma": args.sigma,
            "learn_sigma": args.learn_sigma, "image_shape": dataset.image_shape}


def guide_config(args) -> dict:
    """The guide config dict the CLI's flags describe."""
    if args.model.strip().lower() == "vqvae" and args.guide in ("diag_normal", "codebook"):
        opts = {"beta": args.commitment, "ema_decay": args.ema_decay, "kmeans_init": not args.no_kmeans_init,
                "restart_dead": args.restart_dead}
        return {"name": "codebook", **{k: v for k, v in opts.items() if v is not None}}
    return {"name": args.guide, "hidden": list(args.hidden)}


def _train(args) -> int:
    from . import data, evaluate, fit, guides, models

    binarize = None if args.binarize == "none" else args.binarize
    ds = data.load(args.data, seed=args.seed, binarize=binarize)
    model = models.build(model_config(args, ds))
    guide = guides.build(model, guide_config(args))
    out = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    run = fit(model, guide, ds, objective=args.objective, particles=args.particles, alpha=args.alpha,
              epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, out=out,
              resume=args.resume, overwrite=args.overwrite, patience=args.patience, beta=args.beta,
              warmup=args.warmup, clip_norm=args.clip_norm, lr_schedule=args.lr_schedule, device=args.device,
              progress=not args.no_progress)
    print(f"run directory: {out}")
    print(json.dumps({k: v for k, v in run.metrics.items() if not isinstance(v, dict)}, indent=2))
    if args.evaluate_k:
        _print_eval(evaluate(run, ds, k=args.evaluate_k))
        from .report import write_report

        write_report(run)
    return 0


COMMANDS["train"] = (_train_args, _train, "train a model and guide; writes a run directory")


# --------------------------------------------------------------------------- evaluate


def _print_eval(metrics: dict) -> None:
    print("test metrics (nats per datapoint):")
    for k, v in metrics.items():
        print(f"  {k:16s} {v:.4f}" if isinstance(v, float) else f"  {k:16s} {v}")


def _evaluate_args(p) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument("--k", type=int, default=5000, help="importance samples per datapoint (default: 5000)")
    p.add_argument("--data", default=None, help="dataset (default: the run's own data, test split)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="auto")


def _evaluate(args) -> int:
    from . import data, evaluate, load_run
    from .report import write_report

    run = load_run(args.run, device=args.device)
    ds = data.load(args.data) if args.data else data.from_source(run.config.get("data", {}))
    _print_eval(evaluate(run, ds, k=args.k, batch_size=args.batch_size))
    write_report(run)
    return 0


COMMANDS["evaluate"] = (_evaluate_args, _evaluate, "held-out ELBO, IWAE log-likelihood, KL; updates metrics.json")


# --------------------------------------------------------------------------- sample


def _sample_args(p) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument("--n", type=int, default=64, help="number of samples (default: 64)")
    p.add_argument("--out", default=None, help="output file: .png (grid), .npy or .csv (default: RUN/samples.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    g = p.add_argument_group("VQ-VAE runs (codes from the run's Transformer prior, else uniform)")
    g.add_argument("--label", type=int, default=None, help="class label for a class-conditional prior")
    g.add_argument("--temperature", type=float, default=1.0, help="prior sampling temperature (default: 1.0)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely codes (default: all)")


def _sample_vq(args, run) -> int:
    from . import plots, priors

    prior = priors.load_prior(run) if os.path.isfile(os.path.join(args.run, priors.PRIOR_CONFIG)) else None
    x = priors.sample_run(run, prior, args.n, label=args.label, temperature=args.temperature, top_k=args.top_k,
                          seed=args.seed)
    if run.model.is_text:
        for s in x:
            print(s)
            print("-" * 20)
        return 0
    out = args.out or os.path.join(args.run, "samples.png")
    shape = run.config.get("data", {}).get("image_shape")
    plots.samples(x.cpu(), tuple(shape) if shape else None, path=out)
    print(f"wrote {args.n} samples ({'Transformer' if prior else 'uniform'} prior) to {out}")
    return 0


def _sample(args) -> int:
    import numpy as np
    import torch

    from . import load_run, plots
    from .errors import ConfigError, check_positive

    check_positive("--n", args.n, integer=True)
    run = load_run(args.run, device=args.device)
    if run.config.get("model", {}).get("name") == "vqvae":
        return _sample_vq(args, run)
    out = args.out or os.path.join(args.run, "samples.png")
    torch.manual_seed(args.seed)
    with run.scope():
        x = run.model.sample(args.n).cpu()
    ext = os.path.splitext(out)[1].lower()
    if ext == ".png":
        shape = run.config.get("data", {}).get("image_shape")
        plots.samples(x, tuple(shape) if shape else None, path=out)
    elif ext == ".npy":
        np.save(out, x.numpy())
    elif ext == ".csv":
        np.savetxt(out, x.numpy(), delimiter=",", fmt="%.6g")
    else:
        raise ConfigError(f"--out must end in .png, .npy or .csv, got {out!r}")
    print(f"wrote {args.n} samples to {out}")
    return 0


COMMANDS["sample"] = (_sample_args, _sample, "draw samples from a trained run's prior and decode them")


# --------------------------------------------------------------------------- train-prior


def _train_prior_args(p) -> None:
    p.add_argument("run", help="a VQ-VAE run directory")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--d-model", type=int, default=128, help="Transformer width (default: 128)")
    p.add_argument("--layers", type=int, default=2, help="Transformer blocks (default: 2)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--conditional", choices=["auto", "yes", "no"], default="auto",
                   help="condition on class labels (default: auto = when the data has labels)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")


def _train_prior(args) -> int:
    from . import data, load_run, priors

    run = load_run(args.run, device=args.device)
    ds = data.from_source(run.config.get("data", {}))
    prior = priors.fit_prior(run, ds, conditional={"auto": None, "yes": True, "no": False}[args.conditional],
                             epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, d_model=args.d_model,
                             layers=args.layers, heads=args.heads, seed=args.seed, progress=not args.no_progress)
    unit = "bits/char" if run.model.is_text else "bits/dim"
    m = prior.metrics
    print(f"wrote {os.path.join(args.run, priors.PRIOR_WEIGHTS)} and {priors.PRIOR_CONFIG}")
    print(f"held-out {unit}: learned prior {m['bits_per_dim_learned']:.4f}, "
          f"uniform prior {m['bits_per_dim_uniform']:.4f}"
          + (f", unigram {m['bits_per_dim_unigram']:.4f}" if "bits_per_dim_unigram" in m else ""))
    return 0


COMMANDS["train-prior"] = (_train_prior_args, _train_prior,
                           "fit a causal Transformer prior over a VQ-VAE run's codes (prior.safetensors)")


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (``pyrovi --help``)."""
    p = argparse.ArgumentParser(
        prog="pyrovi",
        description="Variational inference with neural guides, built on Pyro.",
        epilog=_names_line(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"pyrovi {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_args, _, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text, epilog=_names_line(),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        add_args(sp)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``pyrovi`` console script; returns the exit code."""
    from .errors import PyroviError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command][1](args)
    except PyroviError as e:
        print(f"pyrovi {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pyrovi {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
