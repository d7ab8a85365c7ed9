"""Mixture and Flow guides: shapes under vectorized particles, pathwise gradients, inverses, configs."""

import math

import pytest
import torch

import pyrovi as pv
from pyrovi.guides.flow import FLOWS, FlowHead
from pyrovi.guides.mixture import DiagNormalMixture, stratified
from pyrovi.objectives import iw_bound
from pyrovi.weights import log_weights


pytestmark = pytest.mark.usefixtures("one_thread")


def _vae():
    return pv.models.VAE(12, latent_dim=3, hidden=(16,))


def _guides(model):
    yield pv.guides.Mixture(model, components=3, hidden=(16,))
    for flow in FLOWS:
        yield pv.guides.Flow(model, flow=flow, depth=2, hidden=(16,))


@pytest.mark.parametrize("objective", ["elbo", "meanfield", "iwae", "stl", "dreg"])
def test_guides_train_step_under_vectorized_particles(objective):
    model = _vae()
    x = (torch.rand(5, 12) < 0.5).float()
    for guide in _guides(model):
        loss = pv.objectives.get(objective, particles=4)(model, guide, x)
        assert loss.shape == () and torch.isfinite(loss)
        loss.backward()
        grads = [p.grad for p in guide.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), type(guide).__name__
        assert sum(float(g.abs().sum()) for g in grads) > 0
        lw = log_weights(model, guide, x, particles=4)
        assert lw.log_w.shape == (4, 5) and lw.per_datapoint
        z = lw.guide_trace.nodes["z"]["value"]
        assert z.shape == (4, 5, 3)


def test_flow_log_q_is_change_of_variables():
    """log q(z) of a drawn z equals log N(u0) - sum log|det J_k|, recomputed by hand from the base draw."""
    torch.manual_seed(0)
    for flow in FLOWS:
        head = FlowHead(6, 3, flow=flow, depth=3)
        q, _ = head(torch.randn(4, 6))
        u = q.base_dist.rsample((2,))  # (2, 4, 3)
        z, logdet = u, 0.0
        for t in q.transforms:
            y = t(z)
            logdet = logdet + t.log_abs_det_jacobian(z, y)
            z = y
        expected = q.base_dist.log_prob(u) - logdet
        torch.testing.assert_close(q.log_prob(z), expected)


@pytest.mark.parametrize("flow", FLOWS)
def test_stop_gradient_score_reads_the_draw(flow):
    """The score of q's own draw: log q bit for bit, gradient to z only, J^{-T} grad_u (no inversion)."""
    torch.manual_seed(1)
    head = FlowHead(5, 3, flow=flow, depth=3).double()
    h = torch.randn(2, 5, dtype=torch.float64)
    q, q_sg = head(h)
    z = q.rsample((3,))  # (3, 2, 3)
    zz = z.detach().clone().requires_grad_(True)  # a copy of the draw, as DReG scores it
    lp = q_sg.log_prob(zz)
    assert torch.equal(lp.detach(), q.log_prob(z).detach())  # the same numbers, the same operations
    (g_z,) = torch.autograd.grad(lp.sum(), zz)
    assert all(p.grad is None for p in head.parameters())  # detached weights: nothing reaches them
    u0 = q.draw.us[0]

    def forward(u):  # the whole flow for all draws (each draw's output reads only its own input)
        for t in q.transforms:
            u = t(u)
        return u

    for s in range(3):
        for b in range(2):
            def one(v, s=s, b=b):
                u = u0.clone()
                u[s, b] = v
                return forward(u)[s, b]

            v = u0[s, b].clone().requires_grad_(True)
            J = torch.autograd.functional.jacobian(one, v, create_graph=True)
            base = torch.distributions.Normal(q.base_dist.base_dist.loc[b].detach(),
                                              q.base_dist.base_dist.scale[b].detach())
            (g_u,) = torch.autograd.grad(base.log_prob(v).sum() - torch.linalg.slogdet(J)[1], v)
            torch.testing.assert_close(g_z[s, b], torch.linalg.solve(J.detach().T, g_u), rtol=1e-9, atol=1e-10)
    with pytest.raises(RuntimeError, match="own last draw"):
        q_sg.log_prob(torch.zeros(4, 2, 3, dtype=torch.float64))  # not the draw: refused, never inverted


@pytest.mark.parametrize("dim", [1, 2])
def test_mixture_pathwise_gradient_is_unbiased(dim):
    """d/dphi E_q[f(z)] by pathwise Monte Carlo vs the closed form, for f(z) = sum sin(2z) + z^2.

    Per component, E[sin(2z) + z^2] = exp(-2 s^2) sin(2 mu) + mu^2 + s^2 per coordinate.
    Tolerance: 5 Monte-Carlo standard errors, estimated from 20 independent batches.
    """
    torch.manual_seed(2)
    locs = torch.randn(3, dim).requires_grad_(True)
    scales = (torch.rand(3, dim) + 0.5).requires_grad_(True)
    logits = torch.randn(3).requires_grad_(True)
    params = [locs, scales, logits]

    def f(z):
        return (torch.sin(2 * z) + z ** 2).sum(-1)

    batches = []
    for _ in range(20):
        z = DiagNormalMixture(locs, scales, logits).rsample((20000,))
        batches.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(f(z).mean(), params)]))
    g = torch.stack(batches)  # (20, P)
    mean, se = g.mean(0), g.std(0) / math.sqrt(g.shape[0])
    pi = torch.softmax(logits, 0)
    comp = (torch.exp(-2 * scales ** 2) * torch.sin(2 * locs) + locs ** 2 + scales ** 2).sum(-1)
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad((pi * comp).sum(), params)])
    assert ((mean - exact).abs() <= 5 * se + 1e-6).all(), (mean, exact, se)


def test_stratified_draws_give_unbiased_values_and_gradients():
    """The stratified estimator (1/S) sum_s rho_s f(z_s), rho_s = C pi_c(s), against the same closed form as above.

    Batch (S, N): S = 6 particles (two per component) on dim -2, N = 20000 independent replicates on dim -1.
    Tolerance: 5 Monte-Carlo standard errors from 20 independent batches.
    """
    torch.manual_seed(4)
    C, dim, S, N = 3, 2, 6, 20000
    locs = torch.randn(C, dim).requires_grad_(True)
    scales = (torch.rand(C, dim) + 0.5).requires_grad_(True)
    logits = torch.randn(C).requires_grad_(True)
    params = [locs, scales, logits]

    def f(z):
        return (torch.sin(2 * z) + z ** 2).sum(-1)

    values, batches = [], []
    for _ in range(20):
        d = DiagNormalMixture(locs, scales, logits).expand((S, N))
        with stratified(rank=2):
            z = d.rsample()  # (S, N, dim)
        est = (d.log_stratum.exp() * f(z)).mean(0)  # (N,)
        values.append(est.mean().detach())
        batches.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(est.mean(), params)]))
    g, v = torch.stack(batches), torch.stack(values)
    pi = torch.softmax(logits, 0)
    comp = (torch.exp(-2 * scales ** 2) * torch.sin(2 * locs) + locs ** 2 + scales ** 2).sum(-1)
    exact_value = (pi * comp).sum()
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(exact_value, params)])
    assert abs(float(v.mean() - exact_value.detach())) <= 5 * float(v.std()) / math.sqrt(20)
    mean, se = g.mean(0), g.std(0) / math.sqrt(g.shape[0])
    assert ((mean - exact).abs() <= 5 * se + 1e-6).all(), (mean, exact, se)


def test_stratified_draws_visit_every_component_equally_and_only_under_the_context():
    torch.manual_seed(5)
    locs = torch.tensor([[-100.0], [0.0], [100.0]])  # far apart: a draw's component is read off its sign/size
    d = DiagNormalMixture(locs, torch.ones(3, 1), torch.tensor([2.0, 0.0, -2.0])).expand((6, 50))
    with stratified(rank=2):
        z = d.rsample()[..., 0]  # (6, 50)
    which = torch.bucketize(z, torch.tensor([-50.0, 50.0]))  # component index per draw
    for c in range(3):
        assert ((which == c).sum(0) == 2).all()  # 6 particles, 3 components: each exactly twice per datapoint
    pi = torch.softmax(torch.tensor([2.0, 0.0, -2.0]), 0)
    torch.testing.assert_close(d.log_stratum, math.log(3) + pi.log()[which])
    plain = DiagNormalMixture(locs, torch.ones(3, 1), torch.tensor([2.0, 0.0, -2.0])).expand((6, 50))
    plain.rsample()
    assert plain.log_stratum is None  # outside the context: ordinary draws from q


def test_mixture_elbo_is_estimated_stratified_with_the_same_expectation():
    """objectives' ELBO for a Mixture guide (stratified) and the plain ELBO of the same q agree in expectation."""
    model = pv.models.LinearGaussian(torch.tensor([[1.0, 0.5], [0.3, 1.0], [0.8, -0.6]]), sigma=0.7)
    torch.manual_seed(6)
    guide = pv.guides.Mixture(model, components=3, hidden=(8,))
    x = model.sample_data(64, seed=1)
    with torch.no_grad():
        strat = torch.stack([-pv.objectives.get("elbo")(model, guide, x) for _ in range(200)])
        plain = torch.stack([iw_bound(log_weights(model, guide, x, particles=3), alpha=1.0) for _ in range(200)])
    se = math.sqrt(strat.var() / 200 + plain.var() / 200)
    assert abs(float(strat.mean() - plain.mean())) < 4 * se, (strat.mean(), plain.mean(), se)
    # Weights start equal (1/C), so the draws are allocated proportionally to pi and stratifying cannot add
    # variance; it removes the between-component part.
    assert strat.var() < plain.var()


def test_mixture_1d_samples_have_the_mixture_distribution():
    torch.manual_seed(3)
    d = DiagNormalMixture(torch.tensor([[-2.0], [1.0]]), torch.tensor([[0.5], [1.0]]), torch.tensor([0.0, 1.0]))
    z = d.rsample((100000,))[:, 0]
    pi = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    mean = float(pi[0] * -2 + pi[1] * 1)
    second = float(pi[0] * (4 + 0.25) + pi[1] * (1 + 1))
    sd = math.sqrt(second - mean ** 2)
    assert abs(float(z.mean()) - mean) < 5 * sd / math.sqrt(len(z))


def test_configs_rebuild_the_same_guide():
    model = _vae()
    x = torch.rand(4, 12)
    for guide in list(_guides(model)) + [pv.guides.Mixture(model, components=2, learn_weights=False, hidden=(16,))]:
        cfg = guide.config()
        import json

        json.dumps(cfg)  # JSON-able
        again = pv.guides.build(model, cfg)
        assert type(again) is type(guide) and again.config() == cfg
        again.load_state_dict(guide.state_dict())
        q1, q2 = guide.distributions(x)["z"], again.distributions(x)["z"]
        z = q1.sample()
        torch.testing.assert_close(q1.log_prob(z), q2.log_prob(z))


def test_bad_options_raise_clear_errors():
    model = _vae()
    with pytest.raises(pv.ConfigError, match="valid flows"):
        pv.guides.Flow(model, flow="maf")
    with pytest.raises(pv.ConfigError, match="depth"):
        pv.guides.Flow(model, depth=0)
    with pytest.raises(pv.ConfigError, match="components"):
        pv.guides.Mixture(model, components=0)
    with pytest.raises(pv.ConfigError, match="valid guides"):
        pv.guides.build(model, {"name": "flows"})
    with pytest.raises(pv.ConfigError, match="do not fit"):
        pv.guides.build(model, {"name": "mixture", "depth": 3})


def test_fit_save_load_roundtrip_with_flow_guide(digits, tmp_path):
    model = pv.models.VAE(digits.shape, latent_dim=2, hidden=(32,))
    guide = pv.guides.Flow(model, flow="iaf", depth=2, hidden=(32,))
    run = pv.fit(model, guide, digits, objective="dreg", particles=3, epochs=1, out=tmp_path / "run",
                 progress=False, figures=False)
    loaded = pv.load_run(tmp_path / "run")
    assert loaded.config["guide"]["name"] == "flow" and loaded.config["objective"]["name"] == "dreg"
    x = digits.test.x[:8]
    z = run.guide.distributions(x)["z"].sample()
    with torch.no_grad():
        torch.testing.assert_close(loaded.guide.distributions(x)["z"].log_prob(z), run.guide.distributions(x)["z"].log_prob(z))


@pytest.mark.parametrize("beta", [1.0, 0.5])
@pytest.mark.parametrize("name", ["elbo", "stl"])
@pytest.mark.parametrize("fast", [True, False])
def test_mixture_draws_are_stratified_on_every_path_and_beta(monkeypatch, name, fast, beta):
    """A Mixture guide's ELBO/STL draws are stratified over its components on the fast and the traced path, also
    under a KL weight beta != 1 (the traced path wraps model and guide to scale the latents; the wrapper used to
    hide the guide's components, so those draws were plain)."""
    model = pv.models.LinearGaussian(torch.tensor([[1.0, 0.5], [0.3, 1.0], [0.8, -0.6]]), sigma=0.7)
    torch.manual_seed(6)
    guide = pv.guides.Mixture(model, components=3, hidden=(8,))
    x = model.sample_data(16, seed=1)
    seen, real = [], DiagNormalMixture.rsample

    def spy(self, *a, **k):
        z = real(self, *a, **k)
        seen.append(self.log_stratum is not None)
        return z

    monkeypatch.setattr(DiagNormalMixture, "rsample", spy)
    obj = pv.objectives.get(name, particles=2)
    obj.fast = fast
    loss = obj.loss(model, guide, (x,), beta=beta)
    assert obj.path_counts == {"fast": int(fast), "traced": int(not fast)}
    assert seen and all(seen)  # every draw of q stratified
    assert torch.isfinite(loss)
