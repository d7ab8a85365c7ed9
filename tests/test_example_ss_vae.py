"""The semi-supervised VAE (M2) example runs end to end on a tiny budget (slow: it loads mnist5k)."""

import json
import math
import os
import runpy

import pytest

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "ss_vae_m2.py")


def test_ss_vae_example_quick(tmp_path):
    out = tmp_path / "ex"
    results = runpy.run_path(EXAMPLE)["main"](["--quick", "--out", str(out)])
    for name in ("pyrovi", "pyro_svi"):
        r = results[name]
        assert 0.0 <= r["test_accuracy"] <= 1.0 and math.isfinite(r["test_elbo"]) and r["test_elbo"] < 0
    cfg = json.loads((out / "pyrovi" / "config.json").read_text())
    assert cfg["train"]["semi_supervised"] and cfg["train"]["extra_loss"] is not None
    assert json.loads((out / "results.json").read_text()).keys() == results.keys()
