"""The variational autoencoder's generative model p(z) p(x|z) as a Pyro model.

.. math::

    z \\sim \\mathcal N(0, I_L), \\qquad x \\mid z \\sim p_\\theta(x \\mid \\mathrm{dec}(z))

with a Bernoulli (logits), Gaussian (fixed or learned sigma, the seed's
:math:`\\delta`) or discretized logistic (8-bit images, reported in bits/dim)
likelihood. ``arch="mlp"`` decodes with an MLP; ``arch="conv"`` with a
convolutional decoder (:class:`pyrovi.nets.ConvDecoder`, built on
:mod:`pyrovi.convnets`) for images of any size and channel count, and every
pyrovi guide then encodes with the matching convolutional trunk
(:class:`pyrovi.nets.ConvTrunk`, read from :attr:`VAE.encoder_trunk`). The guide is separate
(:mod:`pyrovi.guides`); this module only says how data is generated.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from ..convnets import auto_downsample
from ..distributions import BernoulliLogits, DiagonalNormal, DiscretizedLogistic, StandardNormal
from ..errors import ConfigError, check_positive, lookup
from ..nets import ARCHS, MLP, ConvDecoder, as_widths, image_chw

__all__ = ["VAE", "VAEConfig", "LIKELIHOODS"]

LIKELIHOODS = ("bernoulli", "gaussian", "logistic")


@dataclass
class VAEConfig:
    """Options of :class:`VAE` (stored in a run's ``config.json``)."""

    input_dim: int  # D, size of one flattened item
    latent_dim: int = 16  # L, size of the latent site "z"
    hidden: tuple = (256,)  # decoder hidden widths (reversed order of a typical encoder)
    likelihood: str = "bernoulli"  # "bernoulli" (logits), "gaussian" or "logistic" (discretized, 8-bit)
    sigma: float = 1.0  # Gaussian observation std (the seed's delta); initial value when learned
    learn_sigma: bool = False  # learn one sigma per pixel instead of keeping it fixed
    activation: str = "relu"
    image_shape: Optional[tuple] = None  # (H, W) grey or (C, H, W) channel-first; plots, and the conv nets
    num_classes: Optional[int] = field(default=None, repr=False)  # set by ConditionalVAE
    arch: str = "mlp"  # "mlp" or "conv" (convolutional decoder, and the guides' encoder trunk)
    channels: int = 32  # conv: feature maps per stage
    downsample: Optional[int] = None  # conv: stride-2 stages; None = as many as divide H and W, at most 2

    def validate(self) -> None:
        """Raise :class:`~pyrovi.ConfigError` naming the first bad option."""
        check_positive("input_dim", self.input_dim, integer=True)
        check_positive("latent_dim", self.latent_dim, integer=True)
        lookup({k: k for k in LIKELIHOODS}, self.likelihood, "likelihood")
        check_positive("sigma", self.sigma)
        if self.image_shape is not None and (not isinstance(self.image_shape, tuple) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in self.image_shape)):
            raise ConfigError(f"image_shape must be positive integers (H, W) or (C, H, W), got {self.image_shape!r}")
        if self.image_shape is not None and math.prod(self.image_shape) != self.input_dim:
            raise ConfigError(f"image_shape {self.image_shape} does not match input_dim {self.input_dim}")
        lookup({k: k for k in ARCHS}, self.arch, "arch")
        if self.arch == "conv":
            if self.image_shape is None:
                raise ConfigError("arch='conv' needs the image shape: pass image_shape=(H, W) or (C, H, W) "
                                  "(e.g. image_shape=data.image_shape), or the data's shape as (C, H, W)")
            check_positive("channels", self.channels, integer=True)
            if self.downsample is not None:
                check_positive("downsample", self.downsample, integer=True, allow_zero=True)


class VAE(PyroModule):
    """VAE generative model: latent site ``"z"`` of shape ``(L,)``, observation ``"x"`` of shape ``(D,)``.

    ``forward(x, y=None)`` runs the model on a batch ``x`` of shape ``(B, D)``
    inside ``pyro.plate("data", B)``; under vectorized particles ``z`` has
    shape ``(S, B, L)``. Log-densities are in nats.

    Args:
        shape: the data's event shape ``(D,)`` (``dataset.shape``) or ``D``.
        latent_dim: L.
        hidden: decoder hidden layer widths.
        likelihood: ``"bernoulli"`` (data in [0, 1], logits parameterization),
            ``"gaussian"`` (std ``sigma``; ``learn_sigma=True`` learns it per pixel) or
            ``"logistic"`` (a discretized logistic per pixel over 256 levels of [0, 1],
            :class:`~pyrovi.distributions.DiscretizedLogistic`: the decoder gives a mean
            and a log-scale per pixel; log p(x) is a probability, so bits/dim are the
            usual 8-bit ones).
        image_shape: ``(H, W)`` (grey) or ``(C, H, W)`` (channel-first, e.g. RGB), used by
            plots and by ``arch="conv"``; pixels are stored channel-first in the flat ``(D,)``.
        arch: ``"mlp"`` (default) or ``"conv"``: a convolutional decoder (a ``hidden`` MLP
            onto a ``channels`` x (H/2^s) x (W/2^s) grid, then ``downsample`` = s transposed
            stride-2 convolutions); pyrovi's guides then encode with the mirror image
            (:attr:`encoder_trunk`).
        channels: conv feature maps per stage.
        downsample: conv stride-2 stages (None: as many as divide H and W, at most 2).
    """

    latent_site = "z"
    obs_site = "x"
    max_plate_nesting = 1
    uses_labels = False

    def __init__(
        self,
        shape,
        latent_dim: int = 16,
        *,
        hidden=(256,),
        likelihood: str = "bernoulli",
        sigma: float = 1.0,
        learn_sigma: bool = False,
        activation: str = "relu",
        image_shape=None,
        num_classes=None,
        arch: str = "mlp",
        channels: int = 32,
        downsample: Optional[int] = None,
    ):
        super().__init__()
        input_dim = _input_dim(shape)
        if image_shape is None and isinstance(shape, (tuple, list, torch.Size)) and len(shape) in (2, 3):
            image_shape = tuple(int(d) for d in shape)  # VAE((C, H, W)) / VAE((H, W)): the shape is the image's
        hidden = as_widths(hidden)
        if not isinstance(learn_sigma, bool):
            raise ConfigError(f"learn_sigma must be True or False, got {learn_sigma!r}")
        likelihood = likelihood.lower() if isinstance(likelihood, str) else likelihood
        self.cfg = VAEConfig(
            input_dim=input_dim,
            latent_dim=latent_dim,
            hidden=tuple(hidden),
            likelihood=likelihood,
            sigma=float(sigma) if isinstance(sigma, (int, float)) and not isinstance(sigma, bool) else sigma,
            learn_sigma=bool(learn_sigma),
            activation=activation,
            image_shape=tuple(image_shape) if isinstance(image_shape, (list, tuple)) else image_shape,
            num_classes=num_classes,
            arch=arch.lower() if isinstance(arch, str) else arch,
            channels=channels,
            downsample=downsample,
        )
        self.cfg.validate()
        self._priors: dict = {}  # (device, dtype) -> StandardNormal, see prior()
        per_pixel = 2 if likelihood == "logistic" else 1  # logistic: a mean and a log-scale per pixel
        if self.cfg.arch == "conv":
            if self.cfg.downsample is None:
                self.cfg.downsample = auto_downsample(image_chw(self.cfg.image_shape)[1:])
            self.decoder = ConvDecoder(latent_dim + self._context_dim(), self.cfg.image_shape, self.cfg.hidden,
                                       per_pixel=per_pixel, act=activation, channels=self.cfg.channels,
                                       downsample=self.cfg.downsample)
        else:
            self.decoder = MLP(latent_dim + self._context_dim(), self.cfg.hidden, per_pixel * input_dim,
                               act=activation)
        if likelihood == "gaussian":
            log_sigma = torch.full((input_dim,), math.log(self.cfg.sigma))
            if learn_sigma:
                self.log_sigma = nn.Parameter(log_sigma)
            else:
                self.register_buffer("log_sigma", log_sigma)

    # -- structure the guides read ----------------------------------------------------
    @property
    def latent_sites(self) -> dict:
        """``{site name: event shape}`` of the latent sites a guide must cover."""
        return {self.latent_site: (self.cfg.latent_dim,)}

    @property
    def obs_shape(self) -> tuple:
        """``(D,)``, the event shape of the observation ``"x"``."""
        return (self.cfg.input_dim,)

    @property
    def encoder_trunk(self) -> Optional[dict]:
        """The encoder body pyrovi's guides build for this model: None (an MLP) or the conv trunk's options.

        ``{"arch": "conv", "image_shape": (C, H, W), "channels": c, "downsample": s}`` for
        ``arch="conv"`` (:class:`pyrovi.nets.ConvTrunk`, the decoder's mirror image).
        """
        if self.cfg.arch != "conv":
            return None
        return {"arch": "conv", "image_shape": image_chw(self.cfg.image_shape), "channels": self.cfg.channels,
                "downsample": self.cfg.downsample}

    def _context_dim(self) -> int:
        return 0

    def config(self) -> dict:
        """JSON-able options that rebuild this model (``pyrovi.models.build``)."""
        d = asdict(self.cfg)
        d["hidden"] = list(d["hidden"])
        d.pop("num_classes")
        if d["arch"] == "mlp":  # an MLP's config stays as it was before conv nets existed
            for k in ("arch", "channels", "downsample"):
                d.pop(k)
        return {"name": "vae", **d}

    @classmethod
    def from_config(cls, d: dict) -> "VAE":
        """Rebuild a model from its :meth:`config` dict (the ``"name"`` key is ignored)."""
        d = dict(d)
        d.pop("name", None)
        return cls(d.pop("input_dim"), **d)

    # -- the model --------------------------------------------------------------------
    def decoder_out(self, z: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Raw decoder output (logits or means) ``(..., D)`` for ``z`` of shape ``(..., L)``.

        The one place subclasses change what the decoder sees (``ConditionalVAE``
        appends the label); ``y`` is ignored here.
        """
        return self.decoder(z)

    def likelihood(self, out: torch.Tensor) -> dist.TorchDistribution:
        """p(x | z) from the decoder output ``out`` of shape ``(..., D)``; event dim 1.

        Bernoulli(logits=out) or Normal(out, sigma), as :mod:`pyrovi.distributions`'
        lean equivalents of ``dist.Bernoulli(logits=out).to_event(1)`` and
        ``dist.Normal(out, sigma).to_event(1)`` (same values, fewer passes over
        ``(S, B, D)``). Arguments are not checked per call: fit validates the
        data's range once (grey levels in [0, 1] are allowed: cross-entropy), and
        a non-finite decoder output surfaces as a non-finite loss, which fit reports.
        """
        if out.dtype in (torch.float16, torch.bfloat16):  # mixed precision: log-densities in float32
            out = out.float()
        if self.cfg.likelihood == "bernoulli":
            return BernoulliLogits(out)
        if self.cfg.likelihood == "logistic":
            D = self.cfg.input_dim
            return DiscretizedLogistic(out[..., :D], out[..., D:])
        return DiagonalNormal(out, self.log_sigma.exp(), validate_args=False)

    def prior(self, batch: int, like: torch.Tensor) -> dist.TorchDistribution:
        """p(z) = N(0, I_L), event dim 1, on ``like``'s device and dtype (``batch`` is left to the plate).

        A constant, so one instance per (device, dtype) is built and reused.
        """
        key = (like.device, like.dtype)
        prior = self._priors.get(key)
        if prior is None:
            prior = self._priors[key] = StandardNormal((self.cfg.latent_dim,), like.dtype, like.device)
        return prior

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the model on ``x`` of shape ``(B, D)``; returns the decoder output ``(..., B, D)``."""
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample(self.latent_site, self.prior(x.shape[0], x))  # (S?, B, L)
            out = self.decoder_out(z, y)  # (S?, B, D)
            pyro.sample(self.obs_site, self.likelihood(out), obs=x)
        return out

    def fast_log_joint(self, x: torch.Tensor, z: dict, y: Optional[torch.Tensor] = None) -> tuple:
        """The model of :meth:`forward` without Pyro's tracing, for :mod:`pyrovi.fastpath`.

        ``z = {"z": (S, B, L)}`` -> ``(log p(x|z) of shape (S, B), {"z": prior distribution})``.
        Must compute exactly what ``forward`` does (a test compares the two).
        """
        out = self.decoder_out(z[self.latent_site], y)  # (S, B, D)
        return self.likelihood(out).log_prob(x), {self.latent_site: self.prior(x.shape[0], x)}

    # -- uses -------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, z: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean of p(x | z) for ``z`` of shape ``(..., L)``: probabilities (Bernoulli) or means, ``(..., D)``.

        ``y`` (labels, shape ``(...,)``) is read only by conditional models.
        """
        out = self.decoder_out(z, y)
        if self.cfg.likelihood == "bernoulli":
            return torch.sigmoid(out)
        if self.cfg.likelihood == "logistic":
            return out[..., : self.cfg.input_dim].clamp(0.0, 1.0)
        return out

    @torch.no_grad()
    def sample(self, n: int, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Means of p(x|z) for ``n`` draws z ~ p(z); shape ``(n, D)``."""
        check_positive("n", n, integer=True)
        p = next(self.parameters())
        z = torch.randn(n, self.cfg.latent_dim, generator=generator, device=p.device, dtype=p.dtype)
        return self.decode(z)


def _input_dim(shape) -> int:
    if isinstance(shape, bool):
        raise ConfigError(f"shape must be the data's event shape (D,) or an int D, got {shape!r}")
    if isinstance(shape, int):
        return shape
    if isinstance(shape, (str, bytes)):
        raise ConfigError(f"shape must be the data's event shape (D,) or an int D, got {shape!r}")
    try:
        dims = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ConfigError(f"shape must be the data's event shape (D,) or an int D, got {shape!r}") from None
    if not dims:
        raise ConfigError("shape must not be empty")
    return math.prod(dims)
