"""Time one conv-VAE training step of pyrovi against hand-written PyTorch with the same networks.

Conv VAE on 28x28 grey images (``VAE(arch="conv")``: 32 channels, two stride-2 stages, a 256-wide
layer on both sides of a 16-d latent), Bernoulli likelihood, diagonal-Gaussian q, batch 128,
Adam (fused, lr 1e-3). The hand-written side uses deep copies of the very same ``torch.nn``
modules (the guide's conv trunk and head, the model's conv decoder) and writes the ELBO / IWAE
and the step out directly; the two losses are checked equal on one seed before timing.
Pyrovi's side is what ``fit`` runs: ``BatchLoss`` + ``train_step`` + ``pyrovi.train.adam``.
With ``--precision bf16`` both sides run the nets under ``torch.autocast(bfloat16)`` and the
heads and log-densities in float32.

The two steps run interleaved in one process (alternating which goes first) after a warm-up;
the ratio printed is the median of per-round ratios pyrovi / hand-written, with its IQR.

    python -m benchmarks.bench_conv [--steps 100] [--threads 2] [--device cpu] [--precision bf16]
    python -m benchmarks.bench_conv --cases elbo,iwae --mlp     # also the MLP VAE (784-256-16) for reference
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from contextlib import nullcontext

import pyro
import torch
import torch.nn.functional as F
from torch import nn

import pyrovi as pv
from pyrovi.train import BatchLoss, adam, train_step

from .bench_step import check_same_loss, step_fn

D, L, H, B, C = 784, 16, 256, 128, 32
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class HandConvVAE(nn.Module):
    """ELBO / IWAE of a VAE over copies of pyrovi's own nets, written out in PyTorch."""

    def __init__(self, model, guide, amp_dtype=None):
        super().__init__()
        self.enc, self.head = copy.deepcopy(guide.body), copy.deepcopy(guide.heads["z"])
        self.dec = copy.deepcopy(model.decoder)
        self.amp_dtype = amp_dtype

    def _amp(self, x):
        return torch.autocast(x.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()

    def loss(self, x: torch.Tensor, objective: str = "elbo", K: int = 1) -> torch.Tensor:
        with self._amp(x):
            h = self.enc(x).float()  # (B, H)
        loc, raw = F.linear(h, self.head.weight, self.head.bias).chunk(2, -1)  # (B, L), float32
        scale = F.softplus(raw) + 1e-4
        S = K if objective == "iwae" else 1
        eps = torch.randn(S, *loc.shape, device=x.device)
        z = loc + scale * eps  # (S, B, L)
        with self._amp(x):
            logits = self.dec(z).float()  # (S, B, D)
        log_lik = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        log_w = log_lik - 0.5 * (z ** 2).sum(-1) - (-0.5 * eps ** 2 - torch.log(scale)).sum(-1)  # (S, B)
        bound = torch.logsumexp(log_w, 0) - math.log(S) if S > 1 else log_w[0]
        return -bound.sum() / x.shape[0]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_case(objective: str, K: int, steps: int, device: str, precision, arch: str = "conv",
              warmup: int = 10) -> dict:
    dev = torch.device(device)
    torch.manual_seed(0)
    x_all = (torch.rand(B * 8, D) < 0.3).float().to(dev)
    model = pv.models.VAE((28, 28), L, hidden=H, arch=arch, channels=C).to(dev)
    guide = pv.guides.DiagNormal(model, hidden=H).to(dev)
    obj = pv.objectives.get(objective, particles=K)
    obj.max_plate_nesting = 1
    amp = {"bf16": torch.bfloat16, None: None}[precision]
    net = HandConvVAE(model, guide, amp)
    loss_fn = BatchLoss(obj, model, guide, global_sites=False, precision=precision)  # what fit builds
    if precision is None and dev.type == "cpu":
        check_same_loss(net, loss_fn, x_all[:B], objective, K)
    p_opt = adam(list(model.parameters()) + list(guide.parameters()), lr=1e-3)
    h_opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)

    fns = (lambda x: train_step(loss_fn, p_opt, x), step_fn(lambda x: net.loss(x, objective, K), h_opt))
    times = ([], [])
    with pyro.get_param_store().scope():
        for i in range(warmup + steps):
            x = x_all[(i % 8) * B:(i % 8 + 1) * B]
            for j in range(2):
                k = (i + j) % 2
                _sync(dev)
                t0 = time.perf_counter()
                fns[k](x)
                _sync(dev)
                if i >= warmup:
                    times[k].append(time.perf_counter() - t0)
    ratios = [a / b for a, b in zip(*times)]
    q = statistics.quantiles(ratios, n=4)
    return {"case": f"{arch} VAE, {objective}" + (f" K={K}" if K > 1 else ""), "device": device,
            "precision": precision or "fp32", "pyrovi_ms": 1e3 * statistics.median(times[0]),
            "hand_ms": 1e3 * statistics.median(times[1]), "ratio": statistics.median(ratios), "q1": q[0], "q3": q[2]}


def table(rows: list) -> str:
    out = ["| case | device | precision | pyrovi ms/step | hand-written ms/step | **ratio** | IQR |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['case']} | {r['device']} | {r['precision']} | {r['pyrovi_ms']:.2f} | {r['hand_ms']:.2f} | "
                   f"**{r['ratio']:.2f}** | {r['q1']:.2f}-{r['q3']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", help="fp32 | bf16 | fp32,bf16")
    p.add_argument("--cases", default="elbo", help="comma-separated: elbo, iwae (K=5)")
    p.add_argument("--mlp", action="store_true", help="also time the MLP VAE (784-256-16) the same way")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for arch in ("conv", "mlp") if args.mlp else ("conv",):
        for prec in args.precision.split(","):
            for case in args.cases.split(","):
                rows.append(time_case(case, 5 if case == "iwae" else 1, args.steps, args.device,
                                      None if prec == "fp32" else prec, arch))
                print(rows[-1], flush=True)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
