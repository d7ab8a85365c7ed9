"""The conditional VAE: the label is an input of both the decoder and the guide's encoder.

.. math::

    z \\sim \\mathcal N(0, I_L), \\qquad
    x \\mid z, y \\sim p_\\theta\\big(x \\mid \\mathrm{dec}([z, \\mathrm{onehot}(y)])\\big), \\qquad
    q_\\phi(z \\mid x, y) = \\mathcal N\\big(\\mu_\\phi([x, \\mathrm{onehot}(y)]),\\ \\sigma_\\phi(\\cdot)^2\\big)

(Sohn, Lee & Yan 2015, "Learning structured output representation using deep
conditional generative models"). The prior over ``z`` does not depend on the
label, so ``z`` is free to carry what the label does not say (slant, stroke
width); fixing ``y`` and drawing ``z ~ p(z)`` generates an item of class ``y``.

Only the decoder's input differs from :class:`pyrovi.models.VAE`; the guide
side is handled by every pyrovi guide, which appends ``onehot(y)`` to x when
``model.uses_labels`` is true (:func:`pyrovi.guides.base.encoder_input`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError, check_positive
from .vae import VAE

__all__ = ["ConditionalVAE"]


class ConditionalVAE(VAE):
    """VAE whose decoder reads ``[z, onehot(y)]``: latent site ``"z"`` ``(L,)``, observation ``"x"`` ``(D,)``.

    ``forward(x, y)`` takes a batch ``x`` of shape ``(B, D)`` and integer labels
    ``y`` of shape ``(B,)`` in ``[0, C)``. Under vectorized particles ``z`` has
    shape ``(S, B, L)`` and the one-hot label is broadcast to ``(S, B, C)``.
    Log-densities are in nats.

    Args:
        shape: the data's event shape ``(D,)`` or ``D``.
        latent_dim: L.
        num_classes: C, the number of label values (>= 2).
        **options: the :class:`~pyrovi.models.VAE` options (``hidden``,
            ``likelihood``, ``sigma``, ``learn_sigma``, ``activation``, ``image_shape``).

    Example::

        model = pv.models.ConditionalVAE(data.shape, 8, num_classes=data.num_classes)
        run = pv.fit(model, pv.guides.DiagNormal(model), data)   # guide sees (x, y)
        sevens = model.sample(16, label=7)                        # (16, D)
    """

    uses_labels = True

    def __init__(self, shape, latent_dim: int = 16, *, num_classes: int, **options):
        check_positive("num_classes", num_classes, integer=True)
        if num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2 for a conditional model, got {num_classes}")
        super().__init__(shape, latent_dim, num_classes=num_classes, **options)

    @property
    def num_classes(self) -> int:
        """C, the number of label values; labels are integers in ``[0, C)``."""
        return self.cfg.num_classes

    def _context_dim(self) -> int:
        return self.cfg.num_classes

    def config(self) -> dict:
        """JSON-able options that rebuild this model (``pyrovi.models.build``)."""
        d = super().config()
        d["name"] = "conditional_vae"
        d["num_classes"] = self.cfg.num_classes
        return d

    def labels(self, y, like: torch.Tensor) -> torch.Tensor:
        """Check labels and return them as an int64 tensor on ``like``'s device.

        ``y``: an int (one label for every item) or integer labels of any shape,
        each in ``[0, C)``. Raises :class:`~pyrovi.ConfigError` otherwise.
        """
        if y is None:
            raise ConfigError(f"{type(self).__name__} needs labels y (integers in [0, {self.num_classes})), got None")
        if isinstance(y, bool):
            raise ConfigError(f"label must be an integer in [0, {self.num_classes}), got {y!r}")
        t = torch.as_tensor(y, device=like.device)
        if t.is_floating_point() or t.dtype == torch.bool:
            if t.dtype == torch.bool or not torch.equal(t, t.round()):
                raise ConfigError(f"labels must be integers in [0, {self.num_classes}), got dtype {t.dtype}")
        t = t.long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_classes):
            raise ConfigError(f"labels must lie in [0, {self.num_classes}); got range [{int(t.min())}, {int(t.max())}]")
        return t

    def decoder_out(self, z: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Decoder output ``(..., D)`` for ``z`` ``(..., L)`` and labels ``y`` ``(B,)`` (or an int).

        The label's one-hot code ``(B, C)`` is broadcast over the leading
        (particle) dimensions of ``z`` and concatenated to it.
        """
        y = self.labels(y, z)
        onehot = F.one_hot(y, self.num_classes).to(z.dtype)  # (B, C) or (C,)
        onehot = onehot.expand(*z.shape[:-1], self.num_classes)  # (S?, B, C)
        return self.decoder(torch.cat([z, onehot], dim=-1))  # (S?, B, D)

    def _require_labels(self, x: torch.Tensor, y) -> None:
        if y is None:
            raise ConfigError(f"{type(self).__name__} conditions on labels: call it as model(x, y) with y of shape "
                              f"({x.shape[0]},)")

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the model on ``x`` ``(B, D)`` with labels ``y`` ``(B,)``; returns the decoder output ``(..., B, D)``."""
        self._require_labels(x, y)
        return super().forward(x, y)

    def fast_log_joint(self, x: torch.Tensor, z: dict, y: Optional[torch.Tensor] = None) -> tuple:
        """:meth:`forward` without Pyro's tracing (:mod:`pyrovi.fastpath`); see :meth:`VAE.fast_log_joint`."""
        self._require_labels(x, y)
        return super().fast_log_joint(x, z, y)

    @torch.no_grad()
    def sample(self, n: int, *, label=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Means of p(x | z, y) for ``n`` draws z ~ p(z); shape ``(n, D)``.

        Args:
            n: number of samples.
            label: an int (all ``n`` samples of that class), a sequence/tensor of
                ``n`` labels, or None (labels ``0, 1, ..., C-1, 0, 1, ...`` in turn).
            generator: a CPU ``torch.Generator`` for reproducible draws.
        """
        check_positive("n", n, integer=True)
        p = next(self.parameters())
        if label is None:
            y = torch.arange(n, device=p.device) % self.num_classes
        else:
            y = self.labels(label, p)
            if y.dim() == 0:
                y = y.expand(n)
            elif y.shape != (n,):
                raise ConfigError(f"label must be an int or hold n={n} labels, got shape {tuple(y.shape)}")
        z = torch.randn(n, self.cfg.latent_dim, generator=generator, dtype=p.dtype).to(p.device)  # (n, L)
        return self.decode(z, y)
