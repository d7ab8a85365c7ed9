"""Issue 19: a run directory is one set of files, whatever kills its writer or reads it mid-save.

* Real SIGKILLs (``PYROVI_KILL_AFTER_WRITE=n``: the writer kills itself right after its n-th
  file write) during a fresh fit and its final save, a resume of a finished run and an
  overwrite with another architecture: afterwards ``load_run`` either loads one save's files
  whole, identical to a run that was not killed, or warns, or refuses. Never a silent mix.
* A reader (``load_run``) running while another process saves two different runs in turn into
  one directory gets one of them whole or a warning, never a silent mix.
"""

import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import pyrovi as pv
from pyrovi.checkpoint import KILL_ENV
from pyrovi.errors import PyroviError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MPLBACKEND="Agg")
X = np.random.default_rng(0).random((40, 4)).astype(np.float32)

def _fit(out, epochs, mode):
    """The fit every child runs (also run in-process for the references)."""
    hidden = (6,) if mode == "overwrite" else (8,)
    torch.manual_seed(0)
    m = pv.models.VAE((4,), 2, hidden=hidden)
    return pv.fit(m, pv.guides.DiagNormal(m, hidden=hidden), X, epochs=epochs, batch_size=8, progress=False,
                  device="cpu", out=str(out), resume=mode == "resume", overwrite=mode == "overwrite",
                  figures=False, seed=0)


#: fit in a child: ``out epochs mode`` (mode: fresh | resume | overwrite; overwrite builds another architecture)
CHILD = r"""
import sys
sys.path.insert(0, {tests!r})
from test_run_sets import _fit
from pyrovi import checkpoint
out, epochs, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
print("go", flush=True)  # imports done: the fit starts now
_fit(out, epochs, mode)
print("writes", checkpoint._WRITES[0])
""".format(tests=os.path.dirname(os.path.abspath(__file__)))

SCENARIOS = {"fresh": 2, "resume": 3, "overwrite": 2}  # epochs of the child's fit


def _signature(run) -> tuple:
    """What makes a run directory one save: its config, history and every tensor."""
    import json

    tensors = tuple(sorted((k, v.detach().cpu().numpy().tobytes()) for k, v in run.state_tensors().items()))
    history = [{k: v for k, v in h.items() if k not in ("seconds", "items_per_second")} for h in run.history]
    metrics = {k: v for k, v in run.metrics.items() if k != "train_seconds"}
    return (json.dumps(run.config, sort_keys=True), json.dumps(history, sort_keys=True), tensors,  # not timings
            json.dumps(metrics, sort_keys=True))


def _outcome(out, wholes: dict) -> str:
    """``"refused"``, ``"warned"`` or the name of the whole save ``load_run(out)`` returned (else the test fails)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run = pv.load_run(str(out))
        except PyroviError:
            return "refused"
    if any(issubclass(w.category, UserWarning) for w in caught):
        return "warned"
    sig = _signature(run)
    names = [name for name, s in wholes.items() if s == sig]
    assert names, f"{out}: load_run returned, without a warning, a run that is no save's whole set"
    return names[0]


@pytest.fixture(scope="module")
def saves(tmp_path_factory):
    """The finished run the children start from, and the whole runs each scenario may leave (made in-process)."""
    base = tmp_path_factory.mktemp("sets")
    template = base / "template"
    _fit(template, 2, "fresh")
    wholes = {"old": _signature(pv.load_run(str(template)))}
    for mode, epochs in (("resume", 3), ("overwrite", 2)):
        d = base / f"ref-{mode}"
        shutil.copytree(template, d)
        _fit(d, epochs, mode)
        wholes[f"new {mode}"] = _signature(pv.load_run(str(d)))
    return template, wholes


def _kill_after(template, out, mode: str, n) -> subprocess.CompletedProcess:
    if mode != "fresh":
        shutil.copytree(template, out)
    env = dict(ENV, **{KILL_ENV: str(n)})
    return subprocess.run([sys.executable, "-c", CHILD, str(out), str(SCENARIOS[mode]), mode], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def _writes(template, tmp_path, mode: str) -> int:
    """Files the child writes in scenario ``mode`` (it counts them, killing nobody)."""
    p = _kill_after(template, tmp_path / f"count-{mode}", mode, 10 ** 9)
    assert p.returncode == 0, p.stderr[-2000:]
    return int(p.stdout.split("writes")[-1])


def _kill_suite(saves, tmp_path, points: dict) -> dict:
    template, wholes = saves
    counts: dict = {}
    for mode, ns in points.items():
        for n in ns:
            out = tmp_path / f"{mode}-{n}"
            p = _kill_after(template, out, mode, n)
            assert p.returncode == -9, (mode, n, p.returncode, p.stderr[-1500:])  # a real SIGKILL
            got = _outcome(out, wholes)
            assert got in ("refused", "warned", "old", f"new {mode}"), (mode, n, got)
            counts[(mode, n)] = got
    return counts


def test_kills_in_a_resume_never_leave_a_silent_mix(saves, tmp_path):
    """Fast part: two kill points of a resume of a finished run (inside the training, inside the final save)."""
    counts = _kill_suite(saves, tmp_path, {"resume": [3, 6]})
    assert len(counts) == 2


@pytest.mark.slow
def test_kills_after_every_write_of_save_resume_overwrite(saves, tmp_path):
    """Slow part: a SIGKILL after each file write of a fresh fit and its final save, of a resume and of an
    overwrite (the kill suite of docs/reliability.md)."""
    template, _ = saves
    points = {mode: list(range(1, _writes(template, tmp_path, mode) + 1)) for mode in SCENARIOS}
    results = _kill_suite(saves, tmp_path, points)
    tally: dict = {}
    for v in results.values():
        tally[v] = tally.get(v, 0) + 1
    print(f"\nkill suite: {len(results)} SIGKILLs, write points {({m: len(p) for m, p in points.items()})}, "
          f"outcomes {tally}")
    assert len(results) >= 20


def _killed_at_random(template, out, mode: str, seconds: float) -> subprocess.Popen:
    """Start the child's fit and SIGKILL it from outside ``seconds`` after its fit began (if still running)."""
    import time

    if mode != "fresh":
        shutil.copytree(template, out)
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(out), str(SCENARIOS[mode]), mode], env=ENV, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert p.stdout.readline().strip() == "go"
    t0 = time.perf_counter()
    try:
        p.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    p.elapsed = time.perf_counter() - t0
    return p


@pytest.mark.slow
def test_twenty_external_sigkills_at_random_times_per_scenario(saves, tmp_path):
    """20 real SIGKILLs sent from outside at a uniformly random time of a fresh fit with its final save, of a
    resume of a finished run and of an overwrite: each leaves one save whole, or a warning, or a refusal."""
    template, wholes = saves
    rng = np.random.default_rng(19)
    tally: dict = {}
    for mode in SCENARIOS:
        length = _killed_at_random(template, tmp_path / f"time-{mode}", mode, 600).elapsed  # unkilled: its length
        for i in range(20):
            out = tmp_path / f"rand-{mode}-{i}"
            p = _killed_at_random(template, out, mode, float(rng.uniform(0, length)))
            got = "finished" if p.returncode == 0 else _outcome(out, wholes)
            if got == "finished":
                assert _outcome(out, wholes) in ("old", f"new {mode}")
            assert got in ("finished", "refused", "warned", "old", f"new {mode}"), (mode, i, got)
            tally[(mode, got)] = tally.get((mode, got), 0) + 1
    print(f"\nrandom-time kills: {sum(tally.values())} children, outcomes {tally}")
    assert sum(v for (m, g), v in tally.items() if g != "finished") >= 40  # most children were really killed


# --------------------------------------------------------------------------- a reader during saves

WRITER = r"""
import sys, time
import pyrovi as pv
a, b, out, seconds = pv.load_run(sys.argv[1]), pv.load_run(sys.argv[2]), sys.argv[3], float(sys.argv[4])
a.save(out)
print("ready", flush=True)
end, i = time.time() + seconds, 0
while time.time() < end:
    (a if i % 2 else b).save(out)
    i += 1
print("saves", i, flush=True)
"""


def test_reader_during_saves_sees_one_save_or_a_warning(saves, tmp_path):
    """Two runs of the same architecture (so a mix would load without error) saved in turn while read."""
    template, wholes = saves
    other = tmp_path / "other"
    shutil.copytree(template, other)
    _fit(other, 3, "resume")  # same shapes, other weights, config (epochs) and history
    out = tmp_path / "shared"
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(template), str(other), str(out), "2"], env=ENV,
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready", p.stderr.read()
    wholes = {"a": wholes["old"], "b": _signature(pv.load_run(str(other)))}
    tables = {name: sig[:2] for name, sig in wholes.items()}  # what compare reads: config and history
    seen: dict = {}
    while p.poll() is None:
        got = _outcome(out, wholes)
        seen[got] = seen.get(got, 0) + 1
        got = "compare " + _summary_outcome(out, tables)
        seen[got] = seen.get(got, 0) + 1
    assert p.returncode == 0, p.stderr.read()[-2000:]
    print(f"\nreaders during saves: {seen}; writer {p.stdout.read().strip()}")
    assert seen.get("a", 0) + seen.get("b", 0) >= 1


def _summary_outcome(out, tables: dict) -> str:
    """Like :func:`_outcome` for the files ``pyrovi compare`` reads (config.json, history.csv)."""
    import json

    from pyrovi.run_files import read_summary

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            config, _, history = read_summary(str(out))
        except PyroviError:
            return "refused"
    if caught:
        return "warned"
    history = [{k: v for k, v in h.items() if k not in ("seconds", "items_per_second")} for h in history]
    sig = (json.dumps(config, sort_keys=True), json.dumps(history, sort_keys=True))
    names = [name for name, t in tables.items() if t == sig]
    assert names, f"{out}: compare read, without a warning, a config and history of no single save"
    return names[0]


def test_metrics_of_another_save_are_a_mixed_set(saves, tmp_path):
    """fit's own part of metrics.json is named by the weights like config and history: another save's metrics
    beside these weights warn (load_run and compare); held-out results written later by evaluate do not."""
    import json

    from pyrovi.run_files import RunSetWarning, read_summary

    template, _ = saves
    out = tmp_path / "run"
    shutil.copytree(template, out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a whole set: no warning at all
        pv.evaluate(pv.load_run(str(out)), X, k=2, progress=False)  # writes "test" into metrics.json later
        assert "test" in read_summary(str(out))[1]
        pv.load_run(str(out))  # a held-out result written after the weights: still one set
    path = out / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["train_loss"] = metrics["train_loss"] + 1.0  # another save's training numbers
    path.write_text(json.dumps(metrics))
    with pytest.warns(RunSetWarning, match="metrics.json is not the one"):
        pv.load_run(str(out))
    with pytest.warns(RunSetWarning, match="metrics.json is not the one"):
        read_summary(str(out))
