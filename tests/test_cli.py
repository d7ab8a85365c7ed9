"""The pyrovi command: help lists names, train writes a run, sample writes files, errors are one line."""

import os
import subprocess
import sys

import numpy as np
import pytest

from pyrovi.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_lists_datasets_guides_objectives(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ("digits", "mnist5k", "diag_normal", "elbo", "meanfield", "iwae", "renyi", "train", "sample"):
        assert name in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--objective" in out and "--particles" in out and "objectives: dreg, elbo" in out


def test_train_sample_evaluate(tmp_path, capsys):
    out = str(tmp_path / "run")
    rc = main(["train", "--epochs", "2", "--latent-dim", "2", "--hidden", "32", "--out", out, "--no-progress",
               "--objective", "iwae", "--particles", "2"])
    assert rc == 0
    for f in ("config.json", "weights.safetensors", "history.csv", "metrics.json", "samples.png", "report.md"):
        assert os.path.isfile(os.path.join(out, f))
    assert main(["sample", out, "--n", "5", "--out", str(tmp_path / "s.npy")]) == 0
    s = np.load(tmp_path / "s.npy")
    assert s.shape == (5, 64) and (s >= 0).all() and (s <= 1).all()
    assert main(["evaluate", out, "--k", "10"]) == 0
    assert "log_likelihood" in capsys.readouterr().out


def test_user_errors_are_one_line_with_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pyrovi.cli", "train", "--objective", "elbow", "--out",
                        str(tmp_path / "x")], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 2
    assert "unknown objective 'elbow'; valid objectives: dreg, elbo" in r.stderr
    assert "Traceback" not in r.stderr
    assert main(["sample", str(tmp_path / "missing")]) == 2


def test_val_fraction_out_of_range_is_named_in_cli_spelling(capsys):
    assert main(["train", "--data", "digits", "--val-fraction", "1.5", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert "--val-fraction must be in [0, 1)" in err and "1.5" in err and len(err.strip().splitlines()) == 1


def test_dtype_float64_from_the_shell(tmp_path, capsys):
    """``pyrovi train --dtype float64`` (docs/cli.md): the run trains, is
    recorded, loads and evaluates in float64; an unknown dtype is a one-line usage error."""
    import pyrovi as pv
    from pyrovi.checkpoint import read_json

    out = str(tmp_path / "run64")
    assert main(["train", "--epochs", "1", "--latent-dim", "2", "--hidden", "16", "--guide", "flow", "--objective",
                 "dreg", "--particles", "2", "--dtype", "float64", "--out", out, "--no-progress",
                 "--evaluate-k", "0"]) == 0
    assert read_json(os.path.join(out, "config.json"), "config")["train"]["dtype"] == "float64"
    run = pv.load_run(out)
    assert run.dtype == pv.train.DTYPES["float64"]
    assert all(p.dtype == run.dtype for p in run.guide.parameters())
    assert main(["evaluate", out, "--k", "3"]) == 0
    with pytest.raises(SystemExit) as e:
        main(["train", "--dtype", "float16", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "invalid choice: 'float16'" in capsys.readouterr().err
