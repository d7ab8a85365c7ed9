"""The VQ-VAE's generative model: a grid of discrete codes, a uniform prior over them, a conv decoder.

.. math::

    k_l \\sim \\mathrm{Uniform}\\{1..K\\},\\quad z_l = e_{k_l}\\ (l = 1..L), \\qquad
    x \\mid z \\sim p_\\theta(x \\mid \\mathrm{dec}(z))

The latent site ``"z"`` holds the *code vectors* ``(L, d)``, not the indices,
so the guide's straight-through vector reaches the decoder. Its prior
:class:`UniformCodebook` is a uniform mixture of point masses at the K
codebook vectors of each position; as a density with respect to counting
measure on the codebook it is :math:`1/K` per position, so
:math:`\\log p(z) = -L \\log K` for every code grid. The guide's one-hot
posterior (a ``Delta`` at the chosen codes, :class:`pyrovi.guides.Codebook`)
has density 1 on the same measure, hence

.. math::

    \\mathrm{KL}(q(z|x) \\,\\|\\, p(z)) = L \\log K, \\qquad
    \\mathrm{ELBO}(x) = \\log p(x \\mid z_q(x)) - L \\log K

(van den Oord, Vinyals & Kavukcuoglu 2017, "Neural Discrete Representation
Learning", sec. 3.1). The model owns the codebook ``(K, d)``; the guide reads
it, so there is one codebook, trained once.

Two layouts, both with data arriving flat:

- images ``(B, H*W)`` with ``image_shape=(H, W)``: a 2-D grid of
  ``L = (H/2^s)(W/2^s)`` codes, conv decoder, Bernoulli (logits) or Gaussian likelihood;
- text ``(B, T)`` character indices with ``vocab``: ``L = T/2^s`` codes, 1-D
  conv decoder, Categorical likelihood over the ``V = len(vocab)`` characters.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer.util import is_validation_enabled
from pyro.nn import PyroModule
from torch import nn

from ..convnets import ImageDecoder, TextDecoder, grid_shape
from ..errors import ConfigError, DataError, check_positive, lookup

__all__ = ["VQVAE", "VQVAEConfig", "UniformCodebook"]

IMAGE_LIKELIHOODS = ("bernoulli", "gaussian")


@dataclass
class VQVAEConfig:
    """Options of :class:`VQVAE` (stored in a run's ``config.json``)."""

    input_dim: int  # D: pixels per image, or characters per text item (T)
    num_codes: int = 512  # K, codebook size
    code_dim: int = 16  # d, size of one code vector
    downsample: int = 1  # s: stride-2 stages between data and code grid (L = D / 4^s images, T / 2^s text)
    channels: int = 64  # conv width of the decoder (the guide's encoder defaults to it too)
    likelihood: str = "bernoulli"  # images: "bernoulli" | "gaussian"; text: "categorical"
    sigma: float = 1.0  # Gaussian observation std (likelihood="gaussian")
    image_shape: Optional[tuple] = None  # (H, W): image layout
    vocab: Optional[str] = None  # text layout: the characters, index i <-> vocab[i]

    def validate(self) -> None:
        check_positive("input_dim", self.input_dim, integer=True)
        check_positive("num_codes", self.num_codes, integer=True)
        if self.num_codes < 2:
            raise ConfigError(f"num_codes must be at least 2, got {self.num_codes}")
        check_positive("code_dim", self.code_dim, integer=True)
        check_positive("downsample", self.downsample, integer=True, allow_zero=True)
        check_positive("channels", self.channels, integer=True)
        check_positive("sigma", self.sigma)
        if (self.image_shape is None) == (self.vocab is None):
            raise ConfigError("VQVAE needs exactly one layout: image_shape=(H, W) for images or vocab=<characters> "
                              f"for text; got image_shape={self.image_shape!r}, vocab given: {self.vocab is not None}")
        if self.vocab is not None:
            if not isinstance(self.vocab, str) or len(self.vocab) < 2 or len(set(self.vocab)) != len(self.vocab):
                raise ConfigError("vocab must be a string of at least 2 distinct characters (dataset.vocab)")
            if self.likelihood != "categorical":
                raise ConfigError(f"text data needs likelihood='categorical', got {self.likelihood!r}")
            grid_shape((self.input_dim,), self.downsample)
        else:
            lookup({k: k for k in IMAGE_LIKELIHOODS}, self.likelihood, "likelihood")
            if len(self.image_shape) != 2 or math.prod(self.image_shape) != self.input_dim:
                raise ConfigError(f"image_shape {self.image_shape} must be (H, W) with H*W = input_dim "
                                  f"{self.input_dim}")
            grid_shape(self.image_shape, self.downsample)


class UniformCodebook(dist.TorchDistribution):
    """Uniform prior over the codebook at each of L positions; event shape ``(L, d)``.

    ``sample`` draws indices uniformly and returns their vectors. ``log_prob``
    is the density with respect to counting measure on codebook vectors,
    :math:`-L \\log K` for any code grid; it does not check that the value is
    a codebook vector (the straight-through value equals one up to rounding).

    :param torch.Tensor codebook: ``(K, d)``.
    :param int length: L.
    """

    arg_constraints: dict = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = False

    def __init__(self, codebook: torch.Tensor, length: int, validate_args=None):
        self.codebook = codebook
        self.length = int(length)
        super().__init__(torch.Size(), torch.Size((self.length, codebook.shape[-1])), validate_args=validate_args)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        k = self.codebook.shape[0]
        idx = torch.randint(k, tuple(sample_shape) + (self.length,), device=self.codebook.device)
        return self.codebook.detach()[idx]  # (*sample_shape, L, d)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return value.new_full(value.shape[:-2], -self.length * math.log(self.codebook.shape[0]))


class VQVAE(PyroModule):
    """VQ-VAE generative model: latent site ``"z"`` of shape ``(L, d)``, observation ``"x"`` of shape ``(D,)``.

    ``forward(x)`` runs the model on a batch ``x`` ``(B, D)`` (images in [0, 1],
    or int64 character indices for text) inside ``pyro.plate("data", B)``;
    under vectorized particles ``z`` is ``(S, B, L, d)``. Log-densities in nats.

    Args:
        shape: the data's event shape ``(D,)`` (``dataset.shape``) or ``D``.
        num_codes: K. code_dim: d. downsample: stride-2 stages (see module doc).
        channels: decoder conv width.
        likelihood: ``"bernoulli"`` / ``"gaussian"`` (images), ``"categorical"`` (text, the default with ``vocab``).
        image_shape: ``(H, W)`` for images. vocab: the characters, for text.
    """

    latent_site = "z"
    obs_site = "x"
    max_plate_nesting = 1
    uses_labels = False
    default_guide = "codebook"  # what fit(guide=None) builds for it: q is the quantized encoder output

    def __init__(self, shape, num_codes: int = 512, *, code_dim: int = 16, downsample: int = 1,
                 channels: int = 64, likelihood: Optional[str] = None, sigma: float = 1.0, image_shape=None,
                 vocab: Optional[str] = None):
        super().__init__()
        from .vae import _input_dim

        if likelihood is None:
            likelihood = "categorical" if vocab is not None else "bernoulli"
        self.cfg = VQVAEConfig(
            input_dim=_input_dim(shape), num_codes=num_codes, code_dim=code_dim, downsample=downsample,
            channels=channels, likelihood=likelihood.lower() if isinstance(likelihood, str) else likelihood,
            sigma=float(sigma) if isinstance(sigma, (int, float)) and not isinstance(sigma, bool) else sigma,
            image_shape=tuple(image_shape) if image_shape is not None else None, vocab=vocab)
        self.cfg.validate()
        c = self.cfg
        if self.is_text:
            self.grid = grid_shape((c.input_dim,), c.downsample)
            self.decoder = TextDecoder(len(c.vocab), c.code_dim, c.channels, c.downsample)
        else:
            self.grid = grid_shape(c.image_shape, c.downsample)
            self.decoder = ImageDecoder(c.image_shape, c.code_dim, c.channels, c.downsample)
        # Codebook rows start small and spread (as in the paper's reference code, uniform +-1/K):
        # k-means initialisation or dead-code restarts (guide options) move them onto the data.
        self.codebook = nn.Parameter(torch.empty(c.num_codes, c.code_dim).uniform_(-1.0 / c.num_codes,
                                                                                      1.0 / c.num_codes))
        if c.likelihood == "gaussian":
            self.register_buffer("log_sigma", torch.full((c.input_dim,), math.log(c.sigma)))

    # -- structure the guides read ----------------------------------------------------
    @property
    def is_text(self) -> bool:
        """True for the character layout (``vocab`` set)."""
        return self.cfg.vocab is not None

    @property
    def num_codes(self) -> int:
        return self.cfg.num_codes

    @property
    def length(self) -> int:
        """L, the number of code positions."""
        return math.prod(self.grid)

    @property
    def latent_sites(self) -> dict:
        return {self.latent_site: (self.length, self.cfg.code_dim)}

    @property
    def obs_shape(self) -> tuple:
        return (self.cfg.input_dim,)

    def set_codebook_trainable(self, trainable: bool) -> None:
        """Make the codebook an ``nn.Parameter`` (trained by gradient) or a buffer (updated in place, e.g. EMA).

        Called by :class:`pyrovi.guides.Codebook`, which owns the update rule.
        Either way it is saved under the same ``state_dict`` key ``codebook``.
        """
        current = self.codebook
        if trainable == isinstance(current, nn.Parameter):
            return
        data = current.detach().clone()
        delattr(self, "codebook")
        if trainable:
            self.codebook = nn.Parameter(data)
        else:
            self.register_buffer("codebook", data)

    def config(self) -> dict:
        d = asdict(self.cfg)
        if d["image_shape"] is not None:
            d["image_shape"] = list(d["image_shape"])
        return {"name": "vqvae", **d}

    @classmethod
    def from_config(cls, d: dict) -> "VQVAE":
        d = dict(d)
        d.pop("name", None)
        return cls(d.pop("input_dim"), d.pop("num_codes", 512), **d)

    # -- the model --------------------------------------------------------------------
    def prior(self) -> UniformCodebook:
        """p(z): uniform over the K codes at each of the L positions."""
        return UniformCodebook(self.codebook, self.length)

    def likelihood(self, out: torch.Tensor) -> dist.TorchDistribution:
        """p(x | z) from decoder output: ``(..., D)`` logits/means (images) or ``(..., T, V)`` logits (text)."""
        if self.cfg.likelihood == "categorical":
            return dist.Categorical(logits=out).to_event(1)
        if self.cfg.likelihood == "bernoulli":
            # validate_args=False: grey levels in [0, 1] are allowed (cross-entropy), as in VAE.
            return dist.Bernoulli(logits=out, validate_args=False).to_event(1)
        return dist.Normal(out, self.log_sigma.exp()).to_event(1)

    def _observed(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_text:
            return x
        if is_validation_enabled() and x.numel():
            if x.is_floating_point() and not torch.equal(x, x.round()):
                raise DataError("text data must be integer character indices (dataset.vocab positions)")
            lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi >= len(self.cfg.vocab):
                raise DataError(f"character indices must lie in [0, {len(self.cfg.vocab)}); found [{lo}, {hi}] — "
                                "was the data indexed with a different vocabulary?")
        return x.long()

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the model on ``x`` ``(B, D)``; returns the decoder output ``(..., B, D)`` or ``(..., B, T, V)``."""
        obs = self._observed(x)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample(self.latent_site, self.prior())  # (S?, B, L, d)
            out = self.decoder(z)  # (S?, B, D) or (S?, B, T, V)
            pyro.sample(self.obs_site, self.likelihood(out), obs=obs)
        return out

    # -- uses -------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Mean of p(x|z) for code vectors ``(..., L, d)``: pixel probabilities/means ``(..., D)``,
        or per-character probabilities ``(..., T, V)`` for text."""
        out = self.decoder(z)
        if self.cfg.likelihood == "categorical":
            return out.softmax(-1)
        return torch.sigmoid(out) if self.cfg.likelihood == "bernoulli" else out

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices ``(..., L)`` -> data: image means ``(..., D)``, or the most likely characters
        ``(..., T)`` (int64) for text."""
        out = self.decode(self.codebook.detach()[codes.long()])
        return out.argmax(-1) if self.is_text else out

    @torch.no_grad()
    def sample(self, n: int, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Decode ``n`` code grids drawn from the *uniform* prior: ``(n, D)``.

        :mod:`pyrovi.priors` fits a learned prior over codes and samples from it."""
        check_positive("n", n, integer=True)
        codes = torch.randint(self.num_codes, (n, self.length), generator=generator).to(self.codebook.device)
        return self.decode_codes(codes)

    def text(self, x: torch.Tensor) -> list:
        """Character indices ``(N, T)`` -> N strings (text layout only)."""
        if not self.is_text:
            raise ConfigError("text() needs a text VQVAE (built with vocab=)")
        vocab = self.cfg.vocab
        return ["".join(vocab[i] for i in row) for row in x.long().tolist()]
