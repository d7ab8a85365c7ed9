"""Held-out metrics of a trained VQ-VAE run: reconstruction, ELBO, bits/dim, codebook usage.

This is evaluation, so it lives with the evaluation code (:func:`pyrovi.evaluate`), not in the model:
:mod:`pyrovi.models.vqvae` defines the model; this module reads its terms off the traces
(:func:`vq_terms`), counts code usage (:func:`code_usage`) and scores a run through them.
Models never import this module.

The module is not named after its function (``vq_metrics``) so that
``pyrovi.vq_metrics``, the function, does not hide a module of the same name.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from . import inputs
from .run_files import update_metrics
from .errors import ConfigError, check_positive
from .models.vqvae import VQVAE
from .traces import trace_pair

__all__ = ["vq_metrics", "vq_terms", "code_usage", "VQTerms"]


@torch.no_grad()
def vq_metrics(run, data=None, *, batch_size: int = 256, save: bool = True) -> dict:
    """Held-out metrics of a VQ-VAE run on ``data`` (default: the run's test split).

    Returns floats, per datapoint unless named otherwise:

    - ``reconstruction``: :math:`\\log p(x \\mid z_q(x))`, nats;
    - ``kl`` = :math:`L \\log K` and ``elbo`` = reconstruction - kl, nats (uniform prior);
    - ``bits_per_dim`` = :math:`-\\mathrm{ELBO} / (D \\ln 2)` (bits/char for text): an upper bound
      on the code length under the uniform prior;
    - ``codebook_loss``, ``commitment_loss``, ``vq_loss`` (reported apart from the ELBO);
    - ``perplexity``, ``codes_used``, ``dead_codes``, ``usage`` (see :func:`code_usage`);
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
        run.metrics = update_metrics(run.directory, "vq", res)  # under the run's lock, on a fresh copy
    return res


# --------------------------------------------------------------------------- terms and metrics


class VQTerms(NamedTuple):
    """Per-datapoint terms of a VQ-VAE, shape ``(B,)`` each, in nats (losses in squared code units).

    ``elbo = reconstruction - kl`` with ``kl = L log K``. The training objective
    is ``elbo - vq_loss`` with ``vq_loss = codebook_weight * codebook_loss +
    beta * commitment_loss``; the VQ terms are surrogate penalties, not part of
    any bound, so they are reported apart from it.
    """

    reconstruction: torch.Tensor  # log p(x | z_q)
    kl: torch.Tensor  # log q(z|x) - log p(z) = L log K
    elbo: torch.Tensor  # reconstruction - kl
    codebook_loss: torch.Tensor  # ||sg(z_e) - e||^2, summed over positions and dims
    commitment_loss: torch.Tensor  # ||z_e - sg(e)||^2 (before the beta weight)
    vq_loss: torch.Tensor  # what training adds to -ELBO
    codes: torch.Tensor  # (B, L) int64 code indices


@torch.no_grad()
def vq_terms(model, guide, x: torch.Tensor) -> VQTerms:
    """Evaluate the VQ-VAE's terms on a batch ``x`` ``(B, D)`` from Pyro traces (guide, then model replayed).

    Runs model and guide in eval mode (no codebook updates; the guide's Delta
    then has ``log_density = 0``), restoring their modes afterwards. The ELBO is
    read off the traces exactly as Pyro's ``Trace_ELBO`` forms it,
    :math:`\\log p(x|z) + \\log p(z) - \\log q(z|x)`; the VQ penalties come from
    the guide's :meth:`~pyrovi.guides.Codebook.quantize`.
    """
    modes = [(m, m.training) for m in (model, guide) if isinstance(m, nn.Module)]
    for m, _ in modes:
        m.eval()
    try:
        guide_tr, model_tr = trace_pair(model, guide, (x,))
        z_site, x_site = model_tr.nodes[model.latent_site], model_tr.nodes[model.obs_site]
        q_site = guide_tr.nodes[model.latent_site]
        recon = x_site["fn"].log_prob(x_site["value"])  # (B,)
        log_p_z = z_site["fn"].log_prob(z_site["value"])  # (B,)  = -L log K
        log_q_z = q_site["fn"].log_prob(q_site["value"])  # (B,)  = 0 (one-hot q, eval mode)
        q = guide.quantize(x)
    finally:
        for m, mode in modes:
            m.train(mode)
    vq = guide.vq_weights
    return VQTerms(
        reconstruction=recon,
        kl=log_q_z - log_p_z,
        elbo=recon + log_p_z - log_q_z,
        codebook_loss=q.codebook_loss,
        commitment_loss=q.commitment_loss,
        vq_loss=vq[0] * q.codebook_loss + vq[1] * q.commitment_loss,
        codes=q.codes,
    )


def code_usage(codes: torch.Tensor, num_codes: int) -> dict:
    """Usage of the codebook by ``codes`` (any shape of indices).

    Returns ``perplexity`` :math:`\\exp(-\\sum_k p_k \\log p_k)` of the code
    frequencies :math:`p_k` (K when all codes are used equally, 1 when one code
    takes everything), ``codes_used``, ``dead_codes`` (never chosen) and
    ``usage`` (share of the K codes in use).
    """
    counts = torch.bincount(codes.reshape(-1).long(), minlength=num_codes).double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    used = int((counts > 0).sum())
    return {"perplexity": float(entropy.exp()), "codes_used": used, "dead_codes": num_codes - used,
            "usage": used / num_codes}

