"""mkdocs hooks: the CLI reference from the live parser, reST bits of docstrings, and math as MathML.

- ``docs/cli.md`` is filled with the live ``--help`` of every ``pyrovi`` subcommand, generated
  from the parser itself at build time, so it cannot drift from the code.
- Math (``$...$``/``$$...$$`` in the pages, ``:math:`` and ``.. math::`` in docstrings) is turned
  into MathML at build time with latex2mathml (``pip install latex2mathml``, in the ``dev``
  extra). Browsers render MathML natively, so the site needs no JavaScript and no CDN for its
  equations: they show offline, e.g. on a cluster without internet.
"""

from __future__ import annotations

import html as html_mod
import os
import re
import sys

MARKER = "<!-- pyrovi-cli-help -->"


def _cli_reference() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps help text to the terminal width
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:  # document this checkout's CLI, installed or not
        sys.path.insert(0, root)
    from pyrovi.cli import COMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    parts = ["### `pyrovi`", "", "```text", parser.format_help().rstrip(), "```", ""]
    for name in COMMANDS:
        parts += [f"### `pyrovi {name}`", "", "```text", sub.choices[name].format_help().rstrip(), "```", ""]
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: D103 - mkdocs hook signature
    if MARKER in markdown:
        return markdown.replace(MARKER, _cli_reference())
    return markdown


# --------------------------------------------------------------------------- API pages: reST bits in docstrings
# pyrovi's docstrings follow Pyro's habit of reST roles (:class:`X`, :math:`x`) and ``.. math::``
# blocks. mkdocstrings renders docstrings as Markdown, so those arrive as literal text; these
# rules turn them into what they mean (code, inline math, display math) after rendering.

_MATH_BLOCK = re.compile(
    r'<p>\.\. math::</p>\s*<div class="highlight"><pre><span></span><code>(.*?)</code></pre></div>', re.S)
_MATH_INLINE_BLOCK = re.compile(r"<p>\.\. math:: (.*?)</p>", re.S)  # ".. math:: formula" on one paragraph
_MATH_ROLE = re.compile(r":math:<code>(.*?)</code>", re.S)
_XREF_ROLE = re.compile(r":(?:class|func|mod|meth|attr|data|obj|exc):<code>(~?)([^<]*)</code>")


def _display(match) -> str:
    parts = [p.strip() for p in re.split(r"\n\s*\n", match.group(1)) if p.strip()]
    return "".join(f'<div class="arithmatex">\\[{p}\\]</div>' for p in parts)


def _xref(match) -> str:
    name = match.group(2).split(".")[-1] if match.group(1) else match.group(2)
    return f"<code>{name}</code>"


# --------------------------------------------------------------------------- math: LaTeX -> MathML at build time
# pymdownx.arithmatex (generic mode) leaves <span class="arithmatex">\(...\)</span> and
# <div class="arithmatex">\[...\]</div>, HTML-escaped; each becomes a <math> element.

_ARITHMATEX = re.compile(r'<(span|div) class="arithmatex">\\([(\[])(.*?)\\[)\]]</\1>', re.S)


# MathML Core (what Chromium renders) ignores mathvariant other than "normal": letters in a
# script/double-struck/bold style (what `\mathcal L` without braces leaves) become the Unicode
# mathematical letters themselves, e.g. script L -> U+2112.
_VARIANT = re.compile(r'<mi mathvariant="(script|double-struck|bold|bold-italic|fraktur)">([A-Za-z])</mi>')


def _letter(match) -> str:
    import unicodedata

    style, ch = match.group(1).upper().replace("-ITALIC", " ITALIC"), match.group(2)
    case = "CAPITAL" if ch.isupper() else "SMALL"
    for name in (f"MATHEMATICAL {style} {case} {ch.upper()}", f"{style} {case} {ch.upper()}"):
        try:
            return f"<mi>{unicodedata.lookup(name)}</mi>"
        except KeyError:  # the Letterlike block holds some (script L is "SCRIPT CAPITAL L")
            pass
    return match.group(0)


def _mathml(match) -> str:
    import latex2mathml.converter

    tex = html_mod.unescape(match.group(3)).strip()
    block = match.group(2) == "["
    try:
        return _VARIANT.sub(_letter, latex2mathml.converter.convert(tex, display="block" if block else "inline"))
    except Exception as e:  # a macro latex2mathml lacks: fail the build, naming the formula
        raise ValueError(f"cannot render the formula {tex!r} as MathML ({type(e).__name__}: {e})") from None


def on_page_content(html: str, page, config, files) -> str:  # noqa: D103 - mkdocs hook signature
    html = _MATH_BLOCK.sub(_display, html)
    html = _MATH_INLINE_BLOCK.sub(lambda m: f'<div class="arithmatex">\\[{m.group(1)}\\]</div>', html)
    html = _MATH_ROLE.sub(lambda m: f'<span class="arithmatex">\\({m.group(1)}\\)</span>', html)
    html = _XREF_ROLE.sub(_xref, html)
    html = _ARITHMATEX.sub(_mathml, html)
    return html.replace("::</p>", ":</p>")
