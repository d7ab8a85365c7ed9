"""Held-out metrics of a trained run: ELBO, importance-weighted log p(x), reconstruction, KL, active units.

(Over 500 lines on purpose: the per-datapoint importance weights, their reduction to the
held-out metrics and the latent summary are one computation, shared with diagnostics.)

.. math::

    \\log p(x) \\approx \\log \\frac1K \\sum_{k=1}^K \\frac{p(x, z_k)}{q(z_k \\mid x)},\\quad z_k \\sim q(z|x)

(the IWAE bound with K particles; Burda et al. 2016), computed per datapoint
in chunks of particles whose log-sum-exps are merged, so memory stays bounded
at K = 5000. From the same draws:

- ``elbo`` :math:`= \\frac1K\\sum_k \\log w_k` and ``reconstruction``
  :math:`= \\frac1K\\sum_k \\log p(x \\mid z_k)`, both nats per datapoint;
- ``kl`` :math:`= \\frac1K\\sum_k \\log q(z_k|x) - \\log p(z_k)` (Monte Carlo, so
  ``elbo = reconstruction - kl`` holds exactly for the reported numbers);
- ``kl_per_dim`` per latent site: analytic
  :math:`\\mathrm{KL}(q(z_d|x)\\,\\|\\,p(z_d))` where q and p both factorize over
  dimensions and torch knows the pair (a DiagNormal guide over a N(0, I) prior);
  Monte Carlo per dimension where both factorize but no closed form is known;
  for a guide whose density does not factorize (flows, mixtures, full-covariance
  Gaussians) the KL of the Gaussian with q's marginal mean and variance, a
  lower bound on the marginal KL when the prior is Gaussian ("moment_matched");
- active units (Burda et al. 2016, Sec. 5.2): dimension d is active when
  :math:`\\mathrm{Cov}_x\\big(\\mathbb E_{q(z|x)}[z_d]\\big) > 0.01`, with
  :math:`\\mathbb E_q[z_d]` the guide distribution's own mean where it has one
  (Gaussians), else the mean of the K draws minus its Monte Carlo variance;
- ``mse``: mean over datapoints and data dimensions of
  :math:`(x - \\mathbb E[x \\mid z])^2`, :math:`z \\sim q(z|x)` (when the likelihood has a
  mean), estimated from the first chunk of draws only (a few hundred per datapoint);
- ``bits_per_dim`` :math:`= -\\log p(x) / (D \\ln 2)`.

All log-densities are in nats per datapoint unless a name says otherwise.
Per-datapoint metrics need every sample site inside the data plate (the
run's ``data_plate``: ``"data"`` unless ``fit(data_plate=...)`` named another;
found with :mod:`pyrovi.traces`); a model with a global latent gets a clear error (its weights do not factorize
over datapoints, so there is no per-datapoint log p(x) to estimate).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Optional

import pyro
import torch
from pyro import poutine
import torch.distributions as tdist
from pyro.distributions import Delta
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.poutine.util import site_is_subsample

from . import data as data_mod
from . import enumeration, inputs
from . import particles as particles_mod
from .progress import bar
from .run_files import update_metrics
from .errors import ConfigError, check_positive
from .traces import data_dim, guess_max_plate_nesting, in_data_plate, rng_neutral, trace_pair
from .weights import LogWeights, log_weights

__all__ = ["evaluate", "iw_log_likelihood", "hold_point_mass_globals", "prepare", "Tally", "site_matrix", "latent_summary", "per_datapoint_weights", "seeded",
           "ACTIVE_THRESHOLD", "KL_METHODS"]

#: Burda et al. (2016): a unit is active when Cov_x E_q[z_d] exceeds this.
ACTIVE_THRESHOLD = 0.01
#: how ``kl_per_dim`` was obtained, per latent site.
KL_METHODS = ("analytic", "monte_carlo", "moment_matched", "none")


# --------------------------------------------------------------------------- per-site tensors


def site_matrix(t: torch.Tensor, rank: int, data_dim: Optional[int], event_dims: int) -> torch.Tensor:
    """Reshape a site tensor (plate batch dims, then ``event_dims`` event dims) to ``(S|1, B|1, Dz)``.

    ``rank`` is the number of batch dims under the particle plate (particles
    leftmost), ``data_dim`` the (negative) dim of the data plate, or None. All
    dims but particles and data (other plates, the event) are flattened into Dz.
    """
    nb = t.dim() - event_dims
    t = t.reshape((1,) * (rank - nb) + t.shape)  # pad missing (broadcast) plate dims on the left
    if data_dim is None:
        t = t.unsqueeze(1)
    else:
        t = t.movedim(rank + data_dim, 1)
    return t.reshape(t.shape[0], t.shape[1], -1)  # (S|1, B|1, Dz)


def _unwrap(fn):
    """The elementwise base of ``fn`` through Independent / Masked wrappers (or ``fn`` itself)."""
    while isinstance(fn, (tdist.Independent, MaskedDistribution)):
        fn = fn.base_dist
    return fn


def _elementwise(base) -> bool:
    return not isinstance(base, Delta) and tuple(base.event_shape) == ()


class _SiteTally:
    """Per-datapoint summaries of one latent site over the particles: E_q[z|x] and KL per dimension.

    What does not depend on the draws (the distribution's own mean, an analytic KL) is read from
    the first chunk (averaged over its particles, which matters only when q's or p's parameters
    depend on other latents); only what needs draws (Monte Carlo KL, moments of guides without a
    known mean) is accumulated chunk by chunk. This keeps the per-chunk cost at the weights alone.
    """

    def __init__(self, name: str):
        self.name = name
        self.method: Optional[str] = None
        self.exact_mean = None  # (B, Dz) E_q[z|x] from the distribution, or None
        self.kl_analytic = None  # (B, Dz)
        self.sum_z = self.sum_z2 = self.sum_kl = None  # (B, Dz) running sums over draws
        self.k_draws = 0
        self.prior = None  # (loc, scale), each (B, Dz), for the moment-matched KL

    def add(self, q_site, p_site, rank: int, data_dim: Optional[int], s: int) -> None:
        value = q_site["value"]
        q_fn, p_fn = q_site["fn"], p_site["fn"]
        ev = len(q_fn.event_shape)
        mat = lambda t: site_matrix(t.expand(torch.broadcast_shapes(t.shape, value.shape)).detach(),  # noqa: E731
                                    rank, data_dim, ev).float()  # (S|1, B, Dz)
        q_base, p_base = _unwrap(q_fn), _unwrap(p_fn)
        if self.method is None:  # first chunk
            self.method = _kl_method(q_base, p_base)
            mean = _exact_mean(q_fn, value)
            if mean is not None:  # Gaussians, Delta, ...: no Monte Carlo noise in E_q[z|x]
                m = mat(mean)
                self.exact_mean = _particle_sum(m, m.shape[0]) / m.shape[0]
            if self.method == "analytic":
                kl = mat(tdist.kl_divergence(q_base, p_base))  # per element
                self.kl_analytic = _particle_sum(kl, kl.shape[0]) / kl.shape[0]
            elif self.method == "moment_matched":
                loc, scale = mat(p_base.loc), mat(p_base.scale)
                if not (torch.equal(loc, loc[:1].expand_as(loc)) and torch.equal(scale, scale[:1].expand_as(scale))):
                    self.method = "none"  # the prior depends on other latents: no fixed p(z_d) to compare with
                else:
                    self.prior = (loc[0], scale[0])
        if self.exact_mean is None or self.method == "moment_matched":
            z = mat(value)  # (S, B, Dz)
            self.sum_z = _acc(self.sum_z, z.sum(0))
            self.sum_z2 = _acc(self.sum_z2, (z * z).sum(0))
            self.k_draws += z.shape[0]
        if self.method == "monte_carlo":
            lr = mat(q_base.log_prob(value) - p_base.log_prob(value))  # per element
            self.sum_kl = _acc(self.sum_kl, _particle_sum(lr, s))

    def result(self, k: int) -> dict:
        """``{"mean": (B, Dz), "mean_noise": (B, Dz), "kl_per_dim": (B, Dz) or None, "method": str}``.

        ``mean`` is E_q[z|x] (the distribution's own, or the mean of the k draws); ``mean_noise``
        the variance of that estimate (0 when exact, Var_q(z_d|x) / k from the draws otherwise).
        """
        if self.k_draws:
            m_draws = self.sum_z / self.k_draws
            var = (self.sum_z2 / self.k_draws - m_draws * m_draws).clamp_min(0.0)
        if self.exact_mean is not None:
            mean, noise = self.exact_mean, torch.zeros_like(self.exact_mean)
        else:
            mean, noise = m_draws, var / max(1, self.k_draws - 1)
        kl = None
        if self.method == "analytic":
            kl = self.kl_analytic
        elif self.method == "monte_carlo":
            kl = self.sum_kl / k
        elif self.method == "moment_matched":
            loc, scale = self.prior
            v = var.clamp_min(1e-12)
            # KL(N(m, v) || N(loc, scale^2)); <= the marginal KL (a Gaussian has the largest entropy)
            kl = torch.log(scale) - 0.5 * torch.log(v) + (v + (m_draws - loc) ** 2) / (2 * scale ** 2) - 0.5
        return {"mean": mean, "mean_noise": noise, "kl_per_dim": kl, "method": self.method}


def _exact_mean(fn, value) -> Optional[torch.Tensor]:
    """``fn.mean`` broadcast to ``value``'s shape, or None when the distribution has no usable mean."""
    try:
        m = fn.mean
    except (NotImplementedError, AttributeError, ValueError, RuntimeError):
        return None
    if not torch.is_tensor(m) or not torch.isfinite(m).all():
        return None
    try:
        return m.expand(value.shape)
    except RuntimeError:
        return None


def _kl_method(q_base, p_base) -> str:
    if isinstance(q_base, Delta):
        return "none"  # a point mass (VQ-VAE's codebook): no per-dimension density to compare
    if _elementwise(q_base) and _elementwise(p_base):
        try:
            tdist.kl_divergence(q_base, p_base)
            return "analytic"
        except NotImplementedError:
            return "monte_carlo"
    if _elementwise(p_base) and isinstance(p_base, tdist.Normal):
        return "moment_matched"
    return "none"


def _particle_sum(m: torch.Tensor, s: int) -> torch.Tensor:
    """Sum over the particle dim of ``(S|1, B, Dz)``, counting a broadcast dim S times."""
    return m.sum(0) if m.shape[0] == s else m[0] * s


def _acc(total, new):
    return new if total is None else total + new


class Tally:
    """Per-datapoint running sums over chunks of particles for one batch of data.

    Feed it the :class:`~pyrovi.weights.LogWeights` of each chunk with :meth:`add`;
    :meth:`result` merges them. Memory is O(B * Dz), whatever K is.
    """

    def __init__(self, data_plate: str = "data"):
        self.data_plate = data_plate
        self.k = 0
        self.lse = self.sum_w = self.sum_lik = self.sum_kl = self.sum_sq = None  # (B,)
        self.lse2 = None  # (B,) log sum_k w_k^2, for the Monte-Carlo variance of the IWAE estimate
        self.n_obs = 0  # observed numbers per datapoint, for the MSE
        self.k_sq = 0  # draws the MSE is estimated from (the first chunk's)
        self.mse_ok = True
        self.sites: dict = {}

    def add(self, lw: LogWeights, rank: int) -> None:
        """Add one chunk of ``lw.log_w.shape[0]`` particles (per-datapoint weights ``(S, B)``)."""
        s = lw.log_w.shape[0]
        self.k += s
        self.lse = _logaddexp(self.lse, torch.logsumexp(lw.log_w, 0))  # (B,)
        self.lse2 = _logaddexp(self.lse2, torch.logsumexp(2.0 * lw.log_w, 0))  # (B,)
        self.sum_w = _acc(self.sum_w, lw.log_w.sum(0))
        self.sum_lik = _acc(self.sum_lik, lw.log_lik.sum(0))
        self.sum_kl = _acc(self.sum_kl, (lw.log_q - (lw.log_p - lw.log_lik)).sum(0))  # log q(z|x) - log p(z)
        for name, site in lw.guide_trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                continue
            p_site = lw.model_trace.nodes.get(name)
            if p_site is None:
                continue
            self.sites.setdefault(name, _SiteTally(name)).add(site, p_site, rank, self._data_dim(site), s)
        if self.mse_ok and self.sum_sq is None:
            # The squared error is estimated from the first chunk's draws only: a data-size pass per
            # chunk would cost ~25% of the whole evaluation, and a few hundred draws per datapoint
            # pin a mean squared error down far below its spread over datapoints.
            self._add_sq_error(lw, rank, s)

    def _data_dim(self, site) -> Optional[int]:
        return data_dim(site, self.data_plate)

    def _add_sq_error(self, lw: LogWeights, rank: int, s: int) -> None:
        total, count = None, 0
        if enumeration.summed_sites(lw.model_trace):  # the likelihood's mean is per enumerated value, not one
            self.mse_ok = False
            return
        for site in lw.model_trace.nodes.values():
            if site["type"] != "sample" or not site["is_observed"] or site["infer"].get("_deterministic"):
                continue
            try:
                mean = site["fn"].mean
            except (NotImplementedError, AttributeError, ValueError):
                mean = None
            if mean is None:
                self.mse_ok = False
                return
            ev = len(site["fn"].event_shape)
            err = (site["value"] - mean).float()
            err = site_matrix(err.mul_(err), rank, self._data_dim(site), ev)  # (S|1, B, D), squared in place
            count += err.shape[-1]
            total = _acc(total, _particle_sum(err.sum(-1, keepdim=True), s)[:, 0])  # (B,)
        if total is None or not torch.isfinite(total).all():
            self.mse_ok = False  # no observed site, or no finite mean (a Categorical over text)
            return
        self.n_obs = count
        self.sum_sq = total
        self.k_sq = s

    def mc_variance(self) -> Optional[torch.Tensor]:
        """``(B,)`` delta-method estimate of the Monte-Carlo variance of each datapoint's IWAE estimate.

        With :math:`\\hat L = \\log \\bar w`, :math:`\\bar w = \\frac1K \\sum_k w_k`, the delta method gives
        :math:`\\mathrm{Var}\\,\\hat L \\approx \\mathrm{Var}(w) / (K \\bar w^2)`; with the sample variance of the
        weights (denominator K-1) and normalized weights :math:`\\tilde w_k = w_k / \\sum_j w_j` this is

        .. math:: \\widehat{\\mathrm{Var}}\\,\\hat L = \\frac{K \\sum_k \\tilde w_k^2 - 1}{K - 1}
                  = \\frac{K / \\mathrm{ESS} - 1}{K - 1},

        computed in log space from the running ``lse`` and ``lse2``. None for K < 2 (no spread to
        estimate from one draw). Like every variance estimated from importance weights, it is too
        small when the weights are heavy-tailed (large PSIS k-hat): the draws then miss the mass
        that would show the spread.
        """
        k = self.k
        if k < 2:
            return None
        sum_sq_norm = torch.exp(self.lse2 - 2.0 * self.lse)  # sum_k w~_k^2 = 1/ESS, in [1/K, 1]
        return ((k * sum_sq_norm - 1.0) / (k - 1)).clamp(min=0.0)

    def result(self) -> dict:
        """Per-datapoint estimates (nats): ``log_likelihood``, ``elbo``, ``reconstruction``, ``kl``
        ``(B,)``; ``log_likelihood_mc_var`` ``(B,)`` or None (:meth:`mc_variance`); ``mse`` ``(B,)``
        or None; ``latents``: ``{site: {"mean", "kl_per_dim", "method"}}``."""
        k = self.k
        return {
            "log_likelihood": self.lse - math.log(k),
            "log_likelihood_mc_var": self.mc_variance(),
            "elbo": self.sum_w / k,
            "reconstruction": self.sum_lik / k,
            "kl": self.sum_kl / k,
            "mse": self.sum_sq / (self.k_sq * self.n_obs) if self.mse_ok and self.sum_sq is not None else None,
            "latents": {name: t.result(k) for name, t in self.sites.items()},
        }


def _logaddexp(a, b):
    return b if a is None else torch.logaddexp(a, b)


def _global_sites(lw: LogWeights, data_plate: str) -> list:
    names = []
    for tr in (lw.model_trace, lw.guide_trace):
        for name, site in tr.nodes.items():
            if site["type"] == "sample" and not site_is_subsample(site) and not site["infer"].get("_deterministic"):
                if not in_data_plate(site, data_plate) and name not in names:
                    names.append(name)
    return names


def _global_error(sites: list, data_plate: str, extra: str = "") -> ConfigError:
    return ConfigError(
        f"per-datapoint metrics (IWAE log p(x), k-hat) need every sample site inside pyro.plate({data_plate!r}, "
        f"...); this model has site(s) {sites} outside it (a global latent, or no data plate){extra}. Its weights do "
        "not factorize over datapoints, so there is no per-datapoint log p(x) to estimate: put per-datapoint "
        "latents inside the data plate (name it with fit(data_plate=...) if it is not called 'data'), give the "
        "global latents a point-mass guide (AutoDelta: evaluate then holds them at their values), or use "
        "the run's validation loss for models with global latents")


def hold_point_mass_globals(model, guide, args: tuple, kwargs: dict, data_plate: str = "data") -> tuple:
    """One trace, before any particles: ``(model, guide, held, exact)``.

    Sites outside the data plate (global latents) make the weights whole-batch: refused with a clear
    :class:`ConfigError`, unless the guide gives every one of them a point mass (``Delta``, as AutoDelta's MAP
    estimates). Those are held at the guide's values (conditioned on and hidden from the traces), so the
    metrics are per datapoint given them, e.g. :math:`\log p(x_n \mid \hat\theta)`; ``held`` names them.
    ``exact``: the guide draws nothing random besides them (every draw is the same: one particle suffices).
    """
    with poutine.block(), torch.no_grad(), rng_neutral():
        guide_tr, model_tr = trace_pair(model, guide, args, kwargs)
    def sites(tr):
        return [(n, st) for n, st in tr.nodes.items() if st["type"] == "sample" and not site_is_subsample(st)
                and not st["infer"].get("_deterministic")]

    # a guide-only global (an autoguide's joint latent) makes the Delta sites it feeds random: nothing is held then
    aux = [n for n, st in sites(guide_tr) if n not in model_tr.nodes and not in_data_plate(st, data_plate)]
    held, bad, exact = {}, [], not aux
    for name, site in sites(model_tr):
        if in_data_plate(site, data_plate):
            continue
        q = guide_tr.nodes.get(name)
        if not aux and not site["is_observed"] and q is not None and isinstance(_unwrap(q["fn"]), Delta):
            held[name] = q["value"].detach()
        else:
            bad.append(name)
    for name, site in sites(guide_tr):
        if name in held:
            continue
        if not in_data_plate(site, data_plate) and name not in bad:
            bad.append(name)
        if not isinstance(_unwrap(site["fn"]), Delta):
            exact = False
    if bad:
        extra = f"; the point-mass global(s) {sorted(held)} could be held, the others not" if held else ""
        raise _global_error(bad, data_plate, extra)
    if held:
        names = list(held)
        model = poutine.block(poutine.condition(model, data=held), hide=names)
        guide = poutine.block(poutine.condition(guide, data=held), hide=names)
    return model, guide, sorted(held), exact


def per_datapoint_weights(model, guide, *args, particles: int, max_plate_nesting: int, data_plate: str = "data",
                          vectorize: bool = True, **kwargs) -> LogWeights:
    """:func:`~pyrovi.weights.log_weights`, with a clear error when the weights do not factorize."""
    lw = log_weights(model, guide, *args, particles=particles, max_plate_nesting=max_plate_nesting,
                     data_plate=data_plate, vectorize=vectorize, **kwargs)
    if not lw.per_datapoint:
        raise _global_error(_global_sites(lw, data_plate), data_plate)
    return lw


@torch.no_grad()
def iw_log_likelihood(model, guide, *args, k: int = 5000, chunk: int = 500, max_plate_nesting=None,
                      data_plate: str = "data", vectorize: bool = True, **kwargs) -> dict:
    """Per-datapoint estimates from ``k`` importance samples drawn ``chunk`` at a time
    (one at a time, without a particle plate, when ``vectorize`` is False: see :mod:`pyrovi.particles`).

    Returns the dict of :meth:`Tally.result` (``log_likelihood``, ``elbo``,
    ``reconstruction``, ``kl`` of shape ``(B,)`` in nats, ``mse``, ``latents``)
    plus ``log_w``: the ``(k, B)`` log weights when ``k <= chunk``, else None.
    """
    check_positive("k", k, integer=True)
    check_positive("chunk", chunk, integer=True)
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
    rank = max_plate_nesting + 1
    tally = Tally(data_plate)
    log_w = None
    if not vectorize:
        chunk = 1
    while tally.k < k:
        s = min(chunk, k - tally.k)
        # Pyro's and torch's argument/support checks run on the first chunk; later chunks repeat the
        # same computation on new draws, so they skip them (about 5% of the time at K = 5000).
        with contextlib.nullcontext() if tally.k == 0 else pyro.validation_enabled(False):
            lw = per_datapoint_weights(model, guide, *args, particles=s, max_plate_nesting=max_plate_nesting,
                                       data_plate=data_plate, vectorize=vectorize, **kwargs)
        tally.add(lw, rank)
        log_w = lw.log_w
        del lw  # its traces hold data-size tensors (decoder outputs): free them before the next chunk
    out = tally.result()
    out["log_w"] = log_w if k <= chunk else None
    return out


def prepare(run, model, guide, args: tuple, kw: dict, mpn: int, vectorize: Optional[bool], where: str,
            particles: int) -> tuple:
    """Before any particles: the global-latent check (:func:`hold_point_mass_globals`), then whether the
    particles can be vectorized (:func:`pyrovi.particles.decide`; a run trained with them looped keeps looping).

    Returns ``(model, guide, held, exact, vectorize)``.
    """
    model, guide, held, exact = hold_point_mass_globals(model, guide, args, kw, run.data_plate)
    if exact and where == "evaluate":
        particles = 1  # evaluate draws one particle when every draw is the same
    if vectorize is None and getattr(run.objective, "vectorize", True) is False:
        particles_mod.announce(where, "found when the run was fit", particles)
        vectorize = False
    vec = particles_mod.decide(vectorize, model, guide, args, kw, mpn, run.data_plate, where, particles)
    return model, guide, held, exact, vec


def latent_summary(means: dict, kls: dict, methods: dict, noise: Optional[dict] = None) -> dict:
    """Per-site KL per dimension and active units from per-datapoint tensors.

    Args:
        means: ``{site: (N, Dz)}`` posterior means E_q[z|x_n] (exact or estimated).
        kls: ``{site: (N, Dz) or None}`` KL per dimension per datapoint (nats).
        methods: ``{site: method}``.
        noise: ``{site: (N, Dz)}`` variance of each estimated mean; its average is
            subtracted from the spread over x, so Monte Carlo means do not make
            inactive units look active (k draws of N(0, 1) alone give 1/k).

    Returns:
        ``{site: {"dims", "kl_per_dim" (list, nats, mean over datapoints) or None,
        "kl_method", "mean_variance" (list, Cov_x E_q[z_d]), "active" (count),
        "active_dims" (indices)}}``.
    """
    out = {}
    for name, m in means.items():
        n = m.shape[0]
        var = m.var(0, unbiased=True) if n > 1 else torch.zeros(m.shape[1])  # (Dz,)
        if noise is not None and noise.get(name) is not None:
            var = (var - noise[name].mean(0)).clamp_min(0.0)
        active = (var > ACTIVE_THRESHOLD).nonzero().flatten().tolist()
        kl = kls.get(name)
        out[name] = {
            "dims": int(m.shape[1]),
            "kl_per_dim": None if kl is None else [float(v) for v in kl.mean(0)],
            "kl_method": methods.get(name, "none"),
            "mean_variance": [float(v) for v in var],
            "active": len(active),
            "active_dims": active,
        }
    return out


@contextlib.contextmanager
def seeded(seed: Optional[int]):
    """Run the block with torch's global RNG seeded by ``seed``, restoring the caller's RNG after (None: as is)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def evaluate(run, data: Any = None, *, k: int = 5000, batch_size: int = 100, chunk: Optional[int] = None,
             save: bool = True, seed: Optional[int] = None, device: Any = None, progress: bool = False,
             vectorize: Optional[bool] = None) -> dict:
    """Held-out metrics of ``run`` on ``data`` (default: the run's test split).

    Args:
        run: a :class:`pyrovi.run.Run` (from ``fit`` or ``load_run``).
        data: a Dataset (its ``test`` split is used), a dataset name, a Split,
            a tensor/array ``(N, D)`` or an ``(x, y)`` pair.
        k: importance samples per datapoint for ``log_likelihood``.
        batch_size: datapoints per pass.
        chunk: particles per pass (default: bounded so a pass holds about
            2**24 numbers of data size, 64 MiB in float32, whatever k is).
        save: store the result under ``"test"`` in the run's ``metrics.json``.
        seed: seed for the draws (None: use torch's current RNG state).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` to move the run there first
            (:meth:`pyrovi.run.Run.to`); None keeps the run's device.
        progress: count the batches (:func:`pyrovi.progress.bar`: a bar on a terminal, whole lines in a log).
        vectorize: draw the k particles in vectorized chunks (True), one at a time (False, for models that
            cannot take a leading particle dim), or None: probe once (:mod:`pyrovi.particles`), warning in one
            line when they must be looped.

    Global latents: checked on one trace before any particles. A model with sites outside the data plate is
    refused, unless the guide gives each a point mass (AutoDelta): they are then held at their values and the
    metrics are given them (``held_globals`` names them; with nothing else random in the guide ``k`` is 1 and
    ``log_likelihood`` is exact, e.g. a mixture's :math:`\log p(x_n \mid \hat\theta)` with the assignment
    summed out, see :mod:`pyrovi.enumeration`).

    Returns:
        dict, nats per datapoint: ``elbo`` (mean of log w over k draws),
        ``log_likelihood`` (IWAE-k estimate of log p(x), averaged over the n datapoints)
        with two uncertainties that answer different questions.
        ``log_likelihood_mc_se`` is the Monte-Carlo standard error of that average: how
        much it would move with another ``seed`` (same data, same k), from the delta
        method on each datapoint's importance weights, sqrt(sum_i Var_i) / n with
        Var_i = (k / ESS_i - 1) / (k - 1) (:meth:`Tally.mc_variance`; 0 for point-mass
        guides, None for k=1); it leaves out the IWAE bias (the estimate is below
        log p(x) in expectation, by less as k grows) and is too small when the weights
        are heavy-tailed (check k-hat with ``diagnose``).
        ``log_likelihood_sd_over_data`` is the standard deviation of the per-datapoint
        estimates over the n datapoints (how much log p(x) varies from one input to
        another), and ``log_likelihood_se_over_data`` that over sqrt(n): the standard
        error of the average as an estimate of the mean over the data distribution
        (another test set of size n). ``log_likelihood_se`` is the former name of
        ``log_likelihood_se_over_data``, kept for compatibility; it is not the
        Monte-Carlo error.
        ``reconstruction`` (E_q log p(x|z)),
        ``kl`` (E_q[log q(z|x) - log p(z)], Monte Carlo), ``mse`` (squared error of
        the likelihood's mean, per data dimension; None without a mean),
        ``bits_per_dim``, ``active_units`` / ``latent_units`` (counts over all
        latent sites), ``latents`` (per site: ``kl_per_dim``, ``kl_method``,
        ``mean_variance``, ``active``; see :func:`latent_summary`), ``k``, ``n``.

    Raises:
        ConfigError: bad arguments, or a model with a latent outside the data plate.
    """
    check_positive("k", k, integer=True)
    check_positive("batch_size", batch_size, integer=True)
    if chunk is not None:
        check_positive("chunk", chunk, integer=True)
    if getattr(run.guide, "point_mass", False):
        # A point-mass guide (the VQ-VAE's Codebook: one-hot q) draws the same z for every particle, so
        # all k importance weights are equal and the IWAE estimate is the ELBO itself: one draw suffices.
        k = 1
    split = inputs.split(data, run)  # the held-out rows: data's test split, or the run's own
    data_mod.validate(split.x, name="evaluation data")
    if device is not None:
        run.to(device)
    dev = run.device
    dt = getattr(run, "dtype", torch.float32)
    D = split.x[0].numel()
    if chunk is None:
        chunk = max(1, min(k, (1 << 24) // max(1, min(batch_size, len(split)) * D)))
    from . import budget

    budget.check_rows(f"chunk={chunk}, batch_size={batch_size}", min(chunk, k) * min(batch_size, len(split)),
                      max(D, budget.widest(run.model, run.guide)), "use a smaller chunk or batch_size",
                      what="a layer's activations for a chunk of particles of a batch")
    model, guide = run.model, run.guide
    for m in (model, guide):
        if isinstance(m, torch.nn.Module):
            m.eval()
    per_point = {key: [] for key in ("log_likelihood", "elbo", "reconstruction", "kl", "mse",
                                     "log_likelihood_mc_var")}
    means: dict = {}
    noise: dict = {}
    kls: dict = {}
    methods: dict = {}
    held, vec, point = [], vectorize, False
    with run.scope(), seeded(seed), bar(-(-len(split) // batch_size), "evaluate", enabled=progress) as counter:
        mpn = run.objective.max_plate_nesting
        for i in range(0, len(split), batch_size):
            xb = split.x[i:i + batch_size].to(dev, dt)
            yb = None if split.y is None else split.y[i:i + batch_size].to(dev)
            args, kw = run.call_args(xb, yb)
            if mpn is None:
                mpn = guess_max_plate_nesting(model, guide, args, kw)
            bmodel, bguide, held, exact, vec = prepare(run, model, guide, args, kw, mpn, vec, "evaluate", k)
            if exact:
                k, point = 1, True  # the guide draws nothing random: every importance weight is the same
            r = iw_log_likelihood(bmodel, bguide, *args, k=k, chunk=chunk, max_plate_nesting=mpn,
                                  data_plate=run.data_plate, vectorize=vec, **kw)
            for key in per_point:
                per_point[key].append(None if r[key] is None else r[key].cpu())
            for name, st in r["latents"].items():
                means.setdefault(name, []).append(st["mean"].cpu())
                noise.setdefault(name, []).append(st["mean_noise"].cpu())
                kls.setdefault(name, []).append(None if st["kl_per_dim"] is None else st["kl_per_dim"].cpu())
                methods[name] = st["method"]
            counter.update(1)
    n = len(split)
    cat = {key: (None if any(v is None for v in vals) else torch.cat(vals)) for key, vals in per_point.items()}
    ll = cat["log_likelihood"]
    out = {key: float(cat[key].mean()) for key in ("log_likelihood", "elbo", "reconstruction", "kl")}
    # Two different uncertainties of the reported mean log_likelihood (see the docstring):
    # the spread of log p(x) over datapoints, and the Monte-Carlo error of the importance sampling.
    sd = float(ll.std()) if n > 1 else 0.0
    out["log_likelihood_sd_over_data"] = sd
    out["log_likelihood_se_over_data"] = sd / math.sqrt(n)
    out["log_likelihood_se"] = out["log_likelihood_se_over_data"]  # former name, kept for compatibility
    var = cat["log_likelihood_mc_var"]
    if getattr(run.guide, "point_mass", False) or point:
        out["log_likelihood_mc_se"] = 0.0  # every draw is the same z: the estimate is exact for this guide
    else:
        out["log_likelihood_mc_se"] = None if var is None else float(var.double().sum().sqrt() / n)
    out["mse"] = None if cat["mse"] is None else float(cat["mse"].mean())
    out["bits_per_dim"] = -out["log_likelihood"] / (D * math.log(2))
    latents = latent_summary(
        {name: torch.cat(v) for name, v in means.items()},
        {name: (None if any(t is None for t in v) else torch.cat(v)) for name, v in kls.items()},
        methods,
        {name: torch.cat(v) for name, v in noise.items()},
    )
    out["active_units"] = sum(s["active"] for s in latents.values())
    out["latent_units"] = sum(s["dims"] for s in latents.values())
    out["latents"] = latents
    out.update(k=k, n=n)
    if held:
        out["held_globals"] = held
    if vec is False:
        out["particles_vectorized"] = False
    if save and run.directory:
        run.metrics = update_metrics(run.directory, "test", out)  # under the run's lock, on a fresh copy
    return out
