"""mkdocs hook: fill ``docs/cli.md`` with the live ``--help`` of every ``pyrovi`` subcommand.

The command reference is generated from the parser itself at build time, so
it cannot drift from the code and new subcommands appear without editing the page.
"""

from __future__ import annotations

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


def on_page_content(html: str, page, config, files) -> str:  # noqa: D103 - mkdocs hook signature
    html = _MATH_BLOCK.sub(_display, html)
    html = _MATH_INLINE_BLOCK.sub(lambda m: f'<div class="arithmatex">\\[{m.group(1)}\\]</div>', html)
    html = _MATH_ROLE.sub(lambda m: f'<span class="arithmatex">\\({m.group(1)}\\)</span>', html)
    html = _XREF_ROLE.sub(_xref, html)
    return html.replace("::</p>", ":</p>")
