"""The guide-comparison example runs end to end with --quick and writes its table and figure."""

import importlib.util
import json
import os
import pathlib

import torch

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "compare_guides.py"


def test_compare_guides_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("compare_guides", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = mod.main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(n)
    assert set(rows) == set(mod.GUIDES)
    for r in rows.values():
        # the IWAE estimate with k >= 1 samples is never below the ELBO estimate from the same draws on average
        assert r["test_log_likelihood"] >= r["test_elbo"] - 1e-6 and r["seconds_per_epoch"] > 0
    for f in ("table.md", "metrics.json", "training_curves.png"):
        assert os.path.getsize(tmp_path / f) > 0
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs"] == 1
