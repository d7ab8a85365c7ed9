"""Bytes written (wchar of /proc/self/io) by a fit of N epochs into a run directory (docs/reliability.md).

Usage: PYTHONPATH=. python3 tests/measure_history_io.py DIR 100 1000 6000
"""
import sys, time, numpy as np, torch, pyrovi as pv, shutil
def wchar():
    for line in open("/proc/self/io"):
        if line.startswith("wchar:"):
            return int(line.split()[1])
X = np.random.default_rng(0).random((40, 4)).astype(np.float32)
for n in map(int, sys.argv[2:]):
    out = f"{sys.argv[1]}/run{n}"
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(0)
    m = pv.models.VAE((4,), 2, hidden=(8,))
    w0, t0 = wchar(), time.time()
    pv.fit(m, pv.guides.DiagNormal(m, hidden=(8,)), X, epochs=n, batch_size=36, progress=False, device="cpu", out=out, figures=False)
    print(f"epochs {n}: {(wchar() - w0) / 1e6:.2f} MB written, {time.time() - t0:.0f} s", flush=True)
