"""Bad input anywhere a user hands something in gets one pyrovi error naming the argument, value and fix.

Each case is (call, expected error type, fragments the message must contain). The fragments are
the argument's name and the offending value (or what was found), so a message such as
"invalid value" alone fails the test.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import pyrovi as pv
from pyrovi import cli
from pyrovi.errors import CheckpointError, ConfigError, DataError, PyroviError

X = np.random.default_rng(0).random((40, 4)).astype(np.float32)  # valid [0, 1] data, 4 features


@pytest.fixture
def vae():
    return pv.models.VAE((4,), 2, hidden=(8,))


def _fit(model, **kw):
    kw = {"data": X, "epochs": 1, "batch_size": 8, "progress": False, "figures": False, "device": "cpu", **kw}
    return pv.fit(model, pv.guides.DiagNormal(model, hidden=(8,)), **kw)


DATA_CASES = {
    "nan": (lambda: pv.data.from_arrays(np.where(X > 0.5, np.nan, X)), DataError, ["x", "NaN", "row"]),
    "inf": (lambda: pv.data.from_arrays(np.where(X > 0.9, np.inf, X)), DataError, ["x", "NaN/inf"]),
    "empty": (lambda: pv.data.from_arrays(np.zeros((0, 4))), DataError, ["x", "0 rows"]),
    # a 1-D array is N scalar items (tests/test_which_pyro.py), not an error
    "scalar": (lambda: pv.data.from_arrays(3.0), DataError, ["x", "shape ()"]),
    "None": (lambda: pv.data.from_arrays(None), DataError, ["x", "NoneType"]),
    "string array": (lambda: pv.data.from_arrays(np.array([["a", "b"]])), DataError, ["x", "numeric"]),
    "ragged": (lambda: pv.data.from_arrays([[1, 2], [3]]), DataError, ["x", "numeric"]),
    "complex": (lambda: pv.data.from_arrays(np.ones((5, 3), complex)), DataError, ["x", "complex"]),
    "labels negative": (lambda: pv.data.from_arrays(X, -np.ones(40)), DataError, ["labels", "-1", ">= 0"]),
    "labels fractional": (lambda: pv.data.from_arrays(X, np.full(40, 0.5)), DataError, ["labels", "integers"]),
    "labels wrong length": (lambda: pv.data.from_arrays(X, np.ones(3)), DataError, ["labels", "(40,)", "(3,)"]),
    "labels out of range": (lambda: pv.data.from_arrays(X, np.arange(40), num_classes=3),
                            DataError, ["labels", "[0, 3)", "39"]),
    "split sums over 1": (lambda: pv.data.from_arrays(X, split=(0.5, 0.6)), ConfigError, ["split", "0.6"]),
    "split not a pair": (lambda: pv.data.from_arrays(X, split="a"), ConfigError, ["split", "'a'"]),
    "seed str": (lambda: pv.data.from_arrays(X, seed="a"), ConfigError, ["seed", "'a'"]),
    "seed negative": (lambda: pv.data.load("digits", seed=-1), ConfigError, ["seed", "-1"]),
    "binarize out of [0,1]": (lambda: pv.data.from_arrays(X * 3, binarize="static"), DataError, ["[0, 1]", "x / 255"]),
    "binarize unknown": (lambda: pv.data.from_arrays(X, binarize="foo"), ConfigError, ["binarize", "'foo'"]),
    "unknown dataset": (lambda: pv.data.load("mnist"), ConfigError, ["'mnist'", "digits", "mnist5k"]),
    "unknown file kind": (lambda: pv.data.load("xls:/a"), ConfigError, ["'xls'", "csv", "idx", "npz"]),
    "dataset name None": (lambda: pv.data.load(None), ConfigError, ["None", "digits"]),
    "missing file": (lambda: pv.data.load("csv:/no/such.csv"), DataError, ["/no/such.csv", "not found"]),
    "directory as file": (lambda: pv.data.load("npz:/tmp"), DataError, ["/tmp"]),
    "stored source climbs out": (lambda: pv.data.from_source({"name": "csv:../../etc/passwd"}),
                                 ConfigError, ["..", "pass the data explicitly"]),
    "stored source bad split": (lambda: pv.data.from_source({"name": "digits", "split": 3}), ConfigError, ["split"]),
}

MODEL_CASES = {
    "latent_dim=0": (lambda: pv.models.VAE((4,), 0), ConfigError, ["latent_dim", "0"]),
    "latent_dim<0": (lambda: pv.models.VAE((4,), -2), ConfigError, ["latent_dim", "-2"]),
    "latent_dim float": (lambda: pv.models.VAE((4,), 2.5), ConfigError, ["latent_dim", "2.5"]),
    "hidden width 0": (lambda: pv.models.VAE((4,), 2, hidden=(0,)), ConfigError, ["hidden", "0"]),
    "hidden str": (lambda: pv.models.VAE((4,), 2, hidden="abc"), ConfigError, ["hidden", "'abc'"]),
    "likelihood unknown": (lambda: pv.models.VAE((4,), 2, likelihood="poisson"),
                           ConfigError, ["likelihood", "'poisson'", "bernoulli", "gaussian"]),
    "sigma negative": (lambda: pv.models.VAE((4,), 2, likelihood="gaussian", sigma=-1), ConfigError, ["sigma", "-1"]),
    "sigma nan": (lambda: pv.models.VAE((4,), 2, likelihood="gaussian", sigma=float("nan")),
                  ConfigError, ["sigma", "nan"]),
    "learn_sigma str": (lambda: pv.models.VAE((4,), 2, learn_sigma="yes"), ConfigError, ["learn_sigma", "'yes'"]),
    "activation unknown": (lambda: pv.models.VAE((4,), 2, activation="swish"), ConfigError, ["'swish'", "relu"]),
    "shape 0": (lambda: pv.models.VAE((0,), 2), ConfigError, ["input_dim", "0"]),
    "shape str": (lambda: pv.models.VAE("abc", 2), ConfigError, ["shape", "'abc'"]),
    "image_shape mismatch": (lambda: pv.models.VAE(4, 2, image_shape=(3, 3)), ConfigError, ["image_shape", "(3, 3)"]),
    "image_shape str": (lambda: pv.models.VAE(4, 2, image_shape="ab"), ConfigError, ["image_shape", "'ab'"]),
    "build unknown model": (lambda: pv.models.build({"name": "gan"}), ConfigError, ["'gan'", "vae"]),
    "build missing key": (lambda: pv.models.build({"name": "vae"}), ConfigError, ["input_dim"]),
    "build bad type": (lambda: pv.models.build({"name": "vae", "input_dim": "x"}), ConfigError, ["'x'"]),
    "build unexpected key": (lambda: pv.models.build({"name": "vae", "input_dim": 4, "exec": "rm"}),
                             ConfigError, ["exec"]),
}

GUIDE_CASES = {
    "hidden width 0": (lambda m: pv.guides.DiagNormal(m, hidden=(0,)), ConfigError, ["hidden", "0"]),
    "hidden empty": (lambda m: pv.guides.DiagNormal(m, hidden=()), ConfigError, ["hidden layer"]),
    "hidden dict": (lambda m: pv.guides.DiagNormal(m, hidden={"a": 1}), ConfigError, ["hidden", "{'a': 1}"]),
    "min_scale negative": (lambda m: pv.guides.DiagNormal(m, min_scale=-1), ConfigError, ["min_scale", "-1"]),
    # a Pyro model without latent_sites is traced (here on setup(); example= or the first call do the same)
    "no latent sites": (lambda m: pv.guides.DiagNormal(lambda x: None).setup(torch.zeros(2, 4)), ConfigError,
                        ["no latent sample sites"]),
    "unknown guide": (lambda m: pv.guides.build(m, "flowz"), ConfigError, ["'flowz'", "diag_normal"]),
    "unknown option": (lambda m: pv.guides.build(m, {"name": "diag_normal", "depth": 3}), ConfigError, ["depth"]),
}

OBJECTIVE_CASES = {
    "unknown": (lambda: pv.objectives.get("elbow"), ConfigError, ["'elbow'", "elbo", "iwae", "renyi"]),
    "particles=0": (lambda: pv.objectives.get("iwae", particles=0), ConfigError, ["particles", "0"]),
    "particles float": (lambda: pv.objectives.get("iwae", particles=2.5), ConfigError, ["particles", "2.5"]),
    "alpha negative": (lambda: pv.objectives.get("renyi", alpha=-1), ConfigError, ["alpha", "-1"]),
    "alpha on elbo": (lambda: pv.objectives.get("elbo", alpha=0.5), ConfigError, ["'elbo'", "alpha"]),
    "name not str": (lambda: pv.objectives.get(3), ConfigError, ["objective", "3"]),
}

FIT_CASES = {
    "lr negative": (dict(lr=-1e-3), ConfigError, ["lr", "-0.001"]),
    "lr nan": (dict(lr=float("nan")), ConfigError, ["lr", "nan"]),
    "epochs 0": (dict(epochs=0), ConfigError, ["epochs", "0"]),
    "batch > data": (dict(batch_size=1000), ConfigError, ["batch_size=1000", "36", "<= 36"]),
    "batch 0": (dict(batch_size=0), ConfigError, ["batch_size", "0"]),
    "particles 0": (dict(objective="iwae", particles=0), ConfigError, ["particles", "0"]),
    "objective unknown": (dict(objective="kl"), ConfigError, ["'kl'", "elbo"]),
    "seed negative": (dict(seed=-5), ConfigError, ["seed", "-5"]),
    "seed float": (dict(seed=1.5), ConfigError, ["seed", "1.5"]),
    "beta negative": (dict(beta=-1), ConfigError, ["beta", "-1"]),
    "warmup negative": (dict(warmup=-1), ConfigError, ["warmup", "-1"]),
    "clip_norm 0": (dict(clip_norm=0), ConfigError, ["clip_norm", "0"]),
    "patience 0": (dict(patience=0), ConfigError, ["patience", "0"]),
    "lr_schedule unknown": (dict(lr_schedule="step"), ConfigError, ["'step'", "cosine"]),
    "val_fraction 1.5": (dict(val_fraction=1.5), ConfigError, ["val_fraction", "1.5"]),
    "device unknown": (dict(device="tpu"), ConfigError, ["device", "'tpu'"]),
    "dtype unknown": (dict(dtype=torch.float16), ConfigError, ["dtype", "float16"]),
    "dtype name unknown": (dict(dtype="half"), ConfigError, ["dtype", "'half'", "float64"]),
    "out not a path": (dict(out=3), ConfigError, ["out", "3"]),
    "resume not bool": (dict(resume="yes"), ConfigError, ["resume", "'yes'"]),
    "data wrong width": (dict(data=np.random.rand(40, 5)), DataError, ["(5,)", "(4,)"]),
    "data NaN": (dict(data=np.full((40, 4), np.nan)), DataError, ["NaN"]),
    "data out of [0,1] for Bernoulli": (dict(data=X * 3), DataError, ["Bernoulli", "[0, 1]", "gaussian"]),
    "data one row": (dict(data=X[:1]), DataError, ["data", "1 rows", "at least 2"]),
    "data empty": (dict(data=X[:0]), DataError, ["data", "0 rows"]),
    "data None": (dict(data=None), DataError, ["NoneType"]),
    "data unknown name": (dict(data="cifar"), ConfigError, ["'cifar'", "digits"]),
    "labels length": (dict(data=(X, np.ones(3))), DataError, ["labels", "(3,)"]),
    "dataset of other shape": (dict(data="digits"), DataError, ["(64,)", "(4,)"]),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_data_errors(case):
    call, err, frags = DATA_CASES[case]
    with pytest.raises(err) as e:
        call()
    for f in frags:
        assert f in str(e.value), (case, str(e.value))


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_model_errors(case):
    call, err, frags = MODEL_CASES[case]
    with pytest.raises(err) as e:
        call()
    for f in frags:
        assert f in str(e.value), (case, str(e.value))


@pytest.mark.parametrize("case", sorted(GUIDE_CASES))
def test_guide_errors(case, vae):
    call, err, frags = GUIDE_CASES[case]
    with pytest.raises(err) as e:
        call(vae)
    for f in frags:
        assert f in str(e.value), (case, str(e.value))


@pytest.mark.parametrize("case", sorted(OBJECTIVE_CASES))
def test_objective_errors(case):
    call, err, frags = OBJECTIVE_CASES[case]
    with pytest.raises(err) as e:
        call()
    for f in frags:
        assert f in str(e.value), (case, str(e.value))


@pytest.mark.parametrize("case", sorted(FIT_CASES))
def test_fit_errors_before_training(case, vae, tmp_path):
    kw, err, frags = FIT_CASES[case]
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    out = kw.pop("out", tmp_path / "run")
    with pytest.raises(err) as e:
        _fit(vae, out=out, **kw)
    for f in frags:
        assert f in str(e.value), (case, str(e.value))
    # refused up front: nothing trained, no checkpoint written
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_all_pyrovi_errors_are_value_errors():
    """Scripts that catch ValueError keep working; the CLI catches PyroviError alone."""
    for cls in (ConfigError, DataError, CheckpointError, pv.TrainingError):
        assert issubclass(cls, PyroviError) and issubclass(cls, ValueError)


def test_evaluate_refuses_data_of_another_shape(vae):
    run = _fit(vae)
    with pytest.raises(DataError, match=r"\(7,\).*\(4,\)"):
        pv.evaluate(run, np.random.rand(5, 7), k=2)
    with pytest.raises(ConfigError, match="k must be > 0"):
        pv.evaluate(run, X, k=0)


def test_load_run_missing_directory():
    with pytest.raises(CheckpointError, match="not found"):
        pv.load_run("/no/such/run")


# --------------------------------------------------------------------------- CLI

CLI_BAD = {
    "--epochs -1": ["epochs", "-1"],
    "--lr -1": ["lr", "-1"],
    "--lr nan": ["lr", "nan"],
    "--data foo": ["'foo'", "digits"],
    "--data csv:/no/such.csv": ["/no/such.csv"],
    "--latent-dim 0": ["--latent-dim", "0"],
    "--batch-size 100000": ["--batch-size 100000", "1437"],
    "--hidden 0": ["hidden", "0"],
    "--objective foo": ["'foo'", "iwae"],
    "--particles 0 --objective iwae": ["particles", "0"],
    "--likelihood poisson": ["'poisson'", "gaussian"],
    "--guide foo": ["'foo'", "diag_normal"],
    "--model foo": ["'foo'", "vae"],
    "--device tpu": ["'tpu'"],
    "--lr-schedule foo": ["'foo'", "cosine"],
    "--seed -5": ["seed", "-5"],
    "--evaluate-k -3": ["--evaluate-k", "-3"],
    "--alpha -1 --objective renyi": ["alpha", "-1"],
}


@pytest.mark.parametrize("flags", sorted(CLI_BAD))
def test_cli_bad_flags_one_line_exit_2(flags, tmp_path, capsys):
    code = cli.main(["train", *flags.split(), "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("pyrovi train: error: "), err
    for f in CLI_BAD[flags]:
        assert f in err[0], (flags, err)
    assert not (tmp_path / "r" / "checkpoint.safetensors").exists()


@pytest.mark.parametrize("flags", ["--epochs abc", "--hidden 1,x", "--binarize maybe"])
def test_cli_unparseable_flags_exit_2(flags, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *flags.split()])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument" in err and "Traceback" not in err


def test_cli_subprocess_prints_no_traceback(tmp_path):
    """The installed entry point, end to end: a bad flag is one line on stderr, exit 2."""
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    p = subprocess.run([sys.executable, "-m", "pyrovi.cli", "train", "--latent-dim", "0", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if "Warning" not in ln]
    assert lines == ["pyrovi train: error: --latent-dim must be > 0, got 0"]


def test_cli_missing_run_directory(capsys):
    assert cli.main(["evaluate", "/no/such/run", "--k", "2"]) == 2
    assert "run directory not found" in capsys.readouterr().err
