"""Small convolutional encoders/decoders for grids of code vectors: 2-D for images, 1-D for characters.

Plain ``torch.nn``, no Pyro. Each stride-2 stage halves (encoder) or doubles
(decoder) the spatial size, so ``downsample = s`` maps an ``H x W`` image to an
``H/2^s x W/2^s`` grid, or ``T`` characters to ``T/2^s`` positions. Every
module takes and returns *position-last* tensors ``(..., L, d)`` (any leading
particle/batch dims) so the VQ-VAE's latent site is simply ``(L, d)``.

Activations are leaky ReLUs (slope 0.2): with plain ReLUs an early large step
can kill every unit of the encoder, its output becomes a constant, and the
VQ-VAE collapses onto one code for good (seen on mnist5k for some seeds).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError, check_positive

__all__ = ["ImageEncoder", "ImageDecoder", "TextEncoder", "TextDecoder", "grid_shape", "auto_downsample"]


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2)


def grid_shape(size: tuple, downsample: int) -> tuple:
    """Grid of code positions for an input of ``size`` ((H, W) or (T,)) after ``downsample`` halvings."""
    check_positive("downsample", downsample, integer=True, allow_zero=True)
    f = 2 ** downsample
    for s in size:
        if s % f:
            raise ConfigError(f"input size {tuple(size)} is not divisible by 2**downsample = {f}; "
                              f"use a smaller downsample (e.g. {max(0, downsample - 1)})")
    return tuple(s // f for s in size)


def auto_downsample(size: tuple, most: int = 2) -> int:
    """The largest number of halvings ``<= most`` that divides every side of ``size`` (0 for odd sizes)."""
    s = most
    while s and any(d % (2 ** s) for d in size):
        s -= 1
    return s


def _flat(x: torch.Tensor, keep: int) -> tuple:
    """Merge all but the last ``keep`` dims into one batch dim; return it and the merged shape."""
    lead = x.shape[: x.dim() - keep]
    return x.reshape(-1, *x.shape[x.dim() - keep:]), lead


class ImageEncoder(nn.Module):
    """``(B, C*H*W)`` images -> ``(B, L, d)`` code vectors, ``L = (H/2^s)(W/2^s)``, raster order.

    ``image_shape`` is ``(H, W)``; ``in_channels`` C (1 grey, 3 RGB), pixels stored channel-first.
    """

    def __init__(self, image_shape: tuple, code_dim: int, channels: int, downsample: int, in_channels: int = 1):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.in_channels = in_channels
        layers: list[nn.Module] = []
        c_in = in_channels
        for _ in range(downsample):
            layers += [nn.Conv2d(c_in, channels, 4, stride=2, padding=1), _act()]
            c_in = channels
        layers += [nn.Conv2d(c_in, channels, 3, padding=1), _act(), nn.Conv2d(channels, code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, lead = _flat(x, 1)
        h = self.net(x.reshape(-1, self.in_channels, *self.image_shape))  # (N, d, h, w)
        h = h.flatten(2).transpose(1, 2)  # (N, L, d)
        return h.reshape(*lead, *h.shape[1:])


class ImageDecoder(nn.Module):
    """``(..., L, d)`` code vectors on an ``(h, w)`` grid -> ``(..., C*H*W)`` per-pixel outputs (logits or means).

    ``out_channels`` C outputs per pixel, channel-first (e.g. 2C for a mean and a log-scale per pixel).
    """

    def __init__(self, image_shape: tuple, code_dim: int, channels: int, downsample: int, out_channels: int = 1):
        super().__init__()
        self.grid = grid_shape(image_shape, downsample)
        layers: list[nn.Module] = [nn.Conv2d(code_dim, channels, 3, padding=1), _act(),
                                   nn.Conv2d(channels, channels, 3, padding=1), _act()]
        for i in range(downsample):
            last = i == downsample - 1
            layers.append(nn.ConvTranspose2d(channels, out_channels if last else channels, 4, stride=2, padding=1))
            if not last:
                layers.append(_act())
        if downsample == 0:
            layers.append(nn.Conv2d(channels, out_channels, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z, lead = _flat(z, 2)  # (N, L, d)
        h = z.transpose(1, 2).reshape(z.shape[0], z.shape[2], *self.grid)  # (N, d, h, w)
        out = self.net(h).flatten(1)  # (N, C*H*W)
        return out.reshape(*lead, out.shape[-1])


class TextEncoder(nn.Module):
    """``(B, T)`` character indices -> ``(B, L, d)`` code vectors, ``L = T / 2^s``."""

    def __init__(self, vocab_size: int, code_dim: int, channels: int, downsample: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, channels)
        layers: list[nn.Module] = []
        for _ in range(downsample):
            layers += [nn.Conv1d(channels, channels, 4, stride=2, padding=1), _act()]
        layers += [nn.Conv1d(channels, channels, 3, padding=1), _act(), nn.Conv1d(channels, code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, lead = _flat(x, 1)
        h = self.embed(x.long()).transpose(1, 2)  # (N, C, T)
        h = self.net(h).transpose(1, 2)  # (N, L, d)
        return h.reshape(*lead, *h.shape[1:])


class TextDecoder(nn.Module):
    """``(..., L, d)`` code vectors -> ``(..., T, V)`` character logits, ``T = L * 2^s``."""

    def __init__(self, vocab_size: int, code_dim: int, channels: int, downsample: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv1d(code_dim, channels, 3, padding=1), _act(),
                                   nn.Conv1d(channels, channels, 3, padding=1), _act()]
        for _ in range(downsample):
            layers += [nn.ConvTranspose1d(channels, channels, 4, stride=2, padding=1), _act()]
        layers.append(nn.Conv1d(channels, vocab_size, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z, lead = _flat(z, 2)  # (N, L, d)
        out = self.net(z.transpose(1, 2)).transpose(1, 2)  # (N, T, V)
        return out.reshape(*lead, *out.shape[1:])
