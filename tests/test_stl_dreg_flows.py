"""STL and DReG train flow guides on a user-written Pyro model without diverging (issue 17, "Done when").

The model and the measurement are ``benchmarks/stl_flow_seeds.py``'s: ``x = W z + b + N(0, 0.5^2 I)``
with a 2-D latent whose posterior has correlation 0.9 and a closed-form evidence. The slow test is
the issue's criterion (10 initial-weight seeds, 2000 rows, 60 epochs, batch 100, lr 3e-3); the fast
one keeps two seeds of it on a small budget.
"""

import math
import sys
from pathlib import Path

import pyro
import pytest
import torch

import pyrovi as pv

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import stl_flow_seeds as lg  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_model_is_the_issues():
    assert lg.posterior_correlation() == pytest.approx(0.9, abs=1e-6)
    x = lg.data()
    assert len(x) - round(len(x) * lg.VAL) == 2000  # fit trains on 2000 rows
    # the closed-form evidence agrees with a Monte Carlo estimate of p(x) = E_{p(z)} p(x | z)
    torch.manual_seed(0)
    z = torch.randn(200_000, 2, dtype=torch.float64)
    mean = z @ lg.W.double().T + lg.B.double()  # (M, 3)
    ll = torch.distributions.Normal(mean, lg.SIGMA).log_prob(x[0].double()).sum(-1)
    mc = torch.logsumexp(ll, 0) - math.log(len(z))
    assert mc.item() == pytest.approx(lg.exact_log_px(x[:1]).item(), abs=0.02)


@pytest.mark.parametrize("guide,objective", [("iaf", "stl"), ("planar", "dreg")])
def test_two_seeds_train_without_divergence(guide, objective):
    """The fast version: two seeds, 400 rows, 15 epochs; no divergence, and the training loss comes down."""
    x = lg.data(440)
    for seed in (0, 1):
        # 60 steps: a warm start of 40 (the default 200 would cover them all), then 20 of the estimator itself
        # (with a warm start of 8, iaf + stl climbs from 19 to 36 nats in 16 steps: why the warm start exists)
        r = lg.run(guide, objective, seed, x, epochs=15, warm_start=40, eval_particles=50, eval_rows=100)
        assert not r["diverged"], r.get("error")
        assert math.isfinite(r["loss"]) and math.isfinite(r["gap"])
        assert r["loss"] < r["first_loss"], r


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["stl", "dreg"])
@pytest.mark.parametrize("guide", list(lg.GUIDES))
def test_ten_seeds_stl_and_dreg_on_flows(guide, objective):
    """Issue 17: stl and dreg (K=8) with Flow(iaf), Flow(planar), Auto(family="flow"), 10 of 10 seeds without
    divergence or late rise; stl + iaf within 0.05 nats of exact log p(x) for at least 8 of 10 (each case about
    ten minutes on one core; one case per test so that they can run in separate processes, ``-k iaf``)."""
    x = lg.data()
    rs = []
    for seed in range(10):
        rs.append(lg.run(guide, objective, seed, x))
        print(f"{guide} {objective} seed {seed}: {rs[-1]}", flush=True)  # the per-seed record (pytest -s)
    assert sum(r["diverged"] for r in rs) == 0, [r.get("error") for r in rs]
    # no late rise either (Pyro's planar layer: planar + stl seed 2 ended 2.9 nats above its best epoch,
    # planar + dreg seed 8 at 74 nats); healthy runs end within 0.07 nats of their best (benchmarks/RESULTS.md)
    assert max(r["loss"] - r["best_loss"] for r in rs) < 0.5, [(r["loss"], r["best_loss"]) for r in rs]
    if (guide, objective) == ("iaf", "stl"):
        gaps = [r["gap"] for r in rs]
        assert sum(gap <= 0.05 for gap in gaps) >= 8, gaps


def _guide_grads(obj, model, guide, x, seed):
    pyro.set_rng_seed(seed)
    loss = obj(model, guide, x)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(guide.parameters()))])


@pytest.mark.parametrize("name,plain", [("stl", "elbo"), ("dreg", "iwae")])
def test_warm_start_takes_the_plain_gradient_first(name, plain):
    model = pv.models.LinearGaussian(torch.tensor([[1.0, 0.8], [0.9, 1.0], [1.0, 1.1]]), learn=False)
    torch.manual_seed(0)
    flow = pv.guides.Flow(model, flow="planar", depth=2, hidden=(8,))
    x = model.sample_data(5, seed=1)
    obj = pv.objectives.get({"name": name, "warm_start": 2}, particles=3)
    assert obj.config()["warm_start"] == 2 and pv.objectives.get(obj.config()).warm_start == 2
    ref = pv.objectives.get(plain, particles=3)
    for step in range(3):
        g, g_plain = _guide_grads(obj, model, flow, x, step), _guide_grads(ref, model, flow, x, step)
        if step < 2:  # the same draws, the same surrogate: equal to float rounding
            torch.testing.assert_close(g, g_plain)
        else:  # its own estimator now: the score term is gone
            assert (g - g_plain).abs().max() > 1e-3 * g_plain.abs().max()
    with torch.no_grad():  # evaluation does not count as a step
        obj(model, flow, x)
    assert obj._steps == 3
    # under fit the loop says how many steps were taken: every call of that step agrees (no self-counting)
    for told, warm in ((1, True), (2, False)):
        obj.at_step(told)
        for call in range(2):
            g, g_plain = _guide_grads(obj, model, flow, x, call), _guide_grads(ref, model, flow, x, call)
            assert torch.allclose(g, g_plain) == warm


def test_automatic_warm_start_is_for_flows():
    model = pv.models.LinearGaussian(torch.tensor([[1.0, 0.8], [0.9, 1.0]]), learn=False)
    for guide, steps in ((pv.guides.Flow(model, flow="iaf", depth=1, hidden=(8,)), pv.objectives.FLOW_WARM_START),
                         (pv.guides.Auto(model, family="flow", depth=1, hidden=(8,)), pv.objectives.FLOW_WARM_START),
                         (pv.guides.DiagNormal(model, hidden=(8,)), 0)):
        for name in ("stl", "dreg"):
            obj = pv.objectives.get(name)
            assert obj._warm_steps == 0  # outside fit: starts at once
            obj.check_guide(guide)  # fit asks before training
            assert obj._warm_steps == steps
            assert "warm_start" not in obj.config()  # automatic: not pinned in a run's config
    with pytest.raises(pv.errors.ConfigError, match="warm_start"):
        pv.objectives.get("stl", warm_start=-1)


def test_planar_layer_keeps_its_determinant_away_from_zero():
    """The cause of planar + stl seed 2's late blow-up: Pyro's planar bound w.u_hat > -1 lets det J -> 0. pyrovi's
    layer keeps det J >= PLANAR_MIN_DET on every path (log|det J|, the STL score's solve, the inverse)."""
    from pyrovi.guides.flow import PLANAR_MIN_DET, InvertiblePlanar, _transpose_solve_step

    torch.manual_seed(0)
    w = torch.randn(500, 2, dtype=torch.float64)
    u = -30.0 * w  # w.u << -1: Pyro's u_hat gives w.u_hat = -1 + softplus(-30 |w|^2), det J ~ 1e-13 at w.x + b = 0
    b = torch.randn(500, 1, dtype=torch.float64)
    x = -b * w / w.pow(2).sum(-1, keepdim=True)  # w.x + b = 0: where the determinant is smallest
    t = InvertiblePlanar((b, u, w))
    wu = (w * t.u_hat(u, w)).sum(-1)
    torch.testing.assert_close(wu, PLANAR_MIN_DET - 1.0 + torch.nn.functional.softplus((w * u).sum(-1)))
    y = t(x)
    log_det = t.log_abs_det_jacobian(x, y)
    assert log_det.min().item() >= math.log(PLANAR_MIN_DET) - 1e-9
    torch.testing.assert_close(log_det, torch.log1p(wu))  # tanh' = 1 here: det J = 1 + w.u_hat
    # the STL/DReG score's J^{-T} step is bounded by 1 / PLANAR_MIN_DET (Sherman-Morrison with det >= 0.1)
    g = torch.randn(500, 2, dtype=torch.float64)
    v = _transpose_solve_step(None, t, None, x, g)
    assert (v.norm(dim=-1) / g.norm(dim=-1)).max().item() <= 1.0 / PLANAR_MIN_DET + 1e-6
    # the inverse (scoring an arbitrary z) uses the same u_hat: it recovers x
    torch.testing.assert_close(InvertiblePlanar((b, u, w))._inverse(y), x, atol=1e-8, rtol=1e-8)


def test_resumed_fit_keeps_counting_the_warm_start(tmp_path, ctrl_c_at_validation):
    """The warm start counts fit's steps, those before a checkpoint included: a resumed stl fit takes the same
    steps as the uninterrupted one (it used to start the warm start again). 15 warm steps of 50 cross the
    interruption after epoch 1 (10 steps an epoch)."""
    from pyrovi.checkpoint import load_tensors

    model = pv.models.LinearGaussian(torch.tensor([[1.0, 0.8], [0.9, 1.0], [1.0, 1.1]]), learn=False)
    x = model.sample_data(110, seed=1)

    def flow(seed=0):
        torch.manual_seed(seed)
        return pv.guides.Flow(model, flow="iaf", depth=2, hidden=(8,))

    kw = dict(objective={"name": "stl", "warm_start": 15}, epochs=5, batch_size=10, val_fraction=1 / 11, seed=0,
              progress=False, figures=False)
    g1 = flow()
    straight = pv.fit(model, g1, x, out=str(tmp_path / "a"), **kw)
    undo = ctrl_c_at_validation(2)  # Ctrl-C during epoch 2: the checkpoint of epoch 1 stays
    with pytest.raises(KeyboardInterrupt):
        pv.fit(model, flow(), x, out=str(tmp_path / "b"), **kw)
    undo()
    assert load_tensors(str(tmp_path / "b" / "checkpoint.safetensors"))[1]["loop"]["epoch"] == 1
    g3 = flow(seed=99)  # other initial weights: the checkpoint's replace them
    with pytest.warns(pv.errors.SeedWarning):
        resumed = pv.fit(model, g3, x, out=str(tmp_path / "b"), resume=True, **kw)
    # one process, one machine, the same kernels in the same order: the very same trajectory
    assert [h["train_loss"] for h in straight.history] == [h["train_loss"] for h in resumed.history]
    assert all(torch.equal(a, b) for a, b in zip(g1.state_dict().values(), g3.state_dict().values()))
