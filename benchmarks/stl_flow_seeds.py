"""STL and DReG on flows over initial-weight seeds (issue 17, "Done when" and item 2).

A user-written Pyro model, ``x = W z + b + N(0, 0.5^2 I)`` with ``z ~ N(0, I_2)``, whose posterior
has correlation 0.9 and a closed-form evidence. Each run trains only the guide (the model has no
parameters) for ``--epochs`` epochs, batch 100, lr 3e-3, on 2000 rows, and reports whether it
diverged, the final training loss, and the gap ``log p(x) - ELBO`` per row (Pyro's own
``Trace_ELBO`` with 1000 particles, vectorized, on the 2000 training rows; exact ``log p(x)``
closed form), on the first 400 rows.

    PYTHONPATH=. python benchmarks/stl_flow_seeds.py [--seeds 10] [--epochs 60] [--lr 3e-3] [--clip-norm X] [--pyro-planar]

``benchmarks/stl_flow_trace.py`` prints one run's per-epoch loss and gradient norms.
"""

from __future__ import annotations

import argparse
import math
import time

import pyro
import pyro.distributions as dist
import torch

import pyrovi as pv
from pyrovi.errors import TrainingError

SIGMA = 0.5
VAL = 1 / 11  # 200 of the 2200 rows held out for validation: 2000 training rows
# W^T W = [[4, -3.825], [-3.825, 4]]: posterior precision I + W^T W / sigma^2 has correlation 0.9
W = torch.tensor([[2.0, -1.9125], [0.0, math.sqrt(4.0 - 1.9125 ** 2)], [0.0, 0.0]])
B = torch.tensor([0.5, -1.0, 0.25])


def model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ W.to(x.dtype).T + B.to(x.dtype), SIGMA).to_event(1), obs=x)


def posterior_correlation() -> float:
    prec = torch.eye(2) + W.T @ W / SIGMA ** 2
    cov = torch.linalg.inv(prec)
    return float(cov[0, 1] / (cov[0, 0] * cov[1, 1]).sqrt())


def data(n: int = 2200, seed: int = 0) -> torch.Tensor:
    """``n`` rows; ``fit(val_fraction=VAL)`` trains on 2000 of 2200."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g)
    return z @ W.T + B + SIGMA * torch.randn(n, 3, generator=g)


def exact_log_px(x: torch.Tensor) -> torch.Tensor:
    """log p(x_n) per row, ``(N,)``: x ~ N(b, W W^T + sigma^2 I)."""
    x = x.double()
    cov = W.double() @ W.double().T + SIGMA ** 2 * torch.eye(3, dtype=torch.float64)
    return torch.distributions.MultivariateNormal(B.double(), covariance_matrix=cov).log_prob(x)


def elbo_gap(guide, x: torch.Tensor, particles: int = 1000, rows: int = 400) -> float:
    """Mean over the first ``rows`` rows of log p(x) - ELBO, the ELBO by Pyro's Trace_ELBO (``particles``
    vectorized draws per row)."""
    x = x[:rows]
    elbo = pyro.infer.Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        loss = sum(elbo.loss(model, guide, xb) for xb in x.split(100))
    return float(exact_log_px(x).sum() - (-loss)) / len(x)


GUIDES = {
    "iaf": lambda x: pv.guides.Flow(model, flow="iaf", depth=4, example=x[:2]),
    "planar": lambda x: pv.guides.Flow(model, flow="planar", depth=4, example=x[:2]),
    "auto_flow": lambda x: pv.guides.Auto(model, family="flow", example=x[:2]),
}


def pyro_planar() -> None:
    """Planar layers as Pyro makes them (``w.u_hat > -1``, det J > 0 only), bit for bit: the set-up before
    pyrovi kept det J >= ``pyrovi.guides.flow.PLANAR_MIN_DET``."""
    from pyro.distributions.transforms.planar import ConditionedPlanar

    pv.guides.flow.InvertiblePlanar.u_hat = ConditionedPlanar.u_hat


def run(guide_name: str, objective: str, seed: int, x: torch.Tensor, *, epochs: int = 60,
        clip_norm=None, particles=None, warm_start=None, eval_particles: int = 1000, eval_rows: int = 400,
        lr: float = 3e-3) -> dict:
    """One training run; ``{"diverged", "loss", "gap", "seconds"}`` (gap None after a divergence)."""
    torch.manual_seed(seed)  # the guide's initial weights
    pyro.set_rng_seed(seed)
    guide = GUIDES[guide_name](x)
    if particles is None:
        particles = 8 if objective in ("dreg", "iwae") else 1
    obj = pv.objectives.get(objective, particles=particles)
    if warm_start is not None:
        obj = type(obj)(particles=particles, warm_start=warm_start)
    t0 = time.perf_counter()
    try:
        r = pv.fit(model, guide, x, objective=obj, particles=particles, epochs=epochs, batch_size=100,
                   lr=lr, seed=seed, val_fraction=VAL, progress=False, figures=False, clip_norm=clip_norm)
    except TrainingError as e:
        return {"diverged": True, "loss": math.nan, "gap": None, "seconds": time.perf_counter() - t0,
                "error": str(e).splitlines()[0]}
    loss, first = float(r.history[-1]["train_loss"]), float(r.history[0]["train_loss"])
    best = min(float(h["train_loss"]) for h in r.history)  # loss - best: how far it rose late (a late blow-up)
    return {"diverged": False, "loss": loss, "first_loss": first, "best_loss": best,
            "gap": elbo_gap(guide, x, eval_particles, eval_rows),
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--clip-norm", type=float, default=None)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warm-start", type=int, default=None, help="stl/dreg warm start in steps (default: auto)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--guides", default=",".join(GUIDES))
    ap.add_argument("--objectives", default="stl,dreg")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pyro-planar", action="store_true",
                    help="Pyro's own planar layer (det J > 0 only), as before pyrovi's det J >= PLANAR_MIN_DET")
    a = ap.parse_args()
    if a.pyro_planar:
        pyro_planar()
    torch.set_num_threads(a.threads)
    x = data()
    print(f"posterior correlation {posterior_correlation():.3f}; {a.epochs} epochs, batch 100, lr {a.lr:g}, "
          f"clip_norm {a.clip_norm}, warm_start {a.warm_start}, Pyro's planar {a.pyro_planar}; "
          "gap = log p(x) - ELBO per row (Trace_ELBO, 1000 particles)")
    print("| guide | objective | diverged | gap <= 0.05 | median gap | max gap | s / run |")
    print("|---|---|---|---|---|---|---|")
    for g in a.guides.split(","):
        for o in a.objectives.split(","):
            rs = []
            for s in range(a.first_seed, a.first_seed + a.seeds):
                rs.append(run(g, o, s, x, epochs=a.epochs, clip_norm=a.clip_norm, warm_start=a.warm_start, lr=a.lr))
                print(f"  {g} {o} seed {s}: {rs[-1]}", flush=True)
            gaps = sorted(r["gap"] for r in rs if r["gap"] is not None)
            div = sum(r["diverged"] for r in rs)
            ok = sum(gp <= 0.05 for gp in gaps)
            med = gaps[len(gaps) // 2] if gaps else math.nan
            print(f"| {g} | {o} | {div}/{a.seeds} | {ok}/{a.seeds} | {med:.4f} | "
                  f"{(gaps[-1] if gaps else math.nan):.4f} | {sum(r['seconds'] for r in rs) / len(rs):.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
