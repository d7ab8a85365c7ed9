"""All of pyrovi's figures (matplotlib, headless ``Agg`` backend).

Each function returns the ``matplotlib.figure.Figure`` and, given ``path``,
saves it as PNG (atomically) and closes it.
"""

from __future__ import annotations

import io
import math
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .checkpoint import atomic_write  # noqa: E402

__all__ = ["image_grid", "reconstructions", "samples", "training_curves", "save"]


def save(fig, path: Optional[str]):
    """Save ``fig`` as PNG to ``path`` atomically and close it; return the figure."""
    if path:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        atomic_write(path, buf.getvalue())
        plt.close(fig)
    return fig


def _as_images(x, image_shape) -> np.ndarray:
    x = x.detach().cpu().float().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float32)
    if image_shape is None:
        side = int(math.isqrt(x.shape[-1]))
        image_shape = (side, side) if side * side == x.shape[-1] else (1, x.shape[-1])
    return x.reshape(x.shape[0], *image_shape)


def image_grid(images, image_shape=None, *, ncols: int = 8, title: str = "", row_labels: Sequence[str] = (),
               path: Optional[str] = None):
    """Grid of grey images; ``images`` ``(N, D)`` in [0, 1] (or ``(N, H, W)``)."""
    imgs = _as_images(images, image_shape) if np.ndim(images) == 2 else np.asarray(images)
    n = imgs.shape[0]
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.1 * ncols, 1.1 * nrows + (0.4 if title else 0)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i < n:
            ax.imshow(imgs[i], cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            ax.axis("off")
    for r, label in enumerate(row_labels[:nrows]):
        axes[r, 0].set_ylabel(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save(fig, path)


def reconstructions(x, x_hat, image_shape=None, *, n: int = 8, path: Optional[str] = None):
    """Originals (top row) above their reconstructions (bottom row)."""
    n = min(n, x.shape[0])
    both = torch.cat([x[:n].cpu(), x_hat[:n].cpu()])
    return image_grid(both, image_shape, ncols=n, title="Reconstructions: data (top), mean of p(x|z), z~q(z|x) (bottom)",
                      row_labels=["data", "recon."], path=path)


def samples(x, image_shape=None, *, path: Optional[str] = None, title: str = "Samples: mean of p(x|z), z ~ p(z)"):
    """Decoded prior samples in a grid."""
    return image_grid(x, image_shape, ncols=8, title=title, path=path)


def training_curves(histories: dict, *, path: Optional[str] = None):
    """Train and validation loss (nats/datapoint) per epoch; ``histories`` maps a label to a history list."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, hist in histories.items():
        ep = [h["epoch"] for h in hist]
        line, = ax.plot(ep, [h["train_loss"] for h in hist], label=f"{label} train")
        ax.plot(ep, [h["val_loss"] for h in hist], "--", color=line.get_color(), label=f"{label} validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss = -bound (nats / datapoint)")
    ax.set_title("Training curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)
