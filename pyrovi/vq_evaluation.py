"""Held-out metrics of a trained VQ-VAE run: reconstruction, ELBO, bits/dim, codebook usage.

This is evaluation, so it lives with the evaluation code (:func:`pyrovi.evaluate`), not in the model:
:mod:`pyrovi.models.vqvae` defines the model and its loss terms
(:func:`~pyrovi.models.vqvae.vq_terms`, :func:`~pyrovi.models.vqvae.code_usage`),
and this module reads a run through them. Models never import this module.

The module is not named after its function (``vq_metrics``) so that
``pyrovi.vq_metrics``, the function, does not hide a module of the same name.
"""

from __future__ import annotations

import math
import os

import torch

from . import inputs
from .checkpoint import write_json
from .errors import ConfigError, check_positive
from .models.vqvae import VQVAE, code_usage, vq_terms

__all__ = ["vq_metrics"]


@torch.no_grad()
def vq_metrics(run, data=None, *, batch_size: int = 256, save: bool = True) -> dict:
    """Held-out metrics of a VQ-VAE run on ``data`` (default: the run's test split).

    Returns floats, per datapoint unless named otherwise:

    - ``reconstruction``: :math:`\\log p(x \\mid z_q(x))`, nats;
    - ``kl`` = :math:`L \\log K` and ``elbo`` = reconstruction - kl, nats (uniform prior);
    - ``bits_per_dim`` = :math:`-\\mathrm{ELBO} / (D \\ln 2)` (bits/char for text): an upper bound
      on the code length under the uniform prior;
    - ``codebook_loss``, ``commitment_loss``, ``vq_loss`` (reported apart from the ELBO);
    - ``perplexity``, ``codes_used``, ``dead_codes``, ``usage`` (see :func:`pyrovi.models.vqvae.code_usage`);
    - images: ``recon_mse`` (mean squared error per pixel of the decoded mean);
      text: ``char_accuracy`` (most likely character equals the input).

    Saved into ``metrics.json`` under ``"vq"`` when the run has a directory and ``save`` is true.
    """
    check_positive("batch_size", batch_size, integer=True)
    model, guide = run.model, run.guide
    if not isinstance(model, VQVAE) or not hasattr(guide, "quantize"):
        raise ConfigError(f"vq_metrics needs a VQVAE run with a Codebook guide, got {type(model).__name__} / "
                          f"{type(guide).__name__}")
    split = inputs.split(data, run)  # the held-out rows: data's test split, or the run's own
    sums = dict.fromkeys(("reconstruction", "kl", "elbo", "codebook_loss", "commitment_loss", "vq_loss",
                          "recon_mse" if not model.is_text else "char_accuracy"), 0.0)
    all_codes = []
    with run.scope():
        for i in range(0, len(split), batch_size):
            x = split.x[i:i + batch_size].to(run.device)
            t = vq_terms(model, guide, x)
            for k in ("reconstruction", "kl", "elbo", "codebook_loss", "commitment_loss", "vq_loss"):
                sums[k] += float(getattr(t, k).sum())
            out = model.decode_codes(t.codes)
            if model.is_text:
                sums["char_accuracy"] += float((out == x.long()).float().mean(-1).sum())
            else:
                sums["recon_mse"] += float(((out - x) ** 2).mean(-1).sum())
            all_codes.append(t.codes.cpu())
    n = len(split)
    res = {k: v / n for k, v in sums.items()}
    res["bits_per_dim"] = -res["elbo"] / (split.x[0].numel() * math.log(2))
    res.update(code_usage(torch.cat(all_codes), model.num_codes))
    res.update(n=n, num_codes=model.num_codes, positions=model.length)
    if save and run.directory:
        run.metrics["vq"] = res
        write_json(os.path.join(run.directory, "metrics.json"), run.metrics)
    return res
