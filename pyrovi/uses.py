"""What a trained VAE is for: reconstruction, sampling from the prior, interpolation between codes.

Every function takes the trained pair as ``run`` — a :class:`pyrovi.Run` (from
``fit`` or ``load_run``) or a ``(model, guide)`` tuple — and works on flat
data ``(B, D)``. The model must have ``decode(z[, y])`` and ``sample(n)`` and
the guide ``encode(x[, y])`` (pyrovi's models and guides do).

Codes are the posterior means :math:`\\mu_\\phi(x) = \\mathbb E_q[z \\mid x]`;
images are the decoder's means :math:`\\mathbb E[x \\mid z]` (pixel
probabilities for a Bernoulli likelihood, in [0, 1]).

Interpolation (the weight :math:`\\alpha` is the share of the *first* code, so
:math:`\\alpha = 1 \\to 0` walks from :math:`z_1` to :math:`z_2`):

.. math::

    \\text{linear:}\\quad z(\\alpha) = \\alpha z_1 + (1 - \\alpha) z_2

    \\text{spherical (slerp):}\\quad z(\\alpha) = \\frac{\\sin(\\alpha\\Omega)}{\\sin\\Omega} z_1
        + \\frac{\\sin((1-\\alpha)\\Omega)}{\\sin\\Omega} z_2,
    \\qquad \\cos\\Omega = \\frac{z_1 \\cdot z_2}{\\lVert z_1\\rVert\\,\\lVert z_2\\rVert}

(Shoemake 1985; White 2016, "Sampling generative networks"). Under a
standard-normal prior in L dimensions almost all mass lies near the sphere of
radius :math:`\\sqrt L`; the midpoint of a straight line between two such codes
has norm :math:`\\approx\\sqrt{L/2}`, a region the prior rarely visits, while
slerp keeps the norm between the two endpoints' norms.
"""

from __future__ import annotations

from typing import Optional

import torch

from .errors import ConfigError, check_positive, lookup
from .generate import check_rows as _check_rows, parts as _parts, sample_prior

__all__ = ["encode", "reconstruct", "sample_prior", "interpolation_weights", "lerp", "slerp",
           "interpolate_codes", "interpolate", "pick_pairs", "INTERPOLATIONS"]


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _float_dtype(module) -> torch.dtype:
    """The dtype of ``module``'s floating-point parameters (a run trained with ``dtype=torch.float64`` has float64
    nets: data must be cast to it, not only moved); float32 without any."""
    for p in getattr(module, "parameters", lambda: ())():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _rows(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() == 1:
        x = x[None]
    if x.dim() != 2:
        raise ConfigError(f"{name} must have shape (B, D) or (D,), got {tuple(x.shape)}")
    return x.float()


def _labels(model, y, n: int, name: str = "y") -> Optional[torch.Tensor]:
    if not getattr(model, "uses_labels", False):
        return None
    if y is None:
        raise ConfigError(f"{type(model).__name__} conditions on labels: pass {name} (integers, shape ({n},))")
    y = torch.as_tensor(y).long().reshape(-1)
    if y.numel() == 1 and n > 1:
        y = y.expand(n)
    if y.shape != (n,):
        raise ConfigError(f"{name} must hold one label per row ({n}), got shape {tuple(y.shape)}")
    return y


@torch.no_grad()
def encode(run, x, y=None) -> torch.Tensor:
    """Posterior means of the codes, :math:`\\mathbb E_q[z \\mid x]`, shape ``(B, *event_shape)``: ``(B, L)``
    for the VAEs, ``(B, L, d)`` (the quantized code vectors) for a VQ-VAE.

    Every pyrovi guide gives the mean: in closed form for DiagNormal, Delta, Mixture
    and Codebook, from 256 draws on a fixed seed for Flow and Auto's flow heads
    (``guide.encode``); it is the code, never a random draw.

    Args:
        run: a :class:`pyrovi.Run` or ``(model, guide)``.
        x: data ``(B, D)`` (or one item ``(D,)``), same scaling as in training.
        y: labels ``(B,)`` (or one int for all rows), only for conditional models.
    """
    model, guide, scope = _parts(run)
    if not hasattr(guide, "encode"):
        raise ConfigError(f"{type(guide).__name__} has no encode(x) method; reconstruction and interpolation "
                          "need a pyrovi guide (DiagNormal, Delta, ...)")
    x = _rows(x, "x")
    dev = _device(guide)
    y = _labels(model, y, x.shape[0])
    with scope:
        x = x.to(dev, _float_dtype(guide))
        args = (x,) if y is None else (x, y.to(dev))
        params = guide.encode(*args)
    site = getattr(model, "latent_site", "z")
    if site not in params:
        raise ConfigError(f"the guide gives no parameters for latent site {site!r}")
    return params[site][0]  # (B, *event_shape)


@torch.no_grad()
def reconstruct(run, x, y=None) -> torch.Tensor:
    """Decode the posterior mean code of every row: :math:`\\mathbb E[x \\mid z=\\mu_\\phi(x)]`, shape ``(B, D)``.

    Args:
        run: a :class:`pyrovi.Run` or ``(model, guide)``.
        x: data ``(B, D)`` or ``(D,)``.
        y: labels ``(B,)``, only for conditional models (used by encoder and decoder).
    """
    model, _, scope = _parts(run)
    x = _rows(x, "x")
    y = _labels(model, y, x.shape[0])
    z = encode(run, x, y)  # (B, L)
    return _decode(model, scope, z, y)  # (B, D)


def _decode(model, scope, z, y=None):
    """``model.decode(z[, y])``: models without labels (VQ-VAE) take z alone."""
    if not hasattr(model, "decode"):
        raise ConfigError(f"{type(model).__name__} has no decode(z) method: nothing to reconstruct or interpolate")
    with scope:
        return model.decode(z) if y is None else model.decode(z, y.to(z.device))


# --------------------------------------------------------------------------- interpolation


def interpolation_weights(steps: int) -> torch.Tensor:
    """The weights :math:`\\alpha` of the first code, from 1 down to 0, shape ``(steps,)`` (steps >= 2)."""
    check_positive("steps", steps, integer=True)
    if steps < 2:
        raise ConfigError(f"steps must be >= 2 (both end points), got {steps}")
    return torch.linspace(1.0, 0.0, steps)


def lerp(z1: torch.Tensor, z2: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Linear interpolation :math:`\\alpha z_1 + (1-\\alpha) z_2`.

    ``z1``, ``z2``: ``(..., L)``; ``alpha``: ``(A,)``. Returns ``(A, ..., L)``.
    """
    a = alpha.reshape(-1, *([1] * z1.dim())).to(z1)  # (A, 1.., 1)
    return a * z1 + (1 - a) * z2


def slerp(z1: torch.Tensor, z2: torch.Tensor, alpha: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation along the great circle from ``z2`` (:math:`\\alpha=0`) to ``z1`` (:math:`\\alpha=1`).

    ``z1``, ``z2``: ``(..., L)``; ``alpha``: ``(A,)``. Returns ``(A, ..., L)``.
    The angle :math:`\\Omega` is taken between the directions; the radius is the
    same sine-weighted mix of the two codes, so equal-norm codes stay on their
    sphere. Nearly parallel codes (:math:`\\sin\\Omega < 10^{-7}`) fall back to
    :func:`lerp`, the limit of the formula.
    """
    a = alpha.reshape(-1, *([1] * z1.dim())).to(z1)  # (A, 1.., 1)
    n1 = z1.norm(dim=-1, keepdim=True).clamp_min(eps)  # (..., 1)
    n2 = z2.norm(dim=-1, keepdim=True).clamp_min(eps)
    cos = ((z1 / n1) * (z2 / n2)).sum(-1, keepdim=True).clamp(-1.0, 1.0)  # (..., 1)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    small = sin < eps
    safe = torch.where(small, torch.ones_like(sin), sin)
    w1 = torch.sin(a * omega) / safe  # (A, ..., 1)
    w2 = torch.sin((1 - a) * omega) / safe
    out = w1 * z1 + w2 * z2
    return torch.where(small, lerp(z1, z2, alpha), out)


#: name -> interpolation of two codes
INTERPOLATIONS = {"linear": lerp, "lerp": lerp, "slerp": slerp, "spherical": slerp}


def interpolate_codes(z1: torch.Tensor, z2: torch.Tensor, steps: int = 8, method: str = "linear") -> torch.Tensor:
    """``steps`` codes from ``z1`` to ``z2`` (both ``(..., L)``) by ``method``; returns ``(steps, ..., L)``."""
    fn = lookup(INTERPOLATIONS, method, "interpolation")
    if z1.shape != z2.shape:
        raise ConfigError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    return fn(z1, z2, interpolation_weights(steps))


@torch.no_grad()
def interpolate(run, x1, x2, *, steps: int = 8, method: str = "linear", y1=None, y2=None,
                label=None) -> torch.Tensor:
    """Decode the path between the codes of ``x1`` and ``x2``: shape ``(P, steps, D)``.

    Row ``p`` starts at (the reconstruction of) ``x1[p]`` and ends at ``x2[p]``.

    Args:
        run: a :class:`pyrovi.Run` or ``(model, guide)``.
        x1: first items of ``P`` pairs, ``(P, D)`` (or ``(D,)`` for one pair).
        x2: second items, same shape as ``x1``.
        steps: points along each path, end points included (>= 2).
        method: ``"linear"`` or ``"slerp"`` (see the module docstring).
        y1: labels of ``x1`` ``(P,)``, for a conditional model (encoder input).
        y2: labels of ``x2`` ``(P,)``, for a conditional model.
        label: the label the decoder holds fixed along the path for a
            conditional model (default ``y1``): the path changes style, not class.
    """
    model, _, scope = _parts(run)
    x1, x2 = _rows(x1, "x1"), _rows(x2, "x2")
    if x1.shape != x2.shape:
        raise ConfigError(f"x1 and x2 must have the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}")
    P = x1.shape[0]
    interpolation_weights(steps)  # steps >= 2, before the size check names it
    _check_rows(run, f"steps={steps}", P * steps)
    y1 = _labels(model, y1, P, "y1")
    y2 = _labels(model, y2, P, "y2")
    z1, z2 = encode(run, x1, y1), encode(run, x2, y2)  # (P, *event)
    # one code is one vector: a VQ-VAE's (L, d) grid is interpolated as a whole, (P, L*d)
    z = interpolate_codes(z1.reshape(P, -1), z2.reshape(P, -1), steps, method)  # (A, P, L*d)
    z = z.reshape(z.shape[:2] + z1.shape[1:])  # (A, P, *event)
    dec_y = None
    if y1 is not None:
        dec_y = _labels(model, y1 if label is None else label, P, "label")  # (P,)
    out = _decode(model, scope, z, dec_y)  # (A, P, D)
    return out.transpose(0, 1)  # (P, A, D)


def pick_pairs(y: Optional[torch.Tensor], n_pairs: int, *, same_label: bool = False, seed: int = 0) -> tuple:
    """Indices ``(i1, i2)`` of ``n_pairs`` disjoint pairs of rows whose labels differ (or agree, ``same_label=True``).

    Different labels show a path between classes; a conditional model holds
    its label fixed along a path, so for it pairs of the same label show a
    path in style alone. ``y``: labels ``(N,)``. Returns two int64 tensors of
    shape ``(n_pairs,)``; pairs are drawn at random with ``seed``.
    """
    check_positive("n_pairs", n_pairs, integer=True)
    if y is None:
        raise ConfigError("pick_pairs needs labels; pass index pairs yourself for unlabelled data")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(y.shape[0], generator=g)
    i1, i2, used = [], [], set()
    for a in perm.tolist():
        if len(i1) == n_pairs:
            break
        for b in perm.tolist():
            if b != a and b not in used and a not in used and (int(y[a]) == int(y[b])) == same_label:
                i1.append(a)
                i2.append(b)
                used.update((a, b))
                break
    if len(i1) < n_pairs:
        kind = "the same label" if same_label else "different labels"
        raise ConfigError(f"could not find {n_pairs} pairs with {kind} among {y.shape[0]} rows")
    return torch.tensor(i1), torch.tensor(i2)

