"""Property-based tests: every input to a loader, to ``load_run`` or to the CLI either works or raises
pyrovi's own error (:class:`pyrovi.PyroviError`), never anything else.

Inputs are random bytes, valid files truncated or with flipped bytes, and structured-but-wrong
content. Example counts are modest so CI stays fast; ``OUTCOMES`` tallies what happened and
is printed at the end of the module (run with ``-s`` to see it; docs/reliability.md records a run).
"""

import collections
import gzip
import io
import json
import os
import shutil
import struct
import tempfile
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import pyrovi as pv
from pyrovi import cli
from pyrovi.errors import PyroviError

OUTCOMES: dict = collections.defaultdict(collections.Counter)  # target -> Counter(loaded / refused)
# examples per target: (CI, @slow). The slow counts were run once and recorded in docs/reliability.md.
COUNTS = {"idx": (200, 3000), "npz": (200, 3000), "csv": (200, 3000), "config": (150, 2000),
          "weights": (100, 2000), "cli": (12, 200)}


def _fuzz_tests(name, body, **given_kw):
    """Two hypothesis tests from one body: a quick CI one and a ``@pytest.mark.slow`` one."""
    quick, many = COUNTS[name]
    out = []
    for n in (quick, many):
        # CI: a fixed sequence of examples (reproducible runs); slow: fresh random examples every run
        t = settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                     database=None, derandomize=(n == quick))(given(**given_kw)(body))
        out.append(t if n == quick else pytest.mark.slow(t))
    return out
TMP = tempfile.mkdtemp(prefix="pyrovi-fuzz-")


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print("\nfuzz outcomes:", {k: dict(v) for k, v in OUTCOMES.items()})
    shutil.rmtree(TMP, ignore_errors=True)


def _attempt(target: str, fn):
    """Run ``fn``; only success or a PyroviError is allowed. Tally which."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fn()
    except PyroviError as e:
        assert str(e), "a pyrovi error must say something"
        OUTCOMES[target]["refused"] += 1
        return None
    OUTCOMES[target]["loaded"] += 1
    return result


def _load_bytes(kind: str, raw: bytes, suffix: str):
    path = os.path.join(TMP, "input" + suffix)
    with open(path, "wb") as f:
        f.write(raw)
    ds = _attempt(kind, lambda: pv.data.load(f"{kind}:{path}"))
    if ds is not None:  # what loads is usable: finite, flat, float32
        x = torch.cat([ds.train.x, ds.val.x, ds.test.x])
        assert x.dtype == torch.float32 and x.dim() == 2 and torch.isfinite(x).all()


def _mutate(data, raw: bytes) -> bytes:
    """Truncate, extend, or flip a few bytes of ``raw``."""
    how = data.draw(st.sampled_from(["truncate", "flip", "extend", "same"]))
    if how == "truncate" and raw:
        return raw[: data.draw(st.integers(0, len(raw) - 1))]
    if how == "flip" and raw:
        b = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(b) - 1))
            b[i] = data.draw(st.integers(0, 255))
        return bytes(b)
    if how == "extend":
        return raw + data.draw(st.binary(min_size=1, max_size=16))
    return raw


# --------------------------------------------------------------------------- regressions

FOUND = {  # inputs that once escaped as a non-pyrovi exception (kept as fixed examples)
    "idx gzip with bad stored block (zlib.error)": ("idx", b"\x1f\x8b\x08\x00\xbf?\x06k\x02\xff" + bytes(10)),
    "csv carriage return inside a field (csv.Error)": ("csv", b"0,1\n0.5,a\rb\n"),
    "csv header wider than the rows (IndexError)": ("csv", b"a,a,label\n0"),
}


@pytest.mark.parametrize("case", sorted(FOUND))
def test_fuzz_regressions(case):
    kind, raw = FOUND[case]
    before = OUTCOMES[kind]["refused"]
    _load_bytes(kind, raw, "." + kind)
    assert OUTCOMES[kind]["refused"] == before + 1


# --------------------------------------------------------------------------- IDX

IDX_CODES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@st.composite
def idx_files(draw):
    code = draw(st.sampled_from(sorted(IDX_CODES)))
    dims = draw(st.lists(st.integers(0, 6), min_size=1, max_size=3))
    n = int(np.prod(dims))
    dtype = np.dtype(IDX_CODES[code])
    if dtype.kind == "f":
        vals = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=n, max_size=n))
    else:
        info = np.iinfo(dtype)
        vals = draw(st.lists(st.integers(int(info.min), int(info.max)), min_size=n, max_size=n))
    body = np.array(vals, dtype=dtype).tobytes()
    return bytes([0, 0, code, len(dims)]) + struct.pack(">" + "I" * len(dims), *dims) + body


def _idx(data):
    raw = data.draw(st.one_of(st.binary(max_size=200), idx_files()))
    raw = _mutate(data, raw)
    if data.draw(st.booleans()):
        raw = _mutate(data, gzip.compress(raw))  # gzip, possibly truncated or corrupted
    _load_bytes("idx", raw, ".idx")


test_fuzz_idx, test_fuzz_idx_many = _fuzz_tests("idx", _idx, data=st.data())


# --------------------------------------------------------------------------- npz / npy

NP_DTYPES = ["float32", "float64", "float16", "int8", "uint8", "int64", "bool", "complex64", "U3"]


@st.composite
def np_files(draw):
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    dt = np.dtype(draw(st.sampled_from(NP_DTYPES)))
    n = int(np.prod(shape))
    if dt.kind in "fc":
        vals = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=16), min_size=n, max_size=n))
    elif dt.kind == "U":
        vals = draw(st.lists(st.text(max_size=3), min_size=n, max_size=n))
    else:
        vals = draw(st.lists(st.integers(0, 1 if dt.kind == "b" else 100), min_size=n, max_size=n))
    arr = np.array(vals, dtype=dt).reshape(shape)
    buf = io.BytesIO()
    if draw(st.booleans()):
        np.save(buf, arr)
    else:
        keys = draw(st.lists(st.sampled_from(["x", "y", "images", "labels", "z"]), min_size=1, max_size=2,
                             unique=True))
        arrays = {k: arr if k != "y" else arr.reshape(-1)[: arr.shape[0] if arr.ndim else 0] for k in keys}
        (np.savez_compressed if draw(st.booleans()) else np.savez)(buf, **arrays)
    return buf.getvalue()


def _npz(data):
    raw = _mutate(data, data.draw(st.one_of(st.binary(max_size=200), np_files())))
    _load_bytes("npz", raw, ".npz")


test_fuzz_npz, test_fuzz_npz_many = _fuzz_tests("npz", _npz, data=st.data())


# --------------------------------------------------------------------------- CSV

CELLS = st.one_of(st.sampled_from(["0", "1", "0.5", "-1", "nan", "inf", "1e999", "", " ", "x", "label", "y",
                                   "1,5", '"2"', "0x1F", "1_0", "١"]),
                  st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-3, 300).map(str))


@st.composite
def csv_texts(draw):
    rows = draw(st.lists(st.lists(CELLS, min_size=1, max_size=5), min_size=0, max_size=6))
    if draw(st.booleans()):
        width = draw(st.integers(1, 4))
        header = draw(st.lists(st.sampled_from(["a", "b", "label", "y", "target"]), min_size=width,
                               max_size=width))
        grid = draw(st.lists(st.lists(st.floats(0, 1).map(lambda v: f"{v:.3f}"), min_size=width, max_size=width),
                             min_size=1, max_size=6))
        rows = [header] + grid + rows[:1]
    sep = draw(st.sampled_from([",", ";", "\t"]))
    return "\n".join(sep.join(r) for r in rows).encode("utf-8")


def _csv(data):
    raw = _mutate(data, data.draw(st.one_of(st.binary(max_size=200), csv_texts(),
                                            st.text(max_size=80).map(lambda t: t.encode("utf-8", "surrogatepass")))))
    _load_bytes("csv", raw, ".csv")


test_fuzz_csv, test_fuzz_csv_many = _fuzz_tests("csv", _csv, data=st.data())


# --------------------------------------------------------------------------- run directories (config.json)

RUN = os.path.join(TMP, "run")


@pytest.fixture(scope="module")
def good_run():
    X = np.random.default_rng(0).random((40, 4)).astype(np.float32)
    m = pv.models.VAE((4,), 2, hidden=(8,))
    pv.fit(m, pv.guides.DiagNormal(m, hidden=(8,)), X, epochs=1, batch_size=8, progress=False, device="cpu",
           out=RUN, figures=False)
    with open(os.path.join(RUN, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(RUN, "weights.safetensors"), "rb") as f:
        weights = f.read()
    return config, weights


JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
              st.text(max_size=12), st.sampled_from(["vae", "diag_normal", "iwae", "gaussian", "float64", "../x"])),
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)),
    max_leaves=12,
)


@st.composite
def mutated_configs(draw, config):
    cfg = json.loads(json.dumps(config))
    for _ in range(draw(st.integers(1, 3))):
        # walk to a random dict inside the config, then replace, delete or add one key
        node = cfg
        while True:
            subs = [k for k, v in node.items() if isinstance(v, dict)]
            if not subs or draw(st.booleans()):
                break
            node = node[draw(st.sampled_from(sorted(subs)))]
        keys = sorted(node)
        op = draw(st.sampled_from(["replace", "delete", "add"]) if keys else st.just("add"))
        if op == "replace":
            node[draw(st.sampled_from(keys))] = draw(JSON)
        elif op == "delete":
            del node[draw(st.sampled_from(keys))]
        else:
            node[draw(st.text(max_size=10))] = draw(JSON)
    return cfg


def _write(name, raw: bytes):
    with open(os.path.join(RUN, name), "wb") as f:
        f.write(raw)


def _config(good_run, data):
    config, weights = good_run
    kind = data.draw(st.sampled_from(["mutated", "mutated", "mutated", "bytes"]))
    if kind == "bytes":
        raw = _mutate(data, data.draw(st.one_of(st.binary(max_size=100), st.just(json.dumps(config).encode()))))
    else:
        raw = json.dumps(data.draw(mutated_configs(config))).encode()
    _write("config.json", raw)
    _write("weights.safetensors", weights)
    _attempt("config.json", lambda: pv.load_run(RUN))


test_fuzz_config, test_fuzz_config_many = _fuzz_tests("config", _config, data=st.data())


def _weights(good_run, data):
    config, weights = good_run
    _write("config.json", json.dumps(config).encode())
    raw = _mutate(data, weights)
    assume(raw != weights)
    _write("weights.safetensors", raw)
    _attempt("weights.safetensors", lambda: pv.load_run(RUN))


test_fuzz_weights, test_fuzz_weights_many = _fuzz_tests("weights", _weights, data=st.data())


# --------------------------------------------------------------------------- CLI arguments

CSV_PATH = os.path.join(TMP, "tiny.csv")
FLAGS = {
    "--data": st.sampled_from([f"csv:{CSV_PATH}", f"csv:{CSV_PATH}", "nope", "csv:/no/file", "idx:" + CSV_PATH]),
    "--binarize": st.sampled_from(["default", "static", "dynamic", "none", "maybe"]),
    "--model": st.sampled_from(["vae", "vae", "linear_gaussian", "gan"]),
    "--latent-dim": st.sampled_from(["2", "0", "-1", "x", "1.5"]),
    "--hidden": st.sampled_from(["8", "8,4", "0", "", "x", "8,-1"]),
    "--likelihood": st.sampled_from(["bernoulli", "gaussian", "poisson"]),
    "--sigma": st.sampled_from(["1", "0", "-1", "nan", "inf"]),
    "--guide": st.sampled_from(["diag_normal", "diag-normal", "flow?"]),
    "--objective": st.sampled_from(["elbo", "iwae", "renyi", "meanfield", "kl"]),
    "--particles": st.sampled_from(["2", "0", "-3", "x"]),
    "--alpha": st.sampled_from(["0.5", "-1", "nan", "1"]),
    "--epochs": st.sampled_from(["1", "0", "-1", "x", "1.5"]),
    "--batch-size": st.sampled_from(["4", "0", "10000", "x"]),
    "--lr": st.sampled_from(["0.01", "0", "-1", "nan", "inf", "1e400"]),
    "--seed": st.sampled_from(["0", "-1", "4294967296", "x"]),
    "--patience": st.sampled_from(["1", "0", "-2"]),
    "--beta": st.sampled_from(["1", "0", "-1", "nan"]),
    "--warmup": st.sampled_from(["0", "1", "-1"]),
    "--clip-norm": st.sampled_from(["1", "0", "-1"]),
    "--lr-schedule": st.sampled_from(["constant", "cosine", "exponential", "step"]),
    "--device": st.sampled_from(["cpu", "auto", "tpu", "cuda:99"]),
    "--evaluate-k": st.sampled_from(["0", "2", "-1"]),
}


@st.composite
def cli_argvs(draw):
    names = draw(st.lists(st.sampled_from(sorted(FLAGS)), max_size=6, unique=True))
    argv = ["train", "--epochs", "1", "--hidden", "8", "--no-progress", "--overwrite", "--out",
            os.path.join(TMP, "cli-run"), "--data", f"csv:{CSV_PATH}", "--batch-size", "4"]
    for n in names:
        argv += [n, draw(FLAGS[n])]
    if draw(st.booleans()):
        argv.append(draw(st.sampled_from(["--resume", "--learn-sigma", "--bogus", "extra"])))
    return argv


def _cli(argv):
    if not os.path.exists(CSV_PATH):
        rows = np.random.default_rng(0).random((20, 4))
        np.savetxt(CSV_PATH, rows, delimiter=",", fmt="%.4f")
    import contextlib

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse: unparseable flag
            code = e.code
    text = err.getvalue()
    assert "Traceback" not in text
    assert code in (0, 2), (argv, code, text)
    if code == 2:
        assert "error:" in text, (argv, text)
    OUTCOMES["cli"]["ok" if code == 0 else "refused"] += 1


test_fuzz_cli, test_fuzz_cli_many = _fuzz_tests("cli", _cli, argv=cli_argvs())
