"""Pyro code as users write it: val_fraction=0, 1-D data, optimizers by name, diagnose with any y,
unsized data plates, semi-supervised data with extra loss terms (docs/which-pyro-code.md)."""

import json
import os

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyrovi as pv
from pyrovi.cli import main
from pyrovi.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def _mean_model(x):
    """Unknown mean of scalar data: one global latent, the GMM-tutorial data shape (N,)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)


def _mean_guide(x):
    loc = pyro.param("loc", torch.tensor(0.0))
    scale = pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
    pyro.sample("mu", dist.Normal(loc, scale))


def _scalar_data(n=40):
    return 2.0 + torch.randn(n, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- val_fraction=0


def test_val_fraction_zero_keeps_every_row_and_stops_on_the_training_loss(tmp_path):
    x = torch.randn(30, 3, generator=torch.Generator().manual_seed(0))
    x1 = x.reshape(-1)
    run = pv.fit(_mean_model, _mean_guide, x1, val_fraction=0, epochs=3, batch_size=None, lr=0.05,
                 patience=1, progress=False, figures=False, out=str(tmp_path / "r"))
    assert run.config["data"]["n_val"] == 0 and run.config["data"]["n_train"] == len(x1)
    assert run.metrics["val_loss_is"] == "train_loss"
    for h in run.history:
        assert h["val_loss"] == h["train_loss"]
    assert run.metrics["val_loss"] == min(h["train_loss"] for h in run.history)
    with pytest.raises(ConfigError, match=r"val_fraction must be in \[0, 1\)"):
        pv.fit(_mean_model, _mean_guide, x1, val_fraction=-0.1, progress=False, figures=False)


def test_cli_val_fraction_zero(tmp_path):
    out = str(tmp_path / "run")
    assert main(["train", "--epochs", "1", "--latent-dim", "2", "--hidden", "8", "--out", out, "--no-progress",
                 "--val-fraction", "0"]) == 0
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["data"]["n_val"] == 0 and cfg["train"]["val_fraction"] == 0
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["val_loss_is"] == "train_loss"


# --------------------------------------------------------------------------- 1-D data


def _local_guide(x):
    a = pyro.param("a", torch.tensor(0.0))
    s = pyro.param("s", torch.tensor(1.0), constraint=dist.constraints.positive)
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(a * x, s))


def test_one_d_vector_is_n_items_passed_as_given(tmp_path):
    x = 2.0 ** 0.5 * torch.randn(400, generator=torch.Generator().manual_seed(1))  # x ~ N(0, 2)
    shapes = []

    def model(data):  # z ~ N(0, 1), x | z ~ N(z, 1): posterior z | x = N(x/2, 1/2), p(x) = N(0, 2)
        shapes.append(tuple(data.shape))
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=data)

    run = pv.fit(model, _local_guide, x, val_fraction=0.25, epochs=30, batch_size=50, lr=0.05, progress=False,
                 figures=False, out=str(tmp_path / "r"))
    assert (50,) in shapes and all(len(s) == 1 for s in shapes)
    assert run.config["data"]["shape"] == [] and run.config["data"]["n_train"] == 300
    with run.scope():
        a, s = float(pyro.param("a").detach()), float(pyro.param("s").detach())
    assert abs(a - 0.5) < 0.1 and abs(s - 0.5 ** 0.5) < 0.1  # SGD noise of 30 epochs at lr 0.05
    exact = float(dist.Normal(0.0, 2.0 ** 0.5).log_prob(x[:100]).mean())
    m = pv.evaluate(run, x[:100], k=64, progress=False)
    assert abs(m["log_likelihood"] - exact) < 0.05  # a near-exact guide: IWAE is log p(x) up to MC noise
    loaded = pv.load_run(str(tmp_path / "r"), model=model, guide=_local_guide)
    assert abs(pv.evaluate(loaded, x[:100], k=64, progress=False)["log_likelihood"] - exact) < 0.05
