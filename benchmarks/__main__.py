"""`python -m benchmarks`: run every benchmark script in turn (not part of the unit tests)."""

import runpy
import sys

SCRIPTS = ["benchmarks.bench_step", "benchmarks.ddp_agreement"]

if __name__ == "__main__":
    for name in SCRIPTS:
        print(f"\n=== {name}", flush=True)
        sys.argv = [name]
        runpy.run_module(name, run_name="__main__")
