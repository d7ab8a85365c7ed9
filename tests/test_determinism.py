"""Same seed -> identical loss history on CPU; two runs in one process never share parameters."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import pyrovi as pv

X = np.random.default_rng(0).random((48, 6)).astype(np.float32)


def _run(seed, objective="elbo", particles=None, data=X):
    # Parameters are drawn when the model is built, from torch's global generator, so the
    # seed is set before building; fit(seed=...) then seeds particles and shuffling.
    pyro.set_rng_seed(seed)
    m = pv.models.VAE((6,), 3, hidden=(16,))
    g = pv.guides.DiagNormal(m, hidden=(16,))
    return pv.fit(m, g, data, objective=objective, particles=particles, epochs=3, batch_size=8, seed=seed,
                  progress=False, figures=False, device="cpu")


def _losses(run):
    return [(h["train_loss"], h["val_loss"]) for h in run.history]


@pytest.mark.parametrize("objective,particles", [("elbo", None), ("iwae", 4)])
def test_same_seed_identical_history(objective, particles):
    a, b = _run(0, objective, particles), _run(0, objective, particles)
    assert _losses(a) == _losses(b)  # exactly, not approximately
    sa, sb = a.state_tensors(), b.state_tensors()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_other_seed_other_history():
    """The control: the comparison above can fail."""
    assert _losses(_run(0)) != _losses(_run(1))


def test_history_does_not_depend_on_earlier_global_rng_use():
    torch.rand(1000)  # the user's own code draws random numbers in between
    a = _run(3)
    np.random.rand(10)
    torch.randn(7)
    assert _losses(a) == _losses(_run(3))


def test_two_runs_do_not_share_parameters():
    a = _run(0)
    before = {k: v.clone() for k, v in a.state_tensors().items()}
    b = _run(0, data=np.clip(X + 0.3, 0, 1))  # same architecture and seed, other data
    after = a.state_tensors()
    assert all(torch.equal(before[k], after[k]) for k in before)  # training b left a alone
    assert any(not torch.equal(after[k], v) for k, v in b.state_tensors().items())
    assert set(id(p) for p in a.model.parameters()).isdisjoint(id(p) for p in b.model.parameters())
    assert len(pyro.get_param_store()) == 0  # nothing leaked into the global store


def _lin_model(x):
    loc = pyro.param("loc", torch.zeros(x.shape[-1]))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))  # (S?, B)
        pyro.sample("x", dist.Normal(loc + z.unsqueeze(-1), 1.0).to_event(1), obs=x)


def _lin_guide(x):
    m = pyro.param("m", torch.zeros(()))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(m, 1.0))


def test_plain_pyro_functions_with_same_param_names_stay_apart():
    """Two fits of code using the same pyro.param names, and the user's own global store, stay apart."""
    pyro.get_param_store().clear()
    pyro.param("loc", torch.full((6,), 42.0))  # the user's own global parameter of that name
    data_a, data_b = torch.as_tensor(X) * 4, torch.as_tensor(X) * 4 - 3
    kw = dict(epochs=30, batch_size=16, lr=0.1, progress=False, figures=False, device="cpu")
    a = pv.fit(_lin_model, _lin_guide, data_a, **kw)
    loc_a = a.param_state["params"]["loc"].detach().clone()
    b = pv.fit(_lin_model, _lin_guide, data_b, **kw)
    loc_b = b.param_state["params"]["loc"].detach()
    assert torch.equal(a.param_state["params"]["loc"].detach(), loc_a)
    # each learned its own data's mean (the MLE of loc is the mean of the 43 training rows): allow
    # 4 standard errors between that and the all-rows mean, plus 0.1 of Adam jitter at lr=0.1
    tol = float(4 * data_a.std(0).max() / np.sqrt(43)) + 0.1
    assert torch.allclose(loc_a, data_a.mean(0), atol=tol) and torch.allclose(loc_b, data_b.mean(0), atol=tol)
    assert (loc_a - loc_b).abs().min() > 2
    assert torch.equal(pyro.param("loc").detach(), torch.full((6,), 42.0))  # untouched
