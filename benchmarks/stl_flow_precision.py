"""float32 against float64 on the *same draws*: the stl/dreg gradient of a flow guide trained in float32 (issue 17).

Trains ``benchmarks/stl_flow_seeds.py``'s set-up (one guide, one objective, one seed) for ``--epochs``
epochs in float32, then computes the objective's gradient on a few batches twice, in float32 and in
float64, replaying the float32 run's standard-normal draws in the float64 one. A float64 *fit* of
the same seed is not this comparison: torch draws other numbers in float64 (``torch.randn`` of 16 or
more values takes another code path per dtype), so it follows another trajectory.

    PYTHONPATH=. python benchmarks/stl_flow_precision.py iaf dreg 8 --epochs 38
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import pyro
import torch
import torch.distributions.normal as torch_normal

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stl_flow_seeds as lg  # noqa: E402

import pyrovi as pv  # noqa: E402


class Replay:
    """Record the standard-normal draws of one pass and hand the same numbers (cast) to the next."""

    def __init__(self):
        self.real, self.tape, self.recording = torch_normal._standard_normal, [], True

    def __call__(self, shape, dtype, device):
        if self.recording:
            eps = self.real(shape, dtype=dtype, device=device)
            self.tape.append(eps.double())
            return eps
        return self.tape.pop(0).to(dtype)


def grads(guide, objective: str, x: torch.Tensor, dtype, seed: int) -> torch.Tensor:
    g = copy.deepcopy(guide).to(dtype)
    k = 8 if objective in ("dreg", "iwae") else 1
    obj = pv.objectives.get(objective, particles=k)  # called on its own: no warm start
    pyro.set_rng_seed(seed)
    loss = obj(lg.model, g, x.to(dtype))
    return torch.cat([p.reshape(-1) for p in torch.autograd.grad(loss, list(g.parameters()))]).double()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("guide", choices=sorted(lg.GUIDES))
    ap.add_argument("objective", choices=["stl", "dreg", "elbo", "iwae"])
    ap.add_argument("seed", type=int)
    ap.add_argument("--epochs", type=int, default=38)
    ap.add_argument("--batches", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    x = lg.data()
    torch.manual_seed(a.seed)
    pyro.set_rng_seed(a.seed)
    guide = lg.GUIDES[a.guide](x)
    pv.fit(lg.model, guide, x, objective=a.objective, particles=8 if a.objective in ("dreg", "iwae") else 1,
           epochs=a.epochs, batch_size=100, lr=3e-3, seed=a.seed, val_fraction=lg.VAL, progress=False,
           figures=False)
    replay = Replay()
    torch_normal._standard_normal = replay
    try:
        for b in range(a.batches):
            xb = x[100 * b:100 * (b + 1)]
            replay.recording, replay.tape = True, []
            g32 = grads(guide, a.objective, xb, torch.float32, 123 + b)
            replay.recording = False
            g64 = grads(guide, a.objective, xb, torch.float64, 123 + b)
            err = float((g32 - g64).norm() / g64.norm())
            cos = float(torch.nn.functional.cosine_similarity(g32, g64, dim=0))
            print(f"{a.guide} + {a.objective}, seed {a.seed}, after {a.epochs} float32 epochs, batch {b}: "
                  f"|g32 - g64| / |g64| = {err:.2e}, cosine {cos:.6f}, |g64| = {float(g64.norm()):.4g}")
    finally:
        torch_normal._standard_normal = replay.real


if __name__ == "__main__":
    main()
