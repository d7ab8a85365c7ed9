"""pyrovi.traces: where the data plate is, guide-then-model traces, the sites' layout, the scaling handlers."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyrovi import traces, weights


def _model(x, plate="data", global_latent=False, subsample_size=None):
    """z_local per datapoint in ``plate`` (dim -1) with a nested plate "pix" at dim -2; optional global mu."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0)) if global_latent else 0.0
    with pyro.plate(plate, x.shape[0], subsample_size=subsample_size, dim=-1) as idx:
        z = pyro.sample("z", dist.Normal(mu, 1.0).expand([x.shape[0] if subsample_size is None else subsample_size]))
        with pyro.plate("pix", x.shape[1], dim=-2):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx].T)


def _guide(x, plate="data", global_latent=False, subsample_size=None):
    if global_latent:
        pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate(plate, x.shape[0], subsample_size=subsample_size, dim=-1):
        n = x.shape[0] if subsample_size is None else subsample_size
        pyro.sample("z", dist.Normal(torch.zeros(n), 1.0))


X = torch.randn(5, 3)


def test_data_dim_and_in_data_plate():
    tr = poutine.trace(_model).get_trace(X, "batch", True)
    z, x, mu = tr.nodes["z"], tr.nodes["x"], tr.nodes["mu"]
    assert traces.data_dim(z, "batch") == -1 and traces.data_dim(x, "batch") == -1
    assert traces.data_dim(z) is None and not traces.in_data_plate(z)  # default name "data": not this model's
    assert traces.in_data_plate(x, "batch") and not traces.in_data_plate(mu, "batch")
    assert traces.data_frame(x, "pix").dim == -2 and traces.data_frame(mu, "batch") is None


def test_trace_pair_replays_the_guide_draws_under_particles():
    g, m = traces.trace_pair(_model, _guide, (X,), {"plate": "batch"}, particles=7, max_plate_nesting=2)
    assert g.nodes["z"]["value"].shape == (7, 1, 5)  # particles at dim -3, data at dim -1
    assert m.nodes["z"]["value"] is g.nodes["z"]["value"]
    assert any(f.name == traces.PARTICLE_PLATE for f in m.nodes["x"]["cond_indep_stack"])
    g1, m1 = traces.trace_pair(_model, _guide, (X,))
    assert g1.nodes["z"]["value"].shape == (5,) and m1.nodes["z"]["value"] is g1.nodes["z"]["value"]
    with pytest.raises(ValueError, match="max_plate_nesting"):
        traces.trace_pair(_model, _guide, (X,), particles=2)


def test_structure():
    local = traces.structure(_model, _guide, (X,), {}, "data")
    assert local == {"data_plate": True, "global_sites": False, "local_latents": ["z"], "subsample_size": None}
    glob = traces.structure(_model, _guide, (X,), {"plate": "batch", "global_latent": True}, "batch")
    assert glob == {"data_plate": True, "global_sites": True, "local_latents": ["z"], "subsample_size": None}
    sub = traces.structure(_model, _guide, (X,), {"subsample_size": 2}, "data")
    assert sub["subsample_size"] == 2 and not sub["global_sites"]
    misnamed = traces.structure(_model, _guide, (X,), {"plate": "batch"}, "data")
    assert misnamed == {"data_plate": False, "global_sites": True, "local_latents": [], "subsample_size": None}


def test_guess_max_plate_nesting_moved_and_reexported():
    assert weights.guess_max_plate_nesting is traces.guess_max_plate_nesting
    assert weights.PARTICLE_PLATE == traces.PARTICLE_PLATE
    assert traces.guess_max_plate_nesting(_model, _guide, (X,), {}) == 2  # found by one trace
    _guide.max_plate_nesting = 3
    try:
        assert traces.guess_max_plate_nesting(_model, _guide, (X,), {}) == 3  # declared
    finally:
        del _guide.max_plate_nesting


def test_scale_latents_and_scale_plate():
    kw = {"plate": "batch", "global_latent": True}
    tr = poutine.trace(traces.ScaleLatents(0.25)(_model)).get_trace(X, **kw)
    assert tr.nodes["z"]["scale"] == 0.25 and tr.nodes["mu"]["scale"] == 0.25 and tr.nodes["x"]["scale"] == 1.0
    tr = poutine.trace(traces.ScalePlate("batch", 4.0)(_model)).get_trace(X, **kw)
    assert tr.nodes["z"]["scale"] == 4.0 and tr.nodes["x"]["scale"] == 4.0 and tr.nodes["mu"]["scale"] == 1.0
    both = traces.ScalePlate("batch", 4.0)(traces.ScaleLatents(0.5)(_model))
    tr = poutine.trace(both).get_trace(X, **kw)
    assert tr.nodes["z"]["scale"] == 2.0 and tr.nodes["mu"]["scale"] == 0.5 and tr.nodes["x"]["scale"] == 4.0
