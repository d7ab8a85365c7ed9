"""The documentation site builds with `mkdocs build --strict` (broken links, bad docstrings and missing pages fail)."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDED = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
MISSING = [m for m in NEEDED if importlib.util.find_spec(m.split(".")[0]) is None
           or (m.count(".") and importlib.util.find_spec(m) is None)]


@pytest.mark.skipif(bool(MISSING), reason=f"docs tools not installed ({', '.join(MISSING)}); pip install -e "
                                          "'.[dev]' installs mkdocs, mkdocs-material, mkdocstrings[python]")
def test_mkdocs_build_strict(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", os.path.join(ROOT, "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    site = tmp_path / "site"
    for page in ("index.html", "tutorial/index.html", "uses/index.html", "cli/index.html", "api/index.html"):
        assert (site / page).is_file(), page
    cli = (site / "cli" / "index.html").read_text()
    assert "pyrovi interpolate" in cli and "--label" in cli  # the hook filled in the live --help
    api = (site / "api" / "index.html").read_text()
    assert "ConditionalVAE" in api and "slerp" in api
