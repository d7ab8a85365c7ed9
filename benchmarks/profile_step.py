"""Where a pyrovi training step spends its time, next to the hand-written step of ``bench_step``.

Splits each step into loss (forward), backward and optimizer, times them interleaved
(median over steps, one thread by default so the numbers are the work done), and counts per
step: tensor operations that autograd records (torch profiler, forward and backward, the
optimizer excluded), distribution objects built, and argument/support checks run.
Both sides use the same optimizer (``--adam``), so the table shows the model/guide/objective code.

    python -m benchmarks.profile_step [--objective elbo] [--steps 200] [--threads 1] [--adam default]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch
import torch.distributions as tdist
from torch.distributions import constraints
from torch.profiler import ProfilerActivity, profile

import pyrovi as pv
from benchmarks.bench_step import B, D, H, L, HandVAE
from pyrovi.train import BatchLoss


class _Counts:
    """Count Distribution constructions and constraint checks while active."""

    def __init__(self):
        self.n = Counter()

    def __enter__(self):
        self._init, self._check = tdist.Distribution.__init__, constraints.Constraint.check
        counts = self.n
        init, check = self._init, self._check

        def counted_init(obj, *a, **k):
            counts["distributions built"] += 1
            return init(obj, *a, **k)

        tdist.Distribution.__init__ = counted_init
        for cls in {type(c) for c in vars(constraints).values() if isinstance(c, constraints.Constraint)}:
            if "check" in vars(cls):
                orig = vars(cls)["check"]

                def counted_check(obj, value, _orig=orig):
                    counts["constraint checks"] += 1
                    return _orig(obj, value)

                self.n[("patched", cls)] = orig
                cls.check = counted_check
        return self

    def __exit__(self, *exc):
        tdist.Distribution.__init__ = self._init
        for key, orig in list(self.n.items()):
            if isinstance(key, tuple):
                key[1].check = orig
                del self.n[key]
        return False


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objective", default="elbo", choices=["elbo", "meanfield", "iwae"])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--adam", default="default", choices=["default", "fused"], help="the same on both sides")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    K = 50 if args.objective == "iwae" else 1
    torch.manual_seed(0)
    x_all = (torch.rand(B * 8, D) < 0.3).float()
    model = pv.models.VAE(D, L, hidden=(H,))
    guide = pv.guides.DiagNormal(model, hidden=(H,))
    obj = pv.objectives.get(args.objective, particles=K)
    obj.max_plate_nesting = 1
    loss_fn = BatchLoss(obj, model, guide, global_sites=False)
    hand = HandVAE()
    kw = {"fused": True} if args.adam == "fused" else {}
    opts = {"pyrovi": torch.optim.Adam(list(model.parameters()) + list(guide.parameters()), lr=1e-3, **kw),
            "hand": torch.optim.Adam(hand.parameters(), lr=1e-3, **kw)}
    losses = {"pyrovi": lambda x: loss_fn(x), "hand": lambda x: hand.loss(x, args.objective, K)}

    def step(side, x, clock=None):
        t0 = time.perf_counter()
        loss = losses[side](x)
        value = loss.item()
        t1 = time.perf_counter()
        opts[side].zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opts[side].step()
        t3 = time.perf_counter()
        if clock is not None:
            clock.append((t1 - t0, t2 - t1, t3 - t2))
        return value

    clocks = {"pyrovi": [], "hand": []}
    for i in range(args.steps + 10):
        x = x_all[(i % 8) * B:(i % 8 + 1) * B]
        for side in (("pyrovi", "hand") if i % 2 else ("hand", "pyrovi")):
            step(side, x, clocks[side] if i >= 10 else None)
    ops, counts = {}, {}
    for side in ("pyrovi", "hand"):
        x = x_all[:B]
        with _Counts() as c:
            losses[side](x)
        counts[side] = c.n
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                loss = losses[side](x)
                loss.item()
                opts[side].zero_grad(set_to_none=True)
                loss.backward()
        ev = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        ops[side] = sum(e.count for e in ev) // 5
    print(f"{args.objective}{f' K={K}' if K > 1 else ''}, {args.threads} thread(s), Adam {args.adam} on both sides, "
          f"{args.steps} steps, torch {torch.__version__}")
    print("| per step | pyrovi | hand-written | difference |")
    print("| --- | --- | --- | --- |")
    med = {s: [1e3 * statistics.median(c[j] for c in clocks[s]) for j in range(3)] for s in clocks}
    for j, name in enumerate(("loss (forward) ms", "backward ms", "optimizer ms")):
        print(f"| {name} | {med['pyrovi'][j]:.3f} | {med['hand'][j]:.3f} | {med['pyrovi'][j] - med['hand'][j]:+.3f} |")
    tot = {s: sum(med[s]) for s in med}
    print(f"| whole step ms | {tot['pyrovi']:.3f} | {tot['hand']:.3f} | {tot['pyrovi'] - tot['hand']:+.3f} "
          f"(ratio {tot['pyrovi'] / tot['hand']:.3f}) |")
    print(f"| aten ops, forward + backward | {ops['pyrovi']} | {ops['hand']} | {ops['pyrovi'] - ops['hand']:+d} |")
    for key in ("distributions built", "constraint checks"):
        a, b = counts["pyrovi"][key], counts["hand"][key]
        print(f"| {key} (forward) | {a} | {b} | {a - b:+d} |")


if __name__ == "__main__":
    main()
