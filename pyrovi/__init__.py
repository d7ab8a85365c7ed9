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

__version__ = "0.1.0"

from . import data, distributed, guides, models, objectives, uses  # noqa: E402  (distributed: Lightning only when it trains)
from .errors import CheckpointError, ConfigError, DataError, PyroviError, TrainingError  # noqa: E402
from .diagnostics import diagnose  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .run import Run, load_run  # noqa: E402
from .train import TrainConfig, fit  # noqa: E402

__all__ = [
    "__version__",
    "data",
    "models",
    "guides",
    "objectives",
    "distributed",
    "uses",
    "fit",
    "evaluate",
    "diagnose",
    "load_run",
    "Run",
    "TrainConfig",
    "PyroviError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "TrainingError",
]
