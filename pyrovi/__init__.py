"""pyrovi: variational inference with neural guides, built on Pyro.

Typical use::

    import pyrovi as pv
    data = pv.data.load("digits")
    model = pv.models.VAE(data.shape, latent_dim=16, likelihood="bernoulli")
    guide = pv.guides.DiagNormal(model)
    run = pv.fit(model, guide, data, objective="iwae", particles=8, epochs=50, out="runs/demo")
    report = pv.evaluate(run, data.test, k=5000)
    idata = pv.diagnose(run, data.test)   # arviz.InferenceData with PSIS k-hat per datapoint

Log-densities are in nats per datapoint unless a name says otherwise
(``bits_per_dim``).
"""

import importlib
import importlib.util

from ._version import __version__
from . import data, diagnostics, distributed, guides, models, objectives, uses  # distributed: Lightning only when it trains
from .errors import CheckpointError, ConfigError, DataError, PyroviError, TrainingError
from .diagnostics import diagnose
from .evaluation import evaluate
from .run import Run, load_run
from .train import TrainConfig, fit
from .vq_evaluation import vq_metrics

#: Every submodule is reachable as ``pv.<name>``. Those not imported above load on first use
#: (PEP 562 ``__getattr__`` below), so ``import pyrovi`` stays fast: ``plots`` and ``report``
#: import matplotlib, ``priors``, ``sample_quality`` and ``cli`` are needed by few programs.

__all__ = [
    "__version__",
    # modules
    "data",
    "models",
    "guides",
    "objectives",
    "priors",
    "diagnostics",
    "plots",
    "report",
    "distributed",
    "uses",
    "sample_quality",
    "checkpoint",
    "callbacks",
    "loggers",
    # functions and classes
    "fit",
    "evaluate",
    "diagnose",
    "vq_metrics",
    "load_run",
    "Run",
    "TrainConfig",
    "PyroviError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "TrainingError",
]


def __getattr__(name: str):
    if name.isidentifier() and not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # also sets it as an attribute of the package
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    import pkgutil

    return sorted(set(globals()) | {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")})
