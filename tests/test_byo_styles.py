"""Every style of Pyro code trains with pyrovi.fit and reloads with load_run(dir, model=, guide=)."""

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoIAFNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.nn import PyroModule, PyroParam
from torch import nn
from torch.distributions import constraints

import pyrovi as pv
from byo_code import tutorial_vae

pytestmark = pytest.mark.usefixtures("one_thread")

D, L = 6, 2


def _gauss_data(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, L, generator=g)
    return z @ torch.randn(L, D, generator=g) + 0.3 * torch.randn(n, D, generator=g)


def _fit(model, guide, data, tmp_path=None, **kw):
    opts = dict(epochs=3, batch_size=32, lr=0.02, progress=False, device="cpu", figures=False)
    opts.update(kw)
    return pv.fit(model, guide, data, out=None if tmp_path is None else str(tmp_path / "run"), **opts)


def _same_eval(run, loaded, x):
    pyro.set_rng_seed(3)
    a = pv.evaluate(run, x, k=16, save=False)
    pyro.set_rng_seed(3)
    b = pv.evaluate(loaded, x, k=16, save=False)
    assert a["elbo"] == pytest.approx(b["elbo"], rel=1e-6)
    assert a["log_likelihood"] == pytest.approx(b["log_likelihood"], rel=1e-6)


# --------------------------------------------------------------------------- PyroModule subclasses


class UserModel(PyroModule):
    def __init__(self):
        super().__init__()
        self.decoder = PyroModule[nn.Linear](L, D)
        self.noise = PyroParam(torch.tensor(1.0), constraint=constraints.positive)

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(L), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), self.noise).to_event(1), obs=x)


class UserGuide(PyroModule):
    def __init__(self):
        super().__init__()
        self.encoder = PyroModule[nn.Linear](D, 2 * L)

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            h = self.encoder(x)
            pyro.sample("z", dist.Normal(h[..., :L], F.softplus(h[..., L:]) + 1e-3).to_event(1))


def test_pyromodule_subclasses(tmp_path):
    torch.manual_seed(0)
    model, guide = UserModel(), UserGuide()
    w0, n0 = model.decoder.weight.detach().clone(), float(model.noise.detach())
    x = _gauss_data()
    run = _fit(model, guide, x, tmp_path)
    assert not torch.equal(w0, model.decoder.weight.detach())
    assert float(model.noise.detach()) != n0 and float(model.noise.detach()) > 0
    assert run.config["model"] == {"name": "user", "type": "UserModel"}
    with pytest.raises(pv.ConfigError, match="pass model= and guide="):
        pv.load_run(str(tmp_path / "run"))
    torch.manual_seed(1)
    model2, guide2 = UserModel(), UserGuide()
    loaded = pv.load_run(str(tmp_path / "run"), model=model2, guide=guide2)
    torch.testing.assert_close(model2.decoder.weight, model.decoder.weight)
    assert float(model2.noise.detach()) == pytest.approx(float(model.noise.detach()))
    _same_eval(run, loaded, x[:20])


# --------------------------------------------------------------------------- pyro.module in functions


def test_pyro_module_functions(tmp_path, digits):
    model, guide, dec, enc = tutorial_vae(0)
    w0 = dec.fc1.weight.detach().clone()
    run = _fit(model, guide, digits, tmp_path, epochs=2, batch_size=128)
    assert not torch.equal(w0, dec.fc1.weight.detach())
    assert "param/decoder$$$fc1.weight" in run.state_tensors()
    model2, guide2, dec2, enc2 = tutorial_vae(1)  # fresh modules, other init
    loaded = pv.load_run(str(tmp_path / "run"), model=model2, guide=guide2)
    torch.testing.assert_close(dec2.fc1.weight, dec.fc1.weight)
    torch.testing.assert_close(enc2.fc22.bias, enc.fc22.bias)
    _same_eval(run, loaded, digits.test.x[:30])


class TutorialVAE(nn.Module):
    """Pyro's VAE tutorial shape: an nn.Module with model() and guide() methods."""

    def __init__(self):
        super().__init__()
        self.decoder, self.encoder = nn.Linear(L, D), nn.Linear(D, 2 * L)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(L), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 0.5).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            h = self.encoder(x)
            pyro.sample("z", dist.Normal(h[..., :L], F.softplus(h[..., L:]) + 1e-3).to_event(1))


def test_bound_methods(tmp_path):
    torch.manual_seed(0)
    vae = TutorialVAE()
    w0 = vae.encoder.weight.detach().clone()
    x = _gauss_data()
    run = _fit(vae.model, vae.guide, x, tmp_path)
    assert not torch.equal(w0, vae.encoder.weight.detach())
    assert run.config["guide"]["type"] == "TutorialVAE.guide"
    vae2 = TutorialVAE()
    pv.load_run(str(tmp_path / "run"), model=vae2.model, guide=vae2.guide)
    torch.testing.assert_close(vae2.encoder.weight, vae.encoder.weight)


# --------------------------------------------------------------------------- pyro.param with constraints


def param_model(x):
    loc = pyro.sample("loc", dist.Normal(torch.zeros(D), 3.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)


def param_guide(x):
    loc = pyro.param("q_loc", torch.zeros(D))
    scale = pyro.param("q_scale", torch.ones(D), constraint=constraints.positive)
    mix = pyro.param("unused_bounded", torch.tensor(0.5), constraint=constraints.interval(0.0, 1.0))
    pyro.sample("loc", dist.Normal(loc, scale * (0.5 + mix)).to_event(1))


def test_pyro_param_constraints_are_honoured_and_saved(tmp_path):
    x = _gauss_data() + 2.0
    run = _fit(param_model, param_guide, x, tmp_path, epochs=20, lr=0.1)
    cons = run.param_constraints()
    assert cons["q_scale"] == {"name": "positive"}
    assert cons["unused_bounded"] == {"name": "interval", "lower": 0.0, "upper": 1.0}
    with run.scope():
        scale, loc = pyro.param("q_scale").detach(), pyro.param("q_loc").detach()
        bounded = float(pyro.param("unused_bounded").detach())
    assert bool((scale > 0).all()) and 0 < bounded < 1
    assert (loc - x.mean(0)).abs().max() < 0.3  # moved to the data mean
    assert len(pyro.get_param_store()._params) == 0  # nothing leaked to the global store
    loaded = pv.load_run(str(tmp_path / "run"), model=param_model, guide=param_guide)
    with loaded.scope():
        torch.testing.assert_close(pyro.param("q_scale").detach(), scale)
        assert isinstance(pyro.get_param_store()._constraints["unused_bounded"], constraints.interval)
        assert float(pyro.param("unused_bounded").detach()) == pytest.approx(bounded)


# --------------------------------------------------------------------------- Pyro's autoguides


def regression(x, y=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 2.0).to_event(1))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((x * w).sum(-1), sigma), obs=y)


AUTOGUIDES = {
    "AutoNormal": AutoNormal,
    "AutoDiagonalNormal": AutoDiagonalNormal,
    "AutoMultivariateNormal": AutoMultivariateNormal,
    "AutoLowRankMultivariateNormal": AutoLowRankMultivariateNormal,
    "AutoIAFNormal": lambda m: AutoIAFNormal(m, hidden_dim=[8]),
    "AutoDelta": AutoDelta,
}


@pytest.mark.parametrize("name", sorted(AUTOGUIDES))
def test_autoguides_lazy_params_are_trained_and_reloaded(name, tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 3, generator=g)
    y = x @ torch.tensor([1.0, -1.0, 0.5]) + 0.2 * torch.randn(80, generator=g)
    def initial_values():  # what fit(seed=0) starts from: seeded, then the first call creates the parameters
        guide = AUTOGUIDES[name](regression)
        assert len(list(guide.parameters())) == 0  # nothing before the first call
        pyro.set_rng_seed(0)
        with pyro.get_param_store().scope():
            guide(x[:24], y[:24])
        return {k: v.detach().clone() for k, v in guide.named_parameters()}

    init = initial_values()
    again = initial_values()
    assert all(torch.equal(init[k], again[k]) for k in init)  # deterministic, so "changed" below means trained
    guide = AUTOGUIDES[name](regression)
    run = _fit(regression, guide, (x, y), tmp_path, epochs=4, batch_size=24)
    trained = {k: v.detach().clone() for k, v in guide.named_parameters()}
    assert set(trained) == set(init) and trained
    for k in init:  # every lazily created parameter was in the optimizer
        assert not torch.equal(init[k], trained[k]), k
    fresh = AUTOGUIDES[name](regression)
    pv.load_run(str(tmp_path / "run"), model=regression, guide=fresh)
    for k, v in fresh.named_parameters():
        torch.testing.assert_close(v.detach(), trained[k])
    assert run.config["guide"]["name"] == "user"
