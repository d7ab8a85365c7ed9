"""Does 2-rank DDP training reach the held-out ELBO of a single process with the same global batch?

The setting of ``tests/test_distributed.py`` (digits, VAE 64-32-4, DiagNormal guide,
``elbo``, global batch 128, lr 5e-3, 5 epochs, same initial weights). DDP changes
only the random stream (which rows share a step, which particles are drawn), so its
final test ELBO should sit inside the seed-to-seed spread of single-process runs.
This script measures that spread (fit seeds 0..S-1 vary shuffling and particles),
the DDP runs' values for a few seeds, and what the two mistakes the test guards
against would do: a per-rank reading of ``batch_size`` (global batch 256: half the
steps) and summed instead of averaged gradients (twice the step size, lr 1e-2).

    python -m benchmarks.ddp_agreement [--seeds 6] [--ddp-seeds 3]

Each DDP run is a fresh ``python -m benchmarks.ddp_agreement --ddp-run SEED OUT``
process that re-runs itself for rank 1 (Lightning's launcher), as a user's script would.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

import pyrovi as pv

#: the test's setting (tests/test_distributed.py imports nothing from here; keep them in step)
SETTING = dict(epochs=5, batch_size=128, lr=5e-3)
K_EVAL = 200


def build(data):
    torch.manual_seed(0)  # same initial weights for every run
    model = pv.models.VAE(data.shape, 4, hidden=(32,), image_shape=data.image_shape)
    return model, pv.guides.DiagNormal(model, hidden=(32,))


def held_out_elbo(run, data) -> float:
    torch.manual_seed(123)
    return pv.evaluate(run, data, k=K_EVAL, save=False)["elbo"]


def single(data, seed: int, **over) -> float:
    model, guide = build(data)
    run = pv.fit(model, guide, data, seed=seed, progress=False, **{**SETTING, **over})
    return held_out_elbo(run, data)


def ddp_run(seed: int, out: str) -> None:
    data = pv.data.load("digits")
    model, guide = build(data)
    pv.fit(model, guide, data, seed=seed, progress=False, figures=False, out=out, overwrite=True,
           strategy="ddp", devices=2, accelerator="cpu", **SETTING)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=6)
    p.add_argument("--ddp-seeds", type=int, default=3)
    p.add_argument("--ddp-run", nargs=2, metavar=("SEED", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.ddp_run:
        ddp_run(int(a.ddp_run[0]), a.ddp_run[1])
        return
    torch.set_num_threads(1)
    data = pv.data.load("digits")
    singles = [single(data, s) for s in range(a.seeds)]
    print("single-process test ELBO by seed:", [round(v, 3) for v in singles])
    mean, sd = statistics.mean(singles), statistics.stdev(singles)
    print(f"  mean {mean:.3f}  sd {sd:.3f}  max |seed - seed 0| {max(abs(v - singles[0]) for v in singles):.3f}")
    per_rank = [single(data, s, batch_size=256) for s in range(2)]
    summed = [single(data, s, lr=1e-2) for s in range(2)]
    print("batch 256 (per-rank reading):", [round(v, 3) for v in per_rank])
    print("lr 1e-2 (summed gradients):  ", [round(v, 3) for v in summed])
    ddps = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in range(a.ddp_seeds):
            out = os.path.join(tmp, f"ddp{s}")
            subprocess.run([sys.executable, "-m", "benchmarks.ddp_agreement", "--ddp-run", str(s), out], check=True,
                           stdout=subprocess.DEVNULL)
            ddps.append(held_out_elbo(pv.load_run(out), data))
    print("DDP x2 test ELBO by seed:", [round(v, 3) for v in ddps])
    print(json.dumps({"single": singles, "per_rank_batch": per_rank, "summed_grads": summed, "ddp": ddps}))


if __name__ == "__main__":
    main()
