"""`python -m benchmarks` (or `make bench`): the performance suite, pyrovi against hand-written PyTorch.

Runs, in one go (about 5-6 minutes on a quiet 2-core machine; not part of the unit tests):

1. ``bench_step``: one training step, cases elbo, meanfield, iwae K=50, dreg K=50, Flow(iaf), and
   Pyro's SVI loop as a second reference (200 timed steps; 50 for K=50);
2. ``bench_epoch``: one ``fit`` epoch on mnist5k against a hand-written epoch loop (7 pairs);
3. ``bench_eval``: ``evaluate`` at K=5000 on 1000 mnist5k test images against a hand-written
   IWAE evaluation (2 interleaved pairs after a warm-up), and pyrovi's peak RSS during that
   evaluation, measured in a fresh subprocess.

Options: ``--quick`` (a smoke run in well under a minute: fewer steps, 100 images, K=1000),
``--threads N`` (default 2), ``--only step,epoch,eval``. The DDP agreement study
(``python -m benchmarks.ddp_agreement``) is a quality check, not a timing, and runs separately.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import pyro
import torch


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: small sizes, under a minute")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default="step,epoch,eval", help="comma-separated subset of step, epoch, eval")
    args = p.parse_args(argv)
    parts = args.only.split(",")
    t_all = time.perf_counter()
    th = ["--threads", str(args.threads)]
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"pyrovi benchmarks, {datetime.date.today()}, {_cpu_name()}, {os.cpu_count()} cores, load average "
          f"{load[0]:.2f}, torch {torch.__version__}, pyro {pyro.__version__}, {args.threads} threads", flush=True)
    if "step" in parts:
        from benchmarks import bench_step

        print("\n## step: python -m benchmarks.bench_step --steps " + ("20" if args.quick else "200"), flush=True)
        bench_step.main(["--steps", "20" if args.quick else "200"] + th)
    if "epoch" in parts:
        from benchmarks import bench_epoch

        print("\n## epoch: python -m benchmarks.bench_epoch --repeats " + ("2" if args.quick else "7"), flush=True)
        bench_epoch.main(["--repeats", "2" if args.quick else "7"] + th)
    if "eval" in parts:
        from benchmarks import bench_eval

        size = ["--n", "100", "--k", "1000", "--repeats", "1"] if args.quick else \
            ["--n", "1000", "--k", "5000", "--repeats", "2"]
        cmd = size + ["--memory-impls", "pyrovi"] + th
        print("\n## eval: python benchmarks/bench_eval.py " + " ".join(cmd), flush=True)
        bench_eval.main(cmd)
    print(f"\nbenchmarks done in {time.perf_counter() - t_all:.0f} s", flush=True)


if __name__ == "__main__":
    main()
