"""Issue 17: a fit that goes wrong says so (divergence, overflowed optimizer state), seeds, precision, copies."""

import importlib.util
import math
import os

import pytest
import torch

import pyrovi as pv
from pyrovi.checkpoint import load_tensors
from pyrovi.errors import TrainingError
from pyrovi.loop import DivergenceWatch, diverged, optimizer_state_finite

pytestmark = pytest.mark.usefixtures("one_thread")


def _small(data, sigma=None, seed=0):
    torch.manual_seed(seed)
    kw = {} if sigma is None else dict(likelihood="gaussian", sigma=sigma)
    model = pv.models.VAE(data.shape, 2, hidden=(16,), **kw)
    return model, pv.guides.DiagNormal(model, hidden=(16,))


# --------------------------------------------------------------------------- divergence (item 3)


def test_divergence_rule():
    assert not diverged(1e30, math.inf)  # nothing to compare with before the first step
    assert not diverged(900.0, 0.5)  # within 1000 nats of a small best
    assert diverged(1200.0, 0.5)
    assert not diverged(1e14, 1.26e13)  # a large-scale loss may move by a lot in absolute terms
    assert diverged(3e28, 1.26e13)  # the sigma=1e-6, lr=10 blow-up
    assert not diverged(-4000.0, -5000.0) and diverged(1e6, -5000.0)


def test_tiny_sigma_and_huge_lr_stop_with_a_training_error(digits):
    """The issue's case: Gaussian likelihood with sigma=1e-6 and lr=10 used to exit 0 with a loss of 7.6e28."""
    model, guide = _small(digits, sigma=1e-6)
    with pytest.raises(TrainingError, match=r"diverged at epoch 1, step 2: .*lower lr \(now 10\).*clip_norm"):
        pv.fit(model, guide, digits, epochs=3, lr=10, progress=False, figures=False)


class _BlowUpAfter(pv.objectives.ELBO):
    """ELBO whose value is multiplied by `factor` after `steps` differentiable calls (fit makes one to find params,
    so the first changed training step is step `steps`)."""

    def __init__(self, steps, factor=1e20, grad_only=False):
        super().__init__()
        self.steps, self.calls, self.factor, self.grad_only = steps, 0, factor, grad_only

    def __call__(self, model, guide, *args, **kwargs):
        loss = super().__call__(model, guide, *args, **kwargs)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls > self.steps:
                if self.grad_only:  # same value, gradient times factor: overflows Adam's second moment
                    return loss.detach() + self.factor * (loss - loss.detach())
                return loss * self.factor
        return loss


def _steps_per_epoch(digits, batch=128):
    return -(-len(digits.train) // batch)


def test_finite_blow_up_stops_at_its_step_and_keeps_the_last_good_checkpoint(digits, tmp_path):
    model, guide = _small(digits)
    out = str(tmp_path / "r")
    spe = _steps_per_epoch(digits)
    with pytest.raises(TrainingError, match=rf"diverged at epoch 2, step {spe + 2}: .*last good checkpoint "
                                            r"\(epoch 1\) is kept"):
        pv.fit(model, guide, digits, objective=_BlowUpAfter(spe + 2), epochs=3, progress=False, out=out,
               figures=False)
    tensors, meta = load_tensors(os.path.join(out, "checkpoint.safetensors"))
    assert meta["loop"]["epoch"] == 1 and math.isfinite(meta["loop"]["best_train"])
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())


def test_non_finite_optimizer_state_stops_even_when_the_loss_stays_finite(digits, tmp_path):
    model, guide = _small(digits)
    out = str(tmp_path / "r")
    spe = _steps_per_epoch(digits)
    obj = _BlowUpAfter(spe + 1, factor=1e30, grad_only=True)  # |g| ~ 1e30: g^2 overflows float32
    with pytest.raises(TrainingError, match=r"optimizer's state .* non-finite during epoch 2 .*last good checkpoint "
                                            r"\(epoch 1\)"):
        pv.fit(model, guide, digits, objective=obj, epochs=3, progress=False, out=out, figures=False)
    tensors, meta = load_tensors(os.path.join(out, "checkpoint.safetensors"))
    assert meta["loop"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("optim/"))


def test_optimizer_state_finite():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([p])
    assert optimizer_state_finite(opt)  # no state yet
    p.grad = torch.ones(3)
    opt.step()
    assert optimizer_state_finite(opt)
    opt.state[p]["exp_avg_sq"][1] = float("inf")
    assert not optimizer_state_finite(opt)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="needs pyrovi[distributed]")
def test_ddp_ranks_stop_together_on_a_finite_blow_up(digits, tmp_path):
    """Two spawned ranks on the sigma=1e-6, lr=10 case: every rank raises the TrainingError (no rank left
    waiting in an all-reduce); ddp_spawn hands it back as the same TrainingError (about 30 s)."""
    saved = dict(os.environ)  # Lightning's spawn launcher sets MASTER_PORT here
    try:
        model, guide = _small(digits, sigma=1e-6)
        with pytest.raises(pv.TrainingError, match=r"training diverged at epoch 1, step \d+ \(this rank; "
                                            r"\d diverged step\(s\) over all ranks\)"):
            pv.fit(model, guide, digits, epochs=3, lr=10, progress=False, figures=False, strategy="ddp_spawn",
                   devices=2, accelerator="cpu", out=str(tmp_path / "r"))
    finally:
        os.environ.clear()
        os.environ.update(saved)


class _TwoRanks(pv.loop.World):
    """A rank of a world of two whose other rank saw `other` (diverged steps, bad optimizer state)."""

    size = 2
    where = " (on some rank)"

    def __init__(self, other):
        super().__init__("cpu")
        self.other = other

    def sum(self, *values):
        return [float(v) + o for v, o in zip(values, self.other)]


class _Cfg:
    beta, lr, clip_norm = 1.0, 1e-3, None


def test_ranks_stop_together_on_reduced_numbers():
    """Under N ranks one rank's diverged step is remembered, not raised; every rank raises at the epoch's end."""
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])
    loop = {"epoch": 3, "step": 40}
    calm = DivergenceWatch(_TwoRanks(other=(1.0, 0.0)), _Cfg(), dict(loop), None)  # the other rank diverged
    calm.step(1.0, 1.0)
    with pytest.raises(TrainingError, match=r"diverged at epoch 4.*1 diverged step\(s\) over all ranks"):
        calm.end_epoch(opt)
    wild = DivergenceWatch(_TwoRanks(other=(0.0, 0.0)), _Cfg(), dict(loop), None)
    wild.step(1.0, 1.0)
    wild.step(1e9, 1.0)  # diverged here: remembered, not raised (the other rank would wait in all-reduce)
    with pytest.raises(TrainingError, match=r"epoch 4, step 41 \(this rank; 1 diverged"):
        wild.end_epoch(opt)
    fine = DivergenceWatch(_TwoRanks(other=(0.0, 1.0)), _Cfg(), dict(loop), None)  # other rank: bad Adam state
    with pytest.raises(TrainingError, match=r"optimizer's state .*epoch 4 \(by step 40\) \(on some rank\)"):
        fine.end_epoch(opt)
    ok = DivergenceWatch(_TwoRanks(other=(0.0, 0.0)), _Cfg(), dict(loop), None)
    ok.step(1.0, 1.0)
    ok.end_epoch(opt)


def test_warm_up_steps_are_not_compared():
    """During KL warm-up each step's loss is a different function: the best is tracked at full beta only."""
    w = DivergenceWatch(pv.loop.World("cpu"), _Cfg(), {"epoch": 0, "step": 0}, None)
    w.step(0.1, 0.01)
    w.step(5000.0, 0.5)
    assert w.loop["best_train"] == math.inf
    w.step(3.0, 1.0)
    assert w.loop["best_train"] == 3.0


# --------------------------------------------------------------------------- seeds (item 4, API side)

import warnings  # noqa: E402

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402

from pyrovi.errors import SeedWarning  # noqa: E402


def _user_model(x):
    """A user-written Pyro model: z ~ N(0, I_2), x ~ N(W z, 0.5^2), W a pyro.param (drawn lazily, inside fit)."""
    W = pyro.param("W", lambda: torch.randn(x.shape[1], 2, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ W.T, 0.5).to_event(1), obs=x)


def _lg_data(n=200, d=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 2, generator=g) @ torch.randn(2, d, generator=g)).to(dtype)


def test_seed_fixes_everything_fit_builds(one_thread):
    """guide=None (Auto, built in fit) on a user model with lazy pyro.params: the global RNG state before fit does
    not matter, only seed= does."""
    x = _lg_data()
    hist = []
    for noise in (1, 2):
        torch.manual_seed(noise)  # a different global random state before each fit
        torch.rand(noise * 7)
        with warnings.catch_warnings():
            warnings.simplefilter("error", SeedWarning)  # nothing was built before fit: no warning
            run = pv.fit(_user_model, None, x, epochs=2, batch_size=50, seed=3, progress=False, figures=False)
        hist.append([h["train_loss"] for h in run.history])
    assert hist[0] == hist[1]
    torch.manual_seed(9)
    other = pv.fit(_user_model, None, x, epochs=2, batch_size=50, seed=4, progress=False, figures=False)
    assert [h["train_loss"] for h in other.history] != hist[0]


def test_lazily_set_up_guide_is_drawn_from_the_seed(one_thread):
    """A guide built without example= is set up (its nets drawn) inside fit, after fit has seeded."""
    x = _lg_data()
    weights = []
    for noise in (1, 2):
        torch.manual_seed(noise)
        guide = pv.guides.Auto(_user_model)  # no nets yet
        pv.fit(_user_model, guide, x, epochs=1, batch_size=50, seed=3, progress=False, figures=False)
        weights.append({k: v.clone() for k, v in guide.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_modules_built_outside_the_seed_are_kept_and_warned_about(digits, one_thread):
    """fit never re-draws weights handed in (they may be pretrained); with seed= it says they are not seeded."""
    torch.manual_seed(123)
    model = pv.models.VAE(digits.shape, 2, hidden=(16,))
    guide = pv.guides.DiagNormal(model, hidden=(16,))
    before = {k: v.clone() for k, v in guide.state_dict().items()}
    with pytest.warns(SeedWarning, match=r"fit\(seed=0\) .*not the weights of VAE and DiagNormal.*last seeded "
                                         r"with 123.*pyro.set_rng_seed\(0\)"):
        pv.fit(model, guide, digits, epochs=1, seed=0, progress=False, figures=False, lr=1e-9)
    after = guide.state_dict()
    assert all(torch.allclose(before[k], after[k], atol=1e-5) for k in before)  # kept, not re-drawn
    # seeded the documented way, or no seed asked for: silent
    pyro.set_rng_seed(5)
    model = pv.models.VAE(digits.shape, 2, hidden=(16,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SeedWarning)
        pv.fit(model, None, digits, epochs=1, seed=5, progress=False, figures=False)
        torch.manual_seed(77)
        pv.fit(pv.models.VAE(digits.shape, 2, hidden=(16,)), None, digits, epochs=1, progress=False,
               figures=False)


def test_same_seed_before_building_gives_identical_histories(digits, one_thread):
    hist = []
    for _ in range(2):
        pyro.set_rng_seed(11)
        model = pv.models.VAE(digits.shape, 2, hidden=(16,))
        run = pv.fit(model, None, digits, epochs=2, seed=11, progress=False, figures=False)
        hist.append([(h["train_loss"], h["val_loss"]) for h in run.history])
    assert hist[0] == hist[1]


# --------------------------------------------------------------------------- float64 and copies (item 5)

import copy  # noqa: E402
import io  # noqa: E402
import pickle  # noqa: E402

#: every guide head (and Auto family) pyrovi has, on any model; Codebook (VQ-VAE only) is tested below
GUIDES = {
    "diag_normal": lambda m, ex: pv.guides.DiagNormal(m, hidden=(16,), example=ex),
    "mixture": lambda m, ex: pv.guides.Mixture(m, hidden=(16,), example=ex),
    "delta": lambda m, ex: pv.guides.Delta(m, hidden=(16,), example=ex),
    "flow_iaf": lambda m, ex: pv.guides.Flow(m, hidden=(16,), depth=2, example=ex),
    "flow_planar": lambda m, ex: pv.guides.Flow(m, flow="planar", hidden=(16,), depth=2, example=ex),
    "flow_radial": lambda m, ex: pv.guides.Flow(m, flow="radial", hidden=(16,), depth=2, example=ex),
    "flow_spline": lambda m, ex: pv.guides.Flow(m, flow="spline", hidden=(16,), depth=2, example=ex),
    "auto_diag_normal": lambda m, ex: pv.guides.Auto(m, hidden=(16,), example=ex),
    "auto_mixture": lambda m, ex: pv.guides.Auto(m, family="mixture", hidden=(16,), example=ex),
    "auto_flow": lambda m, ex: pv.guides.Auto(m, family="flow", hidden=(16,), example=ex),
    "auto_delta": lambda m, ex: pv.guides.Auto(m, family="delta", hidden=(16,), example=ex),
}


def _copies_agree(guide, x):
    """deepcopy, pickle and a torch.save/torch.load(weights_only=True) state_dict round trip give the same q."""
    twin = copy.deepcopy(guide)
    again = pickle.loads(pickle.dumps(guide))
    buf = io.BytesIO()
    torch.save(guide.state_dict(), buf)
    buf.seek(0)
    fresh = copy.deepcopy(guide)
    for p in fresh.parameters():
        p.data.zero_()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for g in (twin, again, fresh):
        a, b = dict(guide.state_dict()), dict(g.state_dict())
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert all(p.data_ptr() != q.data_ptr() for p, q in zip(guide.parameters(), g.parameters()))
        with pyro.poutine.trace() as t1, torch.no_grad():
            pyro.set_rng_seed(1)
            guide(x)
        with pyro.poutine.trace() as t2, torch.no_grad():
            pyro.set_rng_seed(1)
            g(x)
        for name, site in t1.trace.nodes.items():
            if site["type"] == "sample":
                torch.testing.assert_close(site["value"], t2.trace.nodes[name]["value"])
                # the copy's q is the guide's own kind: a flow's keeps its stop-gradient score (a pickled
                # copy of constraints.real once wrapped it in a TransformedDistribution: stl/dreg failed under
                # ddp_spawn, whose workers get the guide pickled)
                assert type(t2.trace.nodes[name]["fn"]) is type(site["fn"])


@pytest.mark.parametrize("lazy", [False, True], ids=["example", "lazy"])
@pytest.mark.parametrize("name", list(GUIDES))
def test_every_guide_trains_in_float64_on_a_user_model_and_survives_copies(name, lazy):
    """A user-written Pyro model; the guide built with example= (float32 rows) or set up inside fit, before the
    cast to float64. Flows also train with stl (their stop-gradient twins are evaluated in float64 too)."""
    x = _lg_data()
    guide = GUIDES[name](_user_model, None if lazy else (x[:2],))
    obj = "stl" if name.startswith(("flow", "auto_flow")) else "elbo"
    run = pv.fit(_user_model, guide, x, epochs=1, batch_size=50, dtype=torch.float64, objective=obj,
                 progress=False, figures=False)
    assert {p.dtype for p in guide.parameters()} == {torch.float64}
    assert math.isfinite(run.history[-1]["train_loss"]) and run.config["train"]["dtype"] == "float64"
    r = pv.evaluate(run, x[:20], k=10, seed=0, save=False)  # float32 rows in, scored in the run's float64
    assert math.isfinite(r["log_likelihood"]) and r["log_likelihood_mc_se"] is not None
    _copies_agree(guide, x[:5].double())


@pytest.mark.parametrize("name", list(GUIDES))
def test_every_guide_trains_in_float64_on_a_pyrovi_model_and_survives_copies(name, digits):
    model = pv.models.VAE(digits.shape, 2, hidden=(16,))
    guide = GUIDES[name](model, None)
    run = pv.fit(model, guide, digits, epochs=1, dtype=torch.float64, progress=False, figures=False)
    assert {p.dtype for p in list(model.parameters()) + list(guide.parameters())} == {torch.float64}
    assert math.isfinite(run.history[-1]["train_loss"])
    _copies_agree(guide, digits.test.x[:5].double())


def test_codebook_trains_in_float64_and_survives_copies(digits):
    model = pv.models.VQVAE(digits.shape, 8, code_dim=4, downsample=1, channels=8, image_shape=digits.image_shape)
    guide = pv.guides.Codebook(model)
    run = pv.fit(model, guide, digits, epochs=1, dtype=torch.float64, progress=False, figures=False)
    assert {p.dtype for p in guide.parameters()} == {torch.float64}
    assert math.isfinite(run.history[-1]["train_loss"])
    guide.eval()
    _copies_agree(guide, digits.test.x[:5].double())


# --------------------------------------------------------------------------- log-likelihood errors (item 6)

import statistics  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from pyrovi.evaluation import Tally  # noqa: E402


def test_mc_variance_is_the_delta_method_on_the_weights_whatever_the_chunks():
    g = torch.Generator().manual_seed(0)
    log_w = (torch.randn(400, 3, generator=g, dtype=torch.float64) * torch.tensor([0.1, 1.0, 3.0])) - 500.0
    w = (log_w - log_w.max(0).values).exp()  # scale-free: the formula uses normalized weights
    K = log_w.shape[0]
    direct = w.var(0, unbiased=True) / (K * w.mean(0) ** 2)  # Var(w)/(K wbar^2), sample variance over K-1
    for chunks in (1, 3, 7):
        t = Tally()
        t.k = K
        for part in log_w.chunk(chunks, 0):
            t.lse2 = torch.logaddexp(t.lse2, torch.logsumexp(2 * part, 0)) if t.lse2 is not None \
                else torch.logsumexp(2 * part, 0)
            t.lse = torch.logaddexp(t.lse, torch.logsumexp(part, 0)) if t.lse is not None \
                else torch.logsumexp(part, 0)
        torch.testing.assert_close(t.mc_variance(), direct, rtol=1e-9, atol=1e-12)
    t = Tally()
    t.k, t.lse, t.lse2 = 1, log_w[0], 2 * log_w[0]
    assert t.mc_variance() is None  # one draw: no spread to estimate


def test_evaluate_names_both_errors_and_the_mc_one_predicts_the_seed_spread(digits, one_thread):
    """log_likelihood_mc_se matches the spread of log_likelihood over evaluation seeds (to the noise of 8
    seeds); the spread over datapoints (the former log_likelihood_se) is another, much larger, number."""
    pyro.set_rng_seed(0)
    model = pv.models.VAE(digits.shape, 4, hidden=(32,))
    run = pv.fit(model, None, digits, epochs=3, seed=0, progress=False, figures=False)
    test = digits.test.x[:100]
    res = [pv.evaluate(run, test, k=50, seed=s, save=False) for s in range(8)]
    sd = statistics.stdev(r["log_likelihood"] for r in res)
    mc = statistics.mean(r["log_likelihood_mc_se"] for r in res)
    assert 0.4 < mc / sd < 2.5, (mc, sd)
    r = res[0]
    assert r["log_likelihood_se"] == r["log_likelihood_se_over_data"]  # former name, same number
    assert r["log_likelihood_se_over_data"] == pytest.approx(r["log_likelihood_sd_over_data"] / 10)
    assert r["log_likelihood_se_over_data"] > 5 * r["log_likelihood_mc_se"]
    assert pv.evaluate(run, test, k=1, seed=0, save=False)["log_likelihood_mc_se"] is None


def test_point_mass_guides_have_no_monte_carlo_error(digits, one_thread):
    model = pv.models.VAE(digits.shape, 2, hidden=(16,))
    run = pv.fit(model, pv.guides.Delta(model, hidden=(16,)), digits, epochs=1, progress=False, figures=False)
    r = pv.evaluate(run, digits.test.x[:20], k=10, seed=0, save=False)
    assert r["log_likelihood_mc_se"] == 0.0 and r["log_likelihood_sd_over_data"] > 0
