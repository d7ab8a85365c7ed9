"""Encoder/decoder building blocks: plain ``torch.nn`` modules, no Pyro.

Kept deliberately small; models and guides compose them.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .errors import ConfigError, check_positive

__all__ = ["MLP", "ConvTrunk", "ConvDecoder", "activation", "as_widths", "image_chw", "ARCHS"]

#: encoder/decoder architectures of pyrovi's VAEs (``VAE(..., arch=)``)
ARCHS = ("mlp", "conv")

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


def image_chw(image_shape) -> tuple:
    """``(H, W)`` (grey) or ``(C, H, W)`` -> ``(C, H, W)``; a clear error for anything else."""
    shape = tuple(image_shape) if isinstance(image_shape, (tuple, list)) else None
    if shape is None or len(shape) not in (2, 3) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ConfigError(f"a convolutional net needs image_shape (H, W) or (C, H, W) of positive ints, "
                          f"got {image_shape!r}")
    return shape if len(shape) == 3 else (1, *shape)


class ConvTrunk(nn.Module):
    """Convolutional encoder body: ``(..., C*H*W [+ E])`` -> ``(..., hidden[-1])``.

    The first ``C*H*W`` inputs are a channel-first image, read by
    :class:`pyrovi.convnets.ImageEncoder` (``downsample`` stride-2 stages of ``channels``
    feature maps); the code grid is flattened, any ``E`` extra inputs (a conditional
    model's one-hot label) are appended, and an :class:`MLP` ``-> hidden`` follows.
    ``out_features`` is the width of ``h``, as for an MLP body.
    """

    def __init__(self, image_shape, hidden: Sequence[int], *, extra: int = 0, act: str = "relu",
                 channels: int = 32, downsample: int = 2):
        from .convnets import ImageEncoder, grid_shape

        super().__init__()
        c, h, w = image_chw(image_shape)
        check_positive("channels", channels, integer=True)
        self.pixels = c * h * w
        grid = grid_shape((h, w), downsample)
        self.conv = ImageEncoder((h, w), channels, channels, downsample, in_channels=c)
        self.mlp = MLP(grid[0] * grid[1] * channels + extra, hidden, None, act=act)
        self.out_features = self.mlp.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., C*H*W [+ E])`` -> ``(..., H_out)``; leading dims pass through."""
        g = self.conv(x[..., : self.pixels]).flatten(-2)  # (..., L*channels)
        if x.shape[-1] > self.pixels:
            g = torch.cat([g, x[..., self.pixels:].to(g.dtype)], dim=-1)
        return self.mlp(g)


class ConvDecoder(nn.Module):
    """Convolutional decoder: ``(..., in_dim)`` -> ``(..., k*C*H*W)``, ``k`` outputs per pixel, channel-first.

    An :class:`MLP` ``in_dim -> hidden -> L*channels`` fills a ``(H/2^s, W/2^s)`` grid of
    ``channels`` feature maps, which :class:`pyrovi.convnets.ImageDecoder` upsamples to
    ``k*C`` output maps (``k = 2`` gives a mean and a log-scale per pixel: the first
    ``C*H*W`` outputs are the means).
    """

    def __init__(self, in_dim: int, image_shape, hidden: Sequence[int], *, per_pixel: int = 1, act: str = "relu",
                 channels: int = 32, downsample: int = 2):
        from .convnets import ImageDecoder, grid_shape

        super().__init__()
        c, h, w = image_chw(image_shape)
        check_positive("channels", channels, integer=True)
        self.grid = grid_shape((h, w), downsample)
        self.channels = channels
        self.fc = nn.Sequential(MLP(in_dim, hidden, self.grid[0] * self.grid[1] * channels, act=act), activation(act))
        self.conv = ImageDecoder((h, w), channels, channels, downsample, out_channels=per_pixel * c)
        self.out_features = per_pixel * c * h * w

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``(..., in_dim)`` -> ``(..., k*C*H*W)``."""
        g = self.fc(z)  # (..., L*channels), raster order of the grid, channel last
        g = g.reshape(*g.shape[:-1], self.grid[0] * self.grid[1], self.channels)  # (..., L, channels)
        return self.conv(g)
