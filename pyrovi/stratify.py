"""Stratified particles for mixture distributions: the switch and the weights it leaves behind.

A neutral home for what the objective layer (:mod:`pyrovi.weights`,
:mod:`pyrovi.objectives`, :mod:`pyrovi.fastpath`) and the mixture head
(:mod:`pyrovi.guides.mixture`) both need, so that neither imports the other.

Within :func:`stratified` a mixture distribution that supports it (pyrovi's
:class:`~pyrovi.guides.mixture.DiagNormalMixture`) draws particle ``s`` from
component :math:`c(s) = (s + u) \\bmod C` and leaves the log weight
:math:`\\log \\rho_s = \\log C \\pi_{c(s)}(x)` of each draw on the distribution
as ``log_stratum``; :func:`log_stratum` reads it back. See
:mod:`pyrovi.guides.mixture` for the estimator.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Optional

import torch

__all__ = ["stratified", "stratify_rank", "log_stratum", "strata"]

# Rank of the particle dim (it is batch dim ``-rank``) while objectives draw stratified particles; None otherwise.
_STRATIFY: ContextVar[Optional[int]] = ContextVar("pyrovi_stratify", default=None)


@contextmanager
def stratified(rank: int):
    """Within this context mixture distributions draw stratified particles.

    ``rank``: the particle dim is batch dim ``-rank`` of every mixture sampled (Pyro's
    vectorized particle plate at ``dim=-rank``). Each draw's log weight :math:`\\log \\rho_s`
    is left on the distribution as ``log_stratum`` (batch shape); read it with :func:`log_stratum`.
    """
    token = _STRATIFY.set(int(rank))
    try:
        yield
    finally:
        _STRATIFY.reset(token)


def stratify_rank() -> Optional[int]:
    """The particle dim's rank inside :func:`stratified`, else None (read by samplers)."""
    return _STRATIFY.get()


def log_stratum(fn) -> Optional[torch.Tensor]:
    """``log rho`` of a stratified draw from ``fn`` (through Independent/Transformed/Expanded wrappers), else None."""
    while getattr(fn, "log_stratum", None) is None and hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return getattr(fn, "log_stratum", None)


def strata(guide) -> int:
    """Mixture components C of a guide whose sites objectives draw stratified (``guide.strata``), else 1."""
    c = getattr(guide, "strata", 1)
    return c if isinstance(c, int) and not isinstance(c, bool) and c > 1 else 1
