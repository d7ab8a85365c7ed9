"""Enumerated discrete sites (config_enumerate) and Pyro's ELBO objects as objectives."""

import importlib.util
import math
import os

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, RenyiELBO, Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO
from pyro.infer.autoguide import AutoDelta

import pyrovi as pv
from pyrovi import objectives
from pyrovi.errors import ConfigError
from pyrovi.weights import log_weights


def _example():
    """examples/gmm_enumeration.py: Pyro's GMM tutorial model, unchanged (https://pyro.ai/examples/gmm.html)."""
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "gmm_enumeration.py")
    spec = importlib.util.spec_from_file_location("gmm_enumeration", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


EXAMPLE = _example()
gmm, GMM_DATA = EXAMPLE.model, EXAMPLE.data

# the tutorial's best initialization of 100 seeds (seed 13), fixed so both trainings start from it
INIT = {"weights": torch.tensor([0.5, 0.5]), "scale": (GMM_DATA.var() / 2).sqrt(), "locs": torch.tensor([10.0, 1.0])}


def gmm_guide():
    return AutoDelta(poutine.block(gmm, expose=["weights", "locs", "scale"]),
                     init_loc_fn=lambda site: INIT[site["name"]].clone())


STEPS = {"elbo": 120, "pyro-object": 30}


@pytest.fixture(scope="module")
def svi_map():
    """Pyro's own SVI(TraceEnum_ELBO) from the same initialization: the MAP after each number of steps in STEPS."""
    pyro.clear_param_store()
    guide = gmm_guide()
    svi = SVI(gmm, guide, pyro.optim.Adam({"lr": 0.1, "betas": [0.8, 0.99]}), loss=TraceEnum_ELBO(max_plate_nesting=1))
    out = {}
    for step in range(1, max(STEPS.values()) + 1):
        svi.step(GMM_DATA)
        if step in STEPS.values():
            out[step] = {k: v.detach().clone() for k, v in guide().items()}
    pyro.clear_param_store()
    return out


@pytest.mark.parametrize("objective", ["elbo", "pyro-object"])
def test_gmm_tutorial_trains_like_svi_and_evaluates_exactly(svi_map, objective, tmp_path):
    obj = TraceEnum_ELBO(max_plate_nesting=1) if objective == "pyro-object" else "elbo"
    guide = gmm_guide()
    # the tutorial's optimizer on both sides, Adam(lr=0.1, betas=(0.8, 0.99)); full batch, no validation rows: one step per epoch, as svi.step(data)
    out = str(tmp_path / "gmm") if objective == "pyro-object" else None
    run = pv.fit(gmm, guide, GMM_DATA, objective=obj, val_fraction=0, epochs=STEPS[objective], batch_size=None,
                 lr=0.1, optimizer_kwargs={"betas": [0.8, 0.99]}, seed=0, progress=False, figures=False, out=out)
    with run.scope():
        got = {k: v.detach() for k, v in guide().items()}
    ref = svi_map[STEPS[objective]]
    if objective == "elbo":  # the tutorial's MAP: weights (0.625, 0.375), locs (10.98, 0.50)
        assert abs(float(got["weights"][0]) - 0.625) < 1e-2 and abs(float(got["locs"][1]) - 0.50) < 2e-2
    for name in ("weights", "locs", "scale"):
        assert torch.allclose(got[name], ref[name], atol=1e-3), (name, got[name], ref[name])
    r = pv.evaluate(run, GMM_DATA, k=10, save=False)
    w, lo, sc = got["weights"], got["locs"], got["scale"]
    exact = torch.logsumexp(w.log() + dist.Normal(lo, sc).log_prob(GMM_DATA[:, None]), -1).mean()
    assert r["held_globals"] == ["locs", "scale", "weights"] and r["k"] == 1
    assert r["log_likelihood"] == pytest.approx(float(exact), abs=1e-5)
    assert r["log_likelihood_mc_se"] == 0.0 and r["mse"] is None
    if objective == "pyro-object":
        assert run.config["objective"] == {"name": "pyro", "class": "TraceEnum_ELBO",
                                           "options": {"num_particles": 1, "max_plate_nesting": 1,
                                                       "vectorize_particles": False,
                                                       "strict_enumeration_warning": True,
                                                       "tail_adaptive_beta": -1.0}}
        again = pv.load_run(out, model=gmm, guide=gmm_guide())  # the config rebuilds the same Pyro ELBO
        assert isinstance(again.objective, objectives.PyroELBO)
        assert again.objective.config() == run.config["objective"]
        assert pv.evaluate(again, GMM_DATA, save=False)["log_likelihood"] == pytest.approx(float(exact), abs=1e-5)


def local_mixture(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        c = pyro.sample("c", dist.Bernoulli(0.3), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(z + 2.0 * c, 1.0), obs=x)


def local_guide(x):
    a = pyro.param("a", torch.tensor(0.5))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(a * x, 0.8))


def test_log_weights_sum_enumerated_sites_out():
    x = torch.tensor([-1.0, 0.5, 2.5])
    pyro.set_rng_seed(0)
    lw = log_weights(local_mixture, local_guide, x, particles=4, max_plate_nesting=1)
    z = lw.guide_trace.nodes["z"]["value"]  # (4, 3)
    marg = torch.logaddexp(math.log(0.7) + dist.Normal(z, 1.0).log_prob(x),
                           math.log(0.3) + dist.Normal(z + 2.0, 1.0).log_prob(x))
    expect = dist.Normal(0.0, 1.0).log_prob(z) + marg - dist.Normal(0.5 * x, 0.8).log_prob(z)
    assert lw.log_w.shape == (4, 3)
    assert torch.allclose(lw.log_w, expect, atol=1e-5)
    assert torch.allclose(lw.log_lik, marg, atol=1e-5)  # reconstruction: log p(x, c summed | z)


def test_iwae_trains_on_enumerated_sites_and_meanfield_refuses():
    x = torch.randn(40) + 1.0
    for name in ("iwae", "stl", "dreg"):
        run = pv.fit(local_mixture, local_guide, x, objective=name, particles=4, epochs=1, batch_size=20,
                     progress=False, figures=False)
        assert math.isfinite(run.metrics["train_loss"]), name
    with pytest.raises(ConfigError, match=r"meanfield.*\['c'\].*TraceEnum_ELBO"):
        pv.fit(local_mixture, local_guide, x, objective="meanfield", epochs=1, batch_size=20, progress=False,
               figures=False)


def test_pyro_elbo_objects_become_objectives():
    obj = objectives.get(TraceEnum_ELBO(max_plate_nesting=1, num_particles=3, vectorize_particles=True))
    assert isinstance(obj, objectives.PyroELBO) and obj.particles == 3 and obj.vectorize
    again = objectives.get(obj.config())
    assert again.config() == obj.config()
    assert isinstance(objectives.get(Trace_ELBO()), objectives.PyroELBO)
    renyi = objectives.get(RenyiELBO(alpha=0.5, num_particles=4))
    assert isinstance(renyi, objectives.Renyi) and renyi.alpha == 0.5 and renyi.particles == 4
    with pytest.raises(ConfigError, match="TraceGraph_ELBO.*differentiable_loss"):
        objectives.get(TraceGraph_ELBO())
    with pytest.raises(ConfigError, match=r"Pyro ELBO object: set its own options .*\['particles'\]"):
        objectives.get(Trace_ELBO(), particles=4, alpha=None)
    with pytest.raises(ConfigError, match="a pyrovi Objective or a Pyro ELBO object"):
        objectives.get(3)
    with pytest.raises(ConfigError, match="no known Pyro ELBO"):
        objectives.get({"name": "pyro", "class": "os.system", "options": {}})


def test_enumerated_site_in_a_nested_plate_is_refused_by_name():
    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with pyro.plate("feature", x.shape[1], dim=-1):
                c = pyro.sample("c", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})
                pyro.sample("x", dist.Normal(z + c, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("z", dist.Normal(pyro.param("m", torch.zeros(x.shape[0], 1)), 1.0))

    with pytest.raises(ConfigError, match=r"enumerated site 'c' lies in plate\(s\) \['feature'\]"):
        log_weights(model, guide, torch.randn(3, 2), particles=2, max_plate_nesting=2)


@pytest.mark.slow  # the same training as the GMM test above, plus the tutorial's search over 100 initializations
def test_gmm_example_runs():
    out = EXAMPLE.main(["--steps", "5"])
    assert out["max_abs_diff"] < 1e-3
    assert out["log_likelihood"] == pytest.approx(out["exact"], abs=1e-5)
