"""The version of pyrovi, in one place.

Modules inside the package import it from here (``from ._version import __version__``),
never from the package face, so no module depends on ``pyrovi/__init__.py`` having
run first. ``pyproject.toml`` reads it too (``[tool.setuptools.dynamic]``).
"""

__version__ = "0.1.0"
