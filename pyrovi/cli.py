"""The ``pyrovi`` command: a thin layer over the Python API.

Each subcommand parses its arguments into the same config dicts and
keyword arguments the API takes (``models.build``, ``guides.build``,
``objectives.get``, ``fit``), calls the API, and prints the result. Errors a
user can cause (:class:`pyrovi.PyroviError`) are printed as one line, exit 2.

(Over 500 lines on purpose: one section per subcommand, its arguments beside its
handler; split into files, each command's two halves would live apart.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

from ._version import __version__

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
    g.add_argument("--model", default="vae",
                   help="model name (default: vae; linear_gaussian: probabilistic PCA, W and b learned)")
    g.add_argument("--latent-dim", type=int, default=16, help="latent dimension L (default: 16)")
    g.add_argument("--hidden", type=_ints, default=(256,), help="hidden widths, e.g. 400 or 512,256 (default: 256)")
    g.add_argument("--likelihood", default="bernoulli",
                   help="bernoulli | gaussian | logistic (discretized, 8-bit images) (default: bernoulli)")
    g.add_argument("--arch", default="mlp",
                   help="mlp | conv: the VAE's decoder and the guide's encoder trunk (conv: --channels, "
                        "--downsample; default: mlp)")
    g.add_argument("--sigma", type=float, default=1.0, help="Gaussian observation std delta (default: 1.0)")
    g.add_argument("--learn-sigma", action="store_true", help="learn the Gaussian std per pixel (default: fixed)")
    g.add_argument("--guide", default=None,
                   help="guide name (default: diag_normal; delta for --model autoencoder)")
    g.add_argument("--components", type=int, default=None, help="mixture components C (--guide mixture; default 5)")
    g.add_argument("--flow", default=None, help="iaf | spline | planar | radial (--guide flow; default iaf)")
    g.add_argument("--depth", type=int, default=None, help="number of flow transforms K (--guide flow; default 4)")
    _vq_train_args(p)
    g = p.add_argument_group("objective")
    g.add_argument("--objective", default="elbo", help="objective name (default: elbo)")
    g.add_argument("--particles", type=int, default=None,
                   help="vectorized particles S (default: the objective's own: 1 for elbo, meanfield, stl; "
                        "2 for renyi; 8 for iwae, dreg)")
    g.add_argument("--alpha", type=float, default=None,
                   help="Renyi order for --objective renyi (default: 0, the IWAE bound)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=20, help="passes over the training split")
    g.add_argument("--batch-size", type=int, default=128, help="datapoints per optimizer step")
    g.add_argument("--lr", type=float, default=1e-3, help="the optimizer's learning rate")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds the data split, the initial weights and every draw: equal seeds, equal runs")
    g.add_argument("--patience", type=int, default=None,
                   help="early stopping: stop after this many validations without improvement (default: off)")
    g.add_argument("--val-every", type=int, default=1,
                   help="validate after every N-th epoch and the last (default: 1, every epoch)")
    g.add_argument("--beta", type=float, default=1.0, help="weight of the KL terms (beta-VAE)")
    g.add_argument("--warmup", type=int, default=0, help="epochs of linear KL warm-up")
    g.add_argument("--clip-norm", type=float, default=None, help="gradient-norm clipping (default: off)")
    g.add_argument("--lr-schedule", default="constant", help="constant | cosine | exponential")
    g.add_argument("--optimizer", default="adam",
                   help="adam | adamw | sgd | rmsprop | adagrad | clippedadam (default: adam)")
    g.add_argument("--optimizer-kwargs", default=None, metavar="JSON",
                   help='the optimizer\'s keyword arguments as JSON, e.g. \'{"betas": [0.9, 0.99]}\' (default: none)')
    g.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the data held out for validation (default: 0.1); 0: none, early stopping "
                        "then watches the training loss")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--dtype", default=None, choices=["float32", "float64"],
                   help="float64 trains model, guide and data in double precision (default: float32)")
    g.add_argument("--precision", default=None,
                   help="32 | tf32 | bf16 | 16-mixed: mixed precision for the nets; loss and log-densities stay "
                        "float32 (default: 32)")
    g.add_argument("--compile", nargs="?", const="default", default=None,
                   help="torch.compile the model's and guide's nets (optionally a mode, e.g. max-autotune; "
                        "default: off)")
    g = p.add_argument_group("scale-out (PyTorch Lightning; pip install \"pyrovi[distributed]\")")
    g.add_argument("--strategy", default=None, help="ddp | ddp_spawn: data-parallel training (default: one process)")
    g.add_argument("--devices", type=int, default=1, help="processes (GPUs) per node with --strategy (default: 1)")
    g.add_argument("--num-nodes", type=int, default=1, help="nodes with --strategy (default: 1)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="run directory (default: runs/<time>)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint (default: start a new run)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing run in --out (default: refuse to)")
    g.add_argument("--logger", default="csv", choices=["csv", "tensorboard"],
                   help="csv: history.csv only; tensorboard: also step and epoch scalars in OUT/tensorboard "
                        "(pip install \"pyrovi[tensorboard]\") (default: csv)")
    g.add_argument("--evaluate-k", type=int, default=0,
                   help="after training, evaluate on the test split with K importance samples (0: skip)")
    _progress_arg(p)


def _json_arg(text, flag: str):
    """A flag's JSON value (None stays None); malformed JSON is a one-line ConfigError."""
    if text is None:
        return None
    from .errors import ConfigError

    try:
        return json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{flag} must be JSON, e.g. '{{\"momentum\": 0.9}}'; got {text!r:.60} ({e})") from None


def _progress_arg(p) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress output (default: a bar on a terminal, whole lines in a log file)")


def _progress(args) -> bool:
    """Show progress: not --no-progress. Where stderr is no terminal, our own counters print whole lines."""
    return not getattr(args, "no_progress", False)


def _tty_progress(args) -> bool:
    """For tqdm bars drawn by the API (training): only on a terminal, so a log gets no carriage-return line."""
    return _progress(args) and sys.stderr.isatty()


def _vq_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("VQ-VAE (--model vqvae; guide: codebook)")
    g.add_argument("--codebook", type=int, default=512, help="number of codes K (default: 512)")
    g.add_argument("--code-dim", type=int, default=16, help="size d of one code vector (default: 16)")
    g.add_argument("--downsample", type=int, default=None,
                   help="stride-2 stages data -> code grid (default: 1; --arch conv: as many as divide H, W, at most 2)")
    g.add_argument("--channels", type=int, default=None, help="conv width (default: 64; --arch conv: 32)")
    g.add_argument("--commitment", type=float, default=0.25, help="commitment weight beta (default: 0.25)")
    g.add_argument("--ema-decay", type=float, default=None, help="EMA codebook updates, e.g. 0.99 (default: off)")
    g.add_argument("--no-kmeans-init", action="store_true",
                   help="keep the initial codebook instead of k-means on the first batch (default: k-means)")
    g.add_argument("--restart-dead", type=float, default=None,
                   help="restart codes used less than this many times per batch on average (default: off)")


def _vq_model_config(args, dataset) -> dict:
    vocab = getattr(dataset, "vocab", None)
    return {"name": "vqvae", "input_dim": dataset.shape[0], "num_codes": args.codebook, "code_dim": args.code_dim,
            "downsample": 1 if args.downsample is None else args.downsample,
            "channels": 64 if args.channels is None else args.channels,
            "likelihood": "categorical" if vocab else args.likelihood, "sigma": args.sigma,
            "image_shape": dataset.image_shape, "vocab": vocab}


def model_config(args, dataset) -> dict:
    """The model config dict the CLI's flags describe (the same dict ``config.json`` stores)."""
    from . import models
    from .errors import ConfigError, lookup

    if args.model.strip().lower() == "vqvae":
        return _vq_model_config(args, dataset)
    if args.model.strip().lower() == "linear_gaussian":  # probabilistic PCA: W and b learned, sigma fixed
        return models.LinearGaussian(input_dim=dataset.shape[0], latent_dim=args.latent_dim, sigma=args.sigma,
                                     learn=True, seed=args.seed).config()
    cfg = {"name": args.model, "input_dim": dataset.shape[0], "latent_dim": args.latent_dim,
           "hidden": list(args.hidden), "likelihood": args.likelihood, "sigma": args.sigma,
           "learn_sigma": args.learn_sigma, "image_shape": dataset.image_shape}
    if args.arch.strip().lower() != "mlp":  # the conv options only where they apply (an MLP's config is unchanged)
        cfg.update(arch=args.arch.strip().lower(), channels=32 if args.channels is None else args.channels,
                   downsample=args.downsample)
    if getattr(lookup(models.MODELS, args.model, "model"), "uses_labels", False):  # e.g. conditional_vae
        if not dataset.num_classes:
            raise ConfigError(f"--model {args.model} conditions on labels but --data {args.data} has none")
        cfg["num_classes"] = dataset.num_classes
    return cfg


def guide_config(args, model=None) -> dict:
    """The guide config dict the CLI's flags describe (guide options only where given).

    No ``--guide`` takes the model's ``default_guide`` (e.g. ``delta`` for the autoencoder).
    """
    if args.model.strip().lower() == "vqvae" and args.guide in (None, "diag_normal", "codebook"):
        opts = {"beta": args.commitment, "ema_decay": args.ema_decay, "kmeans_init": not args.no_kmeans_init,
                "restart_dead": args.restart_dead}
        return {"name": "codebook", **{k: v for k, v in opts.items() if v is not None}}
    name = args.guide or getattr(model, "default_guide", None) or "diag_normal"
    cfg = {"name": name, "hidden": list(args.hidden)}
    for flag in ("components", "flow", "depth"):
        value = getattr(args, flag, None)
        if value is not None:
            cfg[flag] = value
    return cfg


def _train(args) -> int:
    from . import data, guides, models
    from .evaluation import evaluate
    from .train import fit

    from .errors import ConfigError, check_positive

    check_positive("--evaluate-k", args.evaluate_k, integer=True, allow_zero=True)  # before hours of training
    if not 0 <= args.val_fraction < 1:  # named here: data.load would report it as a split fraction
        raise ConfigError(f"--val-fraction must be in [0, 1) (0: no validation split), got {args.val_fraction}")
    binarize = None if args.binarize == "none" else args.binarize
    ds = data.load(args.data, seed=args.seed, binarize=binarize, split=(args.val_fraction, 0.1))
    import pyro

    pyro.set_rng_seed(args.seed)  # torch, numpy, random: the initial weights of model and guide follow --seed
    mcfg = model_config(args, ds)
    _check_network(args, mcfg)
    model = models.build(mcfg)
    guide = guides.build(model, guide_config(args, model))
    out = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    run = fit(model, guide, ds, objective=args.objective, particles=args.particles, alpha=args.alpha,
              epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, out=out,
              resume=args.resume, overwrite=args.overwrite, patience=args.patience, beta=args.beta,
              warmup=args.warmup, clip_norm=args.clip_norm, lr_schedule=args.lr_schedule, device=args.device,
              val_fraction=args.val_fraction, optimizer=args.optimizer,
              optimizer_kwargs=_json_arg(args.optimizer_kwargs, "--optimizer-kwargs"),
              progress=_progress(args), strategy=args.strategy, devices=args.devices, num_nodes=args.num_nodes,
              val_every=args.val_every, logger=args.logger, precision=args.precision, compile=args.compile or None,
              dtype=args.dtype)
    if run.directory is None and args.strategy:  # a DDP rank other than 0: rank 0 reports and evaluates
        return 0
    print(f"run directory: {out}")
    print(json.dumps({k: v for k, v in run.metrics.items() if not isinstance(v, dict)}, indent=2))
    if args.evaluate_k:
        _print_eval(evaluate(run, ds, k=args.evaluate_k, progress=_progress(args)), run.config)
        from .report import write_report

        write_report(run.directory)  # drawn from the directory: config.json, metrics.json, figures
    return 0


def _check_network(args, mcfg: dict) -> None:
    """Refuse --hidden/--latent-dim (and VQ sizes) whose weights would not fit the memory budget, before building."""
    from . import budget, models
    from .errors import lookup

    cls = lookup(models.MODELS, args.model, "model")
    nbytes = budget.network_bytes(mcfg, guide_config(args, cls))
    if nbytes is not None:  # weights, gradients and Adam's two moments
        flags = f"--hidden {','.join(map(str, args.hidden))} --latent-dim {args.latent_dim}"
        budget.check(flags, 4 * nbytes, "the weights of model and guide with their gradients and Adam moments",
                     "use smaller --hidden widths or a smaller --latent-dim")


COMMANDS["train"] = (_train_args, _train, "train a model and guide; writes a run directory")


# --------------------------------------------------------------------------- evaluate


def _print_eval(metrics: dict, cfg: Optional[dict] = None) -> None:
    """Print the test metrics the run's model kind has (an autoencoder: no log p(x), ELBO or bits/dim)."""
    from .report import has_density, is_density, shown_metrics

    cfg = cfg or {}
    note = "" if has_density(cfg) else f"; the {cfg['model']['name']} has no log p(x), ELBO or bits/dim"
    if has_density(cfg) and is_density(cfg):
        note = "; Gaussian likelihood: log p(x) is a log-density"
    print(f"test metrics (nats per datapoint{note}):")
    for k, v in shown_metrics(metrics, cfg).items():
        if k == "latents":
            continue
        print(f"  {k:18s} {v:.4f}" if isinstance(v, float) else f"  {k:18s} {v}")
    for site, st in (metrics.get("latents") or {}).items():
        kl = st.get("kl_per_dim")
        print(f"  latent {site!r}: {st['active']} of {st['dims']} units active (Cov_x E_q[z_d] > 0.01); "
              f"KL per dim ({st['kl_method']}): " + ("—" if kl is None else " ".join(f"{v:.3f}" for v in kl)))


def _evaluate_args(p) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument("--k", type=int, default=5000, help="importance samples per datapoint (default: 5000)")
    p.add_argument("--data", default=None, help="dataset (default: the run's own data, test split)")
    p.add_argument("--batch-size", type=int, default=100, help="datapoints per pass (default: 100)")
    p.add_argument("--chunk", type=int, default=None, help="particles per pass (default: bounded memory)")
    p.add_argument("--seed", type=int, default=0, help="seed of the importance samples (default: 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    _no_save_arg(p)
    _progress_arg(p)


def _no_save_arg(p) -> None:
    p.add_argument("--no-save", action="store_true",
                   help="print the results only: write nothing into the run directory, e.g. a read-only run "
                        "(default: off)")


def _print_vq(run, ds, batch_size: int, save: bool = True) -> None:
    from .vq_evaluation import vq_metrics

    vq = vq_metrics(run, ds, batch_size=batch_size, save=save)  # saved under "vq" in metrics.json
    unit = "bits/char" if run.model.is_text else "bits/dim"
    print(f"codebook: {vq['codes_used']} of {vq['num_codes']} codes used, {vq['dead_codes']} dead, "
          f"perplexity {vq['perplexity']:.2f}; {unit} under the uniform prior {vq['bits_per_dim']:.4f}")
    prior = run.metrics.get("prior") or {}
    if "bits_per_dim_learned" in prior:
        print(f"{unit} with the Transformer prior (pyrovi train-prior): {prior['bits_per_dim_learned']:.4f} "
              f"(uniform prior: {prior['bits_per_dim_uniform']:.4f}; held-out split of train-prior)")


def _run_data(run, name):
    from .inputs import dataset

    ds = dataset(name, run)  # None: the run's own data
    if ds is not None:
        run.check_items(ds.train.x, f"--data {name}" if name else "the run's data")
    return ds


def _evaluate(args) -> int:
    from .evaluation import evaluate
    from .run import load_run
    from .report import write_report

    run = load_run(args.run, device=args.device)
    ds = _run_data(run, args.data)
    if getattr(run.guide, "point_mass", False) and args.k > 1:
        print(f"q(z|x) is a point mass ({type(run.guide).__name__}): every draw is the same z, so one draw is "
              f"exact and --k {args.k} is not needed; evaluating with K = 1")
    _print_eval(evaluate(run, ds, k=args.k, batch_size=args.batch_size, chunk=args.chunk, seed=args.seed,
                         save=not args.no_save, progress=_progress(args)), run.config)
    if run.config.get("model", {}).get("name") == "vqvae":  # codebook use and the prior: the same command
        _print_vq(run, ds, args.batch_size, save=not args.no_save)
    if args.no_save:
        print("nothing written (--no-save)")
        return 0
    write_report(run.directory)  # drawn from the directory: config.json, metrics.json, figures
    print(f"updated {os.path.join(args.run, 'metrics.json')}, report.md and report.html")
    return 0


COMMANDS["evaluate"] = (_evaluate_args, _evaluate, "held-out ELBO, IWAE log-likelihood, KL; updates metrics.json")


# --------------------------------------------------------------------------- diagnose


def _diagnose_args(p) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument("--n", type=int, default=100, help="datapoints to diagnose, the first N of the test split "
                                                       "(default: 100)")
    p.add_argument("--particles", type=int, default=2500,
                   help="draws from q(z|x) per datapoint (default: 2500; k-hat up to 0.7 needs >= 2155)")
    p.add_argument("--data", default=None, help="dataset (default: the run's own data, test split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (default: 0)")
    p.add_argument("--out", default=None, help="netCDF file (default: RUN/diagnostics.nc)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    _no_save_arg(p)
    _progress_arg(p)


def _diagnose(args) -> int:
    import warnings

    from .diagnostics import diagnose
    from .run import load_run
    from .diagnostics import DiagnosticWarning, save_netcdf, summarize
    from .report import write_diagnostic_figures, write_report

    run = load_run(args.run, device=args.device)
    ds = _run_data(run, args.data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiagnosticWarning)  # printed below as part of the summary
        idata = diagnose(run, ds, n=args.n, particles=args.particles, seed=args.seed, progress=_progress(args),
                         save=not args.no_save)
    if args.no_save:  # an explicit --out outside the run still gets the InferenceData
        print(summarize(idata).to_markdown())
        if args.out:
            save_netcdf(idata, args.out)
        print(f"wrote {args.out}; nothing written into the run (--no-save)" if args.out
              else "nothing written (--no-save)")
        return 0
    out = args.out or os.path.join(args.run, "diagnostics.nc")
    save_netcdf(idata, out)
    figs = write_diagnostic_figures(run, idata, ds.test)
    write_report(run.directory)  # drawn from the directory: config.json, metrics.json, figures
    print(summarize(idata).to_markdown())
    print(f"wrote {out}, {', '.join(figs)}; updated report.md and report.html in {args.run}")
    return 0


COMMANDS["diagnose"] = (_diagnose_args, _diagnose,
                        "posterior draws as ArviZ InferenceData (netCDF), PSIS k-hat, ESS, collapse check, figures")


# --------------------------------------------------------------------------- compare


def _compare_args(p) -> None:
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default=None,
                   help="directory for compare.md and training_curves.png (default: print the table only)")


def _compare(args) -> int:
    from .report import compare_runs

    from .report import COMPARE_NOTE

    res = compare_runs(args.runs, out=args.out)
    print(res["markdown"])
    print(COMPARE_NOTE)
    if args.out:
        print(f"wrote {os.path.join(args.out, 'compare.md')}" + (f" and {res['figure']}" if res["figure"] else ""))
    return 0


COMMANDS["compare"] = (_compare_args, _compare, "one table of metrics across runs, and overlaid training curves")


# --------------------------------------------------------------------------- report


def _report_args(p) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument("--device", default="cpu", help="where to load the weights for the figures (default: cpu)")


def _report(args) -> int:
    from .report import write

    figs = write(args.run, device=args.device)
    print(f"wrote {', '.join(figs + ['report.md', 'report.html'])} in {args.run}")
    return 0


COMMANDS["report"] = (_report_args, _report, "redraw a run directory's figures, report.md and report.html")


# --------------------------------------------------------------------------- sample


def _sample_args(p) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument("--n", type=int, default=64, help="number of samples (default: 64)")
    p.add_argument("--out", default=None,
                   help="output file: .png (grid), .npy or .csv; .txt for text runs "
                        "(default: RUN/samples.png; text runs print to the terminal)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (default: 0)")
    p.add_argument("--label", type=int, default=None,
                   help="class of every sample, for a conditional run or a class-conditional VQ-VAE prior "
                        "(default: classes in turn)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    g = p.add_argument_group("VQ-VAE runs (codes from the run's Transformer prior, else uniform)")
    g.add_argument("--temperature", type=float, default=1.0, help="prior sampling temperature (default: 1.0)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely codes (default: all)")


_SAMPLE_EXTS = (".png", ".npy", ".csv")


def _sample_vq(args, run):
    """-> (samples, description): codes from the run's prior (Transformer when fitted, else uniform), decoded."""
    import torch

    from . import priors

    prior = priors.load_prior(run) if os.path.isfile(os.path.join(args.run, priors.PRIOR_CONFIG)) else None
    label = args.label
    if label is None and prior is not None and prior.conditional:  # classes in turn, as --help says
        label = torch.arange(args.n) % prior.cfg.num_classes
    x = priors.sample_run(run, prior, args.n, label=label, temperature=args.temperature, top_k=args.top_k,
                          seed=args.seed)
    return x, f"{'Transformer' if prior else 'uniform'} prior"


def _write_samples(x, out: str, shape, title: str) -> None:
    import numpy as np

    from . import plots

    ext = os.path.splitext(out)[1].lower()
    if ext == ".png":
        plots.samples(x, tuple(shape) if shape else None, path=out, title=title)
    elif ext == ".npy":
        np.save(out, x.numpy())
    else:  # .csv
        np.savetxt(out, x.numpy(), delimiter=",", fmt="%.6g")


def _sample(args) -> int:
    from .run import load_run
    from .errors import ConfigError, check_positive

    check_positive("--n", args.n, integer=True)
    run = load_run(args.run, device=args.device)
    run.check_rows(f"n={args.n}", args.n, "use a smaller --n")  # before drawing: a typo of a few zeros is an error, not a kill
    is_vq = run.config.get("model", {}).get("name") == "vqvae"
    text = is_vq and run.model.is_text
    exts = (".txt",) if text else _SAMPLE_EXTS
    if args.out is not None and os.path.splitext(args.out)[1].lower() not in exts:
        raise ConfigError(f"--out must end in {', '.join(exts)}" + (" for a text run" if text else "")
                          + f", got {args.out!r}")
    if is_vq:
        x, what = _sample_vq(args, run)
    else:
        from .uses import sample_prior

        x = sample_prior(run, args.n, label=args.label, seed=args.seed)
        what = "z ~ p(z)"
        if getattr(run.model, "uses_labels", False):
            what += f", label {args.label}" if args.label is not None else ", classes in turn"
    if text:
        sep = "\n" + "-" * 20 + "\n"
        body = sep.join(x) + "\n"
        if args.out is None:
            print(body, end="")
            return 0
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(body)
        print(f"wrote {args.n} samples ({what}) to {args.out}")
        return 0
    out = args.out or os.path.join(args.run, "samples.png")
    shape = run.config.get("data", {}).get("image_shape")
    _write_samples(x.cpu(), out, shape, f"Samples: mean of p(x|z), {what}")
    print(f"wrote {args.n} samples ({what}) to {out}")
    return 0


COMMANDS["sample"] = (_sample_args, _sample, "draw samples from a trained run's prior and decode them")


# --------------------------------------------------------------------------- interpolate


def _interpolate_args(p) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument("--pairs", type=int, default=6, help="pairs of test items, one row each (default: 6)")
    p.add_argument("--steps", type=int, default=10, help="points per path, end points included (default: 10)")
    p.add_argument("--method", default="both", choices=["linear", "slerp", "both"],
                   help="linear z = a z1 + (1-a) z2, spherical slerp, or both side by side (default)")
    p.add_argument("--data", default=None, help="dataset (default: the run's own data, test split)")
    p.add_argument("--out", default=None,
                   help="output PNG (default: RUN/interpolations.png; a text run: RUN/interpolations.txt)")
    p.add_argument("--seed", type=int, default=0, help="seeds the choice of pairs (default: 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")


def _interpolate(args) -> int:
    import torch

    from . import plots, uses
    from .run import load_run
    from .errors import ConfigError, check_positive

    check_positive("--steps", args.steps, integer=True)
    check_positive("--pairs", args.pairs, integer=True)
    run = load_run(args.run, device=args.device)
    run.check_rows(f"steps={args.steps}", args.pairs * args.steps * 2, "use fewer --steps or --pairs")  # 2 methods
    ds = _run_data(run, args.data)
    split = ds.test if len(ds.test) >= 2 else ds.train
    conditional = getattr(run.model, "uses_labels", False)
    if split.y is not None:  # a conditional model keeps its label along the path: pair items of one class
        i1, i2 = uses.pick_pairs(split.y, args.pairs, same_label=conditional, seed=args.seed)
    else:
        if 2 * args.pairs > len(split):
            raise ConfigError(f"--pairs {args.pairs} needs {2 * args.pairs} items; the split has {len(split)}")
        perm = torch.randperm(len(split), generator=torch.Generator().manual_seed(args.seed))
        i1, i2 = perm[:args.pairs], perm[args.pairs:2 * args.pairs]
    labels = (split.y[i1], split.y[i2]) if conditional else (None, None)
    methods = ["linear", "slerp"] if args.method == "both" else [args.method]
    if getattr(run.model, "is_text", False):
        return _interpolate_text(args, run, split, i1, i2, methods)
    panels = {}
    for m in methods:
        path = uses.interpolate(run, split.x[i1], split.x[i2], steps=args.steps, method=m,
                                y1=labels[0], y2=labels[1])  # (P, A, D)
        panels[m] = path.reshape(-1, path.shape[-1]).cpu()
    rows = ([f"{int(a)} to {int(b)}" for a, b in zip(split.y[i1], split.y[i2])] if split.y is not None
            else [f"pair {k + 1}" for k in range(len(i1))])
    alpha = uses.interpolation_weights(args.steps)
    shape = run.config.get("data", {}).get("image_shape")
    out = args.out or os.path.join(args.run, "interpolations.png")
    if os.path.splitext(out)[1].lower() != ".png":
        raise ConfigError(f"--out must end in .png, got {out!r}")
    plots.image_panels(panels, tuple(shape) if shape else None, ncols=args.steps, row_labels=rows,
                       col_labels=[f"$\\alpha$={a:.2f}" for a in alpha],
                       title=r"Decoded interpolations between posterior means; $\alpha$ = weight of the left item",
                       path=out)
    print(f"wrote {len(i1)} x {args.steps} interpolations ({', '.join(methods)}) to {out}")
    return 0


def _interpolate_text(args, run, split, i1, i2, methods) -> int:
    """A text VQ-VAE: each path as lines of text (the most likely character per position)."""
    from . import uses
    from .errors import ConfigError

    out = args.out or os.path.join(args.run, "interpolations.txt")
    if os.path.splitext(out)[1].lower() != ".txt":
        raise ConfigError(f"--out must end in .txt for a text run, got {out!r}")
    alpha = uses.interpolation_weights(args.steps)
    lines = [f"Decoded interpolations between posterior means; alpha = weight of the first item ({args.run})"]
    for m in methods:
        path = uses.interpolate(run, split.x[i1], split.x[i2], steps=args.steps, method=m)  # (P, A, T, V)
        chars = path.argmax(-1).cpu()  # (P, A, T)
        for p in range(chars.shape[0]):
            lines += ["", f"{m}, pair {p + 1}"]
            lines += [f"alpha={a:.2f} | {t!r}" for a, t in zip(alpha.tolist(), run.model.text(chars[p]))]
    with open(out, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {len(i1)} x {args.steps} interpolations ({', '.join(methods)}) to {out}")
    return 0


COMMANDS["interpolate"] = (_interpolate_args, _interpolate,
                           "decode paths between pairs of items' codes (linear and slerp) into a PNG")


# --------------------------------------------------------------------------- train-prior


def _train_prior_args(p) -> None:
    p.add_argument("run", help="a VQ-VAE run directory")
    p.add_argument("--epochs", type=int, default=40, help="passes over the training codes (default: 40)")
    p.add_argument("--batch-size", type=int, default=64, help="code grids per step (default: 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 0.001)")
    p.add_argument("--d-model", type=int, default=128, help="Transformer width (default: 128)")
    p.add_argument("--layers", type=int, default=2, help="Transformer blocks (default: 2)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default: 4)")
    p.add_argument("--conditional", choices=["auto", "yes", "no"], default="auto",
                   help="condition on class labels (default: auto = when the data has labels)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights and batches (default: 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    _progress_arg(p)


def _train_prior(args) -> int:
    from . import priors
    from .run import load_run

    run = load_run(args.run, device=args.device)
    ds = _run_data(run, None)
    prior = priors.fit_prior(run, ds, conditional={"auto": None, "yes": True, "no": False}[args.conditional],
                             epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, d_model=args.d_model,
                             layers=args.layers, heads=args.heads, seed=args.seed, progress=_tty_progress(args))
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


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the epilog's line breaks and shows every option's default.

    A help text that already says "default" is left as it is; flags (store_true)
    and options whose default is None say in words what happens without them.
    """

    def _get_help_string(self, action):
        text = action.help or ""
        silent = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text.lower() or silent or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (``pyrovi --help``)."""
    p = argparse.ArgumentParser(
        prog="pyrovi",
        description="Variational inference with neural guides, built on Pyro.",
        epilog=_names_line(),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"pyrovi {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_args, _, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text, epilog=_names_line(),
                            formatter_class=_HelpFormatter)
        add_args(sp)
    return p


def _subparser(parser: argparse.ArgumentParser, command: str) -> Optional[argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(command)
    return None


def cli_spelling(message: str, parser: Optional[argparse.ArgumentParser] = None) -> str:
    """An API error message in the command's spelling: ``resume=True`` -> ``--resume``, ``lr=0.1`` -> ``--lr 0.1``.

    Only names that are options of ``parser`` (the subcommand) are rewritten, so other
    ``name=value`` text (a config dict, a Python call the message quotes) stays as it is.
    """
    import re

    if parser is None:
        return message
    flags = {}
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.startswith("--"):
                flags[action.dest] = (opt, isinstance(action, argparse._StoreTrueAction))

    def fix(m):
        name, value = m.group(1), m.group(2)
        if name not in flags:
            return m.group(0)
        opt, is_flag = flags[name]
        if is_flag:
            return opt if value == "True" else f"no {opt}"
        return f"{opt} {value.strip(chr(39) + chr(34))}"

    message = re.sub(r"(?<![\w.-])([a-z_]+)=('[^']*'|\"[^\"]*\"|[^\s,;)]+)", fix, message)
    # bare API argument names with an underscore ("use batch_size <= 250") are options too
    message = re.sub(r"(?<![\w.-])([a-z]+_[a-z_]+)\b(?!=)",
                     lambda m: flags[m.group(1)][0] if m.group(1) in flags else m.group(0), message)
    return message.replace("fit(..., out=..., resume=True)", "pyrovi train --out ... --resume")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``pyrovi`` console script (and ``python -m pyrovi``); returns the exit code."""
    from .errors import PyroviError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command][1](args)
    except PyroviError as e:
        print(f"pyrovi {args.command}: error: {cli_spelling(str(e)[:2000], _subparser(parser, args.command))}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pyrovi {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the environment, not the input: disk full, permissions, a vanished file
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"pyrovi {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
