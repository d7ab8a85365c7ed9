"""What every guide needs to know about a model: its latent sites and its input.

Guides know a model only through ``model.latent_sites`` (``{name: event
shape}``), ``model.obs_shape`` and, for conditional models, ``model.num_classes``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = ["latent_sites", "input_dim", "encoder_input"]


def latent_sites(model) -> dict:
    """``{site: event shape}`` of ``model``; a clear error if it declares none."""
    sites = getattr(model, "latent_sites", None)
    if not isinstance(sites, dict) or not sites:
        raise ConfigError(
            f"{type(model).__name__} does not declare latent_sites; pyrovi's built-in guides need "
            "them (use guides.Auto for any Pyro model)"
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
