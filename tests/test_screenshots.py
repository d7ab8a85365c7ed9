"""scripts/screenshots.py: report.html (VAE, VQ-VAE) and the docs' objectives page in headless Chromium.

Slow (it trains two small runs and builds the docs) and needs Chromium (``apt-get install -y
chromium``); it checks, and does not rewrite docs/img (``--check-only``).
"""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "screenshots.py")
CHROMIUM = next((shutil.which(c) for c in ("chromium", "chromium-browser", "google-chrome") if shutil.which(c)), None)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)")]


def _module():
    spec = importlib.util.spec_from_file_location("screenshots", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_check_catches_raw_latex_and_overflow(tmp_path):
    shots = _module()
    good = tmp_path / "good.html"
    good.write_text("<html><body><p>loss = -ELBO</p><img style='width:3000px;max-width:100%'></body></html>")
    shots.shoot(CHROMIUM, str(good), None, "good")
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><p>$$\\frac{1}{K}$$</p><div style='width:3000px'>wide</div></body></html>")
    with pytest.raises(SystemExit) as e:
        shots.shoot(CHROMIUM, str(bad), None, "bad")
    assert "raw LaTeX" in str(e.value) and "wider than the window" in str(e.value)


def test_reports_and_docs_render_without_raw_latex_or_overflow():
    pytest.importorskip("mkdocs")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    r = subprocess.run([sys.executable, SCRIPT, "--check-only"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in ("VAE report.html", "VQ-VAE report.html", "docs objectives page"):
        assert f"{name}: " in r.stdout and "ok" in r.stdout.split(f"{name}: ", 1)[1].splitlines()[0], name
