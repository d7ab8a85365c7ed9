"""Every objective honours ``data_plate``: a model whose plate over datapoints is called "batch" gets the
same bound as the same model with the plate called "data", and IWAE approaches the exact log p(x).

The model is linear Gaussian, z ~ N(0, I_2), x | z ~ N(W z + b, 0.5^2 I_3), so
p(x) = N(b, W W^T + 0.5^2 I) is known in closed form. The guide is a deliberately
imperfect diagonal Gaussian (shrunk mean, widened scale), so the ELBO sits visibly
below log p(x) and the importance-weighted bounds have room to close the gap.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyrovi as pv
from pyrovi.objectives import iw_bound
from pyrovi.weights import log_weights

pytestmark = pytest.mark.usefixtures("one_thread")

W = torch.tensor([[1.0, -0.5], [0.3, 0.8], [-0.7, 0.4]])  # (3, 2)
B = torch.tensor([0.2, -0.1, 0.5])  # (3,)
SIGMA = 0.5
EPS32 = torch.finfo(torch.float32).eps  # relative rounding error of one float32 operation
OBJECTIVES = [("elbo", {}), ("meanfield", {}), ("iwae", {}), ("renyi", {"alpha": 0.5}), ("stl", {}), ("dreg", {})]


def _guide_params():
    """Guide parameters near the exact posterior q*(z|x) = N(A* (x - b), Sigma): mean shrunk, scale widened."""
    precision = torch.eye(2) + W.T @ W / SIGMA ** 2
    cov = torch.linalg.inv(precision)  # (2, 2)
    A = 0.8 * cov @ W.T / SIGMA ** 2  # (2, 3)
    return {"A": A.clone().requires_grad_(), "c": (0.1 - A @ B).detach().clone().requires_grad_(),
            "log_s": (cov.diagonal().sqrt() * 1.3).log().clone().requires_grad_()}


def make_pair(plate: str, params: dict):
    """Model and guide with their plate over datapoints named ``plate``; ``params``: the guide's tensors."""

    def model(x):
        with pyro.plate(plate, x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))  # (S, B, 2) under particles
            pyro.sample("x", dist.Normal(z @ W.T + B, SIGMA).to_event(1), obs=x)

    def guide(x):
        with pyro.plate(plate, x.shape[0]):
            loc = x @ params["A"].T + params["c"]  # (B, 2)
            pyro.sample("z", dist.Normal(loc, params["log_s"].exp()).to_event(1))

    return model, guide


def exact_log_px(x: torch.Tensor) -> torch.Tensor:
    """log p(x) per row, ``(B,)``: p(x) = N(b, W W^T + sigma^2 I)."""
    return dist.MultivariateNormal(B, W @ W.T + SIGMA ** 2 * torch.eye(3)).log_prob(x)


def data(n: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g)
    return z @ W.T + B + SIGMA * torch.randn(n, 3, generator=g)  # (n, 3)


def _objective(name, options, data_plate, particles):
    obj = pv.objectives.get(name, particles=particles, **options)
    obj.max_plate_nesting = 1  # as fit sets it
    obj.data_plate = data_plate
    return obj


def _value_and_grad(name, options, plate, data_plate, x, seed, particles=16):
    params = _guide_params()
    model, guide = make_pair(plate, params)
    pyro.set_rng_seed(seed)
    loss = _objective(name, options, data_plate, particles)(model, guide, x)
    grads = torch.autograd.grad(loss, list(params.values()))
    return loss.detach(), torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("name, options", OBJECTIVES, ids=[n for n, _ in OBJECTIVES])
def test_objective_is_the_same_whatever_the_data_plate_is_called(name, options):
    """Same seed, same draws: the value and the gradient agree to float32 rounding between the two namings."""
    x = data()
    v_data, g_data = _value_and_grad(name, options, "data", "data", x, seed=1)
    v_batch, g_batch = _value_and_grad(name, options, "batch", "batch", x, seed=1)
    terms = 16 * x.shape[0] * 5  # particles x datapoints x numbers summed per log weight (3 for x, 2 for z)
    rtol = 4 * EPS32 * terms  # 3e-4: worst-case rounding of two float32 sums of `terms` numbers
    torch.testing.assert_close(v_batch, v_data, rtol=rtol, atol=0)
    torch.testing.assert_close(g_batch, g_data, rtol=rtol, atol=rtol * float(g_data.abs().max()))
    # and not by luck: other draws give a value that differs by more than the tolerance
    v_other, _ = _value_and_grad(name, options, "data", "data", x, seed=2)
    assert abs(float(v_other - v_data)) > 3 * rtol * abs(float(v_data))


@pytest.mark.parametrize("name, options", [o for o in OBJECTIVES if o[0] in ("iwae", "renyi", "dreg")],
                         ids=["iwae", "renyi", "dreg"])
def test_a_misnamed_data_plate_gives_the_looser_whole_batch_bound(name, options, capsys):
    """What data_plate fixes: told the wrong plate name, the "batch" model's weights are whole-batch ones
    (one log-sum-exp over the product of 256 rows' weights), a bound close to the ELBO instead of IWAE's."""
    x = data(256, seed=4)
    rows = x.shape[0]
    per_row = {}
    for data_plate in ("batch", "data"):
        model, guide = make_pair("batch", _guide_params())
        pyro.set_rng_seed(5)
        per_row[data_plate] = -float(_objective(name, options, data_plate, 64)(model, guide, x).detach()) / rows
    with capsys.disabled():
        print(f"\n{name}, K=64, plate 'batch', 256 rows: data_plate='batch' {per_row['batch']:.4f}, "
              f"data_plate='data' {per_row['data']:.4f} nats/row; exact {float(exact_log_px(x).mean()):.4f}")
    assert per_row["data"] < per_row["batch"] - 0.1  # measured: 0.40 (iwae, dreg), 0.21 (renyi) nats/row


def test_iwae_with_many_particles_approaches_exact_log_px(capsys):
    x = data()
    exact = float(exact_log_px(x).mean())
    rows = x.shape[0]
    bounds = {}
    for plate in ("data", "batch"):
        model, guide = make_pair(plate, _guide_params())
        for name in ("elbo", "iwae"):
            pyro.set_rng_seed(3)
            with torch.no_grad():
                bounds[(plate, name)] = -float(_objective(name, {}, plate, 5000)(model, guide, x)) / rows
    with capsys.disabled():
        print(f"\nexact log p(x) {exact:.4f} nats/row; K=5000: " +
              "; ".join(f"plate {p!r} {n} {v:.4f}" for (p, n), v in bounds.items()))
    for plate in ("data", "batch"):
        elbo, iwae = bounds[(plate, "elbo")], bounds[(plate, "iwae")]
        assert exact - elbo > 0.3  # the guide is imperfect: a gap to close
        assert abs(iwae - exact) < 0.01  # K = 5000 closes it (up to Monte Carlo noise, either side)
    assert bounds[("batch", "iwae")] == pytest.approx(bounds[("data", "iwae")], abs=1e-4)


def test_log_weights_per_datapoint_under_either_name():
    x = data()
    for plate in ("data", "batch"):
        model, guide = make_pair(plate, _guide_params())
        lw = log_weights(model, guide, x, particles=4, max_plate_nesting=1, data_plate=plate)
        assert lw.per_datapoint and lw.log_w.shape == (4, 8)
    lw = log_weights(*make_pair("batch", _guide_params()), x, particles=4, max_plate_nesting=1)  # plate not found
    assert not lw.per_datapoint and lw.log_w.shape == (4, 1)
    assert float(iw_bound(lw, alpha=1.0).detach()) == pytest.approx(float(lw.log_w.detach().mean()), rel=1e-6)


# --------------------------------------------------------------------------- through fit, evaluate and diagnose


def make_param_pair(plate: str):
    """``make_pair`` with the guide's tensors as ``pyro.param`` s, so ``fit`` finds and trains them."""
    init = {k: v.detach() for k, v in _guide_params().items()}

    def guide(x):
        p = {k: pyro.param(k, v) for k, v in init.items()}
        with pyro.plate(plate, x.shape[0]):
            pyro.sample("z", dist.Normal(x @ p["A"].T + p["c"], p["log_s"].exp()).to_event(1))

    return make_pair(plate, {})[0], guide


def _fit(plate: str, objective: str, x, instance: bool):
    model, guide = make_param_pair(plate)
    if instance:  # an Objective instance with data_plate set by hand: fit uses it as it is
        objective = pv.objectives.get(objective, particles=8)
        objective.data_plate = plate
    return pv.fit(model, guide, x, data_plate=plate, objective=objective, particles=8, epochs=2, batch_size=20,
                  lr=1e-2, seed=0, progress=False, figures=False)


@pytest.mark.parametrize("instance", [False, True], ids=["name", "instance"])
@pytest.mark.parametrize("objective", ["elbo", "meanfield", "iwae", "renyi", "stl", "dreg"])
def test_fit_evaluate_and_diagnose_honour_data_plate(objective, instance):
    x = data(100, seed=6)
    runs = {plate: _fit(plate, objective, x, instance) for plate in ("data", "batch")}
    assert runs["batch"].objective.data_plate == "batch"  # fit hands its data_plate to the objective
    a, b = (r.history for r in runs.values())
    assert len(a) == len(b) == 2
    for ha, hb in zip(a, b):  # 2 epochs of Adam from the same start on the same draws: equal to rounding
        assert hb["train_loss"] == pytest.approx(ha["train_loss"], rel=1e-4)
        assert hb["val_loss"] == pytest.approx(ha["val_loss"], rel=1e-4)
    x_test = data(16, seed=7)
    res = {plate: pv.evaluate(run, x_test, k=2000, save=False, seed=1) for plate, run in runs.items()}
    assert res["batch"]["log_likelihood"] == pytest.approx(res["data"]["log_likelihood"], rel=1e-4)
    assert abs(res["batch"]["log_likelihood"] - float(exact_log_px(x_test).mean())) < 0.05
    pytest.importorskip("arviz")
    diag = {plate: pv.diagnose(run, x_test, n=4, particles=64, save=False, warn=False) for plate, run in runs.items()}
    lw = {plate: d.sample_stats["log_weight"].values for plate, d in diag.items()}  # (1, 64, 4)
    assert lw["batch"].shape == (1, 64, 4)
    np = pytest.importorskip("numpy")
    np.testing.assert_allclose(lw["batch"], lw["data"], rtol=1e-4, atol=1e-4)
