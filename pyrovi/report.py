"""The run directory's human-readable report (``report.md`` and a self-contained ``report.html``) and its figures.

``report.md`` is written from the run's config and ``metrics.json`` (training
metrics, the test metrics of :func:`pyrovi.evaluate`, the diagnostics summary
of :func:`pyrovi.diagnose`) and links the figures in the directory;
``report.html`` is the same page rendered by Python-Markdown with every
figure embedded as base64, so it can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
from typing import Optional, Sequence

import torch

from . import plots
from .checkpoint import atomic_write, read_json
from .errors import CheckpointError, ConfigError

__all__ = ["write_training_report", "write_report", "write_html", "write_diagnostic_figures", "compare_runs",
           "FIGURES"]

#: figures the report shows, in this order, when present in the run directory
FIGURES = ("training_curves.png", "reconstructions.png", "samples.png", "khat.png", "latents.png",
           "interpolations.png")


def _image_shape(run):
    shape = run.config.get("data", {}).get("image_shape")
    return tuple(shape) if shape else getattr(getattr(run.model, "cfg", None), "image_shape", None)


@torch.no_grad()
def write_training_report(run, x_recon: Optional[torch.Tensor] = None) -> list:
    """Figures of a fresh run (training curves, reconstructions, prior samples) and the report.

    Reconstructions use the validation split (the test split stays unseen).
    Returns the figure file names written.
    """
    d = run.directory
    written = []
    if run.history:
        plots.training_curves({"run": run.history}, path=os.path.join(d, "training_curves.png"))
        written.append("training_curves.png")
    model = run.model
    if hasattr(model, "decode") and hasattr(model, "sample") and not getattr(model, "is_text", False):
        img = _image_shape(run)
        if x_recon is None and run.data is not None:
            x_recon = run.data.val.x[:8]
        with run.scope():
            if x_recon is not None and hasattr(run.guide, "encode"):
                x_recon = x_recon.to(run.device, getattr(run, "dtype", torch.float32))
                args = (x_recon, run.data.val.y[:8].to(run.device)) if getattr(model, "uses_labels", False) else (x_recon,)
                loc = run.guide.encode(*args)[model.latent_site][0]
                dec = model.decode(loc) if not getattr(model, "uses_labels", False) else model.decode(loc, args[1])
                plots.reconstructions(x_recon, dec, img, path=os.path.join(d, "reconstructions.png"))
                written.append("reconstructions.png")
            g = torch.Generator(device="cpu").manual_seed(0)
            plots.samples(model.sample(64, generator=g), img, path=os.path.join(d, "samples.png"))
            written.append("samples.png")
    write_report(run)
    return written


@torch.no_grad()
def write_diagnostic_figures(run, idata, split, *, n_scatter: int = 1000, pairs: int = 4, steps: int = 9) -> list:
    """``khat.png`` (from ``idata``), ``latents.png`` (posterior means of up to ``n_scatter`` points of
    ``split``, coloured by label) and, for models with ``decode``, ``interpolations.png`` between
    the posterior means of ``pairs`` pairs of datapoints. Returns the file names written."""
    from .diagnostics import posterior_means

    d = run.directory
    written = []
    ss = idata.sample_stats
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
        if hasattr(model, "decode") and m >= 2 * pairs and not getattr(model, "uses_labels", False):
            z = means[site]
            a = torch.linspace(0, 1, steps)  # (T,)
            z0, z1 = z[0:2 * pairs:2], z[1:2 * pairs:2]  # (R, L)
            path_z = (1 - a)[None, :, None] * z0[:, None] + a[None, :, None] * z1[:, None]  # (R, T, L)
            with run.scope():
                imgs = model.decode(path_z.to(run.device)).cpu()  # (R, T, D)
            ends = torch.stack([x[0:2 * pairs:2], x[1:2 * pairs:2]], 1)  # (R, 2, D)
            plots.interpolations(imgs, _image_shape(run), alphas=a.tolist(), ends=ends,
                                 title="Linear interpolation between posterior means: decode((1-a) z_1 + a z_2)",
                                 path=os.path.join(d, "interpolations.png"))
            written.append("interpolations.png")
    return written


# --------------------------------------------------------------------------- report.md / report.html


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) else str(v)
    return "—" if v is None else str(v)


_TEST_ROWS = [
    ("log_likelihood", "IWAE log p(x) (nats)"), ("log_likelihood_se", "standard error over datapoints (nats)"),
    ("elbo", "ELBO (nats)"), ("reconstruction", "reconstruction E_q log p(x\\|z) (nats)"),
    ("kl", "KL(q \\|\\| p), Monte Carlo (nats)"), ("mse", "squared error of E[x\\|z] per dimension"),
    ("bits_per_dim", "bits/dim"), ("active_units", "active units"), ("latent_units", "latent units"),
    ("k", "importance samples K"), ("n", "datapoints"),
]


def _test_section(test: dict) -> list:
    lines = ["## Test metrics", "", f"Held-out data, K = {test.get('k')} importance samples per datapoint "
             "(`pyrovi.evaluate`).", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {label} | {_fmt(test.get(key))} |" for key, label in _TEST_ROWS if key in test]
    lines.append("")
    for site, s in (test.get("latents") or {}).items():
        lines += _latent_table(site, s)
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


def write_report(run, extra_sections: Optional[list] = None) -> str:
    """Write ``report.md`` and ``report.html`` from the run's config, metrics and the figures in its directory."""
    from .diagnostics import DiagnosticsSummary

    d = run.directory
    cfg = run.config
    lines = ["# pyrovi run report", ""]
    lines += ["## Setup", "",
              f"- model: `{json.dumps(cfg.get('model'))}`",
              f"- guide: `{json.dumps(cfg.get('guide'))}`",
              f"- objective: `{json.dumps(cfg.get('objective'))}`",
              f"- data: `{json.dumps(cfg.get('data'))}`",
              f"- training: `{json.dumps(cfg.get('train'))}`", ""]
    lines += ["## Training", "", "All log-densities in nats per datapoint unless stated; loss = -bound.", "",
              "| metric | value |", "| --- | --- |"]
    for k, v in sorted(run.metrics.items()):
        if not isinstance(v, (dict, list)):
            lines.append(f"| {k} | {_fmt(v)} |")
    lines.append("")
    if isinstance(run.metrics.get("test"), dict):
        lines += _test_section(run.metrics["test"])
    if isinstance(run.metrics.get("diagnostics"), dict):
        try:
            summary = DiagnosticsSummary.from_dict(run.metrics["diagnostics"])
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
            lines += [f"![{f[:-4]}]({f})", ""]
    text = "\n".join(lines)
    atomic_write(os.path.join(d, "report.md"), text)
    write_html(text, os.path.join(d, "report.html"), base_dir=d)
    return text


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
                             extensions=["tables"])
    html = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")
    atomic_write(path, html)
    return html


# --------------------------------------------------------------------------- compare


_COMPARE_COLS = [
    ("run", "run"), ("model", "model"), ("guide", "guide"), ("objective", "objective"), ("epochs", "epochs"),
    ("val_loss", "val loss"), ("test_elbo", "test ELBO"), ("test_log_likelihood", "test log p(x)"),
    ("test_k", "K"), ("bits_per_dim", "bits/dim"), ("active_units", "active units"), ("khat_good", "k<0.5"),
    ("khat_fair", "0.5-0.7"), ("khat_bad", "k>0.7"),
]


def _run_row(directory: str) -> tuple:
    from .run import read_history

    if not os.path.isdir(directory):
        raise CheckpointError(f"run directory not found: {directory!r}")
    cfg = read_json(os.path.join(directory, "config.json"), "run config")
    metrics = {}
    if os.path.isfile(os.path.join(directory, "metrics.json")):
        metrics = read_json(os.path.join(directory, "metrics.json"), "metrics")
    test = metrics.get("test") if isinstance(metrics.get("test"), dict) else {}
    diag = metrics.get("diagnostics") if isinstance(metrics.get("diagnostics"), dict) else {}
    bands = diag.get("khat_bands") or {}
    name = lambda sec: (cfg.get(sec) or {}).get("name", "?")  # noqa: E731
    row = {
        "run": os.path.basename(os.path.normpath(directory)), "model": name("model"), "guide": name("guide"),
        "objective": name("objective"), "epochs": metrics.get("epochs"), "val_loss": metrics.get("val_loss"),
        "test_elbo": test.get("elbo"), "test_log_likelihood": test.get("log_likelihood"), "test_k": test.get("k"),
        "bits_per_dim": test.get("bits_per_dim"),
        "active_units": (f"{test['active_units']}/{test['latent_units']}" if "active_units" in test else None),
        "khat_good": bands.get("good"), "khat_fair": bands.get("fair"), "khat_bad": bands.get("bad"),
    }
    return row, read_history(os.path.join(directory, "history.csv"))


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
        text = ("# pyrovi run comparison\n\nNats per datapoint; loss = -bound; test numbers from `pyrovi evaluate`, "
                "k-hat bands from `pyrovi diagnose`.\n\n" + md)
        if histories:
            fig = os.path.join(out, "training_curves.png")
            plots.training_curves(histories, path=fig)
            text += "\n![training curves](training_curves.png)\n"
        atomic_write(os.path.join(out, "compare.md"), text)
    return {"rows": rows, "markdown": md, "figure": fig}
