"""Issue 19: untrusted checkpoints, data files and run-directory files.

* A checkpoint is checked whole against the live model, guide, optimizer, scheduler and RNGs
  before any of it touches torch state: a crafted one gives a :class:`CheckpointError` (in the
  CLI one line, exit 2), never a signal, a traceback or a run that trains uphill.
* Memory bombs (tiny files that inflate, special files, huge JSON) run in a child process under
  an address-space cap (``resource.setrlimit(RLIMIT_AS)``), so a regression fails the test
  instead of taking the machine down; the child reports its peak RSS (``VmHWM``, since
  ``resource.getrusage``'s ``ru_maxrss`` keeps the forking parent's peak across ``exec``).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import pyrovi as pv
from pyrovi import cli
from pyrovi.checkpoint import load_tensors, save_tensors
from pyrovi.errors import CheckpointError
from pyrovi.run_files import checkpoint_history

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MPLBACKEND="Agg")
X = np.random.default_rng(0).random((40, 4)).astype(np.float32)
#: address-space cap of every child that reads a possibly hostile file (torch alone maps ~1.5 GB)
CAP = 3 << 30
MIB = 1 << 20

# --------------------------------------------------------------------------- item 1: crafted checkpoints

TRAIN_ARGS = ["train", "--hidden", "8", "--latent-dim", "2", "--batch-size", "8", "--no-progress",
              "--device", "cpu", "--likelihood", "gaussian", "--binarize", "none"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A 2-epoch run written by ``pyrovi train`` (in process), and the args that resume it."""
    d = tmp_path_factory.mktemp("cli")
    np.savez(d / "x.npz", x=X)
    out = d / "run"
    args = TRAIN_ARGS + ["--data", f"npz:{d / 'x.npz'}", "--out", str(out)]
    assert cli.main(args + ["--epochs", "2"]) == 0
    return out, args


def _tamper(path, tensors=None, meta=None):
    """Edit a checkpoint; an edit of ``m["history"]`` is written in the form of older checkpoints (rows inside)."""
    t, m = load_tensors(str(path))
    if tensors:
        tensors(t)
    if meta:
        rows = checkpoint_history(str(path), m)
        m["history"] = [dict(r) for r in rows]
        meta(m)
        if m["history"] == rows:
            del m["history"]  # not edited: keep the rows in history.csv, as pyrovi writes them
    save_tensors(str(path), t, m)


def test_wrong_shape_adam_moment_cli_exit_2_no_signal(cli_run, tmp_path):
    """The issue's SIGSEGV: optim/0/exp_avg of the wrong shape went straight into fused Adam."""
    import shutil

    src, args = cli_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    ckpt = out / "checkpoint.safetensors"
    _tamper(ckpt, tensors=lambda t: t.update({"optim/0/exp_avg": torch.zeros(3, 3)}))
    args = [a if a != str(src) else str(out) for a in args]
    p = subprocess.run([sys.executable, "-m", "pyrovi.cli", *args, "--epochs", "4", "--resume"],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "CheckpointError" not in lines[0] and "optim/0/exp_avg" in lines[0], lines


def _vector_step(t):
    t["optim/0/step"] = torch.ones(3)


def _drop(key):
    return lambda m: m["history"][0].pop(key)


CKPT_EDITS = {
    # tensors
    "exp_avg wrong shape": (lambda t: t.update({"optim/0/exp_avg": torch.zeros(3, 3)}), None, "exp_avg"),
    "exp_avg_sq negative": (lambda t: t["optim/0/exp_avg_sq"].fill_(-1.0), None, "negative"),
    "exp_avg NaN": (lambda t: t["optim/1/exp_avg"].fill_(float("nan")), None, "NaN"),
    "exp_avg integer": (lambda t: t.update({"optim/0/exp_avg": t["optim/0/exp_avg"].long()}), None, "exp_avg"),
    "vector step": (_vector_step, None, "step"),
    "NaN step": (lambda t: t["optim/0/step"].fill_(float("nan")), None, "step"),
    "unknown optimizer state": (lambda t: t.update({"optim/0/momentum_buffer": torch.zeros(1)}), None, "momentum"),
    "optimizer index out of range": (lambda t: t.update({"optim/999/step": torch.tensor(1.0)}), None, "999"),
    "missing moment": (lambda t: t.pop("optim/0/exp_avg_sq"), None, "expected"),
    "weight wrong shape": (lambda t: t.update({"model/decoder.0.weight": torch.zeros(20, 20)}), None, "shape"),
    "weight NaN": (lambda t: t["guide/" + next(k[6:] for k in t if k.startswith("guide/"))].fill_(float("nan")),
                   None, "NaN"),
    "weight missing": (lambda t: t.pop("model/decoder.0.weight"), None, "missing"),
    "unknown tensor": (lambda t: t.update({"evil/x": torch.zeros(1)}), None, "never writes"),
    "rng wrong size": (lambda t: t.update({"rng/torch": torch.zeros(7, dtype=torch.uint8)}), None, "rng/torch"),
    "rng wrong dtype": (lambda t: t.update({"rng/shuffle": t["rng/shuffle"].float()}), None, "rng/shuffle"),
    "rng missing": (lambda t: t.pop("rng/torch"), None, "rng/torch"),
    # optimizer groups
    "lr -1": (None, lambda m: m["optimizer"]["param_groups"][0].update(lr=-1), "lr=-1"),
    "lr inf": (None, lambda m: m["optimizer"]["param_groups"][0].update(lr=float("inf")), "lr=inf"),
    "lr string": (None, lambda m: m["optimizer"]["param_groups"][0].update(lr="big"), "lr="),
    "betas junk": (None, lambda m: m["optimizer"]["param_groups"][0].update(betas=[2, 3]), "betas"),
    "eps 0": (None, lambda m: m["optimizer"]["param_groups"][0].update(eps=0), "eps"),
    "group params other": (None, lambda m: m["optimizer"]["param_groups"][0].update(params=[0]), "other parameters"),
    "group unknown key": (None, lambda m: m["optimizer"]["param_groups"][0].update(evil=1), "evil"),
    "two groups": (None, lambda m: m["optimizer"]["param_groups"].append({}), "groups"),
    "scalars": (None, lambda m: m["optimizer"].update(scalars={"0/step": 3}), "non-tensor"),
    # scheduler
    "scheduler string": (None, lambda m: m.update(scheduler="junk"), "scheduler"),
    "scheduler base_lrs negative": (None, lambda m: m["scheduler"].update(base_lrs=[-1.0]), "base_lrs"),
    "scheduler last_epoch float": (None, lambda m: m["scheduler"].update(last_epoch=1.5), "last_epoch"),
    "scheduler last_epoch list": (None, lambda m: m["scheduler"].update(last_epoch=[1] * 10), "last_epoch"),
    "scheduler extra key": (None, lambda m: m["scheduler"].update(gamma=0.5), "scheduler"),
    # loop and history
    "loop step vector": (None, lambda m: m["loop"].update(step=[1, 2]), "loop"),
    "loop epoch bool": (None, lambda m: m["loop"].update(epoch=True), "loop"),
    "loop best NaN": (None, lambda m: m["loop"].update(best=float("nan")), "loop"),
    "loop extra key": (None, lambda m: m["loop"].update(evil=1), "loop"),
    "history row without val_loss": (None, _drop("val_loss"), "val_loss"),
    "history row a string": (None, lambda m: m["history"].__setitem__(0, "x"), "history row 1"),
    "history too short": (None, lambda m: m["history"].pop(), "history"),
    "history loss inf": (None, lambda m: m["history"][1].update(train_loss=float("inf")), "train_loss"),
    "history epoch wrong": (None, lambda m: m["history"][1].update(epoch=7), "epoch 7"),
    "no config": (None, lambda m: m.pop("config"), "config"),
}


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    torch.manual_seed(0)
    m = pv.models.VAE((4,), 2, hidden=(8,))
    pv.fit(m, pv.guides.DiagNormal(m, hidden=(8,)), X, epochs=2, batch_size=8, progress=False, device="cpu",
           out=str(out), figures=False)
    return out


@pytest.mark.parametrize("case", sorted(CKPT_EDITS))
def test_crafted_checkpoint_refused_before_touching_state(api_run, tmp_path, case):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(api_run, out)
    tfn, mfn, msg = CKPT_EDITS[case]
    _tamper(out / "checkpoint.safetensors", tfn, mfn)
    torch.manual_seed(1)
    m = pv.models.VAE((4,), 2, hidden=(8,))
    g = pv.guides.DiagNormal(m, hidden=(8,))
    before = {k: v.clone() for k, v in {**m.state_dict(), **{"g" + k: v for k, v in g.state_dict().items()}}.items()}
    rng = torch.get_rng_state()
    with pytest.raises(CheckpointError, match=msg) as e:
        pv.fit(m, g, X, epochs=3, batch_size=8, progress=False, device="cpu", out=str(out), resume=True,
               figures=False)
    assert len(str(e.value)) < 500
    after = {**m.state_dict(), **{"g" + k: v for k, v in g.state_dict().items()}}
    assert all(torch.equal(before[k], after[k]) for k in before), "weights were touched before the refusal"
    del rng


def test_untampered_checkpoint_resumes(api_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(api_run, out)
    m = pv.models.VAE((4,), 2, hidden=(8,))
    run = pv.fit(m, pv.guides.DiagNormal(m, hidden=(8,)), X, epochs=3, batch_size=8, progress=False,
                 device="cpu", out=str(out), resume=True, figures=False)
    assert [h["epoch"] for h in run.history] == [1, 2, 3]


@pytest.mark.parametrize("schedule", ["cosine", "exponential"])
def test_resume_with_every_lr_schedule(tmp_path, schedule):
    m = pv.models.VAE((4,), 2, hidden=(8,))
    kw = dict(batch_size=8, progress=False, device="cpu", out=str(tmp_path / "r"), figures=False,
              lr_schedule=schedule, patience=5)
    pv.fit(m, pv.guides.DiagNormal(m, hidden=(8,)), X, epochs=2, **kw)
    m = pv.models.VAE((4,), 2, hidden=(8,))
    run = pv.fit(m, pv.guides.DiagNormal(m, hidden=(8,)), X, epochs=3, resume=True, **kw)
    assert len(run.history) == 3


# --------------------------------------------------------------------------- item 4: smaller ones


def test_run_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        m = pv.models.VAE((4,), 2, hidden=(8,))
        out = tmp_path / "run"
        pv.fit(m, pv.guides.DiagNormal(m, hidden=(8,)), X, epochs=1, batch_size=8, progress=False, device="cpu",
               out=str(out), figures=False)
        modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
        assert modes and all(v == 0o644 for v in modes.values()), modes
        os.umask(0o077)
        from pyrovi.checkpoint import write_json

        write_json(str(out / "private.json"), {})
        assert (out / "private.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_stored_text_source_cannot_climb_out(tmp_path):
    from pyrovi.errors import ConfigError

    for name in ("text:../../etc/passwd", "text:a/../../b", "idx:ok.gz,../../etc/x"):
        with pytest.raises(ConfigError, match=r"'\.\.'"):
            pv.data.from_source({"name": name, "kind": "text" if name.startswith("text") else None})


def test_csv_with_byte_order_mark_keeps_its_first_row(tmp_path):
    p = tmp_path / "bom.csv"
    p.write_bytes(b"\xef\xbb\xbf" + b"".join(b"%d,0.5,0.25\n" % i for i in range(10)))
    x, y, _ = pv.readers.read_csv(str(p))
    assert x.shape == (10, 3) and x[0, 0] == 0
    p.write_bytes(b"\xef\xbb\xbfa,label\n" + b"".join(b"0.5,%d\n" % (i % 2) for i in range(10)))
    x, y, _ = pv.readers.read_csv(str(p))
    assert x.shape == (10, 1) and y is not None and list(y[:2]) == [0, 1]


def test_big_endian_npz_loads(tmp_path):
    x = np.random.default_rng(1).random((30, 5)).astype(">f4")
    y = (np.arange(30) % 3).astype(">i8")
    np.savez(tmp_path / "be.npz", x=x, y=y)
    ds = pv.data.load(f"npz:{tmp_path / 'be.npz'}")
    got = torch.cat([ds.train.x, ds.val.x, ds.test.x])
    assert got.dtype == torch.float32 and got.shape == (30, 5)
    assert np.allclose(np.sort(got.numpy().ravel()), np.sort(x.astype("<f4").ravel()))
    assert ds.num_classes == 3


@pytest.mark.parametrize("bad", [float("-inf"), float("inf"), float("nan")])
def test_labels_with_inf_or_nan_are_a_data_error(tmp_path, bad):
    from pyrovi.errors import DataError

    y = np.zeros(20)
    y[3] = bad
    with pytest.raises(DataError, match="label"):
        pv.data.from_arrays(np.random.default_rng(0).random((20, 3)), y)
    np.savez(tmp_path / "l.npz", x=np.random.default_rng(0).random((20, 3)), y=y)
    with pytest.raises(DataError, match="label"):
        pv.data.load(f"npz:{tmp_path / 'l.npz'}")


@pytest.mark.parametrize("rank", [33, 64, 65, 255])
def test_idx_of_absurd_rank_is_a_data_error(tmp_path, rank):
    import struct

    from pyrovi.errors import DataError

    p = tmp_path / "r.idx"
    p.write_bytes(bytes([0, 0, 0x08, rank]) + struct.pack(">" + "I" * rank, *([1] * rank)) + b"\x00")
    with pytest.raises(DataError, match="rank"):
        pv.data.load(f"idx:{p}")


# --------------------------------------------------------------------------- item 2: bounded reading

CHILD = r"""
import json, resource, sys
spec = json.loads(sys.argv[1])
import numpy as np, torch, warnings
warnings.simplefilter("ignore")
import pyrovi as pv
from pyrovi.errors import PyroviError
torch.set_num_threads(1)
resource.setrlimit(resource.RLIMIT_AS, (spec["cap"], spec["cap"]))
def status(key):  # kB; VmHWM is this process image's peak RSS (getrusage's ru_maxrss survives exec, so
    # it can report the forking pytest's RSS instead)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
base = status("VmRSS")  # the RSS now, not the peak of the imports: the delta is an upper bound
out = {}
try:
    if spec["call"] == "reader":
        got = getattr(pv.readers, spec["fn"])(spec["arg"])
        arr = got[0] if isinstance(got, tuple) else got
        out["nbytes"] = int(arr.nbytes)
    elif spec["call"] == "load":
        ds = pv.data.load(spec["arg"])
        # the final arrays: x and y of all three splits
        out["nbytes"] = sum(int(t.numel() * t.element_size()) for s in (ds.train, ds.val, ds.test) for t in s
                            if t is not None)
    elif spec["call"] == "load_run":
        pv.load_run(spec["arg"])
    elif spec["call"] == "history":
        from pyrovi.run_files import read_history
        read_history(spec["arg"])
    out["outcome"] = "loaded"
except PyroviError as e:
    out["outcome"], out["error"] = "refused", str(e)[:300]
except MemoryError:
    out["outcome"] = "MemoryError"
out["delta"] = (status("VmHWM") - base) * 1024
print(json.dumps(out))
"""


def _capped(call, arg, fn=None, cap=CAP, timeout=240):
    """Run one read in a child under an address-space cap; its JSON report (outcome, error, peak RSS delta)."""
    spec = json.dumps({"call": call, "arg": str(arg), "fn": fn, "cap": cap})
    p = subprocess.run([sys.executable, "-c", CHILD, spec], capture_output=True, text=True, env=ENV, cwd=ROOT,
                       timeout=timeout)
    assert p.returncode == 0, (p.returncode, p.stderr[-1500:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def _gzip_zeros(path, head: bytes, zeros: int, tail: bytes = b""):
    """A gzip file of ``head`` + ``zeros`` zero bytes + ``tail``, written in streaming fashion (tiny on disk)."""
    import gzip

    chunk = bytes(1 << 22)
    with gzip.open(path, "wb", compresslevel=6) as g:
        g.write(head)
        left = zeros
        while left:
            g.write(chunk[:min(left, len(chunk))])
            left -= min(left, len(chunk))
        g.write(tail)
    return path


def _npy_header(shape, descr="<f4"):
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _npz_zeros(path, shape, descr="<f4", lie: int = 0):
    """An npz with one deflated array ``x`` of zeros (``lie`` extra bytes beyond what the header says)."""
    import zipfile

    n = int(np.prod(shape)) * np.dtype(descr).itemsize
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("x.npy", "w", force_zip64=True) as f:
        f.write(_npy_header(shape, descr))
        chunk = bytes(1 << 22)
        left = (n if n <= 1 << 28 else MIB) + lie  # a huge header is a lie: 1 MiB of data, or `lie` bytes more
        while left > 0:
            f.write(chunk[:min(left, len(chunk))])
            left -= len(chunk)
    return path





def _idx_head(dims, code=0x08):
    import struct

    return bytes([0, 0, code, len(dims)]) + struct.pack(">" + "I" * len(dims), *dims)


BOMBS = {
    # name: (builder(tmp) -> (call, arg, fn), expected outcome)
    "npz announcing 16 GB": (lambda t: ("reader", _npz_zeros(t / "a.npz", (1 << 32,)), "read_npz"), "refused"),
    "npz 128 MiB of deflated zeros (reader)": (
        lambda t: ("reader", _npz_zeros(t / "b.npz", (32 * MIB,)), "read_npz"), "loaded"),
    "npz 128 MiB of deflated zeros (data.load)": (lambda t: ("load", "npz:" + str(_npz_zeros(
        t / "c.npz", (MIB, 32))), None), "loaded"),
    "npz 256 MiB of deflated float64 zeros (data.load)": (lambda t: ("load", "npz:" + str(_npz_zeros(
        t / "l.npz", (MIB, 32), "<f8")), None), "loaded"),  # read as float32 while inflating: 128 MiB
    "npz longer than its header": (lambda t: ("reader", _npz_zeros(t / "d.npz", (MIB,), lie=64 * MIB), "read_npz"),
                                   "refused"),
    "gzip IDX 400 MiB (reader)": (lambda t: ("reader", _gzip_zeros(
        t / "e-images-idx3-ubyte.gz", _idx_head((400, 1024, 1024)), 400 * MIB), "read_idx"), "loaded"),
    "gzip IDX 64 MiB (data.load)": (lambda t: ("load", "idx:" + str(_gzip_zeros(
        t / "f-images-idx3-ubyte.gz", _idx_head((65536, 32, 32)), 64 * MIB)), None), "loaded"),
    "gzip IDX 64 MiB with labels (data.load)": (lambda t: _gzip_zeros(  # the labels file beside it is found
        t / "k-labels-idx1-ubyte.gz", _idx_head((65536,)), 65536) and ("load", "idx:" + str(_gzip_zeros(
            t / "k-images-idx3-ubyte.gz", _idx_head((65536, 32, 32)), 64 * MIB)), None), "loaded"),
    "gzip IDX announcing 4 GiB": (lambda t: ("reader", _gzip_zeros(
        t / "g.gz", _idx_head((1 << 16, 1 << 16)), MIB), "read_idx"), "refused"),
    "gzip IDX with 512 MiB past its header": (lambda t: ("reader", _gzip_zeros(
        t / "h.gz", _idx_head((16, 16)), 512 * MIB), "read_idx"), "refused"),
    "gzip CSV inflating to 300 MiB": (lambda t: ("reader", _gzip_zeros(
        t / "i.csv.gz", b"0,0\n", 300 * MIB), "read_csv"), "refused"),
    "gzip text inflating to 300 MiB": (lambda t: ("reader", _gzip_zeros(t / "j.txt.gz", b"", 300 * MIB),
                                       "read_text"), "refused"),
    "/proc/self/pagemap as data": (lambda t: ("reader", "/proc/self/pagemap", "read_npz"), "refused"),
    "/dev/zero as data": (lambda t: ("reader", "/dev/zero", "read_idx"), "refused"),
}


@pytest.mark.parametrize("case", sorted(BOMBS))
def test_memory_bombs_refused_or_loaded_within_2x(tmp_path, case):
    build, expected = BOMBS[case]
    call, arg, fn = build(tmp_path)
    size = os.path.getsize(arg.partition(":")[2] if call == "load" else arg) if not str(arg).startswith("/") or \
        os.path.isfile(str(arg).partition(":")[2] or arg) else 0
    r = _capped(call, arg, fn)
    assert r["outcome"] == expected, r
    if expected == "refused":
        assert r["delta"] < 64 * MIB, r  # refused before inflating
    else:
        # peak RSS growth within twice the final arrays, strictly: data.load reorders the rows of the one
        # array it read in place (no second copy); the readers stream into an array of the announced size
        assert r["delta"] <= 2 * r["nbytes"], r
    print(f"{case}: file {size} bytes, {r['outcome']}, peak RSS +{r['delta'] / MIB:.0f} MiB"
          f"{', arrays %.1f MiB, %.2fx' % (r['nbytes'] / MIB, r['delta'] / r['nbytes']) if 'nbytes' in r else ''}")


def _pagemap(d, name):
    (d / name).unlink(missing_ok=True)
    os.symlink("/proc/self/pagemap", d / name)


def _fifo(d, name):
    (d / name).unlink(missing_ok=True)
    os.mkfifo(d / name)


def _big(d, name, mib):
    with open(d / name, "wb") as f:
        f.write(b"{" + b" " * (mib * MIB) + b"}")


RUN_FILES = {
    "config.json -> /proc/self/pagemap": (lambda d: _pagemap(d, "config.json"), "load_run", "outside its run"),
    "metrics.json -> /proc/self/pagemap": (lambda d: _pagemap(d, "metrics.json"), "load_run", "outside its run"),
    "history.csv -> /proc/self/pagemap": (lambda d: _pagemap(d, "history.csv"), "load_run", "outside its run"),
    "history.csv -> /etc/passwd": (lambda d: (d / "history.csv").unlink() or os.symlink("/etc/passwd",
                                                                                         d / "history.csv"),
                                   "load_run", "outside its run"),
    "config.json a FIFO": (lambda d: _fifo(d, "config.json"), "load_run", "not a regular file"),
    "history.csv a FIFO": (lambda d: _fifo(d, "history.csv"), "load_run", "not a regular file"),
    "checkpoint a FIFO (no weights)": (lambda d: (d / "weights.safetensors").unlink() or _fifo(
        d, "checkpoint.safetensors"), "load_run", "neither"),
    "config.json of 20 MiB": (lambda d: _big(d, "config.json", 20), "load_run", "more than the"),
    "metrics.json of 40 MiB": (lambda d: _big(d, "metrics.json", 40), "load_run", "more than the"),
    "history.csv of 80 MiB": (lambda d: _big(d, "history.csv", 80), "history", "more than the"),
}


@pytest.mark.parametrize("case", sorted(RUN_FILES))
def test_run_directory_files_are_bounded_regular_files(api_run, tmp_path, case):
    import shutil

    d = tmp_path / "run"
    shutil.copytree(api_run, d)
    make, call, msg = RUN_FILES[case]
    make(d)
    r = _capped(call, d / "history.csv" if call == "history" else d, timeout=120)
    assert r["outcome"] == "refused" and msg in r["error"], r
    assert r["delta"] < 64 * MIB, r


def test_symlink_inside_the_run_directory_is_followed(api_run, tmp_path):
    import shutil

    d = tmp_path / "run"
    shutil.copytree(api_run, d)
    os.rename(d / "history.csv", d / "history-real.csv")
    os.symlink("history-real.csv", d / "history.csv")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(pv.load_run(str(d)).history) == 2


def test_checkpoint_is_read_with_one_open(api_run, monkeypatch):
    import builtins

    from pyrovi import checkpoint

    opened = []
    real_open, real_os_open = builtins.open, os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(str(p)) or real_os_open(p, *a, **k))
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    checkpoint.load_tensors(str(api_run / "checkpoint.safetensors"))
    assert [p for p in opened if p.endswith("checkpoint.safetensors")] == [str(api_run / "checkpoint.safetensors")]


# --------------------------------------------------------------------------- item 3: one writer per run directory


def test_second_trainer_on_one_out_fails_at_once_naming_the_holder(tmp_path):
    import socket
    import time

    np.savez(tmp_path / "x.npz", x=X)
    out = tmp_path / "run"
    args = [sys.executable, "-m", "pyrovi.cli", *TRAIN_ARGS, "--data", f"npz:{tmp_path / 'x.npz'}", "--out", str(out)]
    a = subprocess.Popen(args + ["--epochs", "100000"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=ENV, cwd=ROOT)
    try:
        ckpt = out / "checkpoint.safetensors"
        deadline = time.time() + 120
        while not ckpt.exists() and time.time() < deadline and a.poll() is None:
            time.sleep(0.05)
        assert a.poll() is None and ckpt.exists()
        for extra in (["--resume"], ["--overwrite"], []):
            b = subprocess.run(args + ["--epochs", "3"] + extra, capture_output=True, text=True, env=ENV, cwd=ROOT,
                               timeout=120)
            assert b.returncode == 2, (extra, b.stderr[-1500:])
            assert "Traceback" not in b.stderr and f"in use by pid {a.pid} on host {socket.gethostname()!r}" in b.stderr
        assert a.poll() is None, "the first trainer was disturbed"
        epoch = load_tensors(str(ckpt))[1]["loop"]["epoch"]
    finally:
        a.kill()
        a.wait()
    # the killed trainer's lock died with it (an OS lock): no stale lock, resume works
    c = subprocess.run(args + ["--epochs", str(epoch + 1), "--resume"], capture_output=True, text=True, env=ENV,
                       cwd=ROOT, timeout=300)
    assert c.returncode == 0, c.stderr[-1500:]


UPDATER = r"""
import sys
from pyrovi.run_files import update_metrics
d, key, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(n):
    update_metrics(d, f"{key}{i % 3}", {"i": i})
"""


def test_concurrent_metric_updates_keep_every_key(tmp_path):
    (tmp_path / "metrics.json").write_text('{"epochs": 1}')
    ps = [subprocess.Popen([sys.executable, "-c", UPDATER, str(tmp_path), key, "40"], env=ENV, cwd=ROOT,
                           stderr=subprocess.PIPE, text=True) for key in ("test", "diagnostics")]
    for p in ps:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-1500:]
    got = json.loads((tmp_path / "metrics.json").read_text())
    assert set(got) == {"epochs", "test0", "test1", "test2", "diagnostics0", "diagnostics1", "diagnostics2"}
    assert got["test0"] == {"i": 39} and got["diagnostics0"] == {"i": 39}


def test_one_process_may_fit_into_one_out_again(tmp_path):
    """The lock is re-entrant within a process: a refused fit, a fit, a resume, one after another."""

    m = pv.models.VAE((4,), 2, hidden=(8,))
    kw = dict(batch_size=8, progress=False, device="cpu", out=str(tmp_path / "r"), figures=False)
    with pytest.raises(pv.ConfigError):
        pv.fit(m, pv.guides.DiagNormal(m, hidden=(8,)), X, epochs=2, lr=-1.0, **kw)
    run = pv.fit(m, pv.guides.DiagNormal(m, hidden=(8,)), X, epochs=2, **kw)
    assert len(run.history) == 2
    run2 = pv.fit(m, pv.guides.DiagNormal(m, hidden=(8,)), X, epochs=3, resume=True, **kw)
    assert len(run2.history) == 3


class _Kill(BaseException):
    """Stands for SIGKILL after a file write (a BaseException, so nothing in pyrovi handles it)."""


def _interrupted(monkeypatch, after: int, fn):
    """Run ``fn`` with pyrovi's atomic writes cut off after ``after`` of them; the number of writes made."""
    from pyrovi import checkpoint

    real, count = checkpoint.atomic_write, [0]

    def write(path, data):
        if count[0] >= after:
            raise _Kill()
        real(path, data)
        count[0] += 1

    monkeypatch.setattr(checkpoint, "atomic_write", write)
    try:
        fn()
    except _Kill:
        pass
    finally:
        monkeypatch.setattr(checkpoint, "atomic_write", real)
    return count[0]


@pytest.mark.parametrize("mode", ["resume", "overwrite"])
def test_interrupted_resume_or_overwrite_never_loads_a_mixed_run_silently(api_run, tmp_path, monkeypatch, mode):
    import shutil
    import warnings

    hidden = (8,) if mode == "resume" else (6,)

    def go(d):
        m = pv.models.VAE((4,), 2, hidden=hidden)
        pv.fit(m, pv.guides.DiagNormal(m, hidden=hidden), X, epochs=4, batch_size=8, progress=False, device="cpu",
               out=str(d), figures=False, **{mode: True})

    total = _interrupted(monkeypatch, 10 ** 6, lambda: go(shutil.copytree(api_run, tmp_path / "full")))
    silent_ok = 0
    for k in range(total + 1):
        d = tmp_path / f"k{k}"
        shutil.copytree(api_run, d)
        _interrupted(monkeypatch, k, lambda: go(d))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            try:
                run = pv.load_run(str(d))
            except CheckpointError:
                continue
        if w:
            continue
        # loaded without a warning: then it is the old run untouched or the new run whole, never a mix
        old = len(run.history) == 2 and run.config["model"]["hidden"] == [8] and \
            run.config["train"]["epochs"] == 2
        new = len(run.history) == 4 and run.config["model"]["hidden"] == list(hidden) and \
            run.config["train"]["epochs"] == 4
        assert old or new, (k, len(run.history), run.config["model"]["hidden"])
        silent_ok += 1
    print(f"{mode}: {total} writes, kills after each of 0..{total}: {silent_ok} loaded silently (old or new run "
          f"whole), {total + 1 - silent_ok} loaded with a warning or refused")
    assert total >= 6


# --------------------------------------------------------------------------- sizes in a config


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("flow") / "run"
    m = pv.models.VAE((4,), 2, hidden=(8,))
    pv.fit(m, pv.guides.Flow(m, hidden=(8,), depth=2), X, epochs=1, batch_size=8, progress=False, device="cpu",
           out=str(out), figures=False)
    return out


def _set(path, fn):
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


SIZE_EDITS = {
    "flow_hidden 1e9": lambda c: c["guide"].update(flow_hidden=[10 ** 9]),
    "depth 1e6": lambda c: c["guide"].update(depth=10 ** 6),
    "y_shape 1e9": lambda c: c["data"].update(y_shape=[10 ** 9], y_dtype="float32"),
    "y_shape junk": lambda c: c["data"].update(y_shape="big"),
    "y_dtype list": lambda c: c["data"].update(y_dtype=[1]),
    "n_train string": lambda c: c["data"].update(n_train="x"),
    "model_kwargs number": lambda c: c["data"].update(model_kwargs=3),
}


@pytest.mark.parametrize("case", sorted(SIZE_EDITS))
def test_sizes_in_a_config_are_checked_before_allocating(flow_run, tmp_path, case):
    import shutil

    d = tmp_path / "run"
    shutil.copytree(flow_run, d)
    _set(d / "config.json", SIZE_EDITS[case])
    r = _capped("load_run", d, timeout=120)
    assert r["outcome"] == "refused", r
    assert r["delta"] < 256 * MIB, r  # depth 1e6: the meta-device attempt builds some modules before it gives up


def test_nan_weights_warn_on_load(api_run, tmp_path):
    import shutil

    d = tmp_path / "run"
    shutil.copytree(api_run, d)
    _tamper(d / "weights.safetensors", tensors=lambda t: t["model/decoder.0.weight"].fill_(float("nan")))
    with pytest.warns(UserWarning, match="NaN/inf values"):
        pv.load_run(str(d))
