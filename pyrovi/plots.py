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


def _mosaic(imgs: np.ndarray, ncols: int, gap_x: int, gap_y: int) -> tuple:
    """Tile ``imgs`` ``(N, H, W)`` into one array ``(rows*(H+gap_y), ncols*(W+gap_x))`` with NaN gaps.

    Returns the array and the cell centres ``(xs (ncols,), ys (rows,))`` in its pixel coordinates.
    One ``imshow`` of a mosaic draws in milliseconds; one axes per image costs ~10 ms each.
    """
    n, H, W = imgs.shape
    nrows = math.ceil(n / ncols)
    out = np.full((nrows * (H + gap_y) + gap_y, ncols * (W + gap_x) + gap_x), np.nan)
    for i in range(nrows * ncols):
        r, c = divmod(i, ncols)
        y0, x0 = gap_y + r * (H + gap_y), gap_x + c * (W + gap_x)
        out[y0:y0 + H, x0:x0 + W] = imgs[i] if i < n else 0.0  # empty cells stay blank (white)
    xs = gap_x + np.arange(ncols) * (W + gap_x) + (W - 1) / 2
    ys = gap_y + np.arange(nrows) * (H + gap_y) + (H - 1) / 2
    return out, xs, ys


def image_panels(panels: dict, image_shape=None, *, ncols: int = 8, row_labels: Sequence[str] = (),
                 col_labels: Sequence[str] = (), item_titles: Optional[dict] = None, title: str = "",
                 path: Optional[str] = None):
    """Several image grids side by side, one per entry of ``panels`` (``{panel title: images (N, D)}``).

    Every panel has ``ncols`` columns; ``row_labels`` are drawn left of the
    first panel's rows, ``col_labels`` above every panel's columns, and
    ``item_titles`` (``{panel title: one string per image}``) above single
    images. Images are grey levels in [0, 1] (values outside are clipped by the
    colour scale), drawn dark on white, separated by thin grey lines.
    """
    names = list(panels)
    if not names:
        raise ValueError("image_panels needs at least one panel")
    item_titles = item_titles or {}
    grids = [_as_images(panels[k], image_shape) for k in names]
    H, W = grids[0].shape[1:]
    nrows = max(math.ceil(g.shape[0] / ncols) for g in grids)
    gap_x = max(1, round(0.08 * W))
    gap_y = gap_x + (max(2, round(0.3 * H)) if any(item_titles.get(k) for k in names) else 0)
    cell = 0.72  # inches per image
    width = len(names) * ncols * cell * (W + gap_x) / W + (1.0 if row_labels else 0.2)
    height = nrows * cell * (H + gap_y) / H + 0.5 + (0.3 if col_labels else 0) + (0.25 * (title.count("\n") + 1)
                                                                                   if title else 0)
    fig, axes = plt.subplots(1, len(names), figsize=(width, height), squeeze=False, layout="constrained")
    cmap = plt.get_cmap("gray_r").with_extremes(bad="#d4d4d4")
    for j, (ax, name, imgs) in enumerate(zip(axes[0], names, grids)):
        mosaic, xs, ys = _mosaic(imgs, ncols, gap_x, gap_y)
        ax.imshow(mosaic, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.xaxis.tick_top()
        ax.set_xticks(xs[:len(col_labels)], list(col_labels)[:ncols], fontsize=8)
        labels = list(row_labels)[:len(ys)] if j == 0 else []
        ax.set_yticks(ys[:len(labels)], labels, fontsize=8)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        for i, label in enumerate(list(item_titles.get(name, ()))[:imgs.shape[0]]):
            r, c = divmod(i, ncols)
            ax.text(xs[c], ys[r] - H / 2 - 0.15, label, ha="center", va="bottom", fontsize=7)
        if name:
            ax.set_title(name, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11, fontweight="bold")
    return save(fig, path)


def interpolation_norms(alpha, norms: dict, *, latent_dim: Optional[int] = None, path: Optional[str] = None):
    """Norm of the code along interpolation paths: ``norms`` maps a method to ``(P, A)`` norms at ``alpha`` ``(A,)``.

    Draws the mean over the P paths with a band of +-1 standard deviation, and
    the typical prior norm sqrt(L) when ``latent_dim`` is given.
    """
    alpha = np.asarray(alpha, dtype=float)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    n_paths = 0
    for name, v in norms.items():
        v = np.asarray(v, dtype=float)
        m, s = v.mean(0), v.std(0)
        n_paths = v.shape[0]
        line, = ax.plot(alpha, m, marker="o", ms=3, label=name)
        ax.fill_between(alpha, m - s, m + s, color=line.get_color(), alpha=0.2)
    if latent_dim:
        ax.axhline(math.sqrt(latent_dim), color="k", ls=":", lw=1, label=r"$\sqrt{L}$ (typical prior norm)")
    ax.set_xlabel(r"$\alpha$ (weight of the first code $z_1$)")
    ax.set_ylabel(r"$\|z(\alpha)\|_2$")
    ax.set_title(f"Code norm along the interpolation path (mean ± 1 s.d. over {n_paths} paths)", fontsize=10)
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
