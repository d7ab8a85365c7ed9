"""Models that cannot take a leading particle dim: a probe, and the one-line notice of the particle loop.

pyrovi draws its S particles in one vectorized plate on the leftmost batch
dim (Pyro's ``vectorize_particles=True``). Some Pyro code cannot run that
way: a model that indexes a batch with a mask (``x[mask]``, the CVAE
example), an ``nn.Linear`` whose weights are sampled (its matmul takes no
extra leading dim), a global indexed by an enumerated value
(``locs[assignment]``), a hand-written sum over components. Pyro's own
``Trace_ELBO(num_particles=S)`` loops over particles by default, so such
code works there.

:func:`vectorizes` runs model and guide once under a particle plate of 2
(no gradients, nothing recorded). When that raises (or returns weights of
the wrong shape), ``fit``, ``evaluate`` and ``diagnose`` draw the
particles one at a time, each without a particle plate (``vectorize=False``
forces it), and say so once (:class:`ParticleLoopWarning`): S model and
guide calls per step instead of one, so about S times the time per step for
the traced part.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from pyro import poutine

from . import fastpath
from .errors import ConfigError, PyroviError
from .traces import rng_neutral
from .weights import log_weights

__all__ = ["vectorizes", "ParticleLoopWarning", "decide", "settle", "announce"]


class ParticleLoopWarning(UserWarning):
    """The model cannot be vectorized over particles: they are drawn one at a time (slower, same estimates)."""


def vectorizes(model, guide, args: tuple, kwargs: Optional[dict], max_plate_nesting: int,
               data_plate: str = "data") -> Optional[str]:
    """None when model and guide run under a vectorized particle plate of size 2; else why not, in one line."""
    try:
        with poutine.block(), torch.no_grad(), rng_neutral():
            lw = log_weights(model, guide, *args, particles=2, max_plate_nesting=max_plate_nesting,
                             data_plate=data_plate, **(kwargs or {}))
    except PyroviError:
        raise
    except (IndexError, RuntimeError, ValueError, TypeError, NotImplementedError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        return f"{type(e).__name__}: {first[:200]}"
    if lw.log_w.shape[0] != 2:
        return f"its log weights have shape {tuple(lw.log_w.shape)} under 2 particles, not (2, B)"
    return None


def decide(vectorize: Optional[bool], model, guide, args: tuple, kwargs: Optional[dict], max_plate_nesting: int,
           data_plate: str, where: str, particles: int) -> bool:
    """Whether ``where`` (``"fit"``, ``"evaluate"``, ``"diagnose"``) vectorizes its ``particles`` particles.

    ``vectorize``: True/False as the user (or the run) asked, None to probe with :func:`vectorizes`. A probe that
    fails warns once, in one line, with the reason and the cost.
    """
    if vectorize is not None:
        if not isinstance(vectorize, bool):
            raise ConfigError(f"vectorize must be True, False or None (probe), got {vectorize!r}")
        return vectorize
    reason = vectorizes(model, guide, args, kwargs, max_plate_nesting, data_plate)
    if reason is None:
        return True
    announce(where, reason, particles)
    return False


def announce(where: str, reason: str, particles: int) -> None:
    """The one line that says the particles are looped, why, and what it costs (nothing to say for one)."""
    if particles > 1:
        warnings.warn(f"{where}: the model cannot take a leading particle dim ({reason}); its {particles} "
                      f"particles are drawn one at a time, {particles} model and guide calls per step instead of 1",
                      ParticleLoopWarning, stacklevel=4)


def settle(obj, vectorize: Optional[bool], model, guide, args: tuple, kwargs: dict, config: dict) -> None:
    """``fit``'s decision, once before training: set ``obj.vectorize`` and record a loop in the run's ``config``.

    An objective already told not to vectorize (a Pyro ELBO with ``vectorize_particles=False``) keeps it; pyrovi's
    own model/guide pairs on the fast path always vectorize; other pairs are probed unless ``vectorize`` says.
    """
    if vectorize is None and (obj.vectorize is False or (obj.fast and obj.has_fast_path and not kwargs
                                                          and fastpath.supported(model, guide, stratify=True))):
        return
    obj.vectorize = decide(vectorize, model, guide, args, kwargs, obj.max_plate_nesting, obj.data_plate, "fit",
                           obj.particles)
    if not obj.vectorize and isinstance(config.get("objective"), dict) and config["objective"].get("name") != "pyro":
        config["objective"] = {**config["objective"], "vectorize": False}
