"""Run directories and data files from someone else: refused with a clear error, nothing executed.

The payloads are real: unpickling any of them creates a marker file (checked by a positive
control in every test, so the test would fail if pyrovi ever unpickled). pyrovi must refuse each
one with its own error type and the marker must never appear.
"""

import json
import os
import pickle
import re
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import pyrovi as pv
from pyrovi import cli
from pyrovi.errors import CheckpointError, ConfigError, DataError, PyroviError

X = np.random.default_rng(0).random((40, 4)).astype(np.float32)


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears if pickle ever runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def payloads(marker) -> dict:
    """Name -> bytes of every pickle-based format that could pose as a weights file."""
    out = {f"pickle protocol {p}": pickle.dumps({"w": Payload(marker)}, protocol=p) for p in range(6)}
    tmp = Path(marker).with_suffix(".pt")
    torch.save({"w": Payload(marker)}, tmp)
    out["torch.save zip"] = tmp.read_bytes()
    torch.save({"w": Payload(marker)}, tmp, _use_new_zipfile_serialization=False)
    out["torch.save legacy"] = tmp.read_bytes()
    tmp.unlink()
    # a pickle behind a plausible safetensors length prefix
    out["length-prefixed pickle"] = struct.pack("<Q", 64) + out["pickle protocol 2"]
    return out


def _prove_live(marker, blob_name, blob):
    """Positive control: the payload really runs when unpickled (then the marker is removed)."""
    if blob_name.startswith("torch.save"):
        import io

        torch.load(io.BytesIO(blob), weights_only=False)
    elif blob_name.startswith("pickle"):
        pickle.loads(blob)
    else:
        return
    assert os.path.exists(marker), f"payload {blob_name} is not live; the test would prove nothing"
    os.unlink(marker)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "good"
    m = pv.models.VAE((4,), 2, hidden=(8,))
    pv.fit(m, pv.guides.DiagNormal(m, hidden=(8,)), X, epochs=1, batch_size=8, progress=False, device="cpu",
           out=str(out), figures=False)
    return out


@pytest.fixture
def run_dir(trained, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(trained, d)
    return d


def _edit_config(d, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _load(d):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pv.load_run(str(d))


def test_good_run_loads(run_dir):
    run = _load(run_dir)
    assert run.model.cfg.latent_dim == 2


@pytest.mark.parametrize("target", ["weights.safetensors", "checkpoint.safetensors"])
def test_pickle_payloads_never_run(run_dir, tmp_path, target):
    marker = tmp_path / "PWNED"
    refused = 0
    for name, blob in payloads(marker).items():
        _prove_live(marker, name, blob)
        d = tmp_path / f"crafted-{refused}"
        shutil.copytree(run_dir, d)
        (d / target).write_bytes(blob)
        if target == "checkpoint.safetensors":
            (d / "weights.safetensors").unlink()  # load_run falls back to the checkpoint
            m = pv.models.VAE((4,), 2, hidden=(8,))
            with pytest.raises(CheckpointError, match="pickle|not a valid safetensors"):
                pv.fit(m, pv.guides.DiagNormal(m, hidden=(8,)), X, epochs=2, batch_size=8, progress=False,
                       device="cpu", out=str(d), resume=True, figures=False)
        with pytest.raises(CheckpointError, match="pickle|not a valid safetensors"):
            _load(d)
        assert not marker.exists(), f"{name} as {target} executed code"
        refused += 1
    assert refused == 9


def test_cli_refuses_payload_without_traceback(run_dir, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    (run_dir / "weights.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    assert cli.main(["evaluate", str(run_dir), "--k", "2"]) == 2
    err = capsys.readouterr().err
    assert "never unpickles" in err and "Traceback" not in err
    assert not marker.exists()


def test_npz_object_arrays_refused(tmp_path):
    marker = tmp_path / "PWNED"
    obj = np.empty((2, 2), dtype=object)
    obj[:] = Payload(marker)
    np.savez(tmp_path / "evil.npz", x=obj)
    np.save(tmp_path / "evil.npy", obj, allow_pickle=True)
    np.load(tmp_path / "evil.npy", allow_pickle=True)  # positive control: loading with pickle runs it
    assert marker.exists()
    marker.unlink()
    for name in ("npz:" + str(tmp_path / "evil.npz"), "npy:" + str(tmp_path / "evil.npy")):
        with pytest.raises(DataError, match="could not be read"):
            pv.data.load(name)
    assert not marker.exists()


CONFIG_EDITS = {
    "unexpected top-level key": (lambda c: c.update(__reduce__="os.system"), CheckpointError, "unexpected key"),
    "config is a list": (None, CheckpointError, "JSON object"),
    "model section not a dict": (lambda c: c.update(model="vae"), CheckpointError, "'model' section"),
    "model name not str": (lambda c: c["model"].update(name=["vae"]), CheckpointError, "'model' section"),
    "unexpected model option": (lambda c: c["model"].update(command="touch x"), ConfigError, "command"),
    "latent_dim as string": (lambda c: c["model"].update(latent_dim="2"), ConfigError, "latent_dim"),
    "hidden as string": (lambda c: c["model"].update(hidden="8"), ConfigError, "hidden"),
    "huge hidden layer": (lambda c: c["model"].update(hidden=[10**12]), CheckpointError, "bytes"),
    "huge guide": (lambda c: c["guide"].update(hidden=[10**9]), CheckpointError, "bytes"),
    "impossible size": (lambda c: c["model"].update(input_dim=10**30, image_shape=None), ConfigError, "Overflow"),
    "model name traversal": (lambda c: c["model"].update(name="../../vae"), ConfigError, "unknown model"),
    "guide name traversal": (lambda c: c["guide"].update(name="/etc/passwd"), ConfigError, "unknown guide"),
    "objective particles -1": (lambda c: c["objective"].update(particles=-1), ConfigError, "particles"),
    "train is a string": (lambda c: c.update(train="x"), CheckpointError, "'train'"),
    "dtype float16": (lambda c: c["train"].update(dtype="float16"), CheckpointError, "dtype"),
    "dtype a list": (lambda c: c["train"].update(dtype=["float64"]), CheckpointError, "dtype"),  # found by fuzzing
    "data shape huge": (lambda c: c["data"].update(shape=[10**9]), CheckpointError, "shape"),
    "data shape negative": (lambda c: c["data"].update(shape=[-4]), CheckpointError, "shape"),
    "data shape mismatch": (lambda c: c["data"].update(shape=[5]), CheckpointError, "shape"),
    "image_shape junk": (lambda c: c["data"].update(image_shape="ab"), CheckpointError, "image_shape"),
    "version not str": (lambda c: c.update(pyrovi_version=[1]), CheckpointError, "pyrovi_version"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_EDITS))
def test_crafted_config_refused(run_dir, case):
    fn, err, msg = CONFIG_EDITS[case]
    if fn is None:
        (run_dir / "config.json").write_text("[1, 2, 3]")
    else:
        _edit_config(run_dir, fn)
    with pytest.raises(err, match=re.escape(msg)):
        _load(run_dir)


@pytest.mark.parametrize("text", ["{", "[" * 100000, '{"a": ' + "9" * 5000 + "}", "\xff\xfe", ""])
def test_malformed_config_json(run_dir, text):
    (run_dir / "config.json").write_bytes(text.encode("utf-8", "surrogateescape") if text != "\xff\xfe"
                                          else b"\xff\xfe")
    with pytest.raises(CheckpointError):
        _load(run_dir)


def test_stored_data_path_traversal_refused(run_dir, capsys):
    _edit_config(run_dir, lambda c: c["data"].update(name="csv:../../../../etc/passwd"))
    run = _load(run_dir)  # weights and model are fine: only the data path is refused
    with pytest.raises(ConfigError, match=r"'\.\.'"):
        pv.data.from_source(run.config["data"])
    assert cli.main(["evaluate", str(run_dir), "--k", "2"]) == 2
    assert "contains '..'" in capsys.readouterr().err


def _retensor(d, fn):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = str(d / "weights.safetensors")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    fn(tensors)
    save_file(tensors, path, metadata=meta)


TENSOR_EDITS = {
    "traversal name": (lambda t: t.update({"../../../tmp/evil": torch.zeros(1)}), "tensor names"),
    "absolute name": (lambda t: t.update({"/etc/passwd": torch.zeros(1)}), "tensor names"),
    "control character": (lambda t: t.update({"model/a\x00b": torch.zeros(1)}), "tensor names"),
    "unexpected weight": (lambda t: t.update({"model/evil.weight": torch.zeros(1)}), "unexpected"),
    "missing weight": (lambda t: t.pop("model/decoder.0.weight"), "does not belong"),  # size check first
    "wrong shape": (lambda t: t.update({"model/decoder.0.weight": torch.zeros(20, 20)}), "shape"),
    "integer param": (lambda t: t.update({"param/evil": torch.zeros(2, dtype=torch.int64)}), "dtype"),
}


@pytest.mark.parametrize("case", sorted(TENSOR_EDITS))
def test_crafted_tensors_refused(run_dir, case):
    fn, msg = TENSOR_EDITS[case]
    _retensor(run_dir, fn)
    with pytest.raises(CheckpointError, match=re.escape(msg)):
        _load(run_dir)


def test_foreign_safetensors_without_pyrovi_metadata(run_dir):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(run_dir / "weights.safetensors"))
    with pytest.raises(CheckpointError, match="not one written by pyrovi"):
        _load(run_dir)


def test_weights_symlinked_to_a_device_is_not_read(run_dir):
    (run_dir / "weights.safetensors").unlink()
    (run_dir / "checkpoint.safetensors").unlink()
    os.symlink("/dev/zero", run_dir / "weights.safetensors")  # reading would never end
    with pytest.raises(CheckpointError, match="neither"):
        _load(run_dir)


def test_corrupt_history_csv(run_dir):
    (run_dir / "history.csv").write_text("epoch,train_loss\n1," + "9" * 200000 + "\n")
    with pytest.raises(CheckpointError, match="history"):
        _load(run_dir)


def test_crafted_checkpoint_state_on_resume(run_dir):
    """A checkpoint that parses but whose training state is junk is refused, not half-restored."""
    from pyrovi.checkpoint import load_tensors, save_tensors

    path = str(run_dir / "checkpoint.safetensors")
    tensors, meta = load_tensors(path)
    for junk in ({"loop": "x"}, {"loop": {"epoch": -1}}, {"optimizer": 3}, {"history": [1, 2]}):
        save_tensors(path, tensors, {**meta, **junk})
        m = pv.models.VAE((4,), 2, hidden=(8,))
        with pytest.raises(CheckpointError):
            pv.fit(m, pv.guides.DiagNormal(m, hidden=(8,)), X, epochs=2, batch_size=8, progress=False, device="cpu",
                   out=str(run_dir), resume=True, figures=False)
    rng = {k: v for k, v in tensors.items() if k != "rng/torch"}
    save_tensors(path, rng, meta)
    with pytest.raises(CheckpointError):
        pv.fit(m, pv.guides.DiagNormal(m, hidden=(8,)), X, epochs=2, batch_size=8, progress=False, device="cpu",
               out=str(run_dir), resume=True, figures=False)


def test_no_unpickling_code_in_pyrovi():
    """Static guard: no pickle, torch.load, eval/exec or allow_pickle=True anywhere in the package."""
    root = Path(pv.__file__).parent
    files = sorted(root.rglob("*.py"))
    bad = re.compile(r"^\s*(import pickle|from pickle)|torch\.load\(|(?<![.\w])eval\(|(?<![.\w])exec\(|allow_pickle=True|"
                     r"weights_only=False", re.M)
    hits = [(str(f), m.group(0)) for f in files for m in bad.finditer(f.read_text())]
    assert len(files) >= 15 and not hits, hits


@pytest.mark.parametrize("prefix", [b"\x80", b"PK"])
def test_valid_file_whose_length_prefix_looks_like_pickle_loads(tmp_path, prefix):
    """Regression: the header length of a genuine file may start with 0x80 or "PK" (found by the float64
    test, about 1 file in 256); such files load, only real pickles/zips are refused."""
    from pyrovi.checkpoint import load_tensors, save_tensors

    from safetensors.torch import save as st_save

    def first_bytes(pad):  # the file save_tensors would write, built in memory (no fsync per try)
        meta = json.dumps({"format": 1, "pad": "x" * pad})
        return st_save({"model/w": torch.ones(2)}, metadata={"pyrovi": meta})[:2]

    target = int.from_bytes(prefix.ljust(2, b"\0"), "little") if prefix == b"PK" else 0x80
    base = int.from_bytes(st_save({"model/w": torch.ones(2)}, metadata={"pyrovi": json.dumps(
        {"format": 1, "pad": ""})})[:8], "little")
    pad = next(p for p in range(max(0, target - base - 16), target - base + 16)
               if first_bytes(p).startswith(prefix))
    path = str(tmp_path / "w.safetensors")
    save_tensors(path, {"model/w": torch.ones(2)}, {"pad": "x" * pad})
    with open(path, "rb") as f:
        assert f.read(len(prefix)) == prefix
    tensors, meta = load_tensors(path)
    assert torch.equal(tensors["model/w"], torch.ones(2)) and len(meta["pad"]) == pad
