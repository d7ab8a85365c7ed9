"""VIMCO: gradients of importance-weighted bounds for guides with discrete (non-reparameterized) sites.

A guide site drawn without ``rsample`` (a Bernoulli, a Categorical) has no
pathwise gradient, so the plain gradient of the IWAE/Rényi bound misses the
part that flows through the draw itself. Mnih & Rezende (2016), *Variational
inference for Monte Carlo objectives*, add a score-function term with a
per-particle, leave-one-out baseline. With :math:`v_s = (1-\\alpha)\\log w_s`
and

.. math::

    \\hat{\\mathcal L} = \\frac{1}{1-\\alpha}\\log\\frac1S\\sum_{s=1}^S e^{v_s},
    \\qquad
    \\hat{\\mathcal L}_{-s} = \\hat{\\mathcal L}\\big|_{v_s \\leftarrow \\frac{1}{S-1}\\sum_{j\\ne s} v_j}

(the weight of particle s replaced by the geometric mean of the others), the
gradient estimate is

.. math::

    \\nabla \\hat{\\mathcal L}
    + \\sum_{s=1}^S \\big(\\hat{\\mathcal L} - \\hat{\\mathcal L}_{-s}\\big)\\,
      \\nabla \\log q(z_s^{\\mathrm{discrete}} \\mid x),

where the first term is the usual gradient (pathwise through the
reparameterized sites, and through :math:`\\log q` inside the weights) and
the second one is the score term of the discrete sites only. For
:math:`\\alpha = 1` (the ELBO) the same replacement gives the score-function
ELBO gradient with a leave-one-out baseline. The surrogate returned by
:func:`vimco_bound` has the bound's value (the score term is added as
``c * (log q - sg(log q))``) and the VIMCO gradient. Needs S >= 2.
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigError
from .weights import LogWeights

__all__ = ["vimco_bound", "check_particles"]


def _per_datapoint(v: torch.Tensor, alpha: float, dim: int) -> torch.Tensor:
    """The Rényi bound of log weights ``v`` over particle dim ``dim`` (``alpha = 1``: their mean)."""
    s = v.shape[dim]
    if alpha == 1.0:
        return v.mean(dim)
    return (torch.logsumexp((1.0 - alpha) * v, dim=dim) - math.log(s)) / (1.0 - alpha)


def check_particles(particles: int, objective: str, sites) -> None:
    """VIMCO's baseline leaves one particle out: refuse S = 1, naming the discrete sites."""
    if particles < 2:
        raise ConfigError(f"objective {objective!r} trains the guide's discrete site(s) {list(sites)} with VIMCO, "
                          f"whose baseline leaves one particle out: it needs particles >= 2, got {particles}")


def vimco_bound(lw: LogWeights, alpha: float) -> torch.Tensor:
    """The Rényi bound of :func:`pyrovi.objectives.iw_bound` (summed over datapoints) with VIMCO's gradient.

    ``lw.log_q_score`` ``(S, B|1)`` is log q of the guide's non-reparameterized sites per particle; without it
    this is the plain bound. The value equals the bound for the same draws.
    """
    log_w = lw.log_w  # (S, B)
    bound = _per_datapoint(log_w, alpha, 0)  # (B,)
    lq = lw.log_q_score
    if lq is None:
        return lw.scale * bound.sum()
    S, B = log_w.shape
    v = log_w.detach()
    loo = (v.sum(0, keepdim=True) - v) / (S - 1)  # (S, B) mean log weight of the other particles
    eye = torch.eye(S, dtype=torch.bool, device=v.device).unsqueeze(-1)  # (S, S, 1)
    replaced = torch.where(eye, loo.unsqueeze(1), v.unsqueeze(0))  # (S, S, B): row s has w_s replaced
    bound_loo = _per_datapoint(replaced, alpha, 1)  # (S, B)
    signal = bound.detach().unsqueeze(0) - bound_loo  # (S, B) L - L_{-s}
    assert signal.shape == lq.shape, (signal.shape, lq.shape)
    score = (signal * (lq - lq.detach())).sum(0)  # (B,), value 0, gradient sum_s signal_s grad log q_s
    return lw.scale * (bound + score).sum()
