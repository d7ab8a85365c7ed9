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

__all__ = ["image_grid", "reconstructions", "samples", "training_curves", "khat", "latent_scatter", "interpolations",
           "save", "image_panels", "interpolation_norms", "labeled_scatter"]


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
    if len(image_shape) == 3:  # (C, H, W) channel-first colour -> (N, H, W, C) for imshow
        x = x.reshape(x.shape[0], *image_shape).transpose(0, 2, 3, 1)
        return x[..., 0] if image_shape[0] == 1 else x.clip(0.0, 1.0)
    return x.reshape(x.shape[0], *image_shape)


def image_grid(images, image_shape=None, *, ncols: int = 8, title: str = "", row_labels: Sequence[str] = (),
               path: Optional[str] = None):
    """Grid of grey images; ``images`` ``(N, D)`` in [0, 1] (or ``(N, H, W)``).

    Drawn as one mosaic in one axes (:func:`image_panels`): a grid of 64 images
    costs one ``imshow``, not 64 axes (~15x faster to save).
    """
    if np.ndim(images) == 3:
        arr = images.detach().cpu().float().numpy() if torch.is_tensor(images) else np.asarray(images)
        image_shape, images = arr.shape[1:], arr.reshape(arr.shape[0], -1)
    n = images.shape[0]
    return image_panels({"": images}, image_shape, ncols=min(ncols, n), row_labels=row_labels, title=title,
                        path=path)


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
        val = [(h["epoch"], h["val_loss"]) for h in hist if h.get("val_loss") is not None]  # val_every > 1: some
        ax.plot([e for e, _ in val], [v for _, v in val], "--", marker="o" if len(val) < len(hist) else None,
                color=line.get_color(), label=f"{label} validation")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
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
    n, H, W = imgs.shape[:3]
    nrows = math.ceil(n / ncols)
    colour = imgs.shape[3:]  # (3,) for RGB: gaps light grey (NaN has no colour), empty cells white
    out = np.full((nrows * (H + gap_y) + gap_y, ncols * (W + gap_x) + gap_x, *colour), 0.83 if colour else np.nan)
    for i in range(nrows * ncols):
        r, c = divmod(i, ncols)
        y0, x0 = gap_y + r * (H + gap_y), gap_x + c * (W + gap_x)
        out[y0:y0 + H, x0:x0 + W] = imgs[i] if i < n else (1.0 if colour else 0.0)  # empty cells stay blank
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
    H, W = grids[0].shape[1:3]
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


def khat(values, *, particles: Optional[int] = None, labels=None, path: Optional[str] = None):
    """PSIS k-hat per datapoint with the bands of Yao et al. (2018): < 0.5 good, 0.5-0.7 fair, > 0.7 bad.

    ``values`` ``(N,)``; ``-inf`` (all weights equal: q exact for that datapoint) is drawn at the
    bottom edge as a triangle. ``labels`` ``(N,)`` (optional) are shown on the x axis when N <= 40.
    """
    k = np.asarray(values, dtype=float).reshape(-1)
    n = k.size
    x = np.arange(n)
    fin = np.isfinite(k)
    lo = min(0.0, float(np.nanmin(k[fin])) - 0.1) if fin.any() else -0.5
    if np.isneginf(k).any():
        lo = min(lo, -0.5)  # room for the "all weights equal" markers at the bottom
    hi = max(1.0, float(np.nanmax(k[fin])) + 0.1) if fin.any() else 1.0
    fig, ax = plt.subplots(figsize=(max(6.0, min(12.0, 0.06 * n + 5)), 4))
    bands = [(k < 0.5, "tab:green", "k < 0.5 (good)"),
             ((k >= 0.5) & (k <= 0.7), "tab:orange", "0.5 ≤ k ≤ 0.7 (fair)"),
             ((k > 0.7) | np.isnan(k), "tab:red", "k > 0.7 (bad)")]
    for mask, color, text in bands:
        m = mask & fin
        ax.scatter(x[m], k[m], s=18, color=color, label=f"{text}: {int(mask.sum())}", zorder=3)
    flat = np.isneginf(k)
    if flat.any():
        ax.scatter(x[flat], np.full(flat.sum(), lo + 0.05), marker="v", s=22, color="tab:green", zorder=3,
                   label=f"  of which all weights equal (q exact): {int(flat.sum())}")
    odd = np.isnan(k) | np.isposinf(k)
    if odd.any():
        ax.scatter(x[odd], np.full(odd.sum(), hi - 0.05), marker="x", s=26, color="tab:red", zorder=3,
                   label=f"  of which not estimable: {int(odd.sum())}")
    for y, style in ((0.5, "--"), (0.7, "-")):
        ax.axhline(y, color="0.3", ls=style, lw=1)
        ax.text(1.0, y, f" {y}", transform=ax.get_yaxis_transform(), va="center", fontsize=8)
    ax.axhspan(0.7, hi, color="tab:red", alpha=0.06)
    ax.axhspan(0.5, 0.7, color="tab:orange", alpha=0.06)
    ax.set_ylim(lo, hi)
    ax.set_xlim(-1, n)
    ax.set_xlabel("datapoint")
    ax.set_ylabel("PSIS k-hat")
    title = "Pareto k-hat of the importance weights p(x,z)/q(z|x) per datapoint"
    if particles:
        title += f" ({particles} draws each)"
    ax.set_title(title, fontsize=10)
    if labels is not None and n <= 40:
        ax.set_xticks(x)
        ax.set_xticklabels([str(v) for v in np.asarray(labels).reshape(-1)], fontsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.04, 1.0), borderaxespad=0)
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


def latent_scatter(z, labels=None, *, title: str = "Posterior means E_q[z|x]", path: Optional[str] = None):
    """Scatter of latent codes ``z`` ``(N, L)`` coloured by ``labels`` ``(N,)``.

    L = 2 is drawn as is; L > 2 is projected on its first two principal
    components (scikit-learn's PCA; axis labels give the explained variance).
    """
    z = z.detach().cpu().float().numpy() if torch.is_tensor(z) else np.asarray(z, dtype=np.float32)
    z = z.reshape(z.shape[0], -1)
    lab = None if labels is None else (labels.cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels))
    if z.shape[1] == 1:  # a strip plot: one row per label, jittered so points do not hide each other
        jitter = np.random.default_rng(0).uniform(-0.3, 0.3, len(z))
        rows = np.zeros(len(z)) if lab is None else np.searchsorted(np.unique(lab), lab)
        z2 = np.c_[z[:, 0], rows + jitter]
        xl, yl = "z_1", "label (jittered)" if lab is not None else "(jitter)"
    elif z.shape[1] == 2:
        z2, xl, yl = z, "z_1", "z_2"
    else:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2).fit(z)
        z2 = pca.transform(z)
        ev = pca.explained_variance_ratio_
        xl, yl = f"PC 1 ({100 * ev[0]:.0f}% of variance)", f"PC 2 ({100 * ev[1]:.0f}% of variance)"
        title = f"{title}, PCA of {z.shape[1]} dims"
    fig, ax = plt.subplots(figsize=(6.5, 5))
    if lab is None:
        ax.scatter(z2[:, 0], z2[:, 1], s=8, alpha=0.7)
    else:
        classes = np.unique(lab)
        cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
        for i, c in enumerate(classes):
            m = lab == c
            ax.scatter(z2[m, 0], z2[m, 1], s=8, alpha=0.75, color=cmap(i % cmap.N), label=str(c))
        ax.legend(title="label", fontsize=8, markerscale=2, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                  borderaxespad=0)
    if z.shape[1] == 1:
        ax.set_yticks(range(len(np.unique(lab))) if lab is not None else [])
        if lab is not None:
            ax.set_yticklabels([str(c) for c in np.unique(lab)])
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save(fig, path)


def interpolations(images, image_shape=None, *, alphas: Optional[Sequence[float]] = None, ends=None,
                   title: str = "Interpolations: decode (1-a) z_start + a z_end", path: Optional[str] = None):
    """Rows of decoded interpolations, ``images`` ``(R, T, D)`` (R pairs, T steps), columns labelled by a.

    ``ends`` ``(R, 2, D)`` (optional): the two data items of each row, drawn in
    an extra first and last column so the decodes can be compared with them.
    """
    def arr(v):
        return v.detach().cpu().float().numpy() if torch.is_tensor(v) else np.asarray(v, dtype=np.float32)

    imgs = arr(images)
    r, t = imgs.shape[:2]
    alphas = np.linspace(0, 1, t) if alphas is None else np.asarray(alphas)
    cols = [(imgs[:, j], f"a={alphas[j]:.2f}") for j in range(t)]
    if ends is not None:
        e = arr(ends)
        cols = [(e[:, 0], "data 1")] + cols + [(e[:, 1], "data 2")]
    fig, axes = plt.subplots(r, len(cols), figsize=(1.0 * len(cols) + 0.6, 1.0 * r + 0.7), squeeze=False)
    for j, (col, label) in enumerate(cols):
        col = _as_images(col.reshape(r, -1), image_shape)
        for i in range(r):
            ax = axes[i, j]
            ax.imshow(col[i], cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")  # RGB: cmap unused
            ax.set_xticks([])
            ax.set_yticks([])
            if ends is not None and j in (0, len(cols) - 1):
                for sp in ax.spines.values():
                    sp.set_color("tab:blue")
                    sp.set_linewidth(1.5)
            if i == 0:
                ax.set_title(label, fontsize=8)
    for i in range(r):
        axes[i, 0].set_ylabel(f"pair {i + 1}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, path)
