"""Encoder/decoder building blocks: plain ``torch.nn`` modules, no Pyro.

Kept deliberately small; models and guides compose them.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .errors import ConfigError, check_positive

__all__ = ["MLP", "activation", "as_widths"]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "gelu": nn.GELU, "softplus": nn.Softplus}


def activation(name: str) -> nn.Module:
    """A fresh activation module by name (``relu``, ``tanh``, ``elu``, ``gelu``, ``softplus``)."""
    from .errors import lookup

    return lookup(_ACTIVATIONS, name, "activation")()


def as_widths(hidden, name: str = "hidden") -> tuple:
    """``hidden`` (an int or a sequence of ints) as a tuple of layer widths; a clear error otherwise."""
    if isinstance(hidden, int) and not isinstance(hidden, bool):
        hidden = (hidden,)
    if isinstance(hidden, (str, bytes, dict)) or not hasattr(hidden, "__iter__"):
        raise ConfigError(f"{name} must be a layer width or a list of them, such as 256 or (512, 256), got {hidden!r}")
    widths = tuple(hidden)
    for h in widths:
        check_positive(f"{name} layer width", h, integer=True)
    return widths


class MLP(nn.Sequential):
    """Multi-layer perceptron ``in_dim -> hidden... -> out_dim``, activation between layers.

    Input ``(..., in_dim)``, output ``(..., out_dim)``; any leading (particle,
    batch) dims pass through. With ``out_dim=None`` the last hidden layer is
    the output (followed by the activation), for use as an encoder body.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int | None = None, act: str = "relu"):
        check_positive("in_dim", in_dim, integer=True)
        hidden = tuple(hidden)
        for h in hidden:
            check_positive("hidden layer width", h, integer=True)
        if out_dim is None and not hidden:
            raise ConfigError("an MLP with out_dim=None needs at least one hidden layer")
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), activation(act)]
            d = h
        if out_dim is not None:
            check_positive("out_dim", out_dim, integer=True)
            layers.append(nn.Linear(d, out_dim))
        super().__init__(*layers)
        self.out_features = d if out_dim is None else out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in_dim)`` -> ``(..., out_features)``; leading dims pass through."""
        return super().forward(x)
