"""What every guide needs to know about a model (its latent sites and its input), and the probe flag.

Guides know a model only through ``model.latent_sites`` (``{name: event
shape}``), ``model.obs_shape`` and, for conditional models, ``model.num_classes``.

:func:`parameter_probe` marks a call that only looks for parameters (``fit``
runs the loss once under a parameter-only trace to find them): guides with
state updated by training calls (the VQ-VAE's :class:`~pyrovi.guides.Codebook`)
leave it alone inside it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = ["latent_sites", "input_dim", "encoder_input", "parameter_probe", "in_parameter_probe"]

_PROBE: ContextVar[bool] = ContextVar("pyrovi_parameter_probe", default=False)


@contextmanager
def parameter_probe():
    """Within this context model and guide calls only serve to find parameters: no training side effects."""
    token = _PROBE.set(True)
    try:
        yield
    finally:
        _PROBE.reset(token)


def in_parameter_probe() -> bool:
    """Whether the current call runs inside :func:`parameter_probe`."""
    return _PROBE.get()


def latent_sites(model, guide: str = "this guide") -> dict:
    """``{site: event shape}`` of ``model``; a clear error if it declares none."""
    sites = getattr(model, "latent_sites", None)
    if not isinstance(sites, dict) or not sites:
        raise ConfigError(
            f"{getattr(model, '__name__', type(model).__name__)} does not declare latent_sites, which {guide} "
            "needs; DiagNormal, Delta, Mixture, Flow and Auto serve any Pyro model (they trace it)"
        )
    return {k: tuple(v) for k, v in sites.items()}


def _num_classes(model) -> int:
    return int(getattr(model, "num_classes", None) or 0) if getattr(model, "uses_labels", False) else 0


def input_dim(model) -> int:
    """Width of the encoder's input: flattened x, plus a one-hot label for conditional models."""
    return math.prod(model.obs_shape) + _num_classes(model)


def encoder_input(model, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
    """``(B, D)`` -> ``(B, D [+ C])``: x, with one-hot y appended when the model conditions on labels."""
    x = x.reshape(x.shape[0], -1)
    c = _num_classes(model)
    if not c:
        return x
    if y is None:
        raise ConfigError(f"{type(model).__name__} conditions on labels: pass y (shape (B,)) as well as x")
    return torch.cat([x, F.one_hot(y.long(), c).to(x.dtype)], dim=-1)
