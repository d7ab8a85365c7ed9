"""The GPU check: one prepared run of everything pyrovi does on CUDA, printing a table for RESULTS.md.

Parts (each timed; a failure is reported in the table and the script goes on):

1. the CUDA-marked tests (``pytest -m cuda``);
2. the step benchmark, pyrovi vs hand-written PyTorch over the same nets: MLP and conv VAE,
   ELBO and IWAE (K=5), fp32 and bf16 (``benchmarks/bench_conv.py``);
3. evaluation at K=5000 (an MLP VAE trained 5 epochs on mnist5k, test log p(x), 500 images);
4. a short conv-VAE training run on mnist5k (10 epochs) with test log p(x) at K=1000, fp32 and bf16;
5. training streamed from a folder of PNG images through a DataLoader with workers;
6. a 1-GPU DDP smoke run (``strategy="ddp", devices=1``, Lightning), in a subprocess.

On a machine without CUDA the CUDA parts are skipped (2, 3, 4 and 6 run CPU-sized versions
of themselves, a few seconds each, so the script itself is tested by CI-sized runs).

    bash benchmarks/gpu_check.sh            # or: python -m benchmarks.gpu_check [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import pyrovi as pv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS: list = []


def part(name: str):
    """Run ``fn`` as one row of the table: its result string, or the error it raised."""
    def wrap(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                result = fn(*a, **k)
            except Exception as e:  # the check goes on; the table shows what failed
                result = f"FAILED: {type(e).__name__}: {str(e)[:160]}"
            ROWS.append((name, result, time.perf_counter() - t0))
            print(f"[gpu_check] {name}: {result} ({time.perf_counter() - t0:.1f} s)", flush=True)
        return run
    return wrap


@part("pytest -m cuda")
def cuda_tests(cuda: bool) -> str:
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    last = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
    return last if r.returncode in (0, 5) else f"FAILED (rc {r.returncode}): {last}"


@part("step benchmark (pyrovi / hand-written)")
def step_bench(cuda: bool) -> str:
    from .bench_conv import table, time_case

    rows = []
    if cuda:
        for arch in ("mlp", "conv"):
            for prec in (None, "bf16"):
                for obj, k in (("elbo", 1), ("iwae", 5)):
                    rows.append(time_case(obj, k, 100, "cuda", prec, arch))
    else:
        rows.append(time_case("elbo", 1, 3, "cpu", None, "conv", warmup=2))
    print(table(rows), flush=True)
    return "; ".join(f"{r['case']} {r['precision']} {r['ratio']:.2f} ({r['pyrovi_ms']:.2f} ms)" for r in rows)


def _mnist(cuda: bool):
    ds = pv.data.load("mnist5k" if cuda else "digits")
    return ds


@part("evaluate K=5000 (CPU: K=50)")
def evaluation(cuda: bool, device: str) -> str:
    ds = _mnist(cuda)
    torch.manual_seed(0)
    model = pv.models.VAE(ds.shape, 16, hidden=256, image_shape=ds.image_shape)
    run = pv.fit(model, None, ds, epochs=5 if cuda else 1, batch_size=100, progress=False, figures=False,
                 device=device)
    test = ds.test if cuda else pv.data.Split(ds.test.x[:20], ds.test.y[:20])
    t0 = time.perf_counter()
    m = pv.evaluate(run, test, k=5000 if cuda else 50)
    return (f"{ds.name}: test log p(x) {m['log_likelihood']:.2f} nats at K={m['k']} over {m['n']} images, "
            f"{time.perf_counter() - t0:.1f} s")


@part("conv VAE training run (mnist5k; CPU: digits)")
def conv_training(cuda: bool, device: str) -> str:
    ds = _mnist(cuda)
    out = []
    for prec in (None, "bf16") if cuda else (None,):
        torch.manual_seed(0)
        model = pv.models.VAE(ds.shape, 16, hidden=256, arch="conv", channels=32, image_shape=ds.image_shape)
        t0 = time.perf_counter()
        run = pv.fit(model, None, ds, epochs=10 if cuda else 1, batch_size=100, progress=False, figures=False,
                     device=device, precision=prec)
        secs = (time.perf_counter() - t0) / len(run.history)
        test = ds.test if cuda else pv.data.Split(ds.test.x[:20], ds.test.y[:20])
        m = pv.evaluate(run, test, k=1000 if cuda else 10)
        out.append(f"{prec or 'fp32'}: {len(run.history)} epochs, {secs:.2f} s/epoch, test log p(x) "
                   f"{m['log_likelihood']:.2f} (K={m['k']}, {m['n']} images)")
    return "; ".join(out)


@part("streamed image folder")
def streamed(cuda: bool, device: str) -> str:
    from PIL import Image

    n, size = (2000, 32) if cuda else (40, 8)
    with tempfile.TemporaryDirectory() as d:
        rng = np.random.default_rng(0)
        for c in ("a", "b"):
            os.makedirs(os.path.join(d, c))
            for i in range(n // 2):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    os.path.join(d, c, f"{i}.png"))
        ds = pv.data.load(f"images:{d}?stream=1&workers={4 if cuda else 1}")
        model = pv.models.VAE(ds.shape, 16, hidden=128, arch="conv", channels=32, image_shape=ds.image_shape,
                              likelihood="logistic")
        run = pv.fit(model, None, ds, epochs=2, batch_size=64 if cuda else 16, progress=False, figures=False,
                     device=device)
        h = run.history[-1]
    return f"{n} RGB {size}x{size} PNGs from disk: {h['items_per_second']:.0f} items/s, loss {h['train_loss']:.1f}"


DDP_SCRIPT = """
import sys, torch, pyrovi as pv
ds = pv.data.load("digits")
torch.manual_seed(0)
model = pv.models.VAE(ds.shape, 4, hidden=64)
run = pv.fit(model, None, ds, epochs=2, batch_size=128, progress=False, figures=False,
             strategy="ddp", devices=1, accelerator=sys.argv[1])
print("DDP_OK", run.history[-1]["train_loss"], run.config.get("distributed"))
"""


@part("DDP smoke (1 process)")
def ddp(cuda: bool) -> str:
    if not cuda:
        return "skipped (no CUDA device; tests/test_distributed.py covers DDP on CPU)"
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(DDP_SCRIPT)
    r = subprocess.run([sys.executable, f.name, "cuda"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("DDP_OK")), None)
    return line if line and r.returncode == 0 else f"FAILED (rc {r.returncode}): {(r.stdout + r.stderr)[-300:]}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    where = torch.cuda.get_device_name(0) if cuda else "CPU only (CUDA parts skipped or CPU-sized)"
    print(f"[gpu_check] torch {torch.__version__}, pyrovi {pv.__version__}, {where}", flush=True)
    t0 = time.perf_counter()
    cuda_tests(cuda)
    step_bench(cuda)
    evaluation(cuda, device)
    conv_training(cuda, device)
    streamed(cuda, device)
    ddp(cuda)
    print(f"\n### GPU check: {where}, {time.perf_counter() - t0:.0f} s in all\n")
    print("| part | result | seconds |\n| --- | --- | --- |")
    for name, result, secs in ROWS:
        print(f"| {name} | {result} | {secs:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"part": a, "result": b, "seconds": c} for a, b, c in ROWS], f, indent=2)
    return int(any(str(r).startswith("FAILED") for _, r, _ in ROWS))


if __name__ == "__main__":
    sys.exit(main())
