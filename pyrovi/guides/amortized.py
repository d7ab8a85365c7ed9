"""Shared machinery of the amortized guides Mixture, Flow and Auto.

An amortized guide here is one encoder body ``x -> h`` (an MLP, ``(B, H)``)
and, for every latent site of the model, a *head* that turns ``h`` into a
distribution over a flat unconstrained vector ``u`` (``(B,)`` batch, ``(n,)``
event). The site's value is ``z = biject_to(support)(reshape(u))``, so
``log q(z|x)`` follows by change of variables and any real or constrained
continuous site (positive scales, simplices, ...) of any event shape is served.

Where the sites come from:

* a pyrovi model declares them (``model.latent_sites``, ``{name: event shape}``,
  real-valued, in the plate ``"data"`` at dim -1);
* any other Pyro model is traced once on example inputs
  (:func:`discover_latents`), which finds every latent sample site, its event
  shape, support and the data plate, and rejects what an amortized guide
  cannot serve (discrete sites, sites outside the data plate, nested plates,
  subsampled plates) with a :class:`~pyrovi.errors.ConfigError`.

The encoder reads, for a pyrovi model, ``x`` (and a one-hot ``y`` for
conditional models); for any other model, every positional tensor argument
whose first dimension has the data plate's size in the example trace (so a
design matrix or other shared input is left out), flattened and concatenated.

Each sample site also carries a stop-gradient twin of its distribution
(``infer[STOP_GRADIENT_FN]``) for the ``stl`` and ``dreg`` objectives.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.nn import PyroModule
from pyro.poutine.util import site_is_subsample
from torch import nn
from torch.distributions import biject_to, constraints
from torch.distributions import transforms as T

from ..errors import ConfigError
from ..nets import MLP
from ..stop_gradient import STOP_GRADIENT_FN
from .base import encoder_input, input_dim

__all__ = ["Amortized", "NormalHead", "SiteSpec", "discover_latents", "example_spec"]


class SiteSpec(NamedTuple):
    """A latent site as a guide sees it."""

    event_shape: tuple  # shape of one draw for one datapoint
    support: object  # torch constraint; q lives on R^n and is mapped by biject_to(support)
    unconstrained_shape: tuple  # event shape before biject_to (differs for e.g. simplex)


def _is_real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def _spec(event_shape, support) -> SiteSpec:
    event_shape = tuple(int(s) for s in event_shape)
    if _is_real(support):
        return SiteSpec(event_shape, constraints.real, event_shape)
    unc = tuple(biject_to(support).inv.forward_shape(torch.Size(event_shape)))
    return SiteSpec(event_shape, support, unc)


# --------------------------------------------------------------------------- discovery


def example_spec(example) -> list:
    """JSON description ``[{"shape": [...], "dtype": "float32"} or None, ...]`` of example inputs (batch dim dropped)."""
    return [{"shape": list(a.shape[1:]), "dtype": str(a.dtype).replace("torch.", "")}
            if torch.is_tensor(a) and a.dim() >= 1 else None for a in example]


def _as_example(model, example) -> tuple:
    """Example positional inputs as a tuple of tensors (zeros from a JSON spec or the model's obs_shape)."""
    if example is None:
        obs = getattr(model, "obs_shape", None)
        if obs is None:
            raise ConfigError(
                f"{getattr(model, '__name__', type(model).__name__)} declares no latent_sites: pass example= "
                "(a batch of inputs, e.g. example=x[:2]) so the guide can trace the model and find its latent sites"
            )
        example = [{"shape": list(obs), "dtype": "float32"}]
        if getattr(model, "uses_labels", False):
            example.append({"shape": [], "dtype": "int64"})
    if torch.is_tensor(example):
        return (example,)
    if isinstance(example, (list, tuple)) and example and all(isinstance(e, dict) or e is None for e in example):
        try:
            return tuple(None if e is None else torch.zeros((2, *e["shape"]), dtype=getattr(torch, e["dtype"]))
                         for e in example)
        except (KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"example spec {example!r} is malformed ({err}); expected "
                              "[{'shape': [...], 'dtype': 'float32'}, ...]") from None
    if isinstance(example, (list, tuple)) and all(torch.is_tensor(e) or e is None for e in example):
        return tuple(example)
    raise ConfigError(f"example must be a tensor or a tuple of the model's positional tensor inputs, "
                      f"got {type(example).__name__}")


def discover_latents(model, example: tuple, data_plate: str = "data") -> tuple:
    """Trace ``model(*example)`` once; return ``(sites, plate_dim, max_plate_nesting, plate_size)``.

    ``sites`` is ``{name: SiteSpec}`` in trace order. Nothing leaks: the trace
    runs blocked, without gradients and in a throw-away parameter scope.
    """
    name = getattr(model, "__name__", type(model).__name__)
    with poutine.block(), pyro.get_param_store().scope(), torch.no_grad():
        try:
            tr = poutine.trace(model).get_trace(*example)
        except ConfigError:
            raise
        except Exception as e:  # the user's model failed on the example: say so, keep the cause
            raise ConfigError(f"tracing {name} on the example inputs failed: {type(e).__name__}: {e}") from e
    sites, plate_dim, depth, size = {}, None, 0, None
    for site in tr.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        frames = site["cond_indep_stack"]
        depth = max([depth] + [-f.dim for f in frames if f.vectorized])
        if site["is_observed"] or site["infer"].get("is_auxiliary"):
            continue
        n, fn = site["name"], site["fn"]
        if fn.support.is_discrete or not fn.has_rsample:
            raise ConfigError(
                f"latent site {n!r} of {name} is {type(fn).__name__} (discrete or not reparameterizable); "
                "pyrovi's amortized guides need continuous reparameterized latents: marginalize it out "
                "(e.g. config_enumerate with TraceEnum_ELBO) or write a guide for it"
            )
        data = [f for f in frames if f.name == data_plate]
        if not data:
            raise ConfigError(
                f"latent site {n!r} of {name} is outside the plate {data_plate!r}; an amortized guide encodes "
                "q(z_n | x_n) per datapoint, so global latents are not supported: put the site inside "
                f"pyro.plate({data_plate!r}, ...) or fit global sites with a Pyro autoguide (pass data_plate= if "
                "your per-datapoint plate has another name)"
            )
        others = [f.name for f in frames if f.name != data_plate]
        if others:
            raise ConfigError(
                f"latent site {n!r} of {name} sits in plate(s) {others} besides {data_plate!r}; declare those "
                "dims as part of the event with .to_event(...) so one draw per datapoint is one vector"
            )
        f = data[0]
        if not f.vectorized:
            raise ConfigError(f"plate {data_plate!r} must be vectorized (use `with pyro.plate(...)`, not a loop)")
        if f.full_size is not None and f.full_size != f.size:
            raise ConfigError(f"plate {data_plate!r} subsamples ({f.size} of {f.full_size}); pyrovi batches the data "
                              "itself: pass the batch as the model's input and use pyro.plate(name, len(x))")
        if plate_dim is not None and f.dim != plate_dim:
            raise ConfigError(f"plate {data_plate!r} appears at dims {plate_dim} and {f.dim}")
        plate_dim, size = f.dim, f.size
        if math.prod(fn.batch_shape) != f.size:
            raise ConfigError(f"latent site {n!r} has batch shape {tuple(fn.batch_shape)} but plate "
                              f"{data_plate!r} has size {f.size}; move per-datapoint dims into the event with .to_event")
        sites[n] = _spec(fn.event_shape, fn.support)
    if not sites:
        raise ConfigError(f"{name} has no latent sample sites (found only observed sites); nothing to guide")
    return sites, plate_dim, depth, size


# --------------------------------------------------------------------------- heads


class NormalHead(nn.Module):
    """``h (..., H)`` -> Normal(loc, scale) over ``R^n``, ``scale = softplus(raw) + min_scale``."""

    def __init__(self, context_dim: int, dim: int, *, min_scale: float = 1e-4):
        super().__init__()
        self.dim, self.min_scale = dim, float(min_scale)
        self.linear = nn.Linear(context_dim, 2 * dim)

    def forward(self, h: torch.Tensor) -> tuple:
        """``(q, q_stop_gradient)``, each with batch ``h.shape[:-1]`` and event ``(n,)``."""
        loc, raw = self.linear(h).chunk(2, dim=-1)  # (B, n) each
        scale = F.softplus(raw) + self.min_scale
        q = dist.Normal(loc, scale).to_event(1)
        return q, dist.Normal(loc.detach(), scale.detach()).to_event(1)


# --------------------------------------------------------------------------- the guide


class Amortized(PyroModule):
    """Base class: encoder body + one head per latent site; ``forward(*args)`` samples every site.

    Subclasses supply ``make_head(context_dim, n) -> nn.Module`` whose forward
    maps ``h`` to ``(q, q_stop_gradient)`` over ``R^n``, and ``config()``.

    Args:
        model: the model served (pyrovi model with ``latent_sites``, or any Pyro model).
        hidden: encoder hidden widths; the last is the context width H.
        activation: encoder activation.
        example: example inputs for models without ``latent_sites`` (a tensor, a
            tuple of positional tensors, or the JSON spec stored in a config).
        data_plate: name of the model's per-datapoint plate.
    """

    def __init__(self, model, make_head: Callable, *, hidden=(256,), activation: str = "relu",
                 example=None, data_plate: str = "data"):
        super().__init__()
        hidden = tuple(hidden)
        if not hidden:
            raise ConfigError("hidden must list at least one encoder width, e.g. hidden=(256,)")
        self.hidden, self.activation, self.data_plate = hidden, activation, data_plate
        self._model_ref = [model]  # a list so nn.Module does not register the model as a submodule
        declared = getattr(model, "latent_sites", None)
        self._pyrovi_input = hasattr(model, "obs_shape")
        if isinstance(declared, dict) and declared:
            self.sites = {k: _spec(v, constraints.real) for k, v in declared.items()}
            self.plate_dim = -1
            self.max_plate_nesting = int(getattr(model, "max_plate_nesting", 1))
            self._example_spec, self._inputs = None, None
            in_dim = input_dim(model)
        else:
            ex = _as_example(model, example)
            self.sites, self.plate_dim, self.max_plate_nesting, size = discover_latents(model, ex, data_plate)
            self._example_spec = example_spec(ex)
            # The encoder reads the positional tensors whose first dim runs over the data plate.
            self._inputs = [i for i, a in enumerate(ex) if torch.is_tensor(a) and a.dim() >= 1 and a.shape[0] == size]
            if not self._inputs:
                raise ConfigError(
                    f"none of the model's positional tensor inputs has the data plate's size {size} as its first "
                    f"dimension (input shapes: {[tuple(a.shape) if torch.is_tensor(a) else None for a in ex]}); "
                    "the encoder reads the per-datapoint inputs, so pass the data batch-first")
            in_dim = self._encoder_input(ex).shape[-1]
        self.body = MLP(in_dim, hidden, None, act=activation)
        self.heads = nn.ModuleDict(
            {n: make_head(self.body.out_features, math.prod(s.unconstrained_shape))
             for n, s in self.sites.items()})

    # ------------------------------------------------------------------ pieces
    def _encoder_input(self, args) -> torch.Tensor:
        if self._pyrovi_input:
            x = args[0]
            y = args[1] if len(args) > 1 else None
            return encoder_input(self._model_ref[0], x, y)
        try:
            parts = [args[i] for i in self._inputs]
        except IndexError:
            raise ConfigError(f"the guide was built for inputs at positions {self._inputs} but got {len(args)} "
                              "positional arguments") from None
        B = parts[0].shape[0]
        return torch.cat([a.reshape(B, -1).to(torch.get_default_dtype()) for a in parts], dim=-1)  # (B, D)

    def _site_distribution(self, spec: SiteSpec, q):
        """Map a flat ``(n,)``-event q on R^n to the site's event shape and support."""
        ts = []
        flat = (math.prod(spec.unconstrained_shape),) if spec.unconstrained_shape else (1,)
        if tuple(spec.unconstrained_shape) != flat:
            ts.append(T.ReshapeTransform(torch.Size(flat), torch.Size(spec.unconstrained_shape)))
        if spec.support is not constraints.real:
            ts.append(biject_to(spec.support))
        return dist.TransformedDistribution(q, ts) if ts else q

    def _qs(self, x: torch.Tensor) -> dict:
        h = self.body(x)  # (B, H)
        B, H = h.shape
        h = h.reshape((B,) + (1,) * (-self.plate_dim - 1) + (H,))  # batch aligned with the plate's dim
        out = {}
        for name, spec in self.sites.items():
            q, q_sg = self.heads[name](h)
            out[name] = (self._site_distribution(spec, q), self._site_distribution(spec, q_sg))
        return out

    def distributions(self, *args, **kwargs) -> dict:
        """``{site: q(z|x)}`` for the model's inputs ``args``; batch ``(B,)`` (aligned to the data plate)."""
        return {name: q for name, (q, _) in self._qs(self._encoder_input(args)).items()}

    def forward(self, *args, **kwargs) -> dict:
        x = self._encoder_input(args)  # (B, D)
        qs = self._qs(x)
        with pyro.plate(self.data_plate, x.shape[0], dim=self.plate_dim):
            return {name: pyro.sample(name, q, infer={STOP_GRADIENT_FN: q_sg}) for name, (q, q_sg) in qs.items()}

    def _base_config(self) -> dict:
        d = {"hidden": list(self.hidden), "activation": self.activation}
        if self.data_plate != "data":
            d["data_plate"] = self.data_plate
        if self._example_spec is not None:
            d["example"] = self._example_spec
        return d
