"""The run directory's human-readable report (``report.md`` and a self-contained ``report.html``) and its figures.

``report.md`` is written from the run's config and ``metrics.json`` (training
metrics, the test metrics of :func:`pyrovi.evaluate`, the diagnostics summary
of :func:`pyrovi.diagnose`) and links the figures in the directory;
``report.html`` is the same page rendered by Python-Markdown with every
figure embedded as base64, so it can be mailed or archived as one file.

Reports are drawn from a run directory: :func:`write` takes the directory (or a
:class:`~pyrovi.Run` saved in one), reads what it holds and writes the figures and
both report files, so a report can be redrawn at any time without training.
"""

from __future__ import annotations

import base64
import math
import os
import re
from typing import Optional, Sequence

import torch

from . import plots
from .checkpoint import atomic_write, read_json
from .errors import ConfigError, PyroviError

__all__ = ["write", "write_training_report", "write_report", "write_html", "write_diagnostic_figures", "compare_runs",
           "FIGURES"]

#: figures the report shows, in this order, when present in the run directory
FIGURES = ("training_curves.png", "reconstructions.png", "samples.png", "khat.png", "latents.png",
           "diagnose_interpolations.png", "interpolations.png")
#: written by ``pyrovi diagnose`` (4 pairs, linear); ``pyrovi interpolate`` writes ``interpolations.png``
DIAGNOSE_INTERPOLATIONS = "diagnose_interpolations.png"


def _image_shape(run):
    shape = run.config.get("data", {}).get("image_shape")
    return tuple(shape) if shape else getattr(getattr(run.model, "cfg", None), "image_shape", None)


def write(run, *, data=None, x_recon: Optional[torch.Tensor] = None, **load_kwargs) -> list:
    """Draw a run directory's figures and write its ``report.md`` / ``report.html``.

    Everything the report states comes from the directory's files (``config.json``,
    ``history.csv``, ``metrics.json``), so it shows what is saved, whoever wrote it:
    :func:`pyrovi.fit`, the CLI, or a run trained elsewhere. The figures that need the
    trained model (reconstructions, prior samples) use the weights loaded with
    :func:`pyrovi.load_run`, or the live model and guide of a :class:`~pyrovi.Run`
    that was just saved there (``fit(..., out=...)`` calls ``write(run)``).

    Writes ``training_curves.png`` (when there is a history), and for image models
    with ``decode`` and ``sample``: ``reconstructions.png`` (8 validation
    datapoints; the test split stays unseen) and ``samples.png`` (64 prior draws,
    seed 0). Then ``report.md`` and ``report.html`` (see :func:`write_report`).

    Args:
        run: a run directory, or a :class:`~pyrovi.Run` saved in one.
        data: the dataset whose validation split is reconstructed (a
            :class:`~pyrovi.data.Dataset` or a dataset name; other data is used as
            it is). Default: the run's own, reloaded from ``config.json`` when it
            names one; without it no reconstructions are drawn.
        x_recon: the datapoints to reconstruct, ``(B, D)``, instead of ``data``'s.
        **load_kwargs: ``model=``, ``guide=``, ``device=``, ``model_kwargs=`` for
            :func:`pyrovi.load_run` when ``run`` is a directory (a run of your own
            Pyro code needs ``model=`` and ``guide=``).

    Returns:
        The figure file names written.
    """
    from .run import load_run
    from .run_files import HISTORY, read_history

    if isinstance(run, (str, os.PathLike)):
        run = load_run(os.fspath(run), **load_kwargs)
    elif load_kwargs:
        raise ConfigError(f"report.write got {sorted(load_kwargs)}, which are options of load_run for a run "
                          "directory; it was handed a Run, which is already loaded")
    d = run.directory
    if d is None or not os.path.isdir(d):
        raise ConfigError("report.write needs a run directory; this run was trained without out=: save it "
                          "first with run.save(directory)")
    written = []
    history = read_history(os.path.join(d, HISTORY))
    if history:
        plots.training_curves({"run": history}, path=os.path.join(d, "training_curves.png"))
        written.append("training_curves.png")
    written += _model_figures(run, data, x_recon)
    write_report(d)
    return written


def write_training_report(run, x_recon: Optional[torch.Tensor] = None) -> list:
    """Compatibility wrapper of :func:`write` for a run just saved by :func:`pyrovi.fit`."""
    return write(run, x_recon=x_recon)


def _recon_split(run, data):
    """The split whose first rows are reconstructed, or None when the run's data cannot be found."""
    from . import data as data_mod
    from . import inputs

    if data is None:
        if run.data is not None:
            return run.data.val
        try:
            data = data_mod.from_source(run.config.get("data", {}))
        except (PyroviError, OSError):  # in-memory arrays, a file that moved: no reconstructions
            return None
    if isinstance(data, str):
        data = data_mod.load(data, seed=run.config.get("train", {}).get("seed", 0))
    if isinstance(data, data_mod.Dataset):
        return data.val
    return inputs.as_split(data)


@torch.no_grad()
def _model_figures(run, data, x_recon) -> list:
    """``reconstructions.png`` and ``samples.png`` of image models with ``decode`` and ``sample``."""
    d, model, written = run.directory, run.model, []
    if not (hasattr(model, "decode") and hasattr(model, "sample")) or getattr(model, "is_text", False):
        return written
    img = _image_shape(run)
    labels = getattr(model, "uses_labels", False)
    y = None
    if x_recon is None:
        split = _recon_split(run, data) if hasattr(run.guide, "encode") else None
        if split is not None and len(split) > 0:
            x_recon, y = split.x[:8], None if split.y is None else split.y[:8]
    elif labels and run.data is not None:
        y = run.data.val.y[:len(x_recon)]
    with run.scope():
        if x_recon is not None and hasattr(run.guide, "encode") and (y is not None or not labels):
            from . import uses

            dec = uses.reconstruct(run, x_recon, y if labels else None)  # decode(E_q[z|x]), every guide
            plots.reconstructions(x_recon, dec, img, path=os.path.join(d, "reconstructions.png"))
            written.append("reconstructions.png")
        g = torch.Generator(device="cpu").manual_seed(0)
        plots.samples(model.sample(64, generator=g), img, path=os.path.join(d, "samples.png"))
        written.append("samples.png")
    return written


@torch.no_grad()
def write_diagnostic_figures(run, idata, split, *, n_scatter: int = 1000, pairs: int = 4, steps: int = 9) -> list:
    """``khat.png`` (from ``idata``), ``latents.png`` (posterior means of up to ``n_scatter`` points of
    ``split``, coloured by label) and, for models with ``decode``, ``diagnose_interpolations.png``:
    linear paths between the posterior means of ``pairs`` pairs of datapoints, in the one convention
    of :mod:`pyrovi.uses` (a = weight of the first item, 1 -> 0 left to right; ``pyrovi interpolate``
    writes ``interpolations.png`` with the same convention). Returns the file names written."""
    from .diagnostics import posterior_means

    d = run.directory
    written = []
    ss = idata.sample_stats
    if not getattr(run.guide, "point_mass", False):  # a point mass has equal weights: no k-hat to plot
        plots.khat(ss["pareto_k"].values, particles=int(ss.sizes["draw"]), path=os.path.join(d, "khat.png"))
        written.append("khat.png")
    m = min(n_scatter, len(split))
    x = split.x[:m]
    y = None if split.y is None else split.y[:m]
    means = posterior_means(run, x, y)
    site = getattr(run.model, "latent_site", None) or next(iter(means), None)
    if site in means:
        plots.latent_scatter(means[site], y, title=f"Posterior means E_q[{site}|x] of {m} held-out points",
                             path=os.path.join(d, "latents.png"))
        written.append("latents.png")
        model = run.model
        conditional = getattr(model, "uses_labels", False)
        if hasattr(model, "decode") and hasattr(run.guide, "encode") and m >= 2 * pairs \
                and (y is not None or not conditional) and not getattr(model, "is_text", False):
            from . import uses

            x1, x2 = x[0:2 * pairs:2], x[1:2 * pairs:2]  # (R, D)
            # a conditional model decodes every point of a path with the first item's label
            y1, y2 = (y[0:2 * pairs:2], y[1:2 * pairs:2]) if conditional else (None, None)
            imgs = uses.interpolate(run, x1, x2, steps=steps, method="linear", y1=y1, y2=y2).cpu()  # (R, T, D)
            plots.interpolations(imgs, _image_shape(run), alphas=uses.interpolation_weights(steps).tolist(),
                                 ends=torch.stack([x1, x2], 1),
                                 title="Linear interpolation between posterior means: "
                                       "decode(a z_1 + (1-a) z_2), a = weight of data 1",
                                 path=os.path.join(d, DIAGNOSE_INTERPOLATIONS))
            written.append(DIAGNOSE_INTERPOLATIONS)
    return written


# --------------------------------------------------------------------------- report.md / report.html


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) else str(v)
    return "—" if v is None else str(v)


#: test metrics a model kind does not have. An autoencoder defines no density over x (flat prior,
#: point-mass guide): its "log-likelihood", ELBO and bits/dim would all be the reconstruction term
#: under another name, so the report shows the reconstruction and the squared error only.
NOT_REPORTED = {"autoencoder": ("log_likelihood", "log_likelihood_se", "log_likelihood_mc_se",
                                 "log_likelihood_sd_over_data", "log_likelihood_se_over_data", "elbo", "kl",
                                 "bits_per_dim", "k")}


def model_name(cfg: dict) -> str:
    return str((cfg.get("model") or {}).get("name", "?"))


def has_density(cfg: dict) -> bool:
    """Does the run's model define p(x), so that log p(x), bounds on it and bits/dim mean something?"""
    return model_name(cfg) not in NOT_REPORTED


def is_density(cfg: dict) -> bool:
    """A continuous likelihood (Gaussian): log p(x) is a log-density, bits/dim may be negative."""
    return (cfg.get("model") or {}).get("likelihood") == "gaussian" or model_name(cfg) == "linear_gaussian"


def shown_metrics(test: dict, cfg: dict) -> dict:
    """``test`` without the metrics the run's model kind does not have (see :data:`NOT_REPORTED`)."""
    drop = NOT_REPORTED.get(model_name(cfg), ())
    return {k: v for k, v in test.items() if k not in drop}


def bound_name(cfg: dict) -> str:
    """What the training/validation loss is minus: the objective's bound, in words."""
    obj = cfg.get("objective") or {}
    name, s = obj.get("name", "?"), obj.get("particles")
    if not has_density(cfg):
        return "reconstruction log-likelihood, not a bound"
    if name in ("elbo", "meanfield", "stl"):
        return "ELBO" + (f" (mean of {s} draws)" if s and s > 1 else "")
    if name in ("iwae", "dreg"):
        return f"IWAE bound, K={s}"
    if name == "renyi":
        return f"Renyi bound, alpha={obj.get('alpha', 0.0)}, K={s}"
    return f"{name} bound"


_TEST_ROWS = [
    ("log_likelihood", None),  # labelled by _log_likelihood_label: what the number is depends on K and the guide
    ("log_likelihood_mc_se", "Monte-Carlo standard error of that estimate (nats)"),
    ("log_likelihood_sd_over_data", "spread of log p(x) over datapoints, sd (nats)"),
    ("log_likelihood_se_over_data", "standard error of the mean over datapoints, sd/sqrt(n) (nats)"),
    ("elbo", "ELBO (nats)"), ("reconstruction", "reconstruction E_q log p(x\\|z) (nats)"),
    ("kl", "KL(q \\|\\| p), Monte Carlo (nats)"), ("mse", "squared error of E[x\\|z] per dimension"),
    ("bits_per_dim", "bits/dim"), ("active_units", "active units"), ("latent_units", "latent units"),
    ("k", "importance samples K"), ("n", "datapoints"),
]


def _log_likelihood_label(test: dict) -> str:
    """What ``log_likelihood`` is: the IWAE estimate for K > 1; for K = 1 the ELBO itself, exact for q when the
    guide draws nothing random (a VQ-VAE's point-mass codes, enumerated sites with held globals)."""
    k = test.get("k")
    if k is None or k > 1:
        return f"IWAE log p(x), K = {k} (nats)"
    if test.get("log_likelihood_mc_se") == 0.0:
        return "log p(x) bound, K = 1: the ELBO, exact for this q (it draws nothing random) (nats)"
    return "log p(x) bound, K = 1: a one-draw ELBO estimate (nats)"


def _test_rows(test: dict) -> list:
    rows = [(key, label or _log_likelihood_label(test)) for key, label in _TEST_ROWS]
    if "log_likelihood_se_over_data" not in test:  # metrics written before the two errors were told apart
        rows.insert(1, ("log_likelihood_se", "standard error over datapoints (nats)"))
    return rows


def _test_section(test: dict, cfg: Optional[dict] = None) -> list:
    cfg = cfg or {}
    if has_density(cfg):
        k = test.get("k")
        intro = f"Held-out data, K = {k} importance sample{'' if k == 1 else 's'} per datapoint (`pyrovi.evaluate`)."
        if is_density(cfg):
            intro += (" The likelihood is continuous (Gaussian): log p(x) is a log-*density*, so it and "
                      "bits/dim depend on the data's scale and bits/dim can be negative.")
    else:
        intro = (f"Held-out data (`pyrovi.evaluate`). The {model_name(cfg)} defines no density over x, so there "
                 "is no log p(x), ELBO or bits/dim to report: only how well it reconstructs.")
    test = shown_metrics(test, cfg)
    lines = ["## Test metrics", "", intro, "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {label} | {_fmt(test.get(key))} |" for key, label in _test_rows(test) if key in test]
    lines.append("")
    for site, s in (test.get("latents") or {}).items():
        lines += _latent_table(site, s)
    return lines


def _vq_section(vq: dict, prior: dict) -> list:
    """Codebook use (``pyrovi evaluate`` on a VQ-VAE run) and the learned prior (``pyrovi train-prior``)."""
    lines = ["## Codebook and prior", ""]
    rows = [("codes_used", "codes used"), ("dead_codes", "dead codes"), ("num_codes", "codebook size K"),
            ("perplexity", "perplexity of code use"), ("bits_per_dim", "bits/dim, uniform prior over codes"),
            ("recon_mse", "squared error per pixel"), ("char_accuracy", "character accuracy")]
    if vq:
        lines += ["Held-out data (`pyrovi evaluate`).", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {label} | {_fmt(vq.get(key))} |" for key, label in rows if key in vq]
        lines.append("")
    if "bits_per_dim_learned" in prior:
        lines += ["Causal Transformer prior over the codes (`pyrovi train-prior`): held-out bits/dim "
                  "(minus the ELBO with that prior over the codes) " + _fmt(prior["bits_per_dim_learned"])
                  + ", against " + _fmt(prior.get("bits_per_dim_uniform")) + " with the uniform prior.", ""]
    return lines


def _latent_table(site: str, s: dict) -> list:
    kl = s.get("kl_per_dim")
    lines = [f"Latent site `{site}`: {s.get('active')} of {s.get('dims')} units active "
             f"(Cov_x E_q[z_d] > 0.01); KL per dimension: {s.get('kl_method')}.", ""]
    if s.get("dims", 0) > 64:
        return lines
    lines += ["| dim | KL (nats) | Cov_x E_q[z_d] | active |", "| --- | --- | --- | --- |"]
    for d, v in enumerate(s.get("mean_variance", [])):
        lines.append(f"| {d} | {_fmt(None if kl is None else kl[d])} | {v:.4f} | {'yes' if v > 0.01 else 'no'} |")
    lines.append("")
    return lines


def _option(v) -> str:
    if isinstance(v, (list, tuple)) and v and isinstance(v[0], (list, tuple)):
        return f"({len(v)} x {len(v[0])} array)"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_option(x) for x in v[:8]) + (f", … ({len(v)} in all)" if len(v) > 8 else "") + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_option(x)}" for k, x in list(v.items())[:8]) + "}"
    return _fmt(v)


def _setup_row(label: str, section) -> str:
    """One row of the Setup table: the section's name and its options as ``key = value`` (long lists cut)."""
    if not isinstance(section, dict):
        return f"| {label} | {_fmt(section)} | |"
    opts = "; ".join(f"{k} = {_option(v)}" for k, v in section.items() if k != "name" and v is not None)
    return f"| {label} | {section.get('name', '—')} | {opts.replace('|', '/')} |"


#: one caption per figure: what is drawn and how to read it
CAPTIONS = {
    "training_curves.png": "Training and validation loss per epoch (loss = minus the training bound, nats).",
    "reconstructions.png": "Validation items (top) and the decoder's mean at the posterior mean code (bottom).",
    "samples.png": "Decoder means for codes drawn from the prior p(z).",
    "khat.png": "PSIS k-hat per diagnosed datapoint: below 0.5 good, 0.5-0.7 fair, above 0.7 q(z|x) is not "
                "trustworthy there.",
    "latents.png": "Posterior means of held-out items, coloured by label (first two principal components when "
                   "there are more than two latent dimensions).",
    "diagnose_interpolations.png": "Linear paths between the posterior means of pairs of test items "
                                   "(`pyrovi diagnose`); a = weight of the left item.",
    "interpolations.png": "Linear and spherical paths between pairs of items (`pyrovi interpolate`); "
                          "alpha = weight of the left item.",
}


def write_report(run, extra_sections: Optional[list] = None) -> str:
    """Write ``report.md`` and ``report.html`` from a run's config, metrics and the figures in its directory.

    ``run`` is a run directory (its ``config.json`` and ``metrics.json`` are read) or a
    :class:`~pyrovi.Run` with a directory (its ``config`` and ``metrics``).
    Returns the Markdown text.
    """
    from .diagnostics import DiagnosticsSummary
    from .run_files import CONFIG, METRICS

    if isinstance(run, (str, os.PathLike)):
        d = os.fspath(run)
        cfg = read_json(os.path.join(d, CONFIG), "run config")
        metrics = read_json(os.path.join(d, METRICS), "metrics") if os.path.isfile(os.path.join(d, METRICS)) else {}
        metrics = metrics if isinstance(metrics, dict) else {}
    else:
        d, cfg, metrics = run.directory, run.config, run.metrics
    lines = ["# pyrovi run report", ""]
    lines += ["## Setup", "", "| part | name | options |", "| --- | --- | --- |"]
    lines += [_setup_row(label, cfg.get(key)) for key, label in
              (("model", "model"), ("guide", "guide"), ("objective", "objective"), ("data", "data"),
               ("train", "training"))]
    lines += ["", "Everything needed to rebuild the run is in `config.json`.", ""]
    lines += ["## Training", "", "All log-densities in nats per datapoint unless stated; "
              f"loss = -({bound_name(cfg)}).", "",
              "| metric | value |", "| --- | --- |"]
    for k, v in sorted(metrics.items()):
        if not isinstance(v, (dict, list)):
            lines.append(f"| {k} | {_fmt(v)} |")
    lines.append("")
    if isinstance(metrics.get("test"), dict):
        lines += _test_section(metrics["test"], cfg)
    if isinstance(metrics.get("vq"), dict) or isinstance(metrics.get("prior"), dict):
        lines += _vq_section(metrics.get("vq") or {}, metrics.get("prior") or {})
    if isinstance(metrics.get("diagnostics"), dict):
        try:
            summary = DiagnosticsSummary.from_dict(metrics["diagnostics"])
            lines += ["## Posterior diagnostics", "", "PSIS k-hat of the importance weights p(x,z)/q(z|x) "
                      "(Yao et al. 2018; `pyrovi.diagnose`).", "", summary.to_markdown()]
        except TypeError:
            pass  # written by another pyrovi version: skip rather than fail the report
    for section in extra_sections or []:
        lines += [section, ""]
    figs = [f for f in FIGURES if os.path.isfile(os.path.join(d, f))]
    if figs:
        lines += ["## Figures", ""]
        for f in figs:
            lines += [f"### {f[:-4].replace('_', ' ')}", "", f"![{f[:-4]}]({f})", "",
                      f"*{CAPTIONS.get(f, f)}*", ""]
    lines[2:2] = [_contents(lines), ""]
    text = "\n".join(lines)
    atomic_write(os.path.join(d, "report.md"), text)
    write_html(text, os.path.join(d, "report.html"), base_dir=d)
    return text


def _anchor(heading: str) -> str:
    """The id a heading gets, in Python-Markdown's ``toc`` (report.html) and on GitHub (report.md) alike."""
    return re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", heading).strip().lower())


def _contents(lines: list) -> str:
    """One line of links to the report's sections (``## `` headings)."""
    heads = [h[3:].strip() for h in lines if h.startswith("## ")]
    return "Contents: " + " · ".join(f"[{h}](#{_anchor(h)})" for h in heads)


_CSS = """body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f2f2f2}code{font-size:90%;word-break:break-all}img{max-width:100%;display:block;margin:0.5em 0}"""


def write_html(markdown_text: str, path: str, *, base_dir: str, title: str = "pyrovi run report") -> str:
    """Render ``markdown_text`` to a self-contained HTML file: PNGs under ``base_dir`` embedded as base64."""
    import markdown

    def embed(m):
        alt, name = m.group(1), m.group(2)
        f = os.path.join(base_dir, name)
        if os.path.dirname(name) or not os.path.isfile(f):
            return m.group(0)
        with open(f, "rb") as fh:
            data = base64.b64encode(fh.read()).decode("ascii")
        return f"![{alt}](data:image/png;base64,{data})"

    body = markdown.markdown(re.sub(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)", embed, markdown_text),
                             extensions=["tables", "toc"])  # toc: ids on headings, for the contents links
    html = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")
    atomic_write(path, html)
    return html


# --------------------------------------------------------------------------- compare


_COMPARE_COLS = [
    ("run", "run"), ("model", "model"), ("guide", "guide"), ("objective", "objective"), ("epochs", "epochs"),
    ("val_loss", "val loss"), ("bound", "val loss is minus"), ("test_elbo", "test ELBO"),
    ("test_log_likelihood", "test log p(x), IWAE-K"), ("test_k", "K"), ("bits_per_dim", "bits/dim"),
    ("active_units", "active units"), ("khat_good", "k<0.5"),
    ("khat_fair", "0.5-0.7"), ("khat_bad", "k>0.7"),
]


def _run_row(directory: str) -> tuple:
    from .run_files import read_summary

    cfg, metrics, history = read_summary(directory)  # checked as data: a malformed file is a CheckpointError
    test = metrics.get("test") if isinstance(metrics.get("test"), dict) else {}
    diag = metrics.get("diagnostics") if isinstance(metrics.get("diagnostics"), dict) else {}
    bands = {} if diag.get("point_mass") else (diag.get("khat_bands") or {})  # a point mass has no k-hat
    name = lambda sec: (cfg.get(sec) or {}).get("name", "?")  # noqa: E731
    test = shown_metrics(test, cfg)  # an autoencoder has no log p(x), ELBO or bits/dim
    row = {
        "run": os.path.basename(os.path.normpath(directory)), "model": name("model"), "guide": name("guide"),
        "objective": name("objective"), "epochs": metrics.get("epochs"), "val_loss": metrics.get("val_loss"),
        "bound": bound_name(cfg),
        "test_elbo": test.get("elbo"), "test_log_likelihood": test.get("log_likelihood"), "test_k": test.get("k"),
        "bits_per_dim": (None if test.get("bits_per_dim") is None
                         else f"{test['bits_per_dim']:.4f}" + (" (density)" if is_density(cfg) else "")),
        "active_units": (f"{test['active_units']}/{test['latent_units']}" if "active_units" in test else None),
        "khat_good": bands.get("good"), "khat_fair": bands.get("fair"), "khat_bad": bands.get("bad"),
    }
    return row, history


COMPARE_NOTE = (
    "Nats per datapoint; test numbers from `pyrovi evaluate`, k-hat bands from `pyrovi diagnose`. "
    "Each run's validation loss is minus its own training bound (column \"val loss is minus\"): an IWAE "
    "bound with K > 1 is tighter than an ELBO, so compare runs of different objectives on the test "
    "columns, which are the same estimators for every run. An autoencoder has no log p(x) (\"—\"); "
    "bits/dim marked \"(density)\" come from a continuous likelihood and are not comparable with "
    "discrete ones.")


def compare_runs(directories: Sequence[str], out: Optional[str] = None) -> dict:
    """One table across runs (from their ``config.json`` / ``metrics.json``) and overlaid training curves.

    Args:
        directories: run directories.
        out: when given, a directory to write ``compare.md`` (the table) and
            ``training_curves.png`` (train and validation loss of every run) into.

    Returns:
        ``{"rows": [dict per run], "markdown": table text, "figure": path or None}``.
        Numbers are nats per datapoint; runs not yet evaluated/diagnosed show "—".
    """
    if not directories:
        raise ConfigError("compare needs at least one run directory")
    rows, histories = [], {}
    for d in directories:
        row, hist = _run_row(os.fspath(d))
        label = row["run"]
        while label in histories:
            label += "'"
        rows.append(row)
        if hist:
            histories[label] = hist
    table = ["| " + " | ".join(h for _, h in _COMPARE_COLS) + " |", "|" + " --- |" * len(_COMPARE_COLS)]
    table += ["| " + " | ".join(_fmt(r[k]) for k, _ in _COMPARE_COLS) + " |" for r in rows]
    md = "\n".join(table) + "\n"
    fig = None
    if out is not None:
        os.makedirs(out, exist_ok=True)
        text = ("# pyrovi run comparison\n\n" + COMPARE_NOTE + "\n\n" + md)
        if histories:
            fig = os.path.join(out, "training_curves.png")
            plots.training_curves(histories, path=fig)
            text += "\n![training curves](training_curves.png)\n"
        atomic_write(os.path.join(out, "compare.md"), text)
    return {"rows": rows, "markdown": md, "figure": fig}
