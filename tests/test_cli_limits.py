"""Issue 19: sizes over the memory budget, malformed files for ``compare``, data of the wrong shape.

Every case is one line on stderr and exit 2 (a pyrovi error), never a traceback, an allocator
error or a kill. The memory bombs (``--particles 1e9``, ``sample --n 1e10``, ...) run in one child
process under ``resource.setrlimit(RLIMIT_AS)``, which reports each case's exit code, stderr
and the growth of its peak RSS (``VmHWM``).
"""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import torch
import pytest

import pyrovi as pv
from pyrovi import budget, cli
from pyrovi.errors import CheckpointError, ConfigError
from pyrovi.run_files import RunSetWarning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MPLBACKEND="Agg")
ENV.pop(budget.ENV, None)
X = np.random.default_rng(0).random((40, 4)).astype(np.float32)
MIB = 1 << 20


def _cli(argv) -> tuple:
    """``(exit code, stderr lines)`` of ``pyrovi argv`` run in process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(argv)
    return rc, [ln for ln in err.getvalue().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-epoch run on 4-dimensional data, and npz files of its data and of 6-dimensional data."""
    d = tmp_path_factory.mktemp("limits")
    np.savez(d / "x4.npz", x=X)
    np.savez(d / "x6.npz", x=np.random.default_rng(1).random((40, 6)).astype(np.float32))
    m = pv.models.VAE((4,), 2, hidden=(8,))
    pv.fit(m, pv.guides.DiagNormal(m, hidden=(8,)), X, epochs=2, batch_size=8, progress=False, device="cpu",
           out=str(d / "run"), figures=False)
    return d


# --------------------------------------------------------------------------- the memory budget

BOMB_CHILD = r"""
import contextlib, io, json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from pyrovi import cli

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

out = {}
for name, argv in json.loads(sys.argv[1]).items():
    before, err = hwm(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(argv)
    out[name] = {"rc": rc, "stderr": err.getvalue(), "grew": hwm() - before}
print(json.dumps(out))
"""


def test_cli_sizes_over_the_budget_are_refused_before_allocating(run_dir):
    d = run_dir
    run, data = str(d / "run"), f"npz:{d / 'x4.npz'}"
    train = ["train", "--data", data, "--likelihood", "gaussian", "--binarize", "none", "--epochs", "1",
             "--batch-size", "8", "--no-progress", "--device", "cpu", "--out", str(d / "bomb")]
    cases = {
        "train --particles": train + ["--particles", "1000000000", "--hidden", "8"],
        "train --hidden": train + ["--hidden", "1000000000"],
        "train --hidden 1e5,1e5": train + ["--hidden", "100000,100000"],
        "train --latent-dim": train + ["--latent-dim", "1000000000", "--hidden", "8"],
        "sample --n": ["sample", run, "--n", "10000000000", "--out", str(d / "s.npy"), "--device", "cpu"],
        "interpolate --steps": ["interpolate", run, "--steps", "1000000000", "--pairs", "2", "--data", data,
                                "--out", str(d / "i.png"), "--device", "cpu"],
        "diagnose --particles": ["diagnose", run, "--particles", "1000000000", "--no-save", "--no-progress",
                                 "--data", data, "--device", "cpu"],
        "evaluate --chunk": ["evaluate", run, "--k", "100000000", "--chunk", "100000000", "--no-save",
                             "--no-progress", "--data", data, "--device", "cpu"],
    }
    p = subprocess.run([sys.executable, "-c", BOMB_CHILD, json.dumps(cases)], capture_output=True, text=True,
                       env=ENV, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    flags = {"train --particles": "--particles", "train --hidden": "--hidden", "train --hidden 1e5,1e5": "--hidden",
             "train --latent-dim": "--latent-dim", "sample --n": "--n", "interpolate --steps": "--steps",
             "diagnose --particles": "--particles", "evaluate --chunk": "--chunk"}
    for name, r in res.items():
        lines = [ln for ln in r["stderr"].splitlines() if ln.strip()]
        assert r["rc"] == 2 and len(lines) == 1, (name, r)
        assert flags[name] in lines[0] and "memory budget" in lines[0] and budget.ENV in lines[0], (name, lines)
        assert r["grew"] < 256 * MIB, (name, r["grew"])  # refused before any big allocation


def test_budget_env_var(monkeypatch):
    monkeypatch.setenv(budget.ENV, "1M")
    assert budget.limit() == 1 << 20
    with pytest.raises(ConfigError, match=r"particles=9 needs about 2\.0 MiB .* budget of 1\.0 MiB"):
        budget.check_rows("particles=9", 512, 1024, "use fewer")
    monkeypatch.setenv(budget.ENV, "off")
    assert budget.limit() is None
    budget.check_rows("particles=9", 1 << 40, 1 << 20, "use fewer")  # no check
    monkeypatch.setenv(budget.ENV, "lots")
    with pytest.raises(ConfigError, match=budget.ENV):
        budget.limit()
    monkeypatch.delenv(budget.ENV)
    assert 0 < budget.limit() <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_api_sizes_over_the_budget(run_dir, monkeypatch):
    """The same checks through the API: fit particles, Run.sample n, evaluate chunk, diagnose particles."""
    monkeypatch.setenv(budget.ENV, "64M")
    m = pv.models.VAE((4,), 2, hidden=(8,))
    with pytest.raises(ConfigError, match="particles=10000000 needs about"):
        pv.fit(m, pv.guides.DiagNormal(m, hidden=(8,)), X, objective="iwae", particles=10 ** 7, epochs=1,
               batch_size=8, progress=False, device="cpu")
    run = pv.load_run(str(run_dir / "run"))
    with pytest.raises(ConfigError, match="n=100000000 needs about"):
        run.sample(10 ** 8)
    with pytest.raises(ConfigError, match="chunk=1000000"):
        pv.evaluate(run, X, k=10 ** 6, chunk=10 ** 6, batch_size=40, save=False)
    with pytest.raises(ConfigError, match="particles=100000000"):
        pv.diagnose(run, X, particles=10 ** 8, n=40, save=False)


def test_sampling_and_interpolation_sizes_over_the_budget(run_dir, monkeypatch):
    """The one prior sampler (uses.sample_prior, behind Run.sample) and interpolate check their sizes, for a Run
    and for a bare (model, guide) pair, before drawing anything; VQ code sampling too."""
    monkeypatch.setenv(budget.ENV, "64M")
    run = pv.load_run(str(run_dir / "run"))
    m = pv.models.VAE((4,), 2, hidden=(8,))
    for target in (run, (m, pv.guides.DiagNormal(m, hidden=(8,)))):
        with pytest.raises(ConfigError, match="n=100000000 needs about"):
            pv.uses.sample_prior(target, 10 ** 8)
        with pytest.raises(ConfigError, match="steps=100000000 needs about"):
            pv.uses.interpolate(target, X[:2], X[2:4], steps=10 ** 8)
        assert pv.uses.sample_prior(target, 3, seed=0).shape == (3, 4)  # within the budget: works
    torch.testing.assert_close(run.sample(5, seed=1), pv.uses.sample_prior(run, 5, seed=1))  # one sampler
    digits = pv.data.load("digits")
    vq = pv.models.VQVAE(digits.shape, 8, code_dim=4, channels=8, image_shape=digits.image_shape)
    vq_run = pv.fit(vq, pv.guides.Codebook(vq), digits.train.x[:64], epochs=1, batch_size=32, progress=False,
                    device="cpu", figures=False)
    with pytest.raises(ConfigError, match="n=100000000 needs about"):
        pv.priors.sample_codes(vq_run, None, 10 ** 8)


# --------------------------------------------------------------------------- compare on malformed files


def _malformed(cfg: dict) -> dict:
    """name -> (file, content): the 8 kinds of malformed file for each of the three files compare reads."""
    out = {}
    kinds = {
        "metrics.json": ("[1, 2]", json.dumps({"test": 3}), json.dumps({"val_loss": "abc"})),
        "config.json": ('"x"', json.dumps({k: v for k, v in cfg.items() if k != "model"}),
                        json.dumps({**cfg, "objective": {**cfg["objective"], "particles": "many"}})),
        "history.csv": ("epoch,train_loss,val_loss\n1,2\n", "a,b\n1,2\n", "epoch,train_loss,val_loss\n1,abc,2\n"),
    }
    for name, (wrong, missing, nonnum) in kinds.items():
        for kind, c in (("not JSON", "{{{ nope"), ("wrong types", wrong), ("missing keys", missing),
                        ("non-numeric", nonnum), ("empty", ""), ("a directory", "DIR"), ("huge", "HUGE"),
                        ("binary", bytes(range(256)) * 4)):
            out[f"{name} {kind}"] = (name, c)
    return out


def test_compare_on_malformed_files_is_one_line(run_dir, tmp_path):
    src = run_dir / "run"
    cfg = json.loads((src / "config.json").read_text())
    cases = _malformed(cfg)
    clean = []
    for case, (name, content) in cases.items():
        d = tmp_path / case.replace(" ", "_")
        shutil.copytree(src, d)
        p = d / name
        p.unlink()
        if content == "DIR":
            p.mkdir()
        elif content == "HUGE":
            with open(p, "wb") as f:
                f.truncate(100 * MIB)  # sparse: over every cap, refused by size before reading
        else:
            p.write_bytes(content if isinstance(content, bytes) else content.encode())
        if case == "history.csv empty":  # no rows beside weights saved after 2 epochs: shown, with a warning
            with pytest.warns(RunSetWarning, match="history.csv has 0 epochs"):
                assert _cli(["compare", str(d)])[0] == 0
            continue
        rc, lines = _cli(["compare", str(d)])
        assert rc == 2 and len(lines) == 1 and name in lines[0] and "Traceback" not in lines[0], (case, rc, lines)
        clean.append(case)
    assert len(cases) == 24 and len(clean) == 23


# --------------------------------------------------------------------------- data of the wrong shape


@pytest.mark.parametrize("command", [["evaluate", "--k", "2", "--no-save", "--no-progress"],
                                     ["diagnose", "--particles", "10", "--n", "5", "--no-save", "--no-progress"],
                                     ["interpolate", "--pairs", "2"]])
@pytest.mark.parametrize("data", ["x6", "digits"])
def test_data_of_another_shape_is_one_line(run_dir, command, data):
    src = f"npz:{run_dir / 'x6.npz'}" if data == "x6" else data
    argv = [command[0], str(run_dir / "run"), *command[1:], "--data", src, "--device", "cpu"]
    if command[0] == "interpolate":
        argv += ["--out", str(run_dir / "i.png")]
    rc, lines = _cli(argv)
    assert rc == 2 and len(lines) == 1 and "items have shape" in lines[0] and "(4,)" in lines[0], lines


def test_api_data_of_another_shape(run_dir):
    run = pv.load_run(str(run_dir / "run"))
    x6 = np.zeros((10, 6), np.float32)
    for call in (lambda: pv.evaluate(run, x6, k=2, save=False), lambda: pv.diagnose(run, x6, particles=10, save=False)):
        with pytest.raises(pv.errors.DataError, match=r"items have shape \(6,\)"):
            call()


# --------------------------------------------------------------------------- history.csv beside a checkpoint


@pytest.mark.parametrize("edit", ["fewer rows", "other last row", "partial extra row"])
def test_history_csv_against_the_checkpoint(run_dir, tmp_path, edit):
    """The checkpoint counts history.csv's rows and keeps the last one: an edited file is refused on resume;
    a partial row past the count (a trainer killed while appending it) is left out."""
    out = tmp_path / "run"
    shutil.copytree(run_dir / "run", out)
    (out / "weights.safetensors").unlink()  # an unfinished run: load_run reads the checkpoint
    h = out / "history.csv"
    lines = h.read_bytes().splitlines(keepends=True)
    if edit == "fewer rows":
        h.write_bytes(b"".join(lines[:-1]))
    elif edit == "other last row":
        h.write_bytes(b"".join(lines[:-1]) + lines[-1].replace(b"2,", b"2,1", 1))
    else:
        h.write_bytes(b"".join(lines) + b"3,1.5,2.")
    m = pv.models.VAE((4,), 2, hidden=(8,))
    fit = lambda: pv.fit(m, pv.guides.DiagNormal(m, hidden=(8,)), X, epochs=3, batch_size=8,  # noqa: E731
                         progress=False, device="cpu", out=str(out), resume=True, figures=False)
    if edit == "partial extra row":
        with pytest.warns(UserWarning, match="did not finish"):
            assert len(pv.load_run(str(out)).history) == 2
        assert [r["epoch"] for r in fit().history] == [1, 2, 3]
        return
    with pytest.warns(UserWarning, match="loaded without a history"):
        assert pv.load_run(str(out)).history == []
    with pytest.raises(CheckpointError, match="history.csv"):
        fit()
