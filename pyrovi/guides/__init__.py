"""Guides: ``PyroModule`` s whose ``forward(x, y=None)`` is the Pyro *guide* q(z|x).

Build one for a model with ``Guide(model, **options)``; rebuild from a run's
config with :func:`build`. ``DiagNormal``, ``Delta``, ``Mixture``, ``Flow`` and
``Auto`` are heads on one amortized base (:mod:`pyrovi.guides.amortized`): each
serves pyrovi's models and any Pyro model (traced on ``example=`` or on its first
call) with the same common options. ``Codebook`` is the VQ-VAE's own guide.
"""

from __future__ import annotations

from ..errors import ConfigError, lookup, rebuilding
from .auto import Auto
from .codebook import Codebook, CodebookConfig
from .delta import Delta
from .diag_normal import DiagNormal
from .flow import Flow
from .mixture import Mixture

__all__ = ["DiagNormal", "Mixture", "Flow", "Auto", "Delta", "Codebook", "CodebookConfig", "GUIDES", "build", "names"]

#: name -> guide class; each is built as ``cls(model, **options)``.
GUIDES: dict = {"diag_normal": DiagNormal, "diagnormal": DiagNormal, "mixture": Mixture, "flow": Flow, "auto": Auto,
                "delta": Delta, "codebook": Codebook}


def names() -> list:
    """Guide names accepted by :func:`build` and the CLI."""
    return sorted({k for k in GUIDES if k != "diagnormal"})


def build(model, config) -> object:
    """Build a guide for ``model`` from a name or a ``config()`` dict ``{"name": ..., **options}``."""
    if isinstance(config, str):
        config = {"name": config}
    if not isinstance(config, dict) or "name" not in config:
        raise ConfigError(f"guide config must be a name or a dict with a 'name'; got {config!r}")
    opts = dict(config)
    cls = lookup(GUIDES, opts.pop("name"), "guide")
    with rebuilding("guide", config, cls, options=opts):
        return cls(model, **opts)
