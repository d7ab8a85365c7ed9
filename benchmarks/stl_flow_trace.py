"""One run of ``benchmarks/stl_flow_seeds.py``'s set-up, epoch by epoch: training loss and the gradient norm
(median and largest over the epoch's steps, before any clipping), then the ELBO gap (issue 17).

    PYTHONPATH=. python benchmarks/stl_flow_trace.py planar stl 2 [--pyro-planar] [--warm-start N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stl_flow_seeds as lg  # noqa: E402

import pyrovi as pv  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("guide", choices=sorted(lg.GUIDES))
    ap.add_argument("objective", choices=["stl", "dreg"])
    ap.add_argument("seed", type=int)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--warm-start", type=int, default=None)
    ap.add_argument("--clip-norm", type=float, default=None)
    ap.add_argument("--pyro-planar", action="store_true", help="Pyro's own planar layer (det J > 0 only)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                    help="fit's dtype: float64 separates the estimator's math from float32 rounding")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.pyro_planar:
        lg.pyro_planar()
    norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def record(params, max_norm, *args, **kw):  # train_step clips through this; it returns the norm before clipping
        n = clip(params, max_norm, *args, **kw)
        norms.append(float(n))
        return n

    torch.nn.utils.clip_grad_norm_ = record
    x = lg.data()
    torch.manual_seed(a.seed)
    pyro.set_rng_seed(a.seed)
    guide = lg.GUIDES[a.guide](x)
    k = 8 if a.objective == "dreg" else 1
    obj = pv.objectives.get({"name": a.objective, "warm_start": a.warm_start} if a.warm_start is not None
                            else a.objective, particles=k)
    r = pv.fit(lg.model, guide, x, objective=obj, particles=k, epochs=a.epochs, batch_size=100, lr=3e-3,
               seed=a.seed, val_fraction=lg.VAL, progress=False, figures=False, dtype=getattr(torch, a.dtype),
               clip_norm=a.clip_norm if a.clip_norm is not None else 1e30)  # 1e30: measured, never clipped
    per = len(norms) // a.epochs
    for e, h in enumerate(r.history):
        seg = sorted(norms[e * per:(e + 1) * per])
        print(f"epoch {e + 1:2d}  loss {float(h['train_loss']):8.3f}  grad norm median {seg[len(seg) // 2]:9.3g}"
              f"  max {seg[-1]:9.3g}")
    print(f"gap log p(x) - ELBO per row: {lg.elbo_gap(guide, x.to(getattr(torch, a.dtype))):.4f}")


if __name__ == "__main__":
    main()
