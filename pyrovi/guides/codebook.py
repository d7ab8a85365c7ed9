"""The VQ-VAE's guide: encoder, nearest codebook vector, straight-through estimator, a Delta site.

.. math::

    z_e = \\mathrm{enc}_\\phi(x) \\in \\mathbb R^{L \\times d}, \\quad
    k_l = \\arg\\min_k \\lVert z_{e,l} - e_k \\rVert^2, \\quad
    q(z \\mid x) = \\delta\\big(z - e_{k(x)}\\big)\\ \\text{(one-hot over codes)}

The sample is the straight-through value :math:`z_q = z_e + \\mathrm{sg}(e_k - z_e)`:
it equals :math:`e_k` going forward, and passes the decoder's gradient to the
encoder unchanged going back (:math:`\\partial z_q / \\partial z_e = I`).

How the VQ losses enter Pyro's objective. The ``Delta`` site's ``log_density``
is what Pyro's ``Trace_ELBO`` subtracts as :math:`\\log q(z|x)`. In training
mode it is set to the VQ penalty

.. math::

    \\log q := w\\,\\lVert \\mathrm{sg}(z_e) - e \\rVert^2 + \\beta\\,\\lVert z_e - \\mathrm{sg}(e) \\rVert^2

(codebook loss, weight :math:`w = 1`; commitment loss, :math:`\\beta = 0.25`),
so ``Trace_ELBO`` maximizes :math:`\\log p(x|z_q) - L\\log K - \\text{VQ penalty}`,
van den Oord et al.'s (2017) eq. 3 up to the constant. In eval mode
``log_density = 0``: the one-hot q has density 1 against counting measure on
the codebook, the prior :math:`1/K` per position, so the same Pyro trace gives
the ELBO itself, :math:`\\log p(x|z_q) - L\\log K`, exactly (this is what
``fit``'s validation loss, ``pyrovi.evaluate`` and
:func:`pyrovi.vq_evaluation.vq_terms` report; the penalties are reported
separately). Were the penalty kept in eval mode, every reported KL would be
off by it.

Gradient routing (tested): the decoder learns only from the reconstruction;
the encoder from the reconstruction (straight-through) and the commitment
term; the codebook only from the codebook term, or with ``ema_decay`` set not
by gradient at all but by exponential moving averages of the vectors
assigned to each code (van den Oord et al. 2017, appendix A.1; Razavi et al.
2019). The codebook itself lives in the model (``model.codebook``); this
guide owns its update rule and statistics (buffers, so they survive
``state_dict``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from ..convnets import ImageEncoder, TextEncoder
from ..errors import ConfigError, check_positive
from .base import in_parameter_probe, latent_sites

__all__ = ["Codebook", "CodebookConfig", "Quantized"]


@dataclass
class CodebookConfig:
    """Options of :class:`Codebook`. A feature is on when its weight or threshold is set.

    Conflicting settings raise :class:`pyrovi.ConfigError` (see :meth:`validate`).
    """

    beta: float = 0.25  # commitment weight: beta * ||z_e - sg(e)||^2 pulls the encoder to its code
    codebook_weight: Optional[float] = None  # weight of ||sg(z_e) - e||^2; None = 1. Not with ema_decay.
    ema_decay: Optional[float] = None  # EMA codebook updates (e.g. 0.99) instead of the codebook loss
    ema_eps: Optional[float] = None  # Laplace smoothing of EMA counts; None = 1e-5. Only with ema_decay.
    kmeans_init: bool = True  # set the codebook by k-means on the first training batch's z_e (False: keep init)
    kmeans_iters: Optional[int] = None  # Lloyd iterations of that k-means; None = 20. Only with kmeans_init.
    restart_dead: Optional[float] = None  # restart codes whose average use per batch falls below this
    usage_decay: float = 0.99  # decay of the moving average of code use per batch (restarts, reports)
    channels: Optional[int] = None  # encoder conv width; None = the model's channels

    def validate(self) -> None:
        check_positive("beta", self.beta, allow_zero=True)
        if self.codebook_weight is not None:
            check_positive("codebook_weight", self.codebook_weight, allow_zero=True)
            if self.ema_decay is not None:
                raise ConfigError("codebook_weight has no effect with ema_decay (EMA replaces the codebook loss); "
                                  "set one of them")
        if self.ema_decay is not None and not (isinstance(self.ema_decay, float) and 0 < self.ema_decay < 1):
            raise ConfigError(f"ema_decay must be a float in (0, 1) such as 0.99, got {self.ema_decay!r}")
        if self.ema_eps is not None:
            if self.ema_decay is None:
                raise ConfigError("ema_eps only applies to EMA updates; set ema_decay as well or drop ema_eps")
            check_positive("ema_eps", self.ema_eps)
        if self.kmeans_iters is not None:
            if not self.kmeans_init:
                raise ConfigError("kmeans_iters only applies with kmeans_init=True")
            check_positive("kmeans_iters", self.kmeans_iters, integer=True)
        if self.restart_dead is not None:
            check_positive("restart_dead", self.restart_dead)
        if not (isinstance(self.usage_decay, (int, float)) and 0 < self.usage_decay < 1):
            raise ConfigError(f"usage_decay must be in (0, 1), got {self.usage_decay!r}")
        if self.channels is not None:
            check_positive("channels", self.channels, integer=True)


class Quantized(NamedTuple):
    """Output of :meth:`Codebook.quantize` (one fixed record, whatever the options)."""

    z_q: torch.Tensor  # (B, L, d) straight-through code vectors (value e_k, gradient to z_e)
    codes: torch.Tensor  # (B, L) int64 nearest-code indices
    z_e: torch.Tensor  # (B, L, d) encoder output
    codebook_loss: torch.Tensor  # (B,) ||sg(z_e) - e||^2 summed over positions and dims
    commitment_loss: torch.Tensor  # (B,) ||z_e - sg(e)||^2 (unweighted)


def _param_only_trace() -> bool:
    """Whether this call only looks for parameters (``run.discover_params`` marks its probe with
    :func:`~pyrovi.guides.base.parameter_probe`): then it must not move the codebook (no k-means on two rows)."""
    return in_parameter_probe()


class Codebook(PyroModule):
    """VQ-VAE guide for :class:`pyrovi.models.VQVAE`: q(z|x) is a point mass at the nearest codes.

    ``forward(x)`` samples the site ``"z"`` ``(B, L, d)`` from a ``Delta`` inside
    ``pyro.plate("data", B)``; under vectorized particles every particle is
    the same draw (``point_mass = True``, so importance sampling with K
    particles gives back the ELBO). In training mode (and with gradients on)
    each call also updates the codebook statistics: EMA, k-means
    initialisation, dead-code restarts, per the options.

    Args:
        model: the VQVAE whose codebook this guide quantizes to (not registered as a submodule).
        beta, codebook_weight, ema_decay, ema_eps, kmeans_init, kmeans_iters,
        restart_dead, usage_decay, channels: see :class:`CodebookConfig`.

    With ``ema_decay`` set, the model's codebook becomes a buffer (it is then
    not a trainable parameter, and the optimizer never sees it).
    """

    point_mass = True

    def __init__(self, model, *, beta: float = 0.25, codebook_weight: Optional[float] = None,
                 ema_decay: Optional[float] = None, ema_eps: Optional[float] = None, kmeans_init: bool = True,
                 kmeans_iters: Optional[int] = None, restart_dead: Optional[float] = None,
                 usage_decay: float = 0.99, channels: Optional[int] = None):
        super().__init__()
        self.cfg = CodebookConfig(beta=beta, codebook_weight=codebook_weight, ema_decay=ema_decay, ema_eps=ema_eps,
                                  kmeans_init=bool(kmeans_init), kmeans_iters=kmeans_iters,
                                  restart_dead=restart_dead, usage_decay=usage_decay, channels=channels)
        self.cfg.validate()
        for attr in ("codebook", "grid", "is_text", "set_codebook_trainable"):
            if not hasattr(model, attr):
                raise ConfigError(f"the Codebook guide needs a VQ model (pyrovi.models.VQVAE); "
                                  f"{type(model).__name__} has no {attr!r}")
        self.site, shape = next(iter(latent_sites(model, "the Codebook guide").items()))
        self._model_ref = [model]  # a list, so the model (and its codebook) is not a submodule: one codebook
        mc = model.cfg
        width = self.cfg.channels or mc.channels
        if model.is_text:
            self.encoder = TextEncoder(len(mc.vocab), mc.code_dim, width, mc.downsample)
        else:
            self.encoder = ImageEncoder(mc.image_shape, mc.code_dim, width, mc.downsample)
        model.set_codebook_trainable(self.cfg.ema_decay is None)
        K, d = model.codebook.shape
        self.register_buffer("usage", torch.zeros(K))  # moving average of positions per batch on each code
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))  # training calls seen
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))  # k-means done
        if self.cfg.ema_decay is not None:
            # Counts start at 1 and sums at the initial vectors, so unused codes keep their vectors.
            self.register_buffer("ema_count", torch.ones(K))
            self.register_buffer("ema_sum", model.codebook.detach().clone())

    # ------------------------------------------------------------------ config
    @property
    def model(self):
        return self._model_ref[0]

    @property
    def vq_weights(self) -> tuple:
        """``(codebook_weight, beta)`` as used in the objective (codebook weight 0 under EMA)."""
        if self.cfg.ema_decay is not None:
            return 0.0, self.cfg.beta
        return (1.0 if self.cfg.codebook_weight is None else self.cfg.codebook_weight), self.cfg.beta

    def config(self) -> dict:
        """JSON-able options; defaults that were not set are left out."""
        d = {k: v for k, v in asdict(self.cfg).items() if v is not None}
        return {"name": "codebook", **d}

    # ------------------------------------------------------------------ quantization
    def encode_e(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output z_e ``(B, L, d)`` for ``x`` ``(B, D)``."""
        return self.encoder(x)

    def quantize(self, x: torch.Tensor, z_e: Optional[torch.Tensor] = None) -> Quantized:
        """Nearest codes and the VQ losses for ``x`` ``(B, D)`` (no codebook updates)."""
        if z_e is None:
            z_e = self.encode_e(x)  # (B, L, d)
        cb = self.model.codebook  # (K, d)
        with torch.no_grad():
            zd = z_e.detach()
            d2 = zd.pow(2).sum(-1, keepdim=True) - 2 * zd @ cb.detach().T + cb.detach().pow(2).sum(-1)  # (B, L, K)
            codes = d2.argmin(-1)  # (B, L)
        e = cb[codes]  # (B, L, d); a differentiable lookup: the codebook loss reaches the codebook
        codebook_loss = (z_e.detach() - e).pow(2).sum((-2, -1))  # (B,)
        commitment_loss = (z_e - e.detach()).pow(2).sum((-2, -1))  # (B,)
        # Straight-through: forward value e (up to rounding), gradient d z_q / d z_e = I, none to the codebook.
        z_q = z_e + (e - z_e).detach() if torch.is_grad_enabled() else e.detach()
        return Quantized(z_q, codes, z_e, codebook_loss, commitment_loss)

    def encode(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> dict:
        """``{site: (z_q, 0)}``: the point mass as (location, scale), the shape DiagNormal's ``encode`` has."""
        z_q = self.quantize(x).z_q
        return {self.site: (z_q, torch.zeros_like(z_q))}

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        updating = self.training and torch.is_grad_enabled() and not _param_only_trace()
        z_e = self.encode_e(x)  # (B, L, d)
        if updating and self.cfg.kmeans_init and not bool(self.initialized):
            self._kmeans_init(z_e.detach())
        q = self.quantize(x, z_e)
        if updating:
            self._update(q)
        if self.training:
            w, beta = self.vq_weights
            log_density = w * q.codebook_loss + beta * q.commitment_loss  # (B,): the VQ penalty, see module doc
        else:
            log_density = q.codebook_loss.new_zeros(q.codebook_loss.shape)  # one-hot q: log q = 0
        with pyro.plate("data", x.shape[0]):
            return pyro.sample(self.site, dist.Delta(q.z_q, log_density=log_density, event_dim=2))

    # ------------------------------------------------------------------ codebook updates
    @torch.no_grad()
    def _set_codes(self, idx: torch.Tensor, vectors: torch.Tensor) -> None:
        """Overwrite codebook rows ``idx`` with ``vectors`` (and keep the EMA statistics consistent)."""
        self.model.codebook[idx] = vectors
        if self.cfg.ema_decay is not None:
            self.ema_sum[idx] = vectors * self.ema_count[idx, None]

    @torch.no_grad()
    def _kmeans_init(self, z_e: torch.Tensor) -> None:
        """k-means of the batch's encoder vectors as the initial codebook (scikit-learn's KMeans)."""
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits

        pts = z_e.reshape(-1, z_e.shape[-1])  # (B*L, d)
        K = self.model.codebook.shape[0]
        seed = int(torch.randint(2**31 - 1, ()))
        if pts.shape[0] >= K:
            km = KMeans(n_clusters=K, n_init=1, max_iter=self.cfg.kmeans_iters or 20, random_state=seed)
            with threadpool_limits(1):  # one batch of vectors: threads cost more than they save
                centers = torch.as_tensor(km.fit(pts.double().cpu().numpy()).cluster_centers_, dtype=pts.dtype)
        else:  # fewer vectors than codes: every vector is a centre, the rest are jittered copies
            extra = pts[torch.randint(pts.shape[0], (K - pts.shape[0],))]
            centers = torch.cat([pts, extra + 1e-3 * pts.std() * torch.randn_like(extra)]).cpu()
        self._set_codes(torch.arange(K, device=pts.device), centers.to(pts.device))
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update(self, q: Quantized) -> None:
        """One training call's statistics: usage average, EMA codebook, dead-code restarts."""
        K = self.model.codebook.shape[0]
        flat_codes = q.codes.reshape(-1)  # (B*L,)
        flat_z = q.z_e.detach().reshape(-1, q.z_e.shape[-1])  # (B*L, d)
        counts = torch.bincount(flat_codes, minlength=K).to(flat_z.dtype)  # (K,)
        if int(self.updates) == 0:
            self.usage.copy_(counts)
        else:
            self.usage.mul_(self.cfg.usage_decay).add_(counts, alpha=1 - self.cfg.usage_decay)
        self.updates.add_(1)
        if self.cfg.ema_decay is not None:
            g, eps = self.cfg.ema_decay, self.cfg.ema_eps or 1e-5
            sums = torch.zeros_like(self.ema_sum).index_add_(0, flat_codes, flat_z)  # (K, d)
            self.ema_count.mul_(g).add_(counts, alpha=1 - g)
            self.ema_sum.mul_(g).add_(sums, alpha=1 - g)
            n = self.ema_count.sum()
            smoothed = (self.ema_count + eps) / (n + K * eps) * n  # Laplace smoothing: no division by ~0
            self.model.codebook.copy_(self.ema_sum / smoothed[:, None])
        if self.cfg.restart_dead is not None:
            dead = (self.usage < self.cfg.restart_dead).nonzero().squeeze(-1)  # (n_dead,)
            if dead.numel():
                pick = torch.randint(flat_z.shape[0], (dead.numel(),), device=flat_z.device)
                self._set_codes(dead, flat_z[pick])
                # Twice the threshold: ~70 calls at usage_decay 0.99 before an unused restart is restarted again.
                self.usage[dead] = 2 * self.cfg.restart_dead
                if self.cfg.ema_decay is not None:
                    self.ema_count[dead] = 1.0
                    self.ema_sum[dead] = flat_z[pick]
