"""Faults during training: SIGKILL, full disk, read-only output, NaN, Ctrl-C. Nothing saved is lost.

The SIGKILL test runs a real training process, kills it at random moments with SIGKILL (no
chance to clean up), checks after every kill that the last checkpoint loads and that no epoch
already checkpointed was lost, resumes, and finally compares the whole loss history with an
uninterrupted run: a resumed run continues the same trajectory (weights, Adam moments, RNG and
shuffling restored), so the histories are identical. CI kills 2 times; the ``slow`` version
kills 25 times (docs/reliability.md records its result).
"""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import pyrovi as pv
from pyrovi import train_state
from pyrovi.checkpoint import load_tensors
from pyrovi.run_files import checkpoint_history
from pyrovi.errors import ConfigError, TrainingError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
X = np.random.default_rng(0).random((40, 4)).astype(np.float32)

CHILD = """
import sys
import torch
torch.set_num_threads(1)
import pyrovi as pv
out, data, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
ds = pv.data.load("npz:" + data)
model = pv.models.VAE(ds.shape, 4, hidden=(32,))
guide = pv.guides.DiagNormal(model, hidden=(32,))
print("ready", flush=True)
run = pv.fit(model, guide, ds, epochs=epochs, batch_size=64, out=out, resume=True, progress=False,
             figures=False, device="cpu")
print("done", len(run.history), flush=True)
"""


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory):
    from sklearn.datasets import load_digits

    d = tmp_path_factory.mktemp("data")
    # 400 real images keep each epoch short (5 steps), so kills land in every phase of an epoch
    np.savez(d / "digits.npz", x=(load_digits().data[:400] / 16.0).astype(np.float32))
    (d / "child.py").write_text(CHILD)
    return str(d / "digits.npz"), str(d / "child.py")


def _start(child, out, data, epochs):
    return subprocess.Popen([sys.executable, child, out, data, str(epochs)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)


def _checkpoint_state(out):
    """(epoch, history) of the checkpoint in ``out``, or (0, []) when none was written yet."""
    path = os.path.join(out, "checkpoint.safetensors")
    if not os.path.exists(path):
        return 0, []
    tensors, meta = load_tensors(path)  # raises CheckpointError if torn/corrupt: the test then fails
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith(("model/", "guide/")))
    history = checkpoint_history(path, meta)  # history.csv up to the checkpoint's count, its last row checked
    assert len(history) == meta["loop"]["epoch"] and "history" not in meta  # rows are not in the checkpoint
    return meta["loop"]["epoch"], history


def _kill_and_resume(tmp_path, digits_npz, kills: int, epochs: int, seed: int) -> dict:
    data, child = digits_npz
    out = str(tmp_path / "killed")
    rng = random.Random(seed)
    ckpt = os.path.join(out, "checkpoint.safetensors")
    done_kills, last_epoch, epochs_seen, loads, mid_write = 0, 0, [], 0, 0
    while done_kills < kills:
        stamp = os.stat(ckpt).st_mtime_ns if os.path.exists(ckpt) else None
        p = _start(child, out, data, epochs)
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        if rng.random() < 0.2:  # during start-up, resume or the first epoch of this process
            time.sleep(rng.uniform(0.0, 1.0))
        else:  # after this process wrote a checkpoint: at a random point of a later epoch or write
            deadline = time.time() + 300
            while p.poll() is None and time.time() < deadline and (
                    not os.path.exists(ckpt) or os.stat(ckpt).st_mtime_ns == stamp):
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.4))
        if p.poll() is not None:  # finished before the kill: the run is complete
            break
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        p.stdout.close()
        p.stderr.close()
        assert p.returncode == -signal.SIGKILL
        done_kills += 1
        mid_write += any(f.startswith(".tmp-") for f in os.listdir(out))  # killed inside atomic_write
        epoch, _ = _checkpoint_state(out)
        assert epoch >= last_epoch, f"kill {done_kills}: checkpoint went back from epoch {last_epoch} to {epoch}"
        if epoch:
            run = pv.load_run(out)  # an unfinished run loads from its last checkpoint
            assert len(run.history) == epoch
            loads += 1
        last_epoch = epoch
        epochs_seen.append(epoch)
    p = _start(child, out, data, epochs)  # resume to the end, undisturbed
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr
    run = pv.load_run(out)
    assert [h["epoch"] for h in run.history] == list(range(1, epochs + 1))
    leftovers = [f for f in os.listdir(out) if f.startswith(".tmp-")]
    assert leftovers == [], leftovers
    return {"kills": done_kills, "epochs_at_kills": epochs_seen, "history": run.history, "loads": loads,
            "mid_write": mid_write}


def _reference(tmp_path, digits_npz, epochs):
    data, child = digits_npz
    p = _start(child, str(tmp_path / "reference"), data, epochs)
    _, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr
    return pv.load_run(str(tmp_path / "reference")).history


def _same_trajectory(a, b):
    assert len(a) == len(b)
    for ha, hb in zip(a, b):
        assert ha["train_loss"] == hb["train_loss"] and ha["val_loss"] == hb["val_loss"], (ha, hb)


def test_sigkill_ci(tmp_path, digits_npz):
    res = _kill_and_resume(tmp_path, digits_npz, kills=2, epochs=8, seed=1)
    assert res["kills"] >= 1


@pytest.mark.slow
def test_sigkill_25_times(tmp_path, digits_npz):
    # each kill cycle advances some epochs (more as training gets faster: 150 epochs ended after 5-8
    # kills once fit used fused Adam and the fast path); 25 cycles must stay short of the end
    epochs = 1000
    res = _kill_and_resume(tmp_path, digits_npz, kills=25, epochs=epochs, seed=2)
    assert res["kills"] == 25
    _same_trajectory(res["history"], _reference(tmp_path, digits_npz, epochs))
    print(f"\nSIGKILL: {res['kills']} kills survived ({res['mid_write']} inside a file write), 0 corrupt "
          f"checkpoints, {res['loads']} load_run of "
          f"unfinished runs; checkpoint epoch at each kill: {res['epochs_at_kills']}; final history of "
          f"{epochs} epochs identical to an uninterrupted run")


def test_resumed_run_continues_the_same_trajectory(tmp_path, digits_npz):
    """In process: 2 epochs, then resume to 3 == 3 epochs straight."""
    ds = pv.data.load("npz:" + digits_npz[0])

    def go(out, epochs, resume=False):
        torch.manual_seed(0)
        m = pv.models.VAE(ds.shape, 4, hidden=(32,))
        return pv.fit(m, pv.guides.DiagNormal(m, hidden=(32,)), ds, epochs=epochs, batch_size=64, out=out,
                      resume=resume, progress=False, figures=False, device="cpu")

    straight = go(str(tmp_path / "a"), 3).history
    go(str(tmp_path / "b"), 2)
    resumed = go(str(tmp_path / "b"), 3, resume=True).history
    _same_trajectory(straight, resumed)


# --------------------------------------------------------------------------- disk faults


def _small(out, **kw):
    m = pv.models.VAE((4,), 2, hidden=(8,))
    g = pv.guides.DiagNormal(m, hidden=(8,))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    kw = {"epochs": 3, "batch_size": 8, "progress": False, "figures": False, "device": "cpu", **kw}
    return m, before, lambda: pv.fit(m, g, X, out=out, **kw)


def _raiser(code):
    def f(*a, **k):
        raise OSError(code, os.strerror(code))
    return f


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions; see the simulated test")
def test_read_only_directory_real(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    m, before, go = _small(str(ro / "run"))
    with pytest.raises(ConfigError, match="out="):
        go()
    _, _, go2 = _small(str(ro))
    with pytest.raises(ConfigError, match="not writable"):
        go2()


def test_read_only_directory_simulated(tmp_path, monkeypatch):
    """EROFS from the file system: refused before the first training step, weights untouched."""
    m, before, go = _small(str(tmp_path / "new"))
    monkeypatch.setattr(os, "makedirs", _raiser(errno.EROFS))
    with pytest.raises(ConfigError, match="cannot create run directory.*Read-only file system"):
        go()
    monkeypatch.undo()
    (tmp_path / "existing").mkdir()
    m, before, go = _small(str(tmp_path / "existing"))
    monkeypatch.setattr(train_state, "open", _raiser(errno.EROFS), raising=False)  # train_state.py's open() only
    with pytest.raises(ConfigError, match="cannot write into out=.*Read-only file system"):
        go()
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert os.listdir(tmp_path / "existing") == []


def test_full_disk_before_training(tmp_path, monkeypatch):
    m, before, go = _small(str(tmp_path / "run"))
    monkeypatch.setattr(os, "fsync", _raiser(errno.ENOSPC))
    with pytest.raises(ConfigError, match="No space left on device; free disk space"):
        go()
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert os.listdir(tmp_path / "run") == []  # the write probe was removed too


def test_disk_fills_during_training_keeps_last_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    ckpt = out / "checkpoint.safetensors"
    real_fsync = os.fsync

    def fsync(fd):  # the disk is full once the first checkpoint is on it
        if ckpt.exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    _, _, go = _small(str(out), epochs=3)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(TrainingError, match="after epoch 2: No space left on device; the previous checkpoint"):
        go()
    monkeypatch.undo()
    _, meta = load_tensors(str(ckpt))
    assert meta["loop"]["epoch"] == 1
    assert [f for f in os.listdir(out) if f.startswith(".tmp-")] == []  # no half-written file left
    _, _, go = _small(str(out), epochs=3, resume=True)
    assert [h["epoch"] for h in go().history] == [1, 2, 3]


# --------------------------------------------------------------------------- NaN


class _NaNAt(pv.objectives.ELBO):
    """ELBO whose training loss turns NaN at training step ``at`` (1-based); same name, so resume accepts it."""

    def __init__(self, at):
        super().__init__()
        self.at, self.calls = at, 0

    def __call__(self, model, guide, *args, **kwargs):
        loss = super().__call__(model, guide, *args, **kwargs)
        if torch.is_grad_enabled():  # fit makes one differentiable call to find parameters, then trains
            self.calls += 1
            if self.calls == self.at + 1:
                return loss * float("nan")
        return loss


def test_nan_stops_reports_step_keeps_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    m, _, go = _small(out, objective=_NaNAt(12), epochs=5)  # 36 train rows / 8 = 5 steps per epoch
    with pytest.raises(TrainingError) as e:
        go()
    msg = str(e.value)
    assert "loss became nan at epoch 3, step 12" in msg and "last good checkpoint (epoch 2) is kept" in msg
    tensors, meta = load_tensors(os.path.join(out, "checkpoint.safetensors"))
    assert meta["loop"]["epoch"] == 2 and len(checkpoint_history(os.path.join(out, "checkpoint.safetensors"), meta)) == 2
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
    run = pv.load_run(out)  # the unfinished run loads from that checkpoint
    assert len(run.history) == 2
    _, _, go = _small(out, epochs=5, resume=True)  # and continues once the cause is gone
    assert [h["epoch"] for h in go().history] == [1, 2, 3, 4, 5]


# --------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_keeps_checkpoint_and_exits_130(tmp_path, digits_npz):
    data, _ = digits_npz
    out = str(tmp_path / "run")
    args = [sys.executable, "-m", "pyrovi.cli", "train", "--data", "npz:" + data, "--hidden", "32",
            "--latent-dim", "4", "--batch-size", "64", "--no-progress", "--out", out]
    p = subprocess.Popen(args + ["--epochs", "1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=ENV, cwd=ROOT)
    ckpt = os.path.join(out, "checkpoint.safetensors")
    deadline = time.time() + 120
    while not os.path.exists(ckpt) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted; the checkpoint of epoch" in stderr and "pyrovi train: interrupted" in stderr
    epoch, _ = _checkpoint_state(out)
    assert epoch >= 1
    with pytest.warns(UserWarning, match="did not finish"):
        assert len(pv.load_run(out).history) == epoch
    from pyrovi import cli

    assert cli.main(args[3:] + ["--epochs", str(epoch + 1), "--resume"]) == 0  # in process: same code, no start-up
    assert len(pv.load_run(out).history) == epoch + 1
    metrics = json.loads(open(os.path.join(out, "metrics.json")).read())
    assert metrics["epochs"] == epoch + 1
