"""Did variational inference work? Posterior draws as ArviZ ``InferenceData``, PSIS k-hat, ESS, collapse.

(Just over 500 lines: one idea — "can q be trusted?" — from the draws to the InferenceData,
its summary and its netCDF file; the per-datapoint weights it shares live in evaluation.)

For chosen datapoints :math:`x_n`, :func:`diagnose` draws S particles
:math:`z_{n,s} \\sim q(z \\mid x_n)` and keeps their log importance weights

.. math::

    \\log w_{n,s} = \\log p(x_n, z_{n,s}) - \\log q(z_{n,s} \\mid x_n).

If q were the exact posterior every weight would equal :math:`p(x_n)`. How
far they are from that is read off their right tail: Pareto-smoothed
importance sampling (PSIS, Vehtari et al. 2024) fits a generalized Pareto
distribution to the largest weights, and its shape :math:`\\hat k` says how
many moments the weights have. Yao et al. (2018) use it to judge a
variational approximation: :math:`\\hat k < 0.5` good, :math:`0.5 \\le \\hat k
\\le 0.7` fair, :math:`\\hat k > 0.7` not trustworthy (importance sampling
from q would need impractically many draws; q is much narrower than the
posterior somewhere). The fit is ArviZ's (:func:`arviz.psislw`); pyrovi only
supplies the weights.

With S draws the estimate is reliable only for :math:`\\hat k < 1 - 1/\\log_{10} S`
(Vehtari et al. 2024, Sec. 3); the 0.7 band edge therefore needs
:math:`S \\ge 10^{1/0.3} \\approx 2155` draws, and :func:`diagnose` warns below.

Importance-sampling effective sample size (Kong 1992) per datapoint:
:math:`\\mathrm{ESS}_n = 1 / \\sum_s \\bar w_{n,s}^2` with normalized weights
:math:`\\bar w`; it is S for exact q and near 1 when one draw dominates.

Posterior collapse: a latent unit that q ignores has :math:`q(z_d|x) \\approx
p(z_d)` for every x, so its KL is about 0 and its posterior mean does not vary
with x (inactive in the sense of Burda et al. 2016: :math:`\\mathrm{Cov}_x
\\mathbb E_q[z_d] \\le 0.01`). :func:`diagnose` warns when a unit is inactive and
its KL is below 0.01 nats.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
from pyro.poutine.util import site_is_subsample

from . import inputs
from .run_files import update_metrics
from .errors import ConfigError, check_positive
from .progress import bar
from .evaluation import Tally, latent_summary, per_datapoint_weights, prepare, seeded
from .traces import data_dim, guess_max_plate_nesting, in_data_plate

__all__ = [
    "diagnose",
    "summarize",
    "DiagnosticsSummary",
    "DiagnosticWarning",
    "PosteriorCollapseWarning",
    "FewParticlesWarning",
    "khat_bands",
    "is_ess",
    "save_netcdf",
    "load_netcdf",
    "KHAT_GOOD",
    "KHAT_BAD",
    "KL_COLLAPSE", "KL_TOTAL_COLLAPSE",
    "min_particles",
    "posterior_means",
]

KHAT_GOOD = 0.5  # Yao et al. (2018): below, q is good for importance sampling
KHAT_BAD = 0.7  # above, q is not trustworthy
KL_COLLAPSE = 0.01  # nats; a unit with less KL (and no variation of its mean) is collapsed
KL_TOTAL_COLLAPSE = 0.05  # nats per latent unit: a total KL below this times the units is a (near) collapse
SUMMARY_ATTR = "pyrovi_summary"
FLAT_LOG_W = 1e-3  # nats; log weights of one datapoint spread less than this are "all equal"


class DiagnosticWarning(UserWarning):
    """Base class of the warnings :func:`diagnose` issues."""


class PosteriorCollapseWarning(DiagnosticWarning):
    """Some latent units carry no information about x (q(z_d|x) ≈ p(z_d))."""


class FewParticlesWarning(DiagnosticWarning):
    """Too few particles for k-hat to be trusted up to the 0.7 band edge."""


def min_particles(khat: float = KHAT_BAD) -> int:
    """Smallest S for which :math:`\\hat k` up to ``khat`` is reliable: :math:`S \\ge 10^{1/(1-k)}`."""
    return int(math.ceil(10 ** (1.0 / (1.0 - khat))))


def khat_threshold(particles: int) -> float:
    """Sample-size dependent threshold :math:`\\min(1 - 1/\\log_{10} S, 0.7)` (Vehtari et al. 2024)."""
    if particles < 2:
        return -math.inf
    return min(1.0 - 1.0 / math.log10(particles), KHAT_BAD)


def khat_bands(khat: Sequence[float]) -> dict:
    """Counts of datapoints per band: ``{"good": k < 0.5, "fair": 0.5 <= k <= 0.7, "bad": k > 0.7}``.

    A non-finite k-hat (ArviZ's answer when the tail has fewer than 5 distinct
    weights) counts as bad unless all weights are equal (then it is set to -inf: exact q).
    """
    k = np.asarray(khat, dtype=float)
    return {"good": int(np.sum(k < KHAT_GOOD)),
            "fair": int(np.sum((k >= KHAT_GOOD) & (k <= KHAT_BAD))),
            "bad": int(np.sum((k > KHAT_BAD) | np.isnan(k)))}


def is_ess(log_w: np.ndarray) -> np.ndarray:
    """Importance-sampling ESS (Kong 1992) per row of ``log_w`` ``(N, S)``: ``1 / sum_s wbar_s^2``, in draws."""
    lw = log_w - log_w.max(-1, keepdims=True)
    w = np.exp(lw)
    w /= w.sum(-1, keepdims=True)
    return 1.0 / np.sum(w * w, -1)


def _arviz():
    """ArviZ, imported on first use (slow import), without its banner about a coming refactor."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="arviz")
        import arviz

    return arviz


def _psis_khat(log_w: np.ndarray) -> np.ndarray:
    """k-hat per row of ``log_w`` ``(N, S)`` from ArviZ's PSIS (no Pareto fit of our own)."""
    az = _arviz()
    lw = np.asarray(log_w, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # ArviZ's fit on near-flat tails
        _, k = az.psislw(lw, reff=1.0)
    k = np.asarray(k, dtype=float).reshape(lw.shape[0])
    # Weights equal up to float rounding (q is the posterior): the "tail" is a handful of rounding
    # levels, ArviZ's fit is meaningless there (often inf for ties). Weights bounded within a factor
    # e^FLAT_LOG_W make importance sampling exact for practical purposes: report -inf (good).
    flat = (lw.max(-1) - lw.min(-1)) <= FLAT_LOG_W
    k[flat] = -np.inf
    return k


@dataclass
class DiagnosticsSummary:
    """What :func:`diagnose` found, JSON-able (stored in ``idata.attrs`` and the run's ``metrics.json``).

    ``khat_bands`` counts datapoints with k-hat < 0.5 (good), 0.5-0.7 (fair), > 0.7 (bad);
    ``log_likelihood`` and ``elbo`` are means over the diagnosed datapoints in nats
    (IWAE with ``particles`` draws, and the mean log weight); ``ess_*`` are in draws.
    """

    n: int
    particles: int
    khat_bands: dict
    khat_max: float
    khat_median: float
    khat_threshold: float
    ess_mean: float
    ess_min: float
    log_likelihood: float
    elbo: float
    active_units: int
    latent_units: int
    latents: dict
    collapsed: dict = field(default_factory=dict)  # site -> collapsed dims
    warnings: list = field(default_factory=list)
    point_mass: bool = False  # q(z|x) is a point mass (Delta, Codebook): equal weights, no k-hat
    kl: Optional[float] = None  # mean total KL(q(z|x) || p(z)) over the datapoints, Monte Carlo (nats)

    def to_dict(self) -> dict:
        """Plain JSON types; non-finite floats become None."""
        return _json_safe(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "DiagnosticsSummary":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def to_markdown(self) -> str:
        """The summary as a Markdown fragment (tables and a warning list)."""
        b = self.khat_bands
        pct = lambda c: f"{100.0 * c / max(1, self.n):.0f}%"  # noqa: E731
        if self.point_mass:
            lines = [f"{self.n} datapoints. q(z|x) is a point mass (a Delta or codebook guide): every draw is "
                     "the same z, all importance weights are equal, so PSIS k-hat and the importance-sampling "
                     "ESS do not apply, and the \"log p(x)\" below is log p(x, z) at that one z, not a bound "
                     "on log p(x).", "",
                     f"- log p(x, z) at the point: {self.log_likelihood:.4f} nats",
                     f"- active units (Cov_x E_q[z_d] > 0.01): {self.active_units} of {self.latent_units}", ""]
            lines += (["**Warnings**", ""] + [f"- {w}" for w in self.warnings] + [""] if self.warnings
                      else ["No warnings.", ""])
            return "\n".join(lines)
        lines = [f"{self.n} datapoints, {self.particles} draws each from q(z|x).", "",
                 "| PSIS k-hat band | datapoints | share |", "| --- | --- | --- |",
                 f"| good (k < {KHAT_GOOD}) | {b['good']} | {pct(b['good'])} |",
                 f"| fair ({KHAT_GOOD} <= k <= {KHAT_BAD}) | {b['fair']} | {pct(b['fair'])} |",
                 f"| bad (k > {KHAT_BAD}) | {b['bad']} | {pct(b['bad'])} |", "",
                 f"- k-hat median {_f(self.khat_median)}, max {_f(self.khat_max)}; reliable below "
                 f"{_f(self.khat_threshold)} with {self.particles} draws",
                 f"- importance-sampling ESS: mean {self.ess_mean:.1f}, min {self.ess_min:.1f} "
                 f"of {self.particles} draws",
                 f"- IWAE log p(x) with {self.particles} draws: {self.log_likelihood:.4f} nats; "
                 f"ELBO {self.elbo:.4f} nats",
                 f"- active units (Cov_x E_q[z_d] > 0.01): {self.active_units} of {self.latent_units}"
                 + ("" if self.kl is None else f"; total KL(q(z|x) || p(z)) {self.kl:.3f} nats"), ""]
        if self.warnings:
            lines += ["**Warnings**", ""] + [f"- {w}" for w in self.warnings] + [""]
        else:
            lines += ["No warnings.", ""]
        return "\n".join(lines)


def _json_safe(v):
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def _f(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and math.isfinite(v) else str(v)


def summarize(idata) -> DiagnosticsSummary:
    """The :class:`DiagnosticsSummary` stored in an ``InferenceData`` made by :func:`diagnose`."""
    raw = getattr(idata, "attrs", {}).get(SUMMARY_ATTR)
    if raw is None:
        raise ConfigError("this InferenceData was not made by pyrovi.diagnose (no pyrovi_summary attribute)")
    return DiagnosticsSummary.from_dict(json.loads(raw))


# --------------------------------------------------------------------------- draws


def _draws(value: torch.Tensor, rank: int, data_dim: Optional[int], event_shape: tuple,
           s: int) -> Optional[torch.Tensor]:
    """``(S, B, *event_shape)`` draws of a site (or ``(S, *rest)`` without a data plate); None if not per draw."""
    nb = value.dim() - len(event_shape)
    if nb < 0:
        return None
    v = value.reshape((1,) * (rank - nb) + value.shape)
    if v.shape[0] != s:
        return None  # does not depend on the particles: not a posterior quantity
    if data_dim is None:
        return v.reshape(s, *v.shape[rank:]) if all(d == 1 for d in v.shape[1:rank]) else v
    v = v.movedim(rank + data_dim, 1)
    rest = v.shape[2:rank]
    if all(d == 1 for d in rest):
        return v.reshape(v.shape[0], v.shape[1], *v.shape[rank:])
    return v.reshape(v.shape[0], v.shape[1], -1)


def _deterministic_draws(site, rank: int, data_plate: str, s: int, b: int) -> Optional[torch.Tensor]:
    # pyro.deterministic's default event_dim is the whole value, so the plate layout is read from the
    # value itself: leading dims (particles, ..., data) as the plates put them.
    v = site["value"].detach()
    dd = data_dim(site, data_plate)
    if v.dim() < rank or v.shape[0] != s:
        return None
    if dd is not None and v.shape[rank + dd] != b:
        return None
    return _draws(v, rank, dd, tuple(v.shape[rank:]), s)


@torch.no_grad()
def diagnose(run, data: Any = None, *, n: int = 100, particles: int = 2500, indices: Optional[Sequence[int]] = None,
             chunk: Optional[int] = None, seed: int = 0, save: bool = True, warn: bool = True,
             max_deterministic: int = 10_000_000, progress: bool = False, vectorize: Optional[bool] = None):
    """Posterior draws of ``run``'s guide for chosen datapoints, as ``arviz.InferenceData``, with PSIS k-hat.

    Args:
        run: a :class:`pyrovi.run.Run`.
        data: as for :func:`pyrovi.evaluate` (default: the run's test split).
        n: how many datapoints to diagnose (the first ``n`` of the split) when
            ``indices`` is not given.
        particles: S draws per datapoint; k-hat up to 0.7 needs S >= 2155 (else a warning).
        indices: explicit datapoint indices into the split.
        chunk: particles per pass (default: about 2**24 numbers of data size per pass).
        seed: seed of the draws (the caller's RNG state is restored).
        save: store the summary under ``"diagnostics"`` in the run's ``metrics.json``.
        warn: issue :class:`PosteriorCollapseWarning` / :class:`FewParticlesWarning`.
        max_deterministic: deterministic sites with more numbers than this are left out.
        progress: show progress over the chunks of particles (:func:`pyrovi.progress.bar`:
            a tqdm bar on a terminal, whole lines in a log).
        vectorize: as for :func:`pyrovi.evaluate`: draw the particles vectorized, one at a time (False), or
            probe (None). Global latents are checked, and point-mass ones held, before any particles.

    Returns:
        ``arviz.InferenceData`` with groups

        - ``posterior``: each latent site ``(chain=1, draw=S, datapoint, <site>_dim_i...)``
          and the model's deterministic sites;
        - ``log_likelihood``: log p(x|z) in nats, ``(chain, draw, datapoint)``, named after the observed site;
        - ``sample_stats``: ``log_weight`` = log p(x,z) - log q(z|x), ``log_joint``, ``log_q``
          ``(chain, draw, datapoint)``; per datapoint ``pareto_k`` (PSIS k-hat), ``ess``
          (importance-sampling ESS, draws) and ``iw_log_likelihood`` (IWAE-S, nats);
        - ``observed_data``: the observed sites' values; ``constant_data``: ``label`` when known.

        ``idata.attrs["pyrovi_summary"]`` holds the :class:`DiagnosticsSummary` as JSON
        (:func:`summarize` reads it back).
    """
    import xarray as xr

    az = _arviz()
    check_positive("n", n, integer=True)
    check_positive("particles", particles, integer=True)
    if particles < 2:
        raise ConfigError(f"particles must be >= 2 for importance diagnostics, got {particles}")
    split = inputs.split(data, run)  # the held-out rows: data's test split, or the run's own
    N = len(split)
    if indices is None:
        idx = torch.arange(min(n, N))
    else:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if idx.numel() == 0 or idx.dim() != 1 or int(idx.min()) < 0 or int(idx.max()) >= N:
            raise ConfigError(f"indices must be a non-empty list of positions in [0, {N}), got {list(indices)[:10]}")
    x_sel = split.x[idx]
    y_sel = None if split.y is None else split.y[idx]
    B_all = x_sel.shape[0]
    D = x_sel[0].numel()
    if chunk is None:
        chunk = max(1, min(particles, (1 << 24) // max(1, B_all * D)))
    check_positive("chunk", chunk, integer=True)
    from . import budget

    latent = (run.config.get("model") or {}).get("latent_dim") if isinstance(run.config, dict) else None
    L = latent if isinstance(latent, int) and not isinstance(latent, bool) else budget.widest(run.guide)
    budget.check_rows(f"particles={particles}", particles * B_all, L + 4, "use fewer particles or a smaller n",
                      what=f"the kept draws ({particles} particles x {B_all} datapoints x ({L} latents + 4 log "
                           "densities))")
    budget.check_rows(f"chunk={chunk}", chunk * B_all, max(D, budget.widest(run.model, run.guide)),
                      "use a smaller chunk", what="a layer's activations for a chunk of particles")

    model, guide, dev = run.model, run.guide, run.device
    for m in (model, guide):
        if isinstance(m, torch.nn.Module):
            m.eval()
    # the calling rule of fit and evaluate: y when the model takes it, the run's model_kwargs always
    args, kw = run.call_args(x_sel.to(dev, run.dtype), None if y_sel is None else y_sel.to(dev))
    plate = run.data_plate

    latent: dict = {}  # name -> list of (s, B, ...) chunks
    per_point: dict = {}  # name -> has a datapoint dim
    determ: dict = {}
    skipped: list = []
    stats = {"log_weight": [], "log_likelihood": [], "log_joint": [], "log_q": []}
    observed: dict = {}
    tally = Tally(plate)
    with run.scope(), seeded(seed):
        mpn = run.objective.max_plate_nesting
        if mpn is None:
            mpn = guess_max_plate_nesting(model, guide, args, kw)
        model, guide, _, _, vec = prepare(run, model, guide, args, kw, mpn, vectorize, "diagnose", particles)
        if not vec:
            chunk = 1
        rank = mpn + 1
        done = 0
        counter = bar(particles, "diagnose", enabled=progress, unit="draw")
        while done < particles:
            s = min(chunk, particles - done)
            lw = per_datapoint_weights(model, guide, *args, particles=s, max_plate_nesting=mpn, data_plate=plate,
                                       vectorize=vec, **kw)
            tally.add(lw, rank)
            stats["log_weight"].append(lw.log_w.cpu())  # (s, B)
            stats["log_likelihood"].append(lw.log_lik.cpu())
            stats["log_joint"].append(lw.log_p.cpu())
            stats["log_q"].append(lw.log_q.cpu())
            for name, site in lw.guide_trace.nodes.items():
                if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                    continue
                dd = data_dim(site, plate)
                ev = tuple(site["fn"].event_shape)
                d = _draws(site["value"].detach(), rank, dd, ev, s)
                if d is not None:
                    latent.setdefault(name, []).append(d.cpu())
                    per_point[name] = dd is not None
            for name, site in lw.model_trace.nodes.items():
                if site["type"] != "sample" or not site["is_observed"]:
                    continue
                if site["infer"].get("_deterministic"):
                    if name in skipped:
                        continue
                    d = _deterministic_draws(site, rank, plate, s, B_all)
                    if d is None or d[0].numel() * particles > max_deterministic:
                        skipped.append(name)
                        determ.pop(name, None)
                        continue
                    determ.setdefault(name, []).append(d.cpu())
                    per_point[name] = in_data_plate(site, plate)
                elif name not in observed:
                    observed[name] = site["value"].detach().cpu()
            done += s
            counter.update(s)
        counter.close()

    st = {k: torch.cat(v).T.contiguous().double().numpy() for k, v in stats.items()}  # (B, S)
    log_w = st["log_weight"]
    khat = _psis_khat(log_w)
    ess = is_ess(log_w)
    r = tally.result()
    lat = latent_summary({k: v["mean"].cpu() for k, v in r["latents"].items()},
                         {k: (None if v["kl_per_dim"] is None else v["kl_per_dim"].cpu())
                          for k, v in r["latents"].items()},
                         {k: v["method"] for k, v in r["latents"].items()},
                         {k: v["mean_noise"].cpu() for k, v in r["latents"].items()})

    # ---- InferenceData
    dp = idx.numpy()
    coords = {"datapoint": dp}
    posterior = {}
    dims = {}
    for name, chunks in list(latent.items()) + list(determ.items()):
        arr = torch.cat(chunks).numpy()  # (S, B, ...) or (S, ...)
        posterior[name] = arr[None]
        extra = [f"{name}_dim_{i}" for i in range(arr.ndim - (2 if per_point[name] else 1))]
        dims[name] = (["datapoint"] if per_point[name] else []) + extra
    obs_names = [k for k in observed]
    lik_name = obs_names[0] if len(obs_names) == 1 else "log_lik"
    idata = az.from_dict(posterior=posterior, coords=coords, dims=dims)
    sdims = ("chain", "draw", "datapoint")
    draw = np.arange(particles)
    scoords = {"chain": [0], "draw": draw, "datapoint": dp}
    idata.add_groups(log_likelihood=xr.Dataset(
        {lik_name: xr.DataArray(st["log_likelihood"].T[None], dims=sdims, coords=scoords)}))
    ss = xr.Dataset({
        "log_weight": xr.DataArray(log_w.T[None], dims=sdims, coords=scoords),
        "log_joint": xr.DataArray(st["log_joint"].T[None], dims=sdims, coords=scoords),
        "log_q": xr.DataArray(st["log_q"].T[None], dims=sdims, coords=scoords),
        "pareto_k": xr.DataArray(khat, dims=("datapoint",), coords={"datapoint": dp}),
        "ess": xr.DataArray(ess, dims=("datapoint",), coords={"datapoint": dp}),
        "iw_log_likelihood": xr.DataArray(r["log_likelihood"].cpu().double().numpy(), dims=("datapoint",),
                                          coords={"datapoint": dp}),
    })
    idata.add_groups(sample_stats=ss)
    obs = {}
    for name, v in observed.items():
        v = v.numpy()
        obs[name] = xr.DataArray(v, dims=["datapoint"] + [f"{name}_dim_{i}" for i in range(v.ndim - 1)],
                                 coords={"datapoint": dp})
    idata.add_groups(observed_data=xr.Dataset(obs))
    if y_sel is not None:
        y_np = y_sel.cpu().numpy()  # any shape: class labels (N,), one-hot (N, C), target images (N, H, W)
        idata.add_groups(constant_data=xr.Dataset(
            {"label": xr.DataArray(y_np, dims=["datapoint"] + [f"label_dim_{i}" for i in range(y_np.ndim - 1)],
                                   coords={"datapoint": dp})}))

    summary, categories = _summary(khat, ess, r, lat, particles, skipped,
                                   point_mass=bool(getattr(run.guide, "point_mass", False)))
    idata.attrs[SUMMARY_ATTR] = json.dumps(summary.to_dict())
    idata.attrs["pyrovi_units"] = "nats; ess in draws"
    if warn:
        for cat, w in zip(categories, summary.warnings):
            warnings.warn(w, cat, stacklevel=3)  # 3: past torch.no_grad's wrapper, at the caller
    if save and run.directory:
        run.metrics = update_metrics(run.directory, "diagnostics", summary.to_dict())  # under the run's lock
    return idata


def _summary(khat, ess, r, lat, particles, skipped, point_mass: bool = False) -> tuple:
    """-> (DiagnosticsSummary, warning category per message in its ``warnings``).

    A point-mass guide (``point_mass``) has equal weights: no k-hat bands, no particle warning, and no
    collapse check (its units have no KL to p(z)); units with no KL (``kl_per_dim`` None) are never
    called collapsed. Besides the per-unit check, a total KL below :data:`KL_TOTAL_COLLAPSE` nats
    per latent unit (0.8 nats for 16 units) is a collapse however the units' means vary (Monte
    Carlo noise in a flow's means can make a collapsed unit look active).
    """
    bands = khat_bands(khat) if not point_mass else {"good": 0, "fair": 0, "bad": 0}
    finite = khat[np.isfinite(khat)]
    warns, cats = [], []
    need = min_particles()
    kl_total = float(r["kl"].mean()) if r.get("kl") is not None and not point_mass else None
    if particles < need and not point_mass:
        thr = khat_threshold(particles)
        warns.append(f"only {particles} draws per datapoint: k-hat is reliable only below {thr:.2f} with this "
                     f"many (Vehtari et al. 2024: k < 1 - 1/log10 S); use particles >= {need} to trust the 0.7 edge")
        cats.append(FewParticlesWarning)
    if bands["bad"]:
        warns.append(f"{bands['bad']} of {len(khat)} datapoints have k-hat > {KHAT_BAD}: q(z|x) is not a trustworthy "
                     "posterior approximation there (too narrow or mis-shaped); try a richer guide (flow, mixture) or "
                     "an importance-weighted objective")
        cats.append(DiagnosticWarning)
    collapsed = {}
    for name, s in lat.items():
        kl = s["kl_per_dim"]
        if kl is None or point_mass:
            continue  # no KL to p(z) for these units: an unused unit is not a collapsed posterior
        dims = [d for d in range(s["dims"]) if s["mean_variance"][d] <= 0.01 and kl[d] < KL_COLLAPSE]
        if dims:
            collapsed[name] = dims
    total = sum(s["dims"] for s in lat.values())
    n_col = sum(len(v) for v in collapsed.values())
    if n_col:
        where = "; ".join(f"site {k!r} dims {v if len(v) <= 12 else v[:12] + ['...']}" for k, v in collapsed.items())
        if n_col == total:
            warns.append(f"posterior collapse: all {total} latent units are inactive (Cov_x E_q[z_d] <= 0.01) with KL "
                         f"< {KL_COLLAPSE} nats: q(z|x) ≈ p(z) for every x and the decoder ignores z. Lower beta, use "
                         "KL warm-up, or a weaker decoder")
            cats.append(PosteriorCollapseWarning)
        else:
            warns.append(f"partial posterior collapse: {n_col} of {total} latent units are inactive with KL "
                         f"< {KL_COLLAPSE} nats ({where}); they carry no information about x")
            cats.append(PosteriorCollapseWarning)
    if not n_col and kl_total is not None and math.isfinite(kl_total) and total \
            and kl_total < KL_TOTAL_COLLAPSE * total:
        warns.append(f"posterior (nearly) collapsed: the total KL(q(z|x) || p(z)) is {kl_total:.3f} nats per "
                     f"datapoint, under {KL_TOTAL_COLLAPSE} per latent unit ({total} units), so the codes carry "
                     "almost nothing about x and decodes of "
                     "different items look alike. Lower beta, use KL warm-up, or a weaker decoder")
        cats.append(PosteriorCollapseWarning)
    if skipped:
        warns.append(f"deterministic site(s) {skipped} left out of the posterior group (too large, or not per draw)")
        cats.append(DiagnosticWarning)
    return DiagnosticsSummary(
        n=len(khat), particles=particles, khat_bands=bands,
        khat_max=float(finite.max()) if finite.size else float("nan"),
        khat_median=float(np.median(khat)) if len(khat) else float("nan"),
        khat_threshold=khat_threshold(particles),
        ess_mean=float(np.mean(ess)), ess_min=float(np.min(ess)),
        log_likelihood=float(r["log_likelihood"].mean()), elbo=float(r["elbo"].mean()),
        active_units=sum(s["active"] for s in lat.values()), latent_units=total,
        latents=lat, collapsed=collapsed, warnings=warns, point_mass=point_mass, kl=kl_total,
    ), cats


# --------------------------------------------------------------------------- files


def save_netcdf(idata, path: str) -> str:
    """Write ``idata`` to ``path`` (netCDF4/HDF5 via h5netcdf) atomically: temp file, then ``os.replace``."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        idata.to_netcdf(tmp, engine="h5netcdf")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_netcdf(path: str):
    """Read an ``InferenceData`` written by :func:`save_netcdf` (fully loaded; the file is closed)."""
    az = _arviz()

    if not os.path.isfile(path):
        raise ConfigError(f"no InferenceData file at {path!r}; run `pyrovi diagnose RUN` first")
    return az.from_netcdf(path, engine="h5netcdf")


@torch.no_grad()
def posterior_means(run, x: torch.Tensor, y: Optional[torch.Tensor] = None, *, particles: int = 32,
                    batch_size: int = 256, seed: int = 0) -> dict:
    """``{site: (N, Dz)}`` Monte Carlo posterior means E_q[z|x] from ``particles`` draws (any guide)."""
    check_positive("particles", particles, integer=True)
    model, guide, dev = run.model, run.guide, run.device
    out: dict = {}
    with run.scope(), seeded(seed):
        mpn = run.objective.max_plate_nesting
        for i in range(0, x.shape[0], batch_size):
            args, kw = run.call_args(x[i:i + batch_size].to(dev, run.dtype),
                                     None if y is None else y[i:i + batch_size].to(dev))
            if mpn is None:
                mpn = guess_max_plate_nesting(model, guide, args, kw)
            tally = Tally(run.data_plate)
            vec = getattr(run.objective, "vectorize", True)  # False: a model whose particles fit had to loop
            for _ in range(1 if vec else particles):
                tally.add(per_datapoint_weights(model, guide, *args, particles=particles if vec else 1,
                                                max_plate_nesting=mpn, data_plate=run.data_plate, vectorize=vec,
                                                **kw), mpn + 1)
            for name, st in tally.result()["latents"].items():
                out.setdefault(name, []).append(st["mean"].cpu())
    return {k: torch.cat(v) for k, v in out.items()}
