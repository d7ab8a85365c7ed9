"""The VQ-VAE example scripts run end to end with --quick."""

import os
import runpy

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _main(name):
    return runpy.run_path(os.path.join(EXAMPLES, name), run_name="example")["main"]


def test_vqvae_digits_example_quick(tmp_path):
    out = _main("vqvae_digits.py")(["--quick", "--out", str(tmp_path)])
    for f in ("reconstructions.png", "samples_by_label.png", "uniform_prior_samples.png", "metrics.json",
              "run/config.json", "run/prior.safetensors", "run/prior.json"):
        assert os.path.isfile(tmp_path / f), f
    assert set(out["class_conditional"]["temperature_1.0"]["per_label"]) == set(range(10))
    assert out["prior_test"]["bits_per_dim_learned"] < out["prior_test"]["bits_per_dim_uniform"]


def test_vqvae_text_example_quick(tmp_path):
    out = _main("vqvae_text.py")(["--quick", "--out", str(tmp_path)])
    for f in ("bits_per_char.png", "samples.txt", "metrics.json", "run/prior.json"):
        assert os.path.isfile(tmp_path / f), f
    assert len(out["samples"]) == 8 and all(len(s) == 64 for s in out["samples"])
    assert {"bits_per_dim_learned", "bits_per_dim_uniform", "bits_per_dim_unigram"} <= set(out["prior_test"])
