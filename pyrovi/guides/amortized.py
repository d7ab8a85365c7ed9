"""The one amortized guide base: an encoder body and a *head* per latent site.

(Over 500 lines on purpose: it is the whole guide family's common part — discovery by
tracing, the common options, lazy set-up, the encoder, the heads' plumbing and the fast
path's ``posterior``/``encode``; each head module is small because this one is whole.)

Every pyrovi guide (:class:`~pyrovi.guides.DiagNormal`, :class:`~pyrovi.guides.Delta`,
:class:`~pyrovi.guides.Mixture`, :class:`~pyrovi.guides.Flow`, :class:`~pyrovi.guides.Auto`)
is :class:`Amortized` with one kind of head. The base owns the model reference,
the common options (``hidden``, ``activation``, ``min_scale``, ``example``,
``data_plate``, validated once by :func:`common_options`), site discovery,
the encoder, ``forward`` (the Pyro guide), ``posterior`` (the same q without
Pyro, for :mod:`pyrovi.fastpath`), ``encode`` and the config's common part.

The encoder body (the *trunk*) maps ``x -> h`` (``(B, H)``): an MLP, or, for a
model that declares ``encoder_trunk`` (``VAE(arch="conv")``), a convolutional trunk
(:func:`make_trunk`), so every head serves conv models alike. A head maps ``h`` to a
distribution over the site's unconstrained value ``u`` (``(B,)`` batch; event
``(n,)`` flat, or the site's own unconstrained shape). The site's value is
``z = biject_to(support)(reshape(u))``, so ``log q(z|x)`` follows by change of
variables and any real or constrained continuous site (positive scales,
simplices, ...) of any event shape is served. A head is an ``nn.Module`` with
``q(h) -> q``, ``pair(h) -> (q, q_stop_gradient)`` and, where it has them in
closed form, ``moments(h) -> (mean, std)``.

Where the sites come from:

* a pyrovi model declares them (``model.latent_sites``, ``{name: event shape}``,
  real-valued, in the plate ``"data"`` at dim -1);
* any other Pyro model is traced once on example inputs
  (:func:`discover_latents`), which finds every latent sample site, its event
  shape, support and the data plate, and rejects what an amortized guide
  cannot serve (discrete sites, sites outside the data plate, nested plates,
  subsampled plates) with a :class:`~pyrovi.errors.ConfigError`. The inputs
  are ``example=`` when given; otherwise discovery waits for
  :meth:`Amortized.setup` or the guide's first call (as Pyro's autoguides
  wait for their first call), and the config then records the inputs' shapes.

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
from contextlib import nullcontext
from typing import NamedTuple, Optional

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

from ..distributions import DiagonalNormal
from ..errors import ConfigError, check_positive
from ..nets import MLP, ConvTrunk, activation as _activation, as_widths
from ..stop_gradient import STOP_GRADIENT_FN
from ..traces import data_frame
from .base import encoder_input, input_dim

__all__ = ["Amortized", "make_trunk", "NormalHead", "DeltaHead", "WrappedHead", "SiteSpec", "common_options", "discover_latents", "example_spec"]


class SiteSpec(NamedTuple):
    """A latent site as a guide sees it."""

    event_shape: tuple  # shape of one draw for one datapoint
    support: object  # torch constraint; q lives on R^n and is mapped by biject_to(support)
    unconstrained_shape: tuple  # event shape before biject_to (differs for e.g. simplex)


def _is_real(support) -> bool:
    """An unconstrained support: ``real``, maybe under ``independent``. By type, not identity: a copied or
    pickled guide (a ``ddp_spawn`` worker's) holds its own copy of torch's ``constraints.real``."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return type(support) is type(constraints.real)


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


def discover_latents(model, example: tuple, data_plate: str = "data", kwargs: Optional[dict] = None) -> tuple:
    """Trace ``model(*example, **kwargs)`` once; return ``(sites, plate_dim, max_plate_nesting, plate_size)``.

    ``sites`` is ``{name: SiteSpec}`` in trace order. Nothing leaks: the trace
    runs blocked, without gradients and in a throw-away parameter scope.
    """
    name = getattr(model, "__name__", type(model).__name__)
    with poutine.block(), pyro.get_param_store().scope(), torch.no_grad():
        try:
            tr = poutine.trace(model).get_trace(*example, **(kwargs or {}))
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
        f = data_frame(site, data_plate)
        if f is None:
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
        if not f.vectorized:
            raise ConfigError(f"plate {data_plate!r} must be vectorized (use `with pyro.plate(...)`, not a loop)")
        if f.full_size is not None and f.full_size != f.size:
            raise ConfigError(f"plate {data_plate!r} subsamples ({f.size} of {f.full_size}); pyrovi batches the data "
                              "itself: pass the batch as the model's input and use pyro.plate(name, len(x))")
        if plate_dim is not None and f.dim != plate_dim:
            raise ConfigError(f"plate {data_plate!r} appears at dims {plate_dim} and {f.dim}")
        plate_dim, size = f.dim, f.size
        if size == -1:  # pyro.plate(name) without a size: the site's batch shape gives it
            if len(fn.batch_shape) < -f.dim:
                raise ConfigError(f"plate {data_plate!r} has no size and latent site {n!r} has no batch dim at "
                                  f"dim {f.dim} (batch shape {tuple(fn.batch_shape)}): give the plate its size, "
                                  f"pyro.plate({data_plate!r}, len(x)), or shape the site's batch as the data's rows")
            size = fn.batch_shape[f.dim]
        if math.prod(fn.batch_shape) != size:
            raise ConfigError(f"latent site {n!r} has batch shape {tuple(fn.batch_shape)} but plate "
                              f"{data_plate!r} has size {size}; move per-datapoint dims into the event with .to_event")
        sites[n] = _spec(fn.event_shape, fn.support)
    if not sites:
        raise ConfigError(f"{name} has no latent sample sites (found only observed sites); nothing to guide")
    return sites, plate_dim, depth, size


# --------------------------------------------------------------------------- common options


def common_options(hidden, activation, min_scale=None, data_plate="data") -> tuple:
    """Validate the options every amortized guide takes; ``(widths, activation, min_scale, data_plate)``.

    One check for all guides, so a bad value gets the same :class:`~pyrovi.errors.ConfigError`
    whichever guide it is handed to. ``hidden`` is an int or a sequence of ints (see
    :func:`pyrovi.nets.as_widths`); ``min_scale`` is None for heads without a scale.
    """
    widths = as_widths(hidden)
    if not widths:
        raise ConfigError("hidden must list at least one hidden layer width, e.g. hidden=256 or hidden=(512, 256)")
    _activation(activation)  # an unknown name raises, listing the valid ones
    if min_scale is not None:
        check_positive("min_scale", min_scale, allow_zero=True)
        min_scale = float(min_scale)
    if not isinstance(data_plate, str) or not data_plate:
        raise ConfigError(f"data_plate must name the model's per-datapoint plate (a str such as 'data'), "
                          f"got {data_plate!r}")
    return widths, activation, min_scale, data_plate


# --------------------------------------------------------------------------- heads


def _shape(shape) -> tuple:
    return (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)


class NormalHead(nn.Linear):
    """``h (..., H)`` -> diagonal Normal(loc, scale) over the site's shape, ``scale = softplus(raw) + min_scale``.

    A linear layer ``H -> 2n`` (``n`` = prod(shape)): ``loc`` is the first half of
    its output, the raw scale the second; its parameters are ``weight`` and ``bias``.
    """

    def __init__(self, context_dim: int, shape, *, min_scale: float = 1e-4):
        shape = _shape(shape)
        super().__init__(context_dim, 2 * math.prod(shape))
        self.shape, self.min_scale = shape, float(min_scale)

    def moments(self, h: torch.Tensor) -> tuple:
        """``(loc, scale)``, each ``h.shape[:-1] + shape``."""
        loc, raw = super().forward(h).chunk(2, dim=-1)  # (..., n) each
        scale = F.softplus(raw) + self.min_scale
        if len(self.shape) != 1:  # a (B, n) site needs no reshape (a no-op view, but a node in the graph)
            loc, scale = loc.reshape(h.shape[:-1] + self.shape), scale.reshape(h.shape[:-1] + self.shape)
        return loc, scale

    def q(self, h: torch.Tensor):
        """q, batch ``h.shape[:-1]``; not argument-checked (the scale is positive by construction)."""
        loc, scale = self.moments(h)
        return DiagonalNormal(loc, scale, len(self.shape), validate_args=False)

    def pair(self, h: torch.Tensor) -> tuple:
        """``(q, q_stop_gradient)``."""
        loc, scale = self.moments(h)
        n = len(self.shape)
        return (DiagonalNormal(loc, scale, n, validate_args=False),
                DiagonalNormal(loc.detach(), scale.detach(), n, validate_args=False))


class DeltaHead(nn.Linear):
    """``h (..., H)`` -> a point mass at ``f(h)`` over the site's shape (a linear layer ``H -> n``).

    Pyro's ``Delta`` gives its point log-density 0, so the guide adds nothing to the
    objective but the model's terms at the point.
    """

    def __init__(self, context_dim: int, shape, **_):
        shape = _shape(shape)
        super().__init__(context_dim, math.prod(shape))
        self.shape = shape

    def point(self, h: torch.Tensor) -> torch.Tensor:
        """``h.shape[:-1] + shape``."""
        return super().forward(h).reshape(h.shape[:-1] + self.shape)

    def moments(self, h: torch.Tensor) -> tuple:
        """``(point, 0)``: a point mass as (location, scale)."""
        p = self.point(h)
        return p, torch.zeros_like(p)

    def q(self, h: torch.Tensor):
        return dist.Delta(self.point(h), event_dim=len(self.shape))

    def pair(self, h: torch.Tensor) -> tuple:
        p = self.point(h)
        return dist.Delta(p, event_dim=len(self.shape)), dist.Delta(p.detach(), event_dim=len(self.shape))


class WrappedHead(nn.Module):
    """A head held as the child ``linear``: the state-dict layout ``Auto`` saved its Gaussian heads in.

    Same head, same q; only the parameter names differ (``heads.<site>.linear.weight``), so
    run directories written before the guides shared their heads still load.
    """

    def __init__(self, head: nn.Module):
        super().__init__()
        self.linear = head

    def q(self, h):
        return self.linear.q(h)

    def pair(self, h):
        return self.linear.pair(h)

    def moments(self, h):
        return self.linear.moments(h)


def _pair(head, h):
    return head.pair(h) if hasattr(head, "pair") else head(h)


def _q(head, h):
    return head.q(h) if hasattr(head, "q") else head(h)[0]


def _mc_moments(q, draws: int = 256) -> tuple:
    """Mean and standard deviation of ``q`` from ``draws`` draws on a fixed seed (the global RNG is left alone)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        z = q.rsample((draws,)) if q.has_rsample else q.sample((draws,))  # (draws, *batch, *event)
    return z.mean(0), z.std(0)


# --------------------------------------------------------------------------- the trunk


def make_trunk(model, in_dim: int, hidden: tuple, activation: str) -> nn.Module:
    """The encoder body for ``model``: ``(B, in_dim) -> (B, hidden[-1])``, with ``out_features``.

    An :class:`~pyrovi.nets.MLP`, unless the model declares ``encoder_trunk`` (a dict with
    ``arch="conv"``, ``image_shape`` ``(C, H, W)``, ``channels``, ``downsample``): then a
    :class:`~pyrovi.nets.ConvTrunk` reads the first ``C*H*W`` inputs as the image and
    appends the rest (a conditional model's one-hot label) after the convolutions. The
    trunk follows the model, so a run rebuilt from its config gets the same one.
    """
    spec = getattr(model, "encoder_trunk", None)
    if isinstance(spec, dict) and spec.get("arch") == "conv":
        c, h, w = spec["image_shape"]
        return ConvTrunk((c, h, w), hidden, extra=in_dim - c * h * w, act=activation,
                         channels=spec["channels"], downsample=spec["downsample"])
    return MLP(in_dim, hidden, None, act=activation)


def _float32(h: torch.Tensor) -> torch.Tensor:
    """Under mixed precision the trunk runs in bf16/fp16; the heads (and so log q) work in float32."""
    return h.float() if h.dtype in (torch.float16, torch.bfloat16) else h


def full_precision(like: torch.Tensor):
    """A context that switches autocast off on ``like``'s device while it is on (else does nothing).

    ``fit(precision="bf16")`` runs the loss under ``torch.autocast``; the heads, their
    draws and log q run in float32 inside this context, so only the trunk is in bf16.
    """
    dev = like.device.type
    return torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else nullcontext()


# --------------------------------------------------------------------------- the guide


class Amortized(PyroModule):
    """The base of every pyrovi guide: encoder body + one head per latent site.

    ``forward(*args, **kwargs)`` samples every site in the model's data plate;
    ``posterior(*args)`` returns the same ``{site: q}`` without Pyro;
    ``encode(*args)`` returns ``{site: (mean, std)}``. Subclasses supply
    ``_head(context_dim, shape) -> head`` (see the module doc) and ``config()``.

    Args:
        model: the model served (pyrovi model with ``latent_sites``, or any Pyro model).
        make_head: optional head factory ``(context_dim, shape) -> head`` in place of ``_head``.
        hidden: encoder hidden widths, an int or a sequence; the last is the context width H.
        activation: encoder activation (``relu``, ``tanh``, ``elu``, ``gelu``, ``softplus``).
        min_scale: lower bound on the head's scales (None for heads without one).
        example: example inputs for models without ``latent_sites`` (a tensor, a
            tuple of positional tensors, or the JSON spec stored in a config). Without
            it the sites are found by :meth:`setup` or on the first call.
        data_plate: name of the model's per-datapoint plate.
    """

    def __init__(self, model, make_head: Optional[Callable] = None, *, hidden=(256,), activation: str = "relu",
                 min_scale: Optional[float] = None, example=None, data_plate: str = "data"):
        super().__init__()
        self.hidden, self.activation, min_scale, self.data_plate = common_options(
            hidden, activation, min_scale, data_plate)
        if min_scale is not None:
            self.min_scale = min_scale
        self._make_head = make_head
        self._model_ref = [model]  # a list so nn.Module does not register the model as a submodule
        self.sites = None  # {name: SiteSpec}, once known
        self.plate_dim, self.max_plate_nesting = -1, None
        self._example_spec, self._inputs = None, None
        declared = getattr(model, "latent_sites", None)
        self._pyrovi_input = hasattr(model, "obs_shape")
        if isinstance(declared, dict) and declared:
            sites = {k: _spec(v, constraints.real) for k, v in declared.items()}
            self._build(sites, -1, int(getattr(model, "max_plate_nesting", 1)), input_dim(model))
        elif example is not None or self._pyrovi_input:
            self._discover(_as_example(model, example), {})
        # else: a Pyro model with no example yet; setup() or the first call finds its sites

    # ------------------------------------------------------------------ sites
    @property
    def model(self):
        """The model this guide serves (not a submodule)."""
        return self._model_ref[0]

    @property
    def is_setup(self) -> bool:
        """Whether the latent sites are known (always, for pyrovi's models or with ``example=``)."""
        return self.sites is not None

    @property
    def point_mass(self) -> bool:
        """Whether q is a point mass at every site (Delta heads): all particles are the same draw."""
        return self.sites is not None and all(isinstance(h, DeltaHead) for h in self.heads.values())

    def setup(self, *args, **kwargs) -> "Amortized":
        """Find the model's latent sites by tracing ``model(*args, **kwargs)`` once, unless known; returns self.

        Idempotent, and a no-op for pyrovi's models (they declare their sites) and for
        guides built with ``example=``. ``fit`` calls it with the first batch; a guide's
        first call does too. The config then records the inputs' shapes as ``example``.
        """
        if self.sites is None:
            if not args:
                raise ConfigError(self._not_setup_message("setup() was called without the model's inputs"))
            self._discover(tuple(args), kwargs)
            device = next((a.device for a in args if torch.is_tensor(a)), None)
            if device is not None and device.type != "cpu":
                self.to(device)
        return self

    def _not_setup_message(self, what: str) -> str:
        name = getattr(self.model, "__name__", type(self.model).__name__)
        return (f"{type(self).__name__} has not found the latent sites of {name} yet ({what}): {name} declares no "
                "latent_sites, so the guide traces it on example inputs. Call guide.setup(*batch) (or the guide "
                "itself) with a batch of the model's inputs first, or build the guide with example=x[:2]")

    def _require_sites(self, what: str) -> None:
        if self.sites is None:
            raise ConfigError(self._not_setup_message(what))

    def _discover(self, ex: tuple, kwargs: dict) -> None:
        sites, plate_dim, depth, size = discover_latents(self.model, ex, self.data_plate, kwargs)
        # The encoder reads the positional tensors whose first dim runs over the data plate.
        self._inputs = [i for i, a in enumerate(ex) if torch.is_tensor(a) and a.dim() >= 1 and a.shape[0] == size]
        if not self._inputs and not self._pyrovi_input:
            raise ConfigError(
                f"none of the model's positional tensor inputs has the data plate's size {size} as its first "
                f"dimension (input shapes: {[tuple(a.shape) if torch.is_tensor(a) else None for a in ex]}); "
                "the encoder reads the per-datapoint inputs, so pass the data batch-first")
        self._example_spec = example_spec(ex)
        self._build(sites, plate_dim, depth, self._encoder_input(ex).shape[-1])

    def _build(self, sites: dict, plate_dim: int, depth: int, in_dim: int) -> None:
        make = self._make_head or self._head
        self.body = make_trunk(self.model, in_dim, self.hidden, self.activation)
        self.heads = nn.ModuleDict(
            {n: make(self.body.out_features, s.unconstrained_shape) for n, s in sites.items()})
        self.plate_dim, self.max_plate_nesting = plate_dim, depth
        self.sites = sites

    def _head(self, context_dim: int, shape: tuple):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must define _head(context_dim, shape)")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.sites is None and any(k.startswith(prefix) for k in state_dict):
            raise ConfigError(self._not_setup_message("loading weights needs them"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ pieces
    def _encoder_input(self, args) -> torch.Tensor:
        if self._pyrovi_input:
            x = args[0]
            y = args[1] if len(args) > 1 else None
            return encoder_input(self.model, x, y)
        try:
            parts = [args[i] for i in self._inputs]
        except IndexError:
            raise ConfigError(f"the guide was built for inputs at positions {self._inputs} but got {len(args)} "
                              "positional arguments") from None
        B = parts[0].shape[0]
        body = self._modules.get("body")  # absent while the sites are being found
        dt = next(body.parameters()).dtype if body is not None else torch.get_default_dtype()
        return torch.cat([a.reshape(B, -1).to(dt) for a in parts], dim=-1)  # (B, D), in the encoder's precision

    def _site_distribution(self, spec: SiteSpec, q):
        """Map q on the head's space (flat ``(n,)`` or the unconstrained shape) to the site's shape and support."""
        if isinstance(q, dist.Delta):  # a point mass is mapped pointwise (no Jacobian: log q stays 0)
            if tuple(q.event_shape) == tuple(spec.event_shape) and _is_real(spec.support):
                return q
            v = q.v.reshape(q.batch_shape + torch.Size(spec.unconstrained_shape))
            if not _is_real(spec.support):
                v = biject_to(spec.support)(v)
            return dist.Delta(v, event_dim=len(spec.event_shape))
        ts = []
        if tuple(q.event_shape) != tuple(spec.unconstrained_shape):
            ts.append(T.ReshapeTransform(q.event_shape, torch.Size(spec.unconstrained_shape)))
        if not _is_real(spec.support):
            ts.append(biject_to(spec.support))
        return dist.TransformedDistribution(q, ts) if ts else q

    def _context(self, args) -> torch.Tensor:
        """``h`` with its batch aligned to the data plate's dim: ``(B, [1, ...,] H)``."""
        h = _float32(self.body(self._encoder_input(args)))  # (B, H)
        if self.plate_dim == -1:
            return h
        B, H = h.shape
        return h.reshape((B,) + (1,) * (-self.plate_dim - 1) + (H,))

    def _qs(self, args) -> dict:
        h = self._context(args)
        out = {}
        with full_precision(h):
            for name, spec in self.sites.items():
                q, q_sg = _pair(self.heads[name], h)
                out[name] = (self._site_distribution(spec, q), self._site_distribution(spec, q_sg))
        return out

    # ------------------------------------------------------------------ the guide and its fast twin
    def forward(self, *args, **kwargs) -> dict:
        """Sample every latent site from q(z|x) in the data plate; returns ``{site: (S?, B, *event)}``."""
        args, kwargs = self._positional(args, kwargs)
        self.setup(*args, **kwargs)
        qs = self._qs(args)
        a = args[0] if self._pyrovi_input else args[self._inputs[0]]
        with full_precision(a), pyro.plate(self.data_plate, a.shape[0], dim=self.plate_dim):
            return {name: pyro.sample(name, q, infer={STOP_GRADIENT_FN: q_sg}) for name, (q, q_sg) in qs.items()}

    def _positional(self, args: tuple, kwargs: dict) -> tuple:
        """A pyrovi model's labels given as ``y=`` become the second positional input, as ``(x, y)``."""
        if self._pyrovi_input and "y" in kwargs and len(args) == 1:
            kwargs = dict(kwargs)
            args = (args[0], kwargs.pop("y"))
        return args, kwargs

    def _encoder_input_batch(self, args) -> int:
        a = args[0] if self._pyrovi_input else args[self._inputs[0]]
        return a.shape[0]

    def posterior(self, *args, **kwargs) -> dict:
        """``{site: q(z|x)}`` for the model's inputs (``x`` and, for conditional models, ``y``).

        The distributions :meth:`forward` samples from, without Pyro (the fast path,
        :mod:`pyrovi.fastpath`) and without their stop-gradient twins. Batch ``(B,)``,
        aligned to the data plate's dim; the site's event shape. Not argument-checked:
        scales are ``softplus(.) + min_scale``, positive by construction, and a
        non-finite encoder output surfaces as a non-finite loss, which fit reports.
        """
        args, kwargs = self._positional(args, kwargs)
        self.setup(*args, **kwargs)
        h = self._context(args)
        with full_precision(h):
            return {name: self._site_distribution(spec, _q(self.heads[name], h)) for name, spec in self.sites.items()}

    def distributions(self, *args, **kwargs) -> dict:
        """Same as :meth:`posterior` (the older name)."""
        return self.posterior(*args, **kwargs)

    def encode(self, *args, **kwargs) -> dict:
        """``{site: (mean, std)}`` of q(z|x), each ``(B, *event_shape)``.

        In closed form where the head has it (the Gaussian's ``(loc, scale)``, a mixture's
        moments, a point mass's ``(point, 0)``), else from 256 draws on a fixed seed
        (flows, constrained sites).
        """
        args, kwargs = self._positional(args, kwargs)
        self.setup(*args, **kwargs)
        h = _float32(self.body(self._encoder_input(args)))  # (B, H)
        out = {}
        for name, spec in self.sites.items():
            head = self.heads[name]
            if hasattr(head, "moments") and _is_real(spec.support):
                loc, scale = head.moments(h)
            else:
                loc, scale = _mc_moments(self._site_distribution(spec, _q(head, h)))
            B = h.shape[0]
            if tuple(loc.shape[1:]) != spec.event_shape:
                loc, scale = loc.reshape((B,) + spec.event_shape), scale.reshape((B,) + spec.event_shape)
            out[name] = (loc, scale)
        return out

    def _base_config(self) -> dict:
        d = {"hidden": list(self.hidden), "activation": self.activation}
        if self.data_plate != "data":
            d["data_plate"] = self.data_plate
        if self._example_spec is not None:
            d["example"] = self._example_spec
        return d
