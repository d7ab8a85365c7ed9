"""``pyrovi.data.load`` of a large ``.npz`` against a hand-written NumPy/PyTorch loader: time and peak memory.

The hand-written loader is what one would write (and what pyrovi did before issue 19's
in-place split): ``np.load``, convert to float32, draw the same seeded ``torch.randperm``
and gather each split with ``x[idx]``. pyrovi streams the file into one float32 array
and reorders its rows in place, so the splits are views of it (the same rows, tested in
``tests/test_data.py``). Both produce identical tensors; this checks they do here too.

Time: the two loaders interleaved in one process, one torch thread, ``--repeats`` pairs
after a warm-up, median seconds and the ratio pyrovi / hand-written (< 1: pyrovi faster).
Peak memory: each loader once in a fresh child process, growth of its peak RSS
(``VmHWM``) over the RSS after imports, in units of the final splits' bytes (x and y).

    python benchmarks/bench_load.py                  # 1M x 64 float32 with labels, 200k x 784 uint8
    python benchmarks/bench_load.py --repeats 3 --dir /tmp/bench-load
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {"float32 1M x 64, labels": "f32.npz", "uint8 200k x 784": "u8.npz"}
SPLIT, SEED = (0.1, 0.1), 0


def make(d: str) -> None:
    rng = np.random.default_rng(0)
    if not os.path.exists(os.path.join(d, "f32.npz")):
        np.savez(os.path.join(d, "f32.npz"), x=rng.random((1_000_000, 64), dtype=np.float32),
                 y=rng.integers(0, 10, 1_000_000))
    if not os.path.exists(os.path.join(d, "u8.npz")):
        np.savez(os.path.join(d, "u8.npz"), x=rng.integers(0, 256, (200_000, 784), dtype=np.uint8))


def hand_written(path: str) -> list:
    """``[(x, y)]`` for train, val, test: np.load, float32, the seeded permutation, ``x[idx]`` per split."""
    with np.load(path) as z:
        x = torch.from_numpy(z["x"])
        y = torch.from_numpy(z["y"]) if "y" in z.files else None
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    x = x.reshape(len(x), -1)
    n = len(x)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SEED))
    n_test, n_val = round(n * SPLIT[1]), round(n * SPLIT[0])
    parts = perm[n_test + n_val:], perm[n_test:n_test + n_val], perm[:n_test]
    return [(x[i], None if y is None else y[i].long()) for i in parts]


def pyrovi_load(path: str) -> list:
    import pyrovi as pv

    ds = pv.data.load(f"npz:{path}", split=SPLIT, seed=SEED)
    return [(s.x, s.y) for s in (ds.train, ds.val, ds.test)]


LOADERS = {"pyrovi": pyrovi_load, "hand-written": hand_written}

CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[3])
import torch
torch.set_num_threads(1)
import pyrovi
from benchmarks.bench_load import LOADERS
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":")) * 1024
base = status("VmRSS")
parts = LOADERS[sys.argv[1]](sys.argv[2])
nbytes = sum(t.numel() * t.element_size() for p in parts for t in p if t is not None)
print(json.dumps({"grew": status("VmHWM") - base, "nbytes": nbytes}))
"""


def peak(loader: str, path: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", CHILD, loader, path, ROOT], capture_output=True, text=True, env=env,
                       check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where the .npz files are made (kept for reuse)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    d = args.dir or os.path.join(tempfile.gettempdir(), "pyrovi-bench-load")
    os.makedirs(d, exist_ok=True)
    make(d)
    for case, fname in CASES.items():
        path = os.path.join(d, fname)
        a, b = pyrovi_load(path), hand_written(path)  # warm-up, and the same tensors
        assert all(torch.equal(u, v) for (ux, uy), (vx, vy) in zip(a, b) for u, v in ((ux, vx), (uy, vy))
                   if u is not None), case
        del a, b
        times = {k: [] for k in LOADERS}
        for _ in range(args.repeats):
            for k, fn in LOADERS.items():
                t = time.perf_counter()
                parts = fn(path)
                times[k].append(time.perf_counter() - t)
                del parts
        med = {k: statistics.median(v) for k, v in times.items()}
        mem = {k: peak(k, path) for k in LOADERS}
        print(f"{case}: pyrovi {med['pyrovi']:.3f} s, hand-written {med['hand-written']:.3f} s, "
              f"ratio {med['pyrovi'] / med['hand-written']:.2f}; peak RSS growth "
              + ", ".join(f"{k} +{m['grew'] / 2**20:.0f} MiB ({m['grew'] / m['nbytes']:.2f}x of "
                          f"{m['nbytes'] / 2**20:.0f} MiB)" for k, m in mem.items()))


if __name__ == "__main__":
    main()
