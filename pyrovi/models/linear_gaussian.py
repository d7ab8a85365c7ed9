"""Linear-Gaussian latent variable model (probabilistic PCA / factor analysis with isotropic noise).

.. math::

    z \\sim \\mathcal N(0, I_L), \\qquad x \\mid z \\sim \\mathcal N(W z + b,\\ \\sigma^2 I_D)

Everything is known in closed form, which makes it the reference model for
checking inference:

.. math::

    p(x) = \\mathcal N(x;\\ b,\\ W W^\\top + \\sigma^2 I), \\qquad
    p(z \\mid x) = \\mathcal N\\big(\\Lambda^{-1} W^\\top (x - b) / \\sigma^2,\\ \\Lambda^{-1}\\big),
    \\quad \\Lambda = I + W^\\top W / \\sigma^2 .

A diagonal-Gaussian guide cannot represent a correlated posterior; the best
one (the mean-field optimum, precision-diagonal) falls short of log p(x) by
:math:`\\tfrac12(\\sum_i \\log \\Lambda_{ii} - \\log\\det\\Lambda)` nats per datapoint.
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from ..errors import ConfigError, check_positive

__all__ = ["LinearGaussian"]


class LinearGaussian(PyroModule):
    """x = W z + b + noise; latent site ``"z"`` ``(L,)``, observation ``"x"`` ``(D,)``.

    Args:
        W: loading matrix ``(D, L)``; random N(0, 1) entries (seeded) when None.
        b: offset ``(D,)``; zeros when None.
        sigma: observation noise std.
        input_dim: D, used when ``W`` is None.
        latent_dim: L, used when ``W`` is None.
        learn: make W, b trainable parameters (default: fixed buffers, so only a guide learns).
        seed: seeds the random W.
    """

    latent_site = "z"
    obs_site = "x"
    max_plate_nesting = 1
    uses_labels = False

    def __init__(self, W: Optional[torch.Tensor] = None, b: Optional[torch.Tensor] = None, *, sigma: float = 1.0,
                 input_dim: int = 5, latent_dim: int = 2, learn: bool = False, seed: int = 0):
        super().__init__()
        check_positive("sigma", sigma)
        if W is None:
            check_positive("input_dim", input_dim, integer=True)
            check_positive("latent_dim", latent_dim, integer=True)
            W = torch.randn(input_dim, latent_dim, generator=torch.Generator().manual_seed(seed))
        W = torch.as_tensor(W, dtype=torch.float32)
        if W.dim() != 2:
            raise ConfigError(f"W must have shape (D, L), got {tuple(W.shape)}")
        b = torch.zeros(W.shape[0]) if b is None else torch.as_tensor(b, dtype=torch.float32)
        if b.shape != (W.shape[0],):
            raise ConfigError(f"b must have shape ({W.shape[0]},), got {tuple(b.shape)}")
        self.sigma = float(sigma)
        self.learn = bool(learn)
        if learn:
            self.W, self.b = nn.Parameter(W.clone()), nn.Parameter(b.clone())
        else:
            self.register_buffer("W", W.clone())
            self.register_buffer("b", b.clone())

    @property
    def latent_sites(self) -> dict:
        """``{"z": (L,)}``: the latent site a guide must cover."""
        return {"z": (self.W.shape[1],)}

    @property
    def obs_shape(self) -> tuple:
        """``(D,)``, the event shape of the observation ``"x"``."""
        return (self.W.shape[0],)

    def config(self) -> dict:
        """JSON-able options, ``W`` and ``b`` included as nested lists, that rebuild this model."""
        return {"name": "linear_gaussian", "W": self.W.detach().cpu().tolist(), "b": self.b.detach().cpu().tolist(),
                "sigma": self.sigma, "learn": self.learn}

    @classmethod
    def from_config(cls, d: dict) -> "LinearGaussian":
        """Rebuild from :meth:`config` (``W`` ``(D, L)`` and ``b`` ``(D,)`` as lists)."""
        d = dict(d)
        d.pop("name", None)
        return cls(torch.tensor(d.pop("W")), torch.tensor(d.pop("b")), **d)

    def _prior(self, x: torch.Tensor) -> dist.TorchDistribution:
        zero = x.new_zeros(())
        return dist.Normal(zero, zero + 1.0).expand([self.W.shape[1]]).to_event(1)

    def _likelihood(self, z: torch.Tensor) -> dist.TorchDistribution:
        return dist.Normal(z @ self.W.T + self.b, self.sigma).to_event(1)  # mean (S?, B, D)

    def forward(self, x: torch.Tensor, y=None) -> torch.Tensor:
        """Run the model on ``x`` ``(B, D)``: z ~ N(0, I_L), x ~ N(W z + b, sigma^2 I_D); ``y`` is ignored."""
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self._prior(x))  # (S?, B, L)
            lik = self._likelihood(z)
            pyro.sample("x", lik, obs=x)
        return lik.mean

    def decode(self, z: torch.Tensor, y=None) -> torch.Tensor:
        """Mean of p(x | z), W z + b, ``(..., D)`` for ``z`` of shape ``(..., L)``; ``y`` is ignored."""
        return z @ self.W.T + self.b

    @torch.no_grad()
    def sample(self, n: int, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Means of p(x | z) for ``n`` draws z ~ N(0, I_L), ``(n, D)`` (the noise-free part, as a VAE's samples)."""
        check_positive("n", n, integer=True)
        z = torch.randn(n, self.W.shape[1], generator=generator, dtype=self.W.dtype).to(self.W.device)
        return self.decode(z)

    def fast_log_joint(self, x: torch.Tensor, z: dict, y=None) -> tuple:
        """``forward`` without Pyro's tracing (:mod:`pyrovi.fastpath`): ``(log p(x|z) (S, B), {"z": p(z)})``."""
        return self._likelihood(z["z"]).log_prob(x), {"z": self._prior(x)}

    # -- closed forms ---------------------------------------------------------------
    def marginal(self) -> dist.MultivariateNormal:
        """p(x) = N(b, W W^T + sigma^2 I)."""
        D = self.W.shape[0]
        cov = self.W @ self.W.T + self.sigma ** 2 * torch.eye(D, dtype=self.W.dtype, device=self.W.device)
        return dist.MultivariateNormal(self.b, covariance_matrix=cov)

    @torch.no_grad()
    def exact_log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per row, ``(N,)``, in nats."""
        return self.marginal().log_prob(x)

    def posterior_precision(self) -> torch.Tensor:
        """Lambda = I + W^T W / sigma^2, ``(L, L)``."""
        L = self.W.shape[1]
        return torch.eye(L, dtype=self.W.dtype, device=self.W.device) + self.W.T @ self.W / self.sigma ** 2

    @torch.no_grad()
    def exact_posterior(self, x: torch.Tensor) -> tuple:
        """``(mean (N, L), covariance (L, L))`` of p(z | x)."""
        cov = torch.linalg.inv(self.posterior_precision())
        mean = (x - self.b) @ self.W @ cov.T / self.sigma ** 2
        return mean, cov

    @torch.no_grad()
    def mean_field_gap(self) -> float:
        """log p(x) - best diagonal-Gaussian ELBO = (sum_i log Lambda_ii - log det Lambda) / 2, nats/datapoint."""
        lam = self.posterior_precision()
        return float(0.5 * (torch.log(torch.diagonal(lam)).sum() - torch.logdet(lam)))

    @torch.no_grad()
    def sample_data(self, n: int, *, seed: int = 0) -> torch.Tensor:
        """``n`` draws of x from the model, ``(n, D)``."""
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.W.shape[1], generator=g)
        return z @ self.W.T + self.b + self.sigma * torch.randn(n, self.W.shape[0], generator=g)
