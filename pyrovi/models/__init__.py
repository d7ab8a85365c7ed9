"""Generative models: ``PyroModule`` s whose ``forward(x, y=None)`` is the Pyro *model*.

Each model declares ``latent_sites`` (``{name: event shape}``) so guides can be
built for it, and ``config()`` / ``from_config()`` so a run directory rebuilds it.
"""

from __future__ import annotations

from ..errors import ConfigError, lookup, rebuilding
from .autoencoder import Autoencoder
from .conditional import ConditionalVAE
from .linear_gaussian import LinearGaussian
from .vae import VAE, VAEConfig
from .vqvae import VQVAE, VQVAEConfig

__all__ = ["VAE", "VAEConfig", "ConditionalVAE", "Autoencoder", "LinearGaussian", "VQVAE", "VQVAEConfig", "MODELS",
           "build", "names"]

#: name -> model class; every class has ``from_config(dict)``.
MODELS: dict = {"vae": VAE, "linear_gaussian": LinearGaussian, "conditional_vae": ConditionalVAE,
                "autoencoder": Autoencoder, "vqvae": VQVAE}


def names() -> list:
    """Model names accepted by :func:`build` and the CLI."""
    return sorted(MODELS)


def build(config: dict):
    """Rebuild a model from its ``config()`` dict (as stored in ``config.json``)."""
    if not isinstance(config, dict) or "name" not in config:
        raise ConfigError(f"model config must be a dict with a 'name'; got {config!r}")
    cls = lookup(MODELS, config["name"], "model")
    with rebuilding("model", config, cls):
        return cls.from_config(config)

