#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): CUDA tests, step benchmark (fp32/bf16, MLP/conv),
# evaluation at K=5000, a conv-VAE run on mnist5k, streamed images, 1-GPU DDP; < 10 min on one GPU.
# Prints a markdown table for benchmarks/RESULTS.md. Without CUDA the CUDA parts are skipped and the
# rest runs CPU-sized (a minute or two). Run from anywhere:  bash benchmarks/gpu_check.sh [--json FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg
exec python3 -m benchmarks.gpu_check "$@"
