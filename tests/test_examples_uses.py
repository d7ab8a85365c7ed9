"""Every example script of the seed's uses runs with --quick and writes its figure(s) and results."""

import json
import os
import runpy

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
PNG = b"\x89PNG\r\n\x1a\n"

#: script -> the figures it must write
FIGURES = {
    "reconstruction.py": ["reconstructions.png"],
    "prior_samples.py": ["prior_samples.png"],
    "interpolation.py": ["interpolation.png", "interpolation_norms.png"],
    "conditional_grid.py": ["conditional_grid.png"],
    "ae_vs_vae.py": ["ae_vs_vae.png"],
    "gaussian_delta.py": ["gaussian_delta.png", "gaussian_delta_tradeoff.png"],
}


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def test_every_use_example_is_listed():
    listed = set(FIGURES)
    assert listed <= set(os.listdir(EXAMPLES))


@pytest.mark.parametrize("script", sorted(FIGURES))
def test_example_runs_quick_and_writes_figures(script, tmp_path):
    main = runpy.run_path(os.path.join(EXAMPLES, script), run_name="example")["main"]
    out = tmp_path / script[:-3]
    results = main(["--quick", "--out", str(out)])
    for fig in FIGURES[script]:
        data = (out / fig).read_bytes()
        assert data[:8] == PNG and len(data) > 5_000, fig  # a real image, not an empty canvas
    saved = json.loads((out / "results.json").read_text())
    assert saved.keys() == results.keys()
