"""Every CLI command on every run kind, and the CLI's manners (issue 20, items 1 and 5).

One tiny run of each kind (VAE, conditional VAE, autoencoder, flow, mixture,
auto, VQ-VAE on images) is trained once per module; every command then runs on
it in-process: exit 0, the files it promises, no traceback.
"""

import argparse
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from pyrovi.cli import build_parser, cli_spelling, main, _subparser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--epochs", "1", "--latent-dim", "2", "--hidden", "16", "--batch-size", "512", "--no-progress"]
KINDS = {
    "vae": [],
    "cvae": ["--model", "conditional_vae"],
    "ae": ["--model", "autoencoder"],
    "flow": ["--guide", "flow", "--depth", "1"],
    "mixture": ["--guide", "mixture", "--components", "2"],
    "auto": ["--guide", "auto"],
    "vq": ["--model", "vqvae", "--codebook", "8", "--code-dim", "2", "--channels", "4"],
    "lg": ["--model", "linear_gaussian", "--likelihood", "gaussian"],  # probabilistic PCA: decodes to W z + b
}
#: kinds whose model has no decode(z)/sample(n): sample and interpolate refuse in one line (none today;
#: tests/test_uses.py covers the refusal for a user model without them)
NO_DECODER = ()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny run of each kind, trained once for the whole module (the commands below share them)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for kind, flags in KINDS.items():
        d = str(root / kind)
        assert main(["train", *TINY, *flags, "--out", d]) == 0, kind
        out[kind] = d
    return out


def _ok(capsys, argv):
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 0, (argv, captured.err[-2000:])
    assert "Traceback" not in captured.err
    return captured


def _refused(capsys, argv, *words):
    """The CLI's manners for a command a run cannot do: exit 2, one line naming why, no traceback."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (argv, err[-2000:])
    assert all(w in err for w in words), err


# one test per (command, run kind): a failure names the pair; the runs are trained once per module


def _evaluate(d, kind, capsys, tmp_path, runs):
    out = _ok(capsys, ["evaluate", d, "--k", "4", "--batch-size", "200"]).out
    assert ("log_likelihood" in out) == (kind != "ae")  # an autoencoder has no likelihood bound to report


def _diagnose(d, kind, capsys, tmp_path, runs):
    _ok(capsys, ["diagnose", d, "--n", "8", "--particles", "8"])
    assert os.path.isfile(os.path.join(d, "diagnostics.nc")) and os.path.isfile(os.path.join(d, "latents.png"))
    assert os.path.isfile(os.path.join(d, "khat.png")) == (kind not in ("ae", "vq"))  # point masses: no k-hat
    # diagnose's own interpolation paths (not interpolate's file); none without a decoder
    assert os.path.isfile(os.path.join(d, "diagnose_interpolations.png")) == (kind not in NO_DECODER)


def _sample(d, kind, capsys, tmp_path, runs):
    if kind in NO_DECODER:
        return _refused(capsys, ["sample", d, "--n", "4"], "has no sample")
    _ok(capsys, ["sample", d, "--n", "4"])
    assert os.path.isfile(os.path.join(d, "samples.png"))
    _ok(capsys, ["sample", d, "--n", "4", "--out", str(tmp_path / "s.npy")])
    assert np.load(tmp_path / "s.npy").shape == (4, 64)  # a real .npy, not PNG bytes


def _interpolate(d, kind, capsys, tmp_path, runs):
    if kind in NO_DECODER:
        return _refused(capsys, ["interpolate", d, "--pairs", "2", "--steps", "3"], "has no decode")
    _ok(capsys, ["interpolate", d, "--pairs", "2", "--steps", "3"])
    assert os.path.isfile(os.path.join(d, "interpolations.png"))


def _compare(d, kind, capsys, tmp_path, runs):
    _ok(capsys, ["compare", d, runs["vae"], "--out", str(tmp_path / "cmp")])
    assert os.path.isfile(tmp_path / "cmp" / "compare.md")


def _report(d, kind, capsys, tmp_path, runs):
    _ok(capsys, ["report", d])
    for f in ("report.md", "report.html") + (() if kind in NO_DECODER else ("reconstructions.png",)):
        assert os.path.isfile(os.path.join(d, f)), f
    with open(os.path.join(d, "report.html"), encoding="utf-8") as fh:
        page = fh.read()
    links = re.findall(r'href="#([^"]+)"', page)  # the contents line links every section, and the ids exist
    assert {"setup", "training", "figures"} <= set(links) and all(f'id="{a}"' in page for a in links), links


def _train_prior(d, kind, capsys, tmp_path, runs):
    argv = ["train-prior", d, "--epochs", "1", "--d-model", "8", "--layers", "1", "--heads", "2",
            "--batch-size", "512", "--no-progress"]
    if kind != "vq":
        return _refused(capsys, argv, "need a VQ-VAE run")
    _ok(capsys, argv)
    _ok(capsys, ["sample", d, "--n", "4"])  # a class-conditional prior, no --label: classes in turn
    out = _ok(capsys, ["evaluate", d, "--k", "50"]).out  # VQ metrics and the prior through evaluate
    assert "evaluating with K = 1" in out and "perplexity" in out and "Transformer prior" in out
    _ok(capsys, ["report", d])
    with open(os.path.join(d, "report.md")) as fh:
        assert "## Codebook and prior" in fh.read()


COMMANDS = {"evaluate": _evaluate, "diagnose": _diagnose, "sample": _sample, "interpolate": _interpolate,
            "compare": _compare, "report": _report, "train-prior": _train_prior}


def test_the_matrix_covers_every_command():
    from pyrovi.cli import COMMANDS as CLI

    assert set(CLI) == set(COMMANDS) | {"train"}  # train made the runs


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_command_on_run_kind(runs, command, kind, capsys, tmp_path):
    COMMANDS[command](runs[kind], kind, capsys, tmp_path, runs)


# --------------------------------------------------------------------------- item 5: manners


def test_python_m_pyrovi():
    r = subprocess.run([sys.executable, "-m", "pyrovi", "--version"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0 and r.stdout.startswith("pyrovi ")


def test_every_option_has_help_with_its_default():
    parser = build_parser()
    for name, sp in next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices.items():
        for action in sp._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (name, action.option_strings)
            assert "default" in sp.formatter_class("x")._get_help_string(action).lower(), (name, action.dest)
    train = _subparser(parser, "train").format_help()
    for flag, default in (("--epochs", "20"), ("--lr", "0.001"), ("--seed", "0"), ("--batch-size", "128")):
        after = train.split(flag + " ", 2)[-1]
        assert f"(default: {default})" in " ".join(after.split()[:40]), flag


def test_no_progress_on_every_command_that_shows_progress():
    parser = build_parser()
    for name in ("train", "evaluate", "diagnose", "train-prior"):
        assert "--no-progress" in _subparser(parser, name).format_help(), name


def test_progress_in_a_log_is_whole_lines():
    from pyrovi.progress import bar

    buf = io.StringIO()  # not a terminal
    with bar(8, "evaluate", file=buf) as b:
        for _ in range(8):
            b.update(1)
    text = buf.getvalue()
    assert "\r" not in text and text.count("\n") == 4 and "8/8" in text
    off = io.StringIO()
    bar(8, "x", enabled=False, file=off).update(8)
    assert off.getvalue() == ""


def test_errors_in_cli_spelling(tmp_path, capsys):
    train = _subparser(build_parser(), "train")
    assert cli_spelling("pass resume=True to continue it or overwrite=True", train) == \
        "pass --resume to continue it or --overwrite"
    assert cli_spelling("config {'name': 'x'} and lr=0.5", train) == "config {'name': 'x'} and --lr 0.5"
    assert cli_spelling("use batch_size <= 250; image_shape (8, 8)", train) == \
        "use --batch-size <= 250; image_shape (8, 8)"
    d = str(tmp_path / "r")
    assert main(["train", *TINY, "--out", d]) == 0
    capsys.readouterr()
    assert main(["train", *TINY, "--out", d]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "resume=True" not in err


def test_same_seed_same_history(tmp_path):
    hist = []
    for name in ("a", "b"):
        d = str(tmp_path / name)
        assert main(["train", "--epochs", "2", "--latent-dim", "2", "--hidden", "16", "--batch-size", "256",
                     "--seed", "3", "--no-progress", "--out", d]) == 0
        with open(os.path.join(d, "history.csv")) as fh:
            rows = [line.rstrip("\n").split(",") for line in fh]
        keep = [i for i, h in enumerate(rows[0]) if h not in ("seconds", "items_per_second")]
        hist.append([[r[i] for i in keep] for r in rows])
    assert hist[0] == hist[1] and len(hist[0]) == 3


# --------------------------------------------------------------------------- item 3: honest numbers


def _fake_summary(kl_per_unit, point_mass=False, units=16):
    import torch

    from pyrovi.diagnostics import _summary

    lat = {"z": {"dims": units, "mean_variance": [0.5] * units, "active": units,
                 "kl_per_dim": None if point_mass else [kl_per_unit] * units}}
    r = {"log_likelihood": torch.full((8,), -40.0), "elbo": torch.full((8,), -41.0),
         "kl": torch.full((8,), kl_per_unit * units)}
    summary, _ = _summary(np.full(8, 0.2), np.full(8, 2000.0), r, lat, 2500, [], point_mass=point_mass)
    return summary


def test_collapse_check_catches_a_near_zero_total_kl():
    # the flow run: 16 units whose means vary (Monte Carlo noise) but 0.56 nats of KL in all
    s = _fake_summary(0.56 / 16)
    assert any("nearly) collapsed" in w for w in s.warnings)
    assert not any("collapsed" in w for w in _fake_summary(0.3).warnings)  # a healthy run


def test_point_mass_summary_has_no_khat_and_no_spurious_collapse():
    s = _fake_summary(0.0, point_mass=True)
    assert s.khat_bands == {"good": 0, "fair": 0, "bad": 0} and s.warnings == []
    md = s.to_markdown()
    assert "point mass" in md and "k-hat median" not in md


def test_autoencoder_report_and_compare_show_no_log_likelihood(runs, capsys, tmp_path):
    d = runs["ae"]
    _ok(capsys, ["evaluate", d, "--k", "4"])
    with open(os.path.join(d, "report.md")) as fh:
        report = fh.read()
    test_part = report.split("## Test metrics", 1)[1].split("##", 1)[0]
    assert "log p(x)" not in test_part.replace("no log p(x)", "") and "bits/dim" not in test_part.split("|", 1)[1]
    out = _ok(capsys, ["compare", d, runs["vae"]]).out
    assert "val loss is minus" in out and "ELBO" in out and "not a bound" in out
    ae_row = next(line for line in out.splitlines() if line.startswith(f"| {os.path.basename(d)} "))
    assert "-4" not in ae_row.split("|")[9]  # test log p(x): "—" for the autoencoder


def test_every_command_on_a_text_vq_run(tmp_path, capsys):
    import pydoc_data.topics

    src = tmp_path / "small.txt"
    src.write_text("".join(pydoc_data.topics.topics.values())[:20000], encoding="utf-8")
    d = str(tmp_path / "vqt")
    _ok(capsys, ["train", "--data", f"text:{src}", "--model", "vqvae", "--codebook", "8", "--code-dim", "2",
                 "--channels", "4", "--epochs", "1", "--batch-size", "128", "--no-progress", "--out", d])
    _ok(capsys, ["evaluate", d, "--k", "2"])
    _ok(capsys, ["diagnose", d, "--n", "4", "--particles", "4"])
    _ok(capsys, ["interpolate", d, "--pairs", "1", "--steps", "3"])
    assert os.path.isfile(os.path.join(d, "interpolations.txt"))
    _ok(capsys, ["sample", d, "--n", "2", "--out", str(tmp_path / "s.txt")])
    assert (tmp_path / "s.txt").read_text(encoding="utf-8").count("-" * 20) == 1  # two samples, one separator
    _ok(capsys, ["report", d])
    _ok(capsys, ["train-prior", d, "--epochs", "1", "--d-model", "8", "--layers", "1", "--heads", "2",
                 "--no-progress"])
    assert _ok(capsys, ["sample", d, "--n", "2"]).out.strip()  # printed to the terminal


def test_report_setup_is_a_table_and_figures_have_captions(runs, capsys):
    d = runs["vae"]
    _ok(capsys, ["report", d])
    with open(os.path.join(d, "report.md")) as fh:
        text = fh.read()
    setup = text.split("## Setup", 1)[1].split("## Training", 1)[0]
    assert "| model | vae |" in setup and "{" not in setup.split("| --- |")[-1].split("\n")[1]
    assert "*Training and validation loss per epoch" in text and "*Decoder means for codes drawn" in text
