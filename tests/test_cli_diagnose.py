"""`pyrovi evaluate | diagnose | compare` on a tiny digits run: files, report contents, the table."""

import base64
import json
import os

import numpy as np
import pytest
import torch

import pyrovi as pv
from pyrovi import cli, plots
from pyrovi.diagnostics import load_netcdf, summarize


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory, digits):
    out = []
    for i, objective in enumerate(("elbo", "iwae")):
        d = str(tmp_path_factory.mktemp(f"run{i}"))
        torch.manual_seed(i)
        model = pv.models.VAE(digits.shape, latent_dim=3, hidden=(32,), image_shape=digits.image_shape)
        pv.fit(model, pv.guides.DiagNormal(model, hidden=(32,)), digits, objective=objective, epochs=3,
               batch_size=128, out=d, progress=False)
        out.append(d)
    return out


def test_evaluate_diagnose_report(run_dirs, capsys):
    d = run_dirs[0]
    assert cli.main(["evaluate", d, "--k", "50"]) == 0
    printed = capsys.readouterr().out
    assert "log_likelihood" in printed and "KL per dim (analytic)" in printed
    with open(os.path.join(d, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["test"]["k"] == 50 and metrics["test"]["n"] == 180

    assert cli.main(["diagnose", d, "--n", "24", "--particles", "300"]) == 0
    printed = capsys.readouterr().out
    nc = os.path.join(d, "diagnostics.nc")
    assert os.path.isfile(nc)
    idata = load_netcdf(nc)
    assert idata.posterior["z"].shape == (1, 300, 24, 3)
    s = summarize(idata)
    assert sum(s.khat_bands.values()) == 24
    assert "only 300 draws" in printed  # the particle warning reaches the shell user
    for f in ("khat.png", "latents.png", "diagnose_interpolations.png"):
        with open(os.path.join(d, f), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n", f

    with open(os.path.join(d, "report.md")) as f:
        md = f.read()
    assert "## Test metrics" in md and "## Posterior diagnostics" in md
    b = s.khat_bands
    assert f"| good (k < 0.5) | {b['good']} |" in md and f"| bad (k > 0.7) | {b['bad']} |" in md
    assert "![khat](khat.png)" in md
    with open(os.path.join(d, "report.html")) as f:
        html = f.read()
    pngs = [f for f in os.listdir(d) if f.endswith(".png")]
    assert html.count("data:image/png;base64,") == len(pngs) >= 6  # every figure embedded
    assert 'src="khat.png"' not in html  # self-contained: no links to files
    first = html.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(first)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<table>" in html and "PSIS k-hat band" in html


def test_compare(run_dirs, tmp_path, capsys):
    out = str(tmp_path / "cmp")
    assert cli.main(["compare", *run_dirs, "--out", out]) == 0
    printed = capsys.readouterr().out
    lines = [ln for ln in printed.splitlines() if ln.startswith("|")]
    assert len(lines) == 2 + 2  # header, rule, one row per run
    assert "| elbo |" in lines[2] and "| iwae |" in lines[3]
    assert os.path.isfile(os.path.join(out, "compare.md"))
    assert os.path.isfile(os.path.join(out, "training_curves.png"))


def test_cli_errors(tmp_path, capsys):
    assert cli.main(["diagnose", str(tmp_path / "missing")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    assert cli.main(["compare", str(tmp_path / "missing")]) == 2


def test_plots_edge_cases(tmp_path):
    k = np.array([-np.inf, -0.2, 0.3, 0.55, 0.69, 0.75, 1.3, np.nan])
    plots.khat(k, particles=100, path=str(tmp_path / "k.png"))
    for dim in (1, 2, 5):
        z = torch.randn(60, dim)
        plots.latent_scatter(z, torch.arange(60) % 3, path=str(tmp_path / f"z{dim}.png"))
    plots.latent_scatter(torch.randn(10, 2), None, path=str(tmp_path / "nolabel.png"))
    plots.interpolations(torch.rand(2, 5, 64), (8, 8), ends=torch.rand(2, 2, 64), path=str(tmp_path / "i.png"))
    assert len(os.listdir(tmp_path)) == 6
