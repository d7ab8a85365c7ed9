"""Every guide x every objective x {a pyrovi model, a user-written Pyro model}, end to end.

Each case trains one tiny run (``fit``), reloads it from its directory (``load_run``),
evaluates it (``evaluate``) and diagnoses it (``diagnose``) — the path every user
takes. A combination pyrovi does not support is refused up front by a pyrovi error
that names both sides of it. The DDP path (2 CPU processes) for a pyrovi model and
a user model with ``guide=None`` is ``tests/test_distributed.py::test_every_fit_option_behaves_the_same_under_ddp``.
"""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pyrovi as pv

D, L = 6, 2
OBJECTIVES = ["elbo", "meanfield", "iwae", "renyi", "stl", "dreg"]
GUIDES = {
    "diag_normal": {"name": "diag_normal"},
    "delta": {"name": "delta"},
    "mixture": {"name": "mixture", "components": 2},
    **{f"flow-{f}": {"name": "flow", "flow": f, "depth": 1} for f in ("iaf", "spline", "planar", "radial")},
    **{f"auto-{fam}": {"name": "auto", "family": fam} for fam in ("diag_normal", "mixture", "flow")},
}
#: (guide, objective) pairs that must be refused, and words the error must contain
UNSUPPORTED = {("delta", "dreg"): ["dreg", "Delta", "point mass"]}


def _data():
    g = torch.Generator().manual_seed(0)
    return (torch.rand(48, D, generator=g) < 0.3).float(), (torch.rand(10, D, generator=g) < 0.3).float()


def user_model_factory(seed: int):
    """A user's plain-function Pyro model, written as Pyro's tutorials write it (pyro.module in a function)."""
    torch.manual_seed(seed)
    decoder = nn.Sequential(nn.Linear(L, 8), nn.Tanh(), nn.Linear(8, D))

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(L), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    return model


def _model(kind: str, seed: int):
    if kind == "pyrovi":
        torch.manual_seed(seed)
        return pv.models.VAE(D, L, hidden=(8,))
    return user_model_factory(seed)


def _check_pair(guide_name, objective, kind, tmp_path):
    x, x_test = _data()
    model = _model(kind, 0)
    guide = pv.guides.build(model, {**GUIDES[guide_name], "hidden": 8})  # traced lazily on a user model
    kw = dict(objective=objective, particles=2, epochs=1, batch_size=24, progress=False, figures=False, seed=0)
    if (guide_name, objective) in UNSUPPORTED:
        with pytest.raises(pv.ConfigError) as err:
            pv.fit(model, guide, x, **kw)
        assert all(w in str(err.value) for w in UNSUPPORTED[guide_name, objective]), str(err.value)
        return
    out = str(tmp_path / "run")
    run = pv.fit(model, guide, x, out=out, **kw)
    assert len(run.history) == 1 and math.isfinite(run.history[0]["val_loss"])
    assert run.metrics["estimator_path"] in ("fast", "traced")
    if kind == "pyrovi" and objective not in ("stl", "dreg"):
        assert run.metrics["estimator_path"] == "fast"  # every pyrovi guide on a pyrovi model
    if kind == "user":
        assert run.metrics["estimator_path"] == "traced"
    loaded = pv.load_run(out) if kind == "pyrovi" else pv.load_run(out, model=_model(kind, 1))
    assert type(loaded.guide) is type(run.guide)
    for k, v in run.state_tensors().items():
        torch.testing.assert_close(loaded.state_tensors()[k], v)
    a = pv.evaluate(run, x_test, k=8, seed=3, save=False)
    b = pv.evaluate(loaded, x_test, k=8, seed=3, save=False)
    assert math.isfinite(b["elbo"])
    # the same weights and draws give the same estimate, to float32 rounding of a sum over D*n terms
    assert b["elbo"] == pytest.approx(a["elbo"], rel=1e-4, abs=1e-4)
    idata = pv.diagnose(loaded, x_test, n=4, particles=16, save=False, warn=False)
    lw = idata.sample_stats["log_weight"]
    assert lw.sizes["datapoint"] == 4 and bool(np.isfinite(lw.values).all())
    # the diagnosed weights are the evaluated model's: their IWAE estimate lies within the bounds' range
    assert bool(np.isfinite(idata.sample_stats["iw_log_likelihood"].values).all())


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("guide_name", sorted(GUIDES))
@pytest.mark.parametrize("kind", ["pyrovi", "user"])
def test_guide_objective_model(kind, guide_name, objective, tmp_path, one_thread):
    _check_pair(guide_name, objective, kind, tmp_path)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_codebook_on_vqvae(objective, digits, tmp_path, one_thread):
    small = pv.data.Split(digits.train.x[:48], None)
    model = pv.models.VQVAE(digits.shape, 8, code_dim=4, channels=8, image_shape=digits.image_shape)
    kw = dict(objective=objective, particles=2, epochs=1, batch_size=24, progress=False, figures=False)
    if objective == "dreg":
        with pytest.raises(pv.ConfigError, match="'dreg' does not support the guide Codebook"):
            pv.fit(model, None, small, **kw)
        return
    run = pv.fit(model, None, small, out=str(tmp_path / "vq"), **kw)
    assert isinstance(run.guide, pv.guides.Codebook)
    loaded = pv.load_run(str(tmp_path / "vq"))
    m = pv.evaluate(loaded, pv.data.Split(digits.test.x[:8], None), k=2, save=False)
    assert math.isfinite(m["elbo"])
    pv.diagnose(loaded, pv.data.Split(digits.test.x[:4], None), n=4, particles=4, save=False, warn=False)


def test_codebook_on_a_user_model_names_the_combination():
    with pytest.raises(pv.PyroviError, match="Codebook"):
        pv.guides.Codebook(user_model_factory(0))
