#!/usr/bin/env bash
# pythae's VAE with pyrovi's conv networks on pyrovi's mnist5k split, in an environment of its own.
#   bash benchmarks/pythae_conv.sh [EPOCHS] [K] [TEST_ROWS]        (run from the repository root)
# Builds /tmp/pythae-venv (torch first, the same version as pyrovi's, then pythae), exports the
# split with pyrovi, and runs benchmarks/pythae_conv.py there.
set -euo pipefail
EPOCHS=${1:-10}
K=${2:-1000}
TEST_ROWS=${3:-500}
VENV=${PYTHAE_VENV:-/tmp/pythae-venv}
TORCH=$(python3 -c "import torch; print(torch.__version__.split('+')[0])")
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==$TORCH"
  "$VENV/bin/pip" install -q pythae
fi
python3 - <<'PY'
import numpy as np, pyrovi as pv
ds = pv.data.load("mnist5k")  # the split every mnist5k row in RESULTS.md uses (seed 0, static binarization)
np.savez("/tmp/mnist5k_split.npz", **{k: getattr(ds, k).x.reshape(-1, 1, 28, 28).numpy() for k in ("train", "val", "test")})
PY
OMP_NUM_THREADS=1 "$VENV/bin/python" benchmarks/pythae_conv.py --data /tmp/mnist5k_split.npz --epochs "$EPOCHS" --k "$K" --test-rows "$TEST_ROWS" --threads 1
