"""Render report.html of a VAE run and of a VQ-VAE run, and the docs' objectives page, in headless
Chromium; check that no raw LaTeX is left and nothing overflows the window; save PNG screenshots.

    python scripts/screenshots.py                 # trains two small runs, builds the docs, writes docs/img/*.png
    python scripts/screenshots.py --check-only    # the checks, no PNGs written
    python scripts/screenshots.py --vae RUN --vq RUN --site SITE   # use existing run directories / built site

Needs Chromium (Debian: ``apt-get install -y chromium``; or pass ``--chromium PATH``) and the
docs tools (``pip install -e ".[dev]"``). Everything is read from local files (``file://``)
with Chromium's network features off, so a page that needed the internet to render its math
or layout would fail the check here.

How the checks see the page: a copy of each page gets a small script appended that, after
the page has loaded, writes into an attribute of ``<html>``: the visible text
(``innerText``), the viewport width, and every element that reaches past the viewport's
right edge outside a scrolling box. Chromium's ``--dump-dom`` prints that DOM; the script
then asserts that the visible text holds no ``$$``, ``\\(``, ``\\[`` or ``\\frac``-style
macros and that no element overflows. The screenshot is taken of the original page with
a window as tall as the page (``--screenshot``).
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH = 1100  # CSS pixels: a laptop browser window
MAX_HEIGHT = 7000  # screenshots stop here (a long report is cut, not shrunk)

PROBE = """
<script>
window.addEventListener("load", () => setTimeout(() => {
  const vw = document.documentElement.clientWidth;
  const scrolls = (el) => {
    for (let p = el.parentElement; p; p = p.parentElement) {
      const o = getComputedStyle(p).overflowX;
      if (o === "auto" || o === "scroll" || o === "hidden") return p !== document.body && p !== document.documentElement;
    }
    return false;
  };
  const over = [];
  for (const el of document.body.querySelectorAll("*")) {
    const r = el.getBoundingClientRect();
    if (r.width > 0 && r.right > vw + 1 && !scrolls(el) && getComputedStyle(el).visibility !== "hidden")
      over.push(el.tagName.toLowerCase() + (el.className && el.className.baseVal === undefined ? "." + el.className : "")
                + " right=" + Math.round(r.right));
  }
  document.documentElement.setAttribute("data-pyrovi-check", JSON.stringify({
    viewport: vw, scrollWidth: document.documentElement.scrollWidth, height: document.documentElement.scrollHeight,
    overflow: over.slice(0, 10), text: document.body.innerText, maths: document.querySelectorAll("math").length}));
}, 300));
</script>
"""

#: LaTeX that a reader should never see as text on a rendered page
RAW_LATEX = re.compile(r"\$\$|\\\(|\\\)|\\\[|\\\]|\\(frac|mathcal|log|sum|mathbb|hat|mid|theta|phi)\b")


def find_chromium(path=None) -> str:
    for c in ([path] if path else []) + ["chromium", "chromium-browser", "google-chrome", "chrome"]:
        found = shutil.which(c) if c else None
        if found:
            return found
    sys.exit("screenshots.py: no Chromium found; apt-get install -y chromium, or pass --chromium PATH")


def chromium(exe: str, url: str, *args: str, height: int = 900) -> str:
    profile = tempfile.mkdtemp(prefix="pyrovi-chromium-")
    try:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
               "--disable-extensions", "--force-device-scale-factor=1", f"--user-data-dir={profile}",
               f"--window-size={WIDTH},{height}", "--virtual-time-budget=4000", *args, url]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            raise RuntimeError(f"chromium failed on {url}: {r.stderr[-1500:]}")
        return r.stdout
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def check(exe: str, page: str) -> dict:
    """Load a probed copy of ``page`` (beside it, so relative links work); the probe's findings."""
    with open(page, encoding="utf-8") as f:
        text = f.read()
    probed = os.path.join(os.path.dirname(page), ".pyrovi-probe-" + os.path.basename(page))
    with open(probed, "w", encoding="utf-8") as f:
        f.write(text.replace("</body>", PROBE + "</body>") if "</body>" in text else text + PROBE)
    try:
        dom = chromium(exe, "file://" + os.path.abspath(probed), "--dump-dom")
    finally:
        os.unlink(probed)
    m = re.search(r'data-pyrovi-check="([^"]*)"', dom)
    if not m:
        raise RuntimeError(f"{page}: the probe did not run (no data-pyrovi-check in the DOM)")
    return json.loads(html.unescape(m.group(1)))


def shoot(exe: str, page: str, png: str, name: str, min_maths: int = 0) -> None:
    found = check(exe, page)
    raw = sorted({m.group(0) for m in RAW_LATEX.finditer(found["text"])})
    problems = []
    if raw:
        problems.append(f"raw LaTeX in the visible text: {raw[:8]}")
    if found["overflow"] or found["scrollWidth"] > found["viewport"] + 1:
        problems.append(f"wider than the window ({found['scrollWidth']} > {found['viewport']} px): "
                        f"{found['overflow']}")
    if found["maths"] < min_maths:
        problems.append(f"{found['maths']} <math> elements, expected at least {min_maths}")
    status = "ok" if not problems else "FAILED: " + "; ".join(problems)
    print(f"{name}: {found['viewport']} px wide, {found['height']} px tall, {found['maths']} formulas: {status}")
    if png:
        chromium(exe, "file://" + os.path.abspath(page), f"--screenshot={png}",
                 height=min(MAX_HEIGHT, max(600, found["height"])))
        _shrink(png)
        print(f"  wrote {os.path.relpath(png, ROOT)} ({os.path.getsize(png) // 1024} KiB)")
    if problems:
        raise SystemExit(f"screenshots.py: {name}: " + "; ".join(problems))


def _shrink(png: str) -> None:
    """Re-save with a 256-colour palette (pages are text and flat figures): a third of the bytes in git."""
    from PIL import Image  # Pillow comes with matplotlib

    with Image.open(png) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(png, optimize=True)


def cli(*argv: str) -> None:
    from pyrovi.cli import main

    rc = main(list(argv))
    if rc != 0:
        raise SystemExit(f"screenshots.py: pyrovi {' '.join(argv)} exited {rc}")


def make_runs(tmp: str) -> tuple:
    """A small VAE run and a small VQ-VAE run (with a prior) on digits, with every figure a report shows."""
    vae, vq = os.path.join(tmp, "vae"), os.path.join(tmp, "vq")
    cli("train", "--latent-dim", "8", "--hidden", "128", "--epochs", "30", "--batch-size", "128", "--no-progress",
        "--evaluate-k", "100", "--out", vae)
    cli("diagnose", vae, "--n", "64", "--particles", "64", "--no-progress")
    cli("interpolate", vae, "--pairs", "4", "--steps", "10")
    cli("train", "--model", "vqvae", "--codebook", "32", "--code-dim", "8", "--channels", "32", "--epochs", "15",
        "--batch-size", "128", "--no-progress", "--out", vq)
    cli("train-prior", vq, "--epochs", "5", "--no-progress")
    cli("evaluate", vq, "--k", "1", "--no-progress")
    cli("diagnose", vq, "--n", "32", "--particles", "8", "--no-progress")
    cli("interpolate", vq, "--pairs", "4", "--steps", "10")
    cli("report", vae)
    cli("report", vq)
    return vae, vq


def build_site(tmp: str) -> str:
    site = os.path.join(tmp, "site")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), NO_MKDOCS_2_WARNING="1")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f",
                        os.path.join(ROOT, "mkdocs.yml"), "-d", site], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise SystemExit(f"screenshots.py: mkdocs build failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return site


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", help="a VAE run directory (default: train one)")
    p.add_argument("--vq", help="a VQ-VAE run directory (default: train one)")
    p.add_argument("--site", help="a built docs site (default: mkdocs build into a temp dir)")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "img"), help="folder of the PNGs (default: docs/img)")
    p.add_argument("--check-only", action="store_true", help="run the checks, write no PNGs")
    p.add_argument("--chromium", default=None, help="the browser (default: chromium on PATH)")
    args = p.parse_args(argv)
    exe = find_chromium(args.chromium)
    sys.path.insert(0, ROOT)  # this checkout's pyrovi
    os.environ.setdefault("MPLBACKEND", "Agg")
    with tempfile.TemporaryDirectory(prefix="pyrovi-shots-") as tmp:
        vae, vq = (args.vae, args.vq) if args.vae and args.vq else make_runs(tmp)
        site = args.site or build_site(tmp)
        os.makedirs(args.out, exist_ok=True)
        png = (lambda name: None) if args.check_only else (lambda name: os.path.join(args.out, name))
        shoot(exe, os.path.join(vae, "report.html"), png("report_vae.png"), "VAE report.html")
        shoot(exe, os.path.join(vq, "report.html"), png("report_vq.png"), "VQ-VAE report.html")
        shoot(exe, os.path.join(site, "objectives", "index.html"), png("docs_objectives.png"),
              "docs objectives page", min_maths=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
