"""`pyrovi train` accepts the new guides, their options and the new objectives."""

import json

import torch

from pyrovi import cli


def _train(tmp_path, name, *extra):
    out = tmp_path / name
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = cli.main(["train", "--epochs", "1", "--latent-dim", "2", "--hidden", "32", "--no-progress",
                       "--out", str(out), *extra])
    finally:
        torch.set_num_threads(n)
    return rc, out


def test_train_with_flow_guide_and_dreg(tmp_path):
    rc, out = _train(tmp_path, "flow", "--guide", "flow", "--flow", "iaf", "--depth", "2", "--objective", "dreg",
                     "--particles", "4")
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["guide"]["name"] == "flow" and cfg["guide"]["flow"] == "iaf" and cfg["guide"]["depth"] == 2
    assert cfg["objective"] == {"name": "dreg", "particles": 4}


def test_train_with_mixture_guide_and_stl(tmp_path):
    rc, out = _train(tmp_path, "mix", "--guide", "mixture", "--components", "3", "--objective", "stl")
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["guide"]["name"] == "mixture" and cfg["guide"]["components"] == 3
    assert cfg["objective"]["name"] == "stl"


def test_guide_option_that_does_not_fit_is_a_clear_error(tmp_path, capsys):
    rc, _ = _train(tmp_path, "bad", "--guide", "diag_normal", "--components", "3")
    assert rc == 2
    assert "components" in capsys.readouterr().err
    rc, _ = _train(tmp_path, "bad2", "--guide", "flow", "--flow", "maf")
    assert rc == 2
    assert "valid flows" in capsys.readouterr().err
