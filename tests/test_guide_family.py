"""One guide family: every pyrovi guide is a head on the one amortized base.

A matrix over the guides: the same common options (validated with the same
messages), every model kind (pyrovi's, a traced Pyro model with or without
``example=``), ``encode``/``posterior`` everywhere, and the fast path on
pyrovi's models, equal to Pyro's traced path to float32 rounding.
"""

import ast
import math
import pathlib

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pyrovi as pv
from pyrovi import fastpath
from pyrovi.objectives import iw_bound
from pyrovi.weights import log_weights

pytestmark = pytest.mark.usefixtures("one_thread")

#: name -> factory(model, **common options); the family options kept small so the matrix runs fast
GUIDES = {
    "diag_normal": lambda m, **kw: pv.guides.DiagNormal(m, **kw),
    "delta": lambda m, **kw: pv.guides.Delta(m, **kw),
    "mixture": lambda m, **kw: pv.guides.Mixture(m, components=2, **kw),
    "flow": lambda m, **kw: pv.guides.Flow(m, depth=1, **kw),
    "auto": lambda m, **kw: pv.guides.Auto(m, **kw),
    "auto_mixture": lambda m, **kw: pv.guides.Auto(m, family="mixture", components=2, **kw),
    "auto_flow": lambda m, **kw: pv.guides.Auto(m, family="flow", depth=1, **kw),
    "auto_delta": lambda m, **kw: pv.guides.Auto(m, family="delta", **kw),
}
SCALED = [n for n in GUIDES if n != "delta"]  # the guides that take min_scale (Auto takes it for every family)


def _vae():
    return pv.models.VAE(16, 3, hidden=(8,))


def _bits(n=6):
    return (torch.rand(n, 16) < 0.5).float()


def _user_model(likelihood):
    """A plain Pyro model: a 2-d Normal latent per datapoint, a Bernoulli or Normal likelihood."""
    w = torch.tensor([[1.0, -0.5, 0.3], [0.2, 0.8, -1.0]])  # (2, 3)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))  # (B, 2)
            mean = z @ w  # (B, 3)
            if likelihood == "bernoulli":
                pyro.sample("x", dist.Bernoulli(logits=mean).to_event(1), obs=x)
            else:
                pyro.sample("x", dist.Normal(mean, 0.5).to_event(1), obs=x)

    x = (torch.rand(8, 3) < 0.5).float() if likelihood == "bernoulli" else torch.randn(8, 3)
    return model, x


def _linear_widths(guide):
    return [m.out_features for m in guide.body if isinstance(m, nn.Linear)]


# --------------------------------------------------------------------------- common options


@pytest.mark.parametrize("name", GUIDES)
@pytest.mark.parametrize("hidden, widths", [(7, [7]), ((16, 16), [16, 16])])
def test_every_guide_takes_hidden_as_an_int_or_a_sequence(name, hidden, widths):
    torch.manual_seed(0)
    model = _vae()
    guide = GUIDES[name](model, hidden=hidden)
    assert _linear_widths(guide) == widths
    assert guide.config()["hidden"] == widths
    z = guide(_bits())["z"]
    assert z.shape == (6, 3)


BAD = [
    ("hidden", 0, "hidden layer width must be > 0, got 0"),
    ("hidden", (), "hidden must list at least one hidden layer width"),
    ("hidden", "wide", "hidden must be"),
    ("activation", "nope", "unknown activation 'nope'; valid activations: elu, gelu, relu, softplus, tanh"),
    ("min_scale", -1, "min_scale must be >= 0, got -1"),
    ("data_plate", 3, "data_plate must name the model's per-datapoint plate"),
]


@pytest.mark.parametrize("option, value, text", BAD)
def test_bad_common_options_raise_the_same_config_error_for_every_guide(option, value, text):
    model = _vae()
    messages = set()
    for name in (SCALED if option == "min_scale" else GUIDES):
        with pytest.raises(pv.ConfigError) as err:
            GUIDES[name](model, **{option: value})
        messages.add(str(err.value))
    assert len(messages) == 1, messages  # one text, whichever guide
    assert text in messages.pop()


@pytest.mark.parametrize("option, value, text", BAD[:4])
def test_bad_options_are_caught_up_front_even_when_discovery_is_deferred(option, value, text):
    model, _ = _user_model("normal")
    with pytest.raises(pv.ConfigError, match=text.split(";")[0].replace("(", "\\(")):
        pv.guides.DiagNormal(model, **{option: value})  # no example: nothing is traced yet, yet it is checked


# --------------------------------------------------------------------------- every model kind


@pytest.mark.parametrize("name", GUIDES)
@pytest.mark.parametrize("likelihood", ["bernoulli", "normal"])
def test_every_guide_serves_a_user_model_with_example(name, likelihood):
    torch.manual_seed(0)
    model, x = _user_model(likelihood)
    guide = GUIDES[name](model, example=x[:2], hidden=(16, 16))
    assert guide.is_setup and set(guide.sites) == {"z"}
    assert guide.config()["example"] == [{"shape": [3], "dtype": "float32"}]
    assert not fastpath.supported(model, guide)  # a user's model has no fast path
    loss = pv.objectives.get("elbo", particles=2)(model, guide, x)
    assert torch.isfinite(loss)
    loss.backward()
    lw = log_weights(model, guide, x, particles=4)
    assert lw.log_w.shape == (4, 8) and lw.per_datapoint
    assert lw.guide_trace.nodes["z"]["value"].shape == (4, 8, 2)


@pytest.mark.parametrize("name", GUIDES)
@pytest.mark.parametrize("how", ["setup", "first call"])
def test_every_guide_serves_a_user_model_without_example(name, how):
    """Without example= the guide finds the sites on setup() or its first call, then records the example spec."""
    torch.manual_seed(0)
    model, x = _user_model("normal")
    guide = GUIDES[name](model, hidden=8)
    assert not guide.is_setup and list(guide.parameters()) == []
    assert "example" not in guide.config()
    if how == "setup":
        assert guide.setup(x) is guide
        guide.setup(x)  # idempotent: no second trace, same modules
    else:
        pv.objectives.get("elbo")(model, guide, x)
    assert guide.is_setup and set(guide.sites) == {"z"}
    cfg = guide.config()
    assert cfg["example"] == [{"shape": [3], "dtype": "float32"}]
    params = list(guide.parameters())
    assert params
    guide.setup(x)
    assert list(guide.parameters()) == params  # idempotent
    # the config rebuilds it (as load_run does), with the same weights layout
    again = pv.guides.build(model, cfg)
    assert again.is_setup
    again.load_state_dict(guide.state_dict())
    z = guide(x)["z"]
    assert z.shape == (8, 2)


def test_fit_trains_a_lazy_guide_on_a_user_model():
    torch.manual_seed(0)
    model, x = _user_model("normal")
    guide = pv.guides.DiagNormal(model, hidden=8)
    run = pv.fit(model, guide, x, epochs=2, batch_size=4, progress=False)
    # The guide traced the model on fit's first trace of it; its config now records the example spec.
    # (For load_run, fit must call guide.setup(...) before it writes run.config: see train.py.)
    assert guide.is_setup and guide.config()["example"] == [{"shape": [3], "dtype": "float32"}]
    assert all(math.isfinite(h["train_loss"]) for h in run.history)


def test_a_guide_not_yet_set_up_says_what_to_do():
    model, x = _user_model("normal")
    guide = pv.guides.DiagNormal(model)
    with pytest.raises(pv.ConfigError, match=r"DiagNormal has not found the latent sites of model yet.*"
                                             r"guide.setup\(\*batch\).*example=x\[:2\]"):
        guide.setup()  # no inputs to trace
    trained = pv.guides.DiagNormal(model, example=x[:2])
    with pytest.raises(pv.ConfigError, match="loading weights needs them"):
        guide.load_state_dict(trained.state_dict())
    assert "built-in guides need latent_sites" not in str(_codebook_error(model))


def _codebook_error(model):
    with pytest.raises(pv.ConfigError) as err:
        pv.guides.Codebook(model)
    return err.value


def test_delta_on_a_constrained_site_is_a_point_in_the_support_with_log_q_zero():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            s = pyro.sample("s", dist.LogNormal(0.0, 1.0))  # (B,), positive
            pyro.sample("x", dist.Normal(0.0, s[:, None]).to_event(1), obs=x)

    x = torch.randn(5, 2)
    guide = pv.guides.Delta(model, example=x[:2], hidden=4)
    q = guide.posterior(x)["s"]
    assert isinstance(q, dist.Delta) and q.batch_shape == (5,) and q.event_shape == ()
    assert (q.v > 0).all()
    assert torch.equal(q.log_prob(q.v), torch.zeros(5))
    loc, scale = guide.encode(x)["s"]
    torch.testing.assert_close(loc, q.v)
    assert torch.equal(scale, torch.zeros(5))


# --------------------------------------------------------------------------- encode, posterior, checkpoints


@pytest.mark.parametrize("name", GUIDES)
def test_every_guide_encodes_mean_and_scale(name):
    torch.manual_seed(0)
    model = _vae()
    guide = GUIDES[name](model, hidden=8)
    x = _bits(5)
    with torch.no_grad():
        loc, scale = guide.encode(x)["z"]
        assert loc.shape == scale.shape == (5, 3) and (scale >= 0).all()
        q = guide.posterior(x)["z"]
        assert q.batch_shape == (5,) and q.event_shape == (3,)
        if "delta" in name:
            torch.testing.assert_close(loc, q.v)
            assert torch.equal(scale, torch.zeros_like(scale))
        elif "flow" not in name:  # closed form: compare with many draws (a flow's encode is such an estimate)
            z = q.sample((20000,))  # (N, 5, 3)
            torch.testing.assert_close(loc, z.mean(0), atol=0.05, rtol=0)
            torch.testing.assert_close(scale, z.std(0), atol=0.05, rtol=0.05)


def test_diag_normal_keeps_its_config_encode_and_state_dict_layout():
    model = _vae()
    guide = pv.guides.DiagNormal(model, hidden=(8,), min_scale=1e-3)
    assert guide.config() == {"name": "diag_normal", "hidden": [8], "activation": "relu", "min_scale": 1e-3}
    assert sorted(guide.state_dict()) == ["body.0.bias", "body.0.weight", "heads.z.bias", "heads.z.weight"]
    x = _bits(4)
    loc, scale = guide.encode(x)["z"]
    q = guide.posterior(x, None)["z"]
    assert isinstance(q, pv.distributions.DiagonalNormal)
    torch.testing.assert_close(q.mean, loc)
    torch.testing.assert_close(q.stddev, scale)
    raw = guide.heads["z"](guide.body(x))  # the head is still the linear layer: (B, 2n), loc first
    torch.testing.assert_close(raw[:, :3], loc)


def test_auto_keeps_the_state_dict_layout_of_its_runs():
    """Auto's Gaussian head is DiagNormal's, held as ``linear``: the names its run directories hold."""
    model = _vae()
    auto, named = pv.guides.Auto(model, hidden=8), pv.guides.DiagNormal(model, hidden=8)
    assert sorted(auto.state_dict()) == ["body.0.bias", "body.0.weight", "heads.z.linear.bias",
                                         "heads.z.linear.weight"]
    assert type(auto.heads["z"].linear) is type(named.heads["z"])


def test_auto_families_are_the_named_guides_heads():
    model = _vae()
    pairs = [("diag_normal", pv.guides.DiagNormal(model, hidden=8)), ("delta", pv.guides.Delta(model, hidden=8)),
             ("mixture", pv.guides.Mixture(model, hidden=8)), ("flow", pv.guides.Flow(model, hidden=8))]
    for family, named in pairs:
        head = pv.guides.Auto(model, family=family, hidden=8).heads["z"]
        head = head.linear if family == "diag_normal" else head  # held as `linear` (the layout of Auto's runs)
        assert type(head) is type(named.heads["z"])


# --------------------------------------------------------------------------- the fast path


def _rtol(*shape) -> float:
    """Relative tolerance for sums of ``prod(shape)`` float32 terms added in different orders."""
    return 8 * torch.finfo(torch.float32).eps * math.sqrt(math.prod(shape))


@pytest.mark.parametrize("name", GUIDES)
@pytest.mark.parametrize("objective, particles", [("elbo", 3), ("meanfield", 2), ("iwae", 4)])
def test_fast_path_serves_every_guide_on_the_vae_and_equals_the_traced_path(name, objective, particles):
    torch.manual_seed(0)
    model = _vae()
    guide = GUIDES[name](model, hidden=8)
    x = _bits(6)
    assert fastpath.supported(model, guide, stratify=True)
    obj = pv.objectives.get(objective, particles=particles)
    obj.max_plate_nesting = 1

    def loss(fast):
        obj.fast = fast
        pyro.set_rng_seed(5)
        return obj(model, guide, x)

    if getattr(guide, "strata", 1) == 1:
        assert fastpath.supported(model, guide)
        fast = loss(True)
        assert obj.path_counts == {"fast": 1, "traced": 0}  # it ran
        plain = loss(False)
        torch.testing.assert_close(fast, plain, rtol=_rtol(particles, *x.shape), atol=0.0)
        params = list(guide.parameters())
        gf = torch.autograd.grad(fast, params, allow_unused=True)
        gp = torch.autograd.grad(plain, params, allow_unused=True)
        for a, b in zip(gf, gp):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    else:
        # a mixture: the objectives' traced draws (stratified for ELBOs) against fastpath's, weight by weight
        C = guide.strata
        stratify = objective != "iwae"
        S = particles * C if stratify else particles
        pyro.set_rng_seed(5)
        fw = fastpath.fast_log_weights(model, guide, x, particles=S, stratify=stratify)
        pyro.set_rng_seed(5)
        tw = log_weights(model, guide, x, particles=S, max_plate_nesting=1, stratify=stratify)
        tol = dict(rtol=_rtol(*x.shape), atol=1e-5)
        torch.testing.assert_close(fw.log_w, tw.log_w, **tol)
        torch.testing.assert_close(fw.log_q, tw.log_q, **tol)
        assert (fw.log_rho is None) == (tw.log_rho is None) == (not stratify)
        if stratify:
            torch.testing.assert_close(fw.log_rho, tw.log_rho, rtol=1e-6, atol=1e-6)
        alpha = 1.0 if stratify else 0.0
        torch.testing.assert_close(iw_bound(fw, alpha), iw_bound(tw, alpha), rtol=_rtol(S, *x.shape), atol=0.0)
        assert not fastpath.supported(model, guide)  # only a caller that stratifies may take it
        if objective == "elbo":  # what an ELBO objective computes on Pyro's path, from fastpath's draws
            obj.fast = False
            pyro.set_rng_seed(5)
            traced = obj(model, guide, x)
            pyro.set_rng_seed(5)
            fast = -iw_bound(fastpath.fast_elbo_weights(model, guide, x, particles=particles), alpha=1.0)
            torch.testing.assert_close(fast, traced, rtol=_rtol(S, *x.shape), atol=0.0)


def test_a_guide_overriding_forward_falls_back_and_a_lazy_guide_is_not_fast():
    class Other(pv.guides.Mixture):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    model = _vae()
    assert not fastpath.supported(model, Other(model, hidden=8), stratify=True)
    user, x = _user_model("normal")
    assert not fastpath.supported(user, pv.guides.DiagNormal(user))


# --------------------------------------------------------------------------- layering


def _imports(module: str) -> set:
    src = (pathlib.Path(pv.__file__).parent / module).read_text()
    out = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.ImportFrom):
            out.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("module", ["weights.py", "stratify.py", "fastpath.py"])
def test_the_objective_layer_imports_no_guide_module(module):
    assert not [m for m in _imports(module) if "guides" in m]


def test_stratification_lives_in_its_own_module_and_mixture_re_exports_it():
    from pyrovi import stratify
    from pyrovi.guides import mixture

    assert mixture.stratified is stratify.stratified and mixture.log_stratum is stratify.log_stratum
    assert stratify.strata(pv.guides.Mixture(_vae(), components=3, hidden=4)) == 3
    assert stratify.strata(pv.guides.DiagNormal(_vae(), hidden=4)) == 1


# --------------------------------------------------------------------------- the codebook's probe flag


def test_codebook_leaves_its_statistics_alone_inside_a_parameter_probe(digits):
    from pyrovi.guides.base import in_parameter_probe, parameter_probe

    model = pv.models.VQVAE(digits.shape, 8, code_dim=4, downsample=1, channels=8, image_shape=digits.image_shape)
    guide = pv.guides.Codebook(model)
    x = digits.train.x[:64]
    guide.train()
    assert not in_parameter_probe()
    with parameter_probe():
        assert in_parameter_probe()
        guide(x)  # a training-mode call with gradients, but only to find parameters
    assert not in_parameter_probe()
    assert not bool(guide.initialized) and int(guide.updates) == 0
    guide(x)
    assert bool(guide.initialized) and int(guide.updates) == 1


@pytest.mark.parametrize("name", GUIDES)
def test_labels_reach_the_encoder_positionally_or_as_y(name):
    torch.manual_seed(0)
    model = pv.models.ConditionalVAE(16, 3, num_classes=4, hidden=(8,))
    guide = GUIDES[name](model, hidden=8)
    x, y = _bits(5), torch.arange(5) % 4
    with torch.no_grad():
        a, b = guide.encode(x, y)["z"][0], guide.encode(x, y=y)["z"][0]
        torch.testing.assert_close(a, b)
        assert guide.posterior(x, y=y)["z"].batch_shape == (5,)
    with pytest.raises(pv.ConfigError, match="pass y"):
        guide.encode(x)


@pytest.mark.parametrize("name", GUIDES)
def test_point_mass_is_a_property_of_the_head(name):
    guide = GUIDES[name](_vae(), hidden=4)
    assert guide.point_mass == ("delta" in name)
    if guide.point_mass:  # dreg has no second reparameterization to make for a point mass
        with pytest.raises(pv.ConfigError, match="point mass"):
            pv.objectives.get("dreg").check_guide(guide)
