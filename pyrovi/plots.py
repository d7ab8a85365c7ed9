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

__all__ = ["image_grid", "reconstructions", "samples", "training_curves", "save", "image_panels", "interpolation_norms",
           "labeled_scatter"]


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


# --------------------------------------------------------------------------- uses: panels, interpolation


def _fill_grid(sub, imgs: np.ndarray, ncols: int, row_labels: Sequence[str], col_labels: Sequence[str],
               item_titles: Sequence[str] = ()):
    n = imgs.shape[0]
    nrows = math.ceil(n / ncols)
    axes = sub.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i < n:
            ax.imshow(imgs[i], cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            ax.axis("off")
    for r, label in enumerate(list(row_labels)[:nrows]):
        axes[r, 0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    for c, label in enumerate(list(col_labels)[:ncols]):
        axes[0, c].set_title(label, fontsize=8)
    for i, label in enumerate(list(item_titles)[:n]):
        axes.flat[i].set_title(label, fontsize=7, pad=2)
    return axes


def image_panels(panels: dict, image_shape=None, *, ncols: int = 8, row_labels: Sequence[str] = (),
                 col_labels: Sequence[str] = (), item_titles: Optional[dict] = None, title: str = "",
                 path: Optional[str] = None):
    """Several image grids side by side, one per entry of ``panels`` (``{panel title: images (N, D)}``).

    Every panel has ``ncols`` columns; ``row_labels`` are drawn left of the
    first panel's rows, ``col_labels`` above every panel's first row, and
    ``item_titles`` (``{panel title: one string per image}``) above single
    images. Images are in [0, 1] (values outside are clipped by the colour scale).
    """
    names = list(panels)
    if not names:
        raise ValueError("image_panels needs at least one panel")
    grids = [_as_images(panels[k], image_shape) for k in names]
    nrows = max(math.ceil(g.shape[0] / ncols) for g in grids)
    cell = 0.75
    label_w = 0.9 if row_labels else 0.0
    fig = plt.figure(figsize=(len(names) * ncols * cell + label_w, nrows * cell + 0.9 + (0.3 if title else 0)),
                     layout="constrained")
    subs = fig.subfigures(1, len(names), squeeze=False)[0]
    for j, (sub, name, imgs) in enumerate(zip(subs, names, grids)):
        _fill_grid(sub, imgs, ncols, row_labels if j == 0 else (), col_labels, (item_titles or {}).get(name, ()))
        sub.suptitle(name, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11, fontweight="bold")
    return save(fig, path)


def interpolation_norms(alpha, norms: dict, *, latent_dim: Optional[int] = None, path: Optional[str] = None):
    """Norm of the code along interpolation paths: ``norms`` maps a method to ``(P, A)`` norms at weights ``alpha`` (A,).

    Draws the mean over the P paths with a band of +-1 standard deviation, and
    the typical prior norm sqrt(L) when ``latent_dim`` is given.
    """
    alpha = np.asarray(alpha, dtype=float)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, v in norms.items():
        v = np.asarray(v, dtype=float)
        m, s = v.mean(0), v.std(0)
        line, = ax.plot(alpha, m, marker="o", ms=3, label=name)
        ax.fill_between(alpha, m - s, m + s, color=line.get_color(), alpha=0.2)
    if latent_dim:
        ax.axhline(math.sqrt(latent_dim), color="k", ls=":", lw=1, label=r"$\sqrt{L}$ (typical prior norm)")
    ax.set_xlabel(r"$\alpha$ (weight of the first code $z_1$)")
    ax.set_ylabel(r"$\|z(\alpha)\|_2$")
    ax.set_title("Code norm along the interpolation path")
    ax.invert_xaxis()  # the path runs from z1 (alpha=1) to z2 (alpha=0), left to right as in the image rows
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def labeled_scatter(points: dict, *, xlabel: str, ylabel: str, title: str = "", reference: Optional[tuple] = None,
                    path: Optional[str] = None):
    """One labelled point per entry of ``points`` (``{label: (x, y)}``), e.g. a trade-off between two metrics.

    ``reference``: an optional ``(label, y)`` drawn as a horizontal dotted line.
    """
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    markers = "osD^vP*Xh<>"
    for i, (label, (x, y)) in enumerate(points.items()):
        ax.scatter([x], [y], s=45, marker=markers[i % len(markers)], zorder=3, label=label)
    if reference is not None:
        ax.axhline(reference[1], color="k", ls=":", lw=1, label=reference[0])
    ax.legend(fontsize=8, loc="best")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    fig.tight_layout()
    return save(fig, path)
