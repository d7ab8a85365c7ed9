"""Cost of the stl and dreg gradient estimators against elbo and iwae, per guide (issue 17, item 1).

The objectives' docs promise that ``stl``/``dreg`` cost "the same plus one evaluation" of the
guide's log-density; issue 17 measured 10-25x on IAF flows, where the stop-gradient twin
*inverts* the flow. This script times one training step exactly as ``fit`` makes it
(:class:`pyrovi.loop.BatchLoss` + :func:`pyrovi.loop.train_step` + ``pyrovi.train.adam``)
for every guide with ``elbo``, ``stl`` (1 particle) and ``iwae``, ``dreg`` (K particles),
steps interleaved round-robin so load changes hit all objectives alike, and prints the
medians and the ratios ``stl/elbo`` and ``dreg/iwae`` (target of issue 17: at most 1.3).

    PYTHONPATH=. python benchmarks/bench_estimators.py [--steps 30] [--k 8] [--threads 1] [--before REV]
        [--repeats 1] [--clock cpu|wall]

``--clock cpu`` (the default with one thread) times each step by the calling thread's CPU time
(``time.thread_time``): with one torch thread that is all of the step's work, and unlike the wall
clock it does not count the time other jobs on a shared machine hold the core (on the 2-core VM
under a load of 4-5 the wall-clock ratios moved by +-0.3 between runs, the CPU-time ones by a
few hundredths). ``--clock wall`` (``time.perf_counter``) is the default with more threads.

With ``--before REV`` (a git revision, e.g. ``d8dc016``: main before the stop-gradient score read
the flow's recorded draw), the same measurement also runs on that revision's ``pyrovi`` package
(extracted with ``git archive`` into a temporary directory, in a subprocess) and the table shows
both revisions' ratios side by side: before and after, from one command.

Every measurement runs in a fresh process. One process's ratios move by about +-0.1 from one
process to the next (the spline's ``stl/elbo`` read 1.26-1.50 in four runs on one afternoon: the
C allocator's state, which pages a step faults in, differs per process), so claims use
``--repeats 5``: five processes per revision, alternating, each ratio printed as median (min-max).
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
from pathlib import Path

import pyro
import torch

import pyrovi as pv
from pyrovi.loop import BatchLoss, train_step
from pyrovi.train import adam

GUIDES = {
    "diag_normal": {"name": "diag_normal"},
    "mixture": {"name": "mixture"},
    "flow_iaf": {"name": "flow", "flow": "iaf", "depth": 4},
    "flow_planar": {"name": "flow", "flow": "planar", "depth": 4},
    "flow_radial": {"name": "flow", "flow": "radial", "depth": 4},
    "flow_spline": {"name": "flow", "flow": "spline", "depth": 2},
    "auto_flow": {"name": "auto", "family": "flow"},
}
OBJECTIVES = ("elbo", "stl", "iwae", "dreg")


def _steppers(gname: str, data, k: int, batch: int):
    """One (model, guide, optimizer, loss) per objective, all from the same seeded initial weights."""
    out = {}
    for oname in OBJECTIVES:
        pyro.set_rng_seed(0)
        model = pv.models.VAE(data.shape, 8, hidden=(128,))
        guide = pv.guides.build(model, {**GUIDES[gname], "hidden": [128]})
        particles = k if oname in ("iwae", "dreg") else 1
        try:  # the estimator itself from the first step: no warm start (older revisions have none)
            obj = pv.objectives.get(oname, particles=particles,
                                    **({"warm_start": 0} if oname in ("stl", "dreg") else {}))
        except pv.errors.ConfigError:
            obj = pv.objectives.get(oname, particles=particles)
        obj.max_plate_nesting, obj.data_plate = 1, "data"
        obj.check_guide(guide)
        loss = BatchLoss(obj, model, guide, global_sites=False)
        params = list(model.parameters()) + list(guide.parameters())
        out[oname] = (loss, adam(params, lr=1e-3))
    return out


def measure(gname: str, data, a) -> dict:
    """Median ms per step of each objective for guide ``gname``."""
    clock = time.thread_time if a.clock == "cpu" else time.perf_counter
    x = data.train.x
    steppers = _steppers(gname, data, a.k, a.batch)
    times = {o: [] for o in OBJECTIVES}
    g = torch.Generator().manual_seed(0)
    for i in range(a.warmup + a.steps):
        idx = torch.randint(len(x), (a.batch,), generator=g)
        order = OBJECTIVES[i % 4:] + OBJECTIVES[:i % 4]  # rotate: no objective always runs first
        for o in order:
            loss, opt = steppers[o]
            t0 = clock()
            train_step(loss, opt, x[idx])
            if i >= a.warmup:
                times[o].append(clock() - t0)
    return {o: 1e3 * statistics.median(v) for o, v in times.items()}


def _run(pkg: Path, argv: list) -> dict:
    """This script's measurement on the ``pyrovi`` package under ``pkg``, in a fresh process;
    ``{guide: {objective: ms}}``."""
    env = {**os.environ, "PYTHONPATH": str(pkg)}
    out = subprocess.run([sys.executable, __file__, "--json", *argv], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _ratios(runs: list, gname: str) -> tuple:
    """Each run's ``(stl/elbo, dreg/iwae)`` for guide ``gname``."""
    return tuple([r[gname][a] / r[gname][b] for r in runs] for a, b in (("stl", "elbo"), ("dreg", "iwae")))


def _spread(values: list) -> str:
    """``median`` of one run, ``median (min-max)`` of several."""
    med = statistics.median(values)
    return f"{med:.2f}" if len(values) == 1 else f"{med:.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--guides", default=",".join(GUIDES))
    ap.add_argument("--clock", choices=("cpu", "wall"), default=None,
                    help="cpu: the thread's CPU time (default with one thread); wall: elapsed time")
    ap.add_argument("--before", default=None, help="git revision to compare against (see the module doc)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="fresh processes per revision (alternating with --before's); ratios as median (min-max)")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # machine-readable, one process's run
    a = ap.parse_args()
    a.clock = a.clock or ("cpu" if a.threads == 1 else "wall")
    torch.set_num_threads(a.threads)
    if a.json:
        data = pv.data.load("digits")
        print(json.dumps({g: measure(g, data, a) for g in a.guides.split(",")}))
        return
    if a.repeats < 1:
        ap.error("--repeats must be at least 1")
    argv = ["--steps", str(a.steps), "--warmup", str(a.warmup), "--k", str(a.k), "--batch", str(a.batch),
            "--threads", str(a.threads), "--guides", a.guides, "--clock", a.clock]
    root = Path(__file__).resolve().parents[1]
    runs, before = [], []
    with tempfile.TemporaryDirectory() as tmp:
        if a.before:  # that revision's package, extracted once
            archive = subprocess.run(["git", "archive", a.before, "pyrovi"], cwd=root, check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        for _ in range(a.repeats):  # alternating, so a change in the machine's load hits both alike
            runs.append(_run(root, argv))
            if a.before:
                before.append(_run(Path(tmp), argv))
    print(f"digits VAE (8 latents, 128 hidden), batch {a.batch}, K={a.k} for iwae/dreg, {a.steps} steps, "
          f"{a.threads} thread(s); median ms per step ({a.clock} time), ratios "
          + (f"median (min-max) over {a.repeats} processes" if a.repeats > 1 else "of one process")
          + (f"; before = revision {a.before}" if a.before else ""))
    head = "| guide | elbo | stl | iwae | dreg | stl/elbo | dreg/iwae |"
    print(head + (" stl/elbo before | dreg/iwae before |" if a.before else ""))
    print("|---" * (head.count("|") - 1 + (2 if a.before else 0)) + "|")
    for gname in a.guides.split(","):
        ms = {o: statistics.median(r[gname][o] for r in runs) for o in OBJECTIVES}
        row = (f"| {gname} | {ms['elbo']:.1f} | {ms['stl']:.1f} | {ms['iwae']:.1f} | {ms['dreg']:.1f} | "
               + " | ".join(_spread(v) for v in _ratios(runs, gname)) + " |")
        if a.before:
            row += " " + " | ".join(_spread(v) for v in _ratios(before, gname)) + " |"
        print(row)


if __name__ == "__main__":
    main()
