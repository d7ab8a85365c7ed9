"""Time one training step of pyrovi against a hand-written PyTorch VAE doing the same math.

VAE 784-400-20 (MLP encoder and decoder, one hidden layer of 400), batch 128, Bernoulli
likelihood with logits, diagonal-Gaussian q with scale = softplus(raw) + 1e-4, Adam.
Cases: ``elbo`` (1 particle), ``meanfield`` (analytic KL), ``iwae`` (K=50 vectorized),
``dreg`` (K=50; against the hand-written IWAE step, which does the same forward work),
and Pyro's plain ``SVI`` + ``Trace_ELBO`` loop as a second reference.
Both sides run in the same process, interleaved step by step after a warm-up; the
printed ratio is the median of per-round ratios pyrovi / hand-written.

    python -m benchmarks.bench_step [--steps 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import pyro
import torch
import torch.nn.functional as F
from torch import nn

import pyrovi as pv
from pyrovi.train import BatchLoss, train_step
from pyrovi.weights import guess_max_plate_nesting

D, H, L, B = 784, 400, 20, 128


class HandVAE(nn.Module):
    """The same networks and math as pyrovi's VAE + DiagNormal, written directly in PyTorch."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(D, H), nn.ReLU())
        self.head = nn.Linear(H, 2 * L)
        self.dec = nn.Sequential(nn.Linear(L, H), nn.ReLU(), nn.Linear(H, D))

    def loss(self, x: torch.Tensor, objective: str, K: int) -> torch.Tensor:
        loc, raw = self.head(self.enc(x)).chunk(2, -1)  # (B, L)
        scale = F.softplus(raw) + 1e-4
        S = K if objective == "iwae" else 1
        eps = torch.randn(S, *loc.shape)
        z = loc + scale * eps  # (S, B, L)
        logits = self.dec(z)  # (S, B, D)
        log_lik = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        if objective == "meanfield":
            kl = 0.5 * (loc ** 2 + scale ** 2 - 2 * torch.log(scale) - 1).sum(-1)  # (B,)
            return -(log_lik.mean(0) - kl).sum() / x.shape[0]
        log_pz = -0.5 * (z ** 2).sum(-1) - 0.5 * L * math.log(2 * math.pi)
        log_qz = (-0.5 * eps ** 2 - torch.log(scale) - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_w = log_lik + log_pz - log_qz  # (S, B)
        bound = torch.logsumexp(log_w, 0) - math.log(S)
        return -bound.sum() / x.shape[0]


def _svi_step_fn(model, guide):
    """Pyro's own loop as a second reference: SVI + Trace_ELBO + pyro.optim.Adam (global param store)."""
    from pyro.infer import SVI, Trace_ELBO

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    return lambda x: svi.step(x) / x.shape[0]


def time_case(objective: str, K: int, steps: int, warmup: int = 10) -> dict:
    torch.manual_seed(0)
    x_all = (torch.rand(B * 8, D) < 0.3).float()
    model = pv.models.VAE(D, L, hidden=(H,))
    guide = pv.guides.DiagNormal(model, hidden=(H,))
    svi = objective == "svi"
    # the hand-written side of "dreg" is the IWAE step (same forward, same number of backward passes)
    hand_objective = {"svi": "elbo", "dreg": "iwae"}.get(objective, objective)
    obj = pv.objectives.get("elbo" if svi else objective, particles=K)
    obj.max_plate_nesting = guess_max_plate_nesting(model, guide, (x_all[:B],), {})
    p_opt = torch.optim.Adam(list(model.parameters()) + list(guide.parameters()), lr=1e-3)
    hand = HandVAE()
    h_opt = torch.optim.Adam(hand.parameters(), lr=1e-3)

    def hand_step(x):
        loss = hand.loss(x, hand_objective, K)
        h_opt.zero_grad(set_to_none=True)
        loss.backward()
        h_opt.step()
        return loss.item()

    loss_fn = BatchLoss(obj, model, guide, global_sites=False)  # exactly what fit builds for this pair
    step = _svi_step_fn(model, guide) if svi else (lambda x: train_step(loss_fn, p_opt, x))
    ratios, tp, th = [], [], []
    with pyro.get_param_store().scope():
        for i in range(warmup + steps):
            x = x_all[(i % 8) * B:(i % 8 + 1) * B]
            t0 = time.perf_counter()
            step(x)
            t1 = time.perf_counter()
            hand_step(x)
            t2 = time.perf_counter()
            if i >= warmup:
                tp.append(t1 - t0)
                th.append(t2 - t1)
    for a, b in zip(tp, th):
        ratios.append(a / b)
    q = statistics.quantiles(ratios, n=4)
    name = "Pyro SVI + Trace_ELBO (reference)" if svi else objective
    return {"case": name + (f" K={K}" if K > 1 else ""), "pyrovi_ms": 1e3 * statistics.median(tp),
            "torch_ms": 1e3 * statistics.median(th), "ratio": statistics.median(ratios), "q1": q[0], "q3": q[2]}


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="timed steps per case (iwae uses a quarter)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [time_case("elbo", 1, args.steps), time_case("meanfield", 1, args.steps),
            time_case("iwae", 50, max(10, args.steps // 4)), time_case("dreg", 50, max(10, args.steps // 4)),
            time_case("svi", 1, args.steps)]
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, threads {args.threads}, VAE {D}-{H}-{L}, batch {B}")
    print("| case | pyrovi ms/step | hand-written ms/step | ratio (median) | IQR of ratio |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['case']} | {r['pyrovi_ms']:.2f} | {r['torch_ms']:.2f} | {r['ratio']:.2f} | "
              f"{r['q1']:.2f}-{r['q3']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
