"""The run directory's human-readable report (``report.md``) and its figures."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from . import plots
from .checkpoint import atomic_write

__all__ = ["write_training_report", "write_report"]


def _image_shape(run):
    shape = run.config.get("data", {}).get("image_shape")
    return tuple(shape) if shape else getattr(getattr(run.model, "cfg", None), "image_shape", None)


@torch.no_grad()
def write_training_report(run, x_recon: Optional[torch.Tensor] = None) -> list:
    """Figures of a fresh run (training curves, reconstructions, prior samples) and ``report.md``.

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
                x_recon = x_recon.to(run.device)
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


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_report(run, extra_sections: Optional[list] = None) -> str:
    """Write ``report.md`` from the run's config, metrics and the figures present in its directory."""
    d = run.directory
    cfg = run.config
    lines = ["# pyrovi run report", ""]
    lines += ["## Setup", "",
              f"- model: `{json.dumps(cfg.get('model'))}`",
              f"- guide: `{json.dumps(cfg.get('guide'))}`",
              f"- objective: `{json.dumps(cfg.get('objective'))}`",
              f"- data: `{json.dumps(cfg.get('data'))}`",
              f"- training: `{json.dumps(cfg.get('train'))}`", ""]
    lines += ["## Metrics", "", "All log-densities in nats per datapoint unless stated; loss = -bound.", "",
              "| metric | value |", "| --- | --- |"]
    for k, v in sorted(run.metrics.items()):
        if not isinstance(v, (dict, list)):
            lines.append(f"| {k} | {_fmt(v)} |")
    lines.append("")
    for section in extra_sections or []:
        lines += [section, ""]
    figs = [f for f in ("training_curves.png", "reconstructions.png", "samples.png", "khat.png",
                        "latents.png", "interpolations.png") if os.path.isfile(os.path.join(d, f))]
    if figs:
        lines += ["## Figures", ""]
        lines += [f"![{f[:-4]}]({f})" for f in figs]
        lines.append("")
    text = "\n".join(lines)
    atomic_write(os.path.join(d, "report.md"), text)
    return text
