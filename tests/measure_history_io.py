"""Bytes written (``wchar`` of /proc/self/io) by a fit of N epochs into a run directory (docs/reliability.md).

Not a test: ``PYTHONPATH=. python3 tests/measure_history_io.py DIR 100 1000 6000`` prints one line per N.
Run it on two checkouts to compare their I/O; a checkpoint is written after every epoch.
"""

import shutil
import sys
import time

import numpy as np
import torch

import pyrovi as pv


def wchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise RuntimeError("no /proc/self/io")


def main(directory: str, epochs: list) -> None:
    x = np.random.default_rng(0).random((40, 4)).astype(np.float32)
    for n in epochs:
        out = f"{directory}/run{n}"
        shutil.rmtree(out, ignore_errors=True)
        torch.manual_seed(0)
        m = pv.models.VAE((4,), 2, hidden=(8,))
        w0, t0 = wchar(), time.time()
        pv.fit(m, pv.guides.DiagNormal(m, hidden=(8,)), x, epochs=n, batch_size=36, progress=False, device="cpu",
               out=out, figures=False)  # 36 training rows: one step per epoch
        print(f"epochs {n}: {(wchar() - w0) / 1e6:.2f} MB written, {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [int(a) for a in sys.argv[2:]])
