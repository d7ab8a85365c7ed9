"""The "bring your own Pyro VAE" example runs end to end on a tiny budget."""

import importlib.util
import json
import math
import os

import pytest


pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "byo_pyro_vae.py")


def test_byo_example_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("byo_pyro_vae", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "ex"
    results = mod.main(["--quick", "--out", str(out)])
    for name in ("own_guide", "pyrovi_guide_iwae"):
        r = results[name]
        assert math.isfinite(r["elbo"]) and r["log_likelihood"] >= r["elbo"] - 1e-6  # IWAE-k >= ELBO (same draws)
        assert (out / name / "weights.safetensors").is_file()
    assert json.loads((out / "results.json").read_text()).keys() == results.keys()
    assert (out / "training_curves.png").is_file() and (out / "reconstructions.png").is_file()
    assert json.loads((out / "pyrovi_guide_iwae" / "config.json").read_text())["objective"]["name"] == "iwae"
