"""Pyro code as users write it: val_fraction=0, 1-D data, optimizers by name, diagnose with any y,
unsized data plates, semi-supervised data with extra loss terms (docs/which-pyro-code.md)."""

import json
import math
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


# --------------------------------------------------------------------------- semi-supervised


def _cat(*ts):
    """Concatenate on the last dim, broadcasting the batch dims (particles on the left), as Pyro's MLP does."""
    batch = torch.broadcast_shapes(*(t.shape[:-1] for t in ts))
    return torch.cat([t.expand(batch + t.shape[-1:]) for t in ts], -1)


class TinyM2(torch.nn.Module):
    """Pyro's SS-VAE M2 in miniature: y one-hot, observed when given, inferred by q(y|x) when not."""

    def __init__(self, d=6, k=3, z=2):
        super().__init__()
        self.k, self.z = k, z
        self.enc_y = torch.nn.Linear(d, k)
        self.enc_z = torch.nn.Linear(d + k, 2 * z)
        self.dec = torch.nn.Linear(z + k, d)
        self.calls = []

    def model(self, xs, ys=None):
        self.calls.append(None if ys is None else ys.clone())
        pyro.module("m2", self)
        b = xs.shape[0]
        with pyro.plate("data"):  # no size, as Pyro's SS-VAE writes it
            zs = pyro.sample("z", dist.Normal(xs.new_zeros(b, self.z), 1.0).to_event(1))
            ys = pyro.sample("y", dist.OneHotCategorical(xs.new_ones(b, self.k) / self.k), obs=ys)
            pyro.sample("x", dist.Bernoulli(logits=self.dec(_cat(zs, ys))).to_event(1), obs=xs)

    def guide(self, xs, ys=None):
        with pyro.plate("data"):
            if ys is None:
                ys = pyro.sample("y", dist.OneHotCategorical(logits=self.enc_y(xs)))
            loc, log_s = self.enc_z(_cat(xs, ys)).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_s.exp()).to_event(1))

    def aux_loss(self, xs, ys):
        """alpha * -log q(y|x) summed over the labelled rows (the M2 auxiliary classifier loss)."""
        return -50.0 * dist.OneHotCategorical(logits=self.enc_y(xs)).log_prob(ys).sum()


def _semi_data(n=40, d=6, k=3, labelled=10):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(n, d, generator=g) < 0.5).float()
    y = torch.nn.functional.one_hot(torch.arange(n) % k, k).float()
    y[labelled:] = float("nan")  # missing labels: rows of NaN
    return x, y


def test_semi_supervised_calls_model_with_and_without_y_and_trains_the_aux_term(tmp_path):
    from pyrovi.loop import BatchLoss, Parts
    from pyrovi.objectives import get

    x, y = _semi_data()
    m2 = TinyM2()
    run = pv.fit(m2.model, m2.guide, (x, y), semi_supervised=True, extra_loss=m2.aux_loss, epochs=2, batch_size=8,
                 val_fraction=0.25, progress=False, figures=False, out=str(tmp_path / "r"))
    given = [c for c in m2.calls if c is not None]
    assert given and any(c is None for c in m2.calls)
    assert all(bool(torch.isfinite(c).all()) and bool((c.sum(-1) == 1).all()) for c in given)  # never a marker
    assert run.config["train"]["semi_supervised"] and run.config["train"]["extra_loss"] == "TinyM2.aux_loss"
    # the aux term is what trains q(y|x) on labelled rows: the bound alone never calls enc_y on them
    xl, yl = x[:8], y[:8]
    for extra in (None, m2.aux_loss):
        m2.zero_grad()
        with run.scope():
            BatchLoss(Parts(get("elbo"), semi_supervised=True, extra_loss=extra), m2.model, m2.guide,
                      global_sites=False, pass_y=True)(xl, yl).backward()
        g = m2.enc_y.weight.grad
        if extra is None:
            assert g is None or float(g.abs().sum()) == 0.0
        else:  # d/dW of 50 * mean_rows(-log softmax(W x + b)[y]) / 1: nonzero for non-constant x
            assert float(g.abs().sum()) > 1.0
    # resume refuses a fit without the run's extra loss, naming it
    with pytest.raises(ConfigError, match="extra_loss=None"):
        pv.fit(m2.model, m2.guide, (x, y), semi_supervised=True, epochs=3, batch_size=8, val_fraction=0.25,
               progress=False, figures=False, out=str(tmp_path / "r"), resume=True)
    resumed = pv.fit(m2.model, m2.guide, (x, y), semi_supervised=True, extra_loss=m2.aux_loss, epochs=3,
                     batch_size=8, val_fraction=0.25, progress=False, figures=False, out=str(tmp_path / "r"),
                     resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]


def test_semi_supervised_errors_name_the_cause():
    x, y = _semi_data()
    y[12, 0] = 1.0  # a row half NaN
    m2 = TinyM2()
    with pytest.raises(pv.errors.DataError, match="partly NaN"):
        pv.fit(m2.model, m2.guide, (x, y), semi_supervised=True, progress=False, figures=False)
    with pytest.raises(pv.errors.DataError, match="no labels"):
        pv.fit(m2.model, m2.guide, x, semi_supervised=True, progress=False, figures=False)
    with pytest.raises(ConfigError, match="takes no y"):
        pv.fit(lambda x: m2.model(x), m2.guide, _semi_data(), semi_supervised=True, progress=False, figures=False)


# --------------------------------------------------------------------------- optimizers


def _vae_like(x):
    """A tiny amortized model on (N, 3) data (local latents only), for the optimizer matrix."""
    dec = pyro.param("w", torch.ones(3))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(z[:, None] * dec, 1.0).to_event(1), obs=x)


def _vae_like_guide(x):
    a = pyro.param("a", torch.zeros(3))
    s = pyro.param("s", torch.tensor(1.0), constraint=dist.constraints.positive)
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(x @ a, s))


_X3 = torch.randn(40, 3, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("optimizer,kwargs", [
    ("adamw", {"weight_decay": 0.01}), ("SGD", {"momentum": 0.9}), ("sgd", None), (torch.optim.RMSprop, None),
    ("adagrad", None), ("clippedadam", {"clip_norm": 5.0, "lrd": 0.999}), ("adam", {"betas": [0.8, 0.99]}),
])
def test_optimizer_by_name_or_class_records_and_resumes(tmp_path, optimizer, kwargs):
    from pyrovi.train_state import optimizer_class

    out = str(tmp_path / "r")
    kw = dict(epochs=1, batch_size=10, lr=0.01, progress=False, figures=False, out=out, optimizer=optimizer,
              optimizer_kwargs=kwargs)
    run = pv.fit(_vae_like, _vae_like_guide, _X3, **kw)
    name, cls = optimizer_class(optimizer)
    assert run.config["train"]["optimizer"] == name and run.config["train"]["optimizer_kwargs"] == kwargs
    kw["epochs"] = 2
    resumed = pv.fit(_vae_like, _vae_like_guide, _X3, resume=True, **kw)  # check_checkpoint passes its state
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert pv.load_run(out, model=_vae_like, guide=_vae_like_guide).config["train"]["optimizer"] == name
    with pytest.raises(ConfigError, match="optimizer="):
        pv.fit(_vae_like, _vae_like_guide, _X3, **dict(kw, optimizer="adam" if name != "adam" else "sgd",
                                                      optimizer_kwargs=None, epochs=3), resume=True)


def test_optimizer_errors_and_the_default_stays_fused_adam(tmp_path):
    from pyrovi.train import TrainConfig
    from pyrovi.train_state import make_optimizer

    with pytest.raises(ConfigError, match="unknown optimizer 'adamax'; valid optimizers: adagrad, adam, adamw"):
        pv.fit(_vae_like, _vae_like_guide, _X3, optimizer="adamax", progress=False, figures=False)
    with pytest.raises(ConfigError, match="SGD does not take optimizer_kwargs"):
        pv.fit(_vae_like, _vae_like_guide, _X3, optimizer="sgd", optimizer_kwargs={"betas": [0.9, 0.9]},
               progress=False, figures=False)
    with pytest.raises(ConfigError, match="weight_decay is given twice"):
        pv.fit(_vae_like, _vae_like_guide, _X3, optimizer="adamw", weight_decay=0.1,
               optimizer_kwargs={"weight_decay": 0.01}, progress=False, figures=False)
    opt = make_optimizer([torch.zeros(2, requires_grad=True)], TrainConfig())
    assert type(opt) is torch.optim.Adam and opt.defaults["fused"] and opt.defaults["betas"] == (0.9, 0.999)


def test_a_tampered_state_of_another_optimizer_is_refused(tmp_path):
    from pyrovi.checkpoint import load_tensors, save_tensors
    from pyrovi.errors import CheckpointError

    out = str(tmp_path / "r")
    kw = dict(epochs=1, batch_size=10, progress=False, figures=False, out=out, optimizer="clippedadam")
    pv.fit(_vae_like, _vae_like_guide, _X3, **kw)
    path = os.path.join(out, "checkpoint.safetensors")
    tensors, meta = load_tensors(path)
    key = next(k for k in tensors if k.endswith("/exp_avg_sq"))
    tensors[key] = -tensors[key] - 1.0
    save_tensors(path, tensors, meta)
    with pytest.raises(CheckpointError, match="negative"):
        pv.fit(_vae_like, _vae_like_guide, _X3, resume=True, **dict(kw, epochs=2))


def test_cli_optimizer_and_val_fraction_flags(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--epochs", "1", "--latent-dim", "2", "--hidden", "8", "--out", out, "--no-progress",
                 "--optimizer", "SGD", "--optimizer-kwargs", '{"momentum": 0.9}', "--lr", "0.01",
                 "--val-fraction", "0"]) == 0
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["train"]["optimizer"] == "sgd" and cfg["train"]["optimizer_kwargs"] == {"momentum": 0.9}
    assert cfg["data"]["n_val"] == 0 and cfg["train"]["val_fraction"] == 0
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["val_loss_is"] == "train_loss"
    assert main(["train", "--epochs", "1", "--out", str(tmp_path / "x"), "--optimizer-kwargs", "{momentum"]) == 2
    assert "--optimizer-kwargs must be JSON" in capsys.readouterr().err


# --------------------------------------------------------------------------- diagnose with any y


def _cond_model(x, y=None):
    """z ~ N(0, 1), x | z, y ~ N(z + sum(y), 1): y of any shape is passed and used."""
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        shift = y.reshape(len(x), -1).sum(-1)
        pyro.sample("obs", dist.Normal(z + shift, 1.0), obs=x)


def _cond_guide(x, y=None):
    s = pyro.param("s", torch.tensor(1.0), constraint=dist.constraints.positive)
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal((x - y.reshape(len(x), -1).sum(-1)) / 2, s))


@pytest.mark.parametrize("y_shape", [(), (4,), (2, 3)])
def test_diagnose_keeps_y_of_any_shape(y_shape):
    g = torch.Generator().manual_seed(0)
    n = 30
    y = torch.nn.functional.one_hot(torch.arange(n) % 4, 4).float() if y_shape == (4,) else \
        torch.randn((n,) + y_shape, generator=g) * 0.1
    x = torch.randn(n, generator=g)
    run = pv.fit(_cond_model, _cond_guide, (x, y), epochs=1, batch_size=10, progress=False, figures=False)
    idata = pv.diagnose(run, (x[:6], y[:6]), n=6, particles=8, save=False, warn=False)
    label = idata.constant_data["label"]
    assert label.shape == (6,) + y_shape and float(abs(label.values - y[:6].numpy()).max()) == 0.0


# --------------------------------------------------------------------------- unsized data plate


_DEC = torch.nn.Linear(2, 5)


def _unsized_plate_model(x):
    """The SS-VAE/CVAE way of writing the data plate: pyro.plate("data") with no size."""
    pyro.module("dec", _DEC)
    with pyro.plate("data"):
        z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), 2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(_DEC(z), 1.0).to_event(1), obs=x)


def test_auto_guide_on_a_data_plate_without_size():
    x = torch.randn(50, 5, generator=torch.Generator().manual_seed(0))
    run = pv.fit(_unsized_plate_model, None, x, epochs=2, batch_size=10, progress=False, figures=False)
    assert isinstance(run.guide, pv.guides.Auto) and list(run.guide.sites) == ["z"]
    m = pv.evaluate(run, x[:10], k=8, save=False, progress=False)
    assert m["log_likelihood"] >= m["elbo"] - 1e-4 and m["latents"]["z"]["dims"] == 2


@pytest.mark.slow
def test_semi_supervised_under_ddp_and_full_batch(tmp_path, restore_environ):
    pytest.importorskip("lightning")
    x, y = _semi_data(n=48, labelled=16)
    torch.manual_seed(0)
    m2 = TinyM2()
    before = m2.enc_y.weight.detach().clone()
    kw = dict(semi_supervised=True, extra_loss=m2.aux_loss, epochs=2, val_fraction=0.25, progress=False,
              figures=False)
    run = pv.fit(m2.model, m2.guide, (x, y), batch_size=8, strategy="ddp_spawn", devices=2, accelerator="cpu",
                 out=str(tmp_path / "ddp"), **kw)
    assert run.config["distributed"]["world_size"] == 2 and len(run.history) == 2
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"]) for h in run.history)
    assert not torch.equal(m2.enc_y.weight, before)  # rank 0's trained weights came back
    loaded = pv.load_run(str(tmp_path / "ddp"), model=m2.model, guide=m2.guide)
    m = pv.evaluate(loaded, (x[:6], y[:6]), k=4, save=False, progress=False)  # unlabelled rows: model(x)
    assert math.isfinite(m["elbo"])
    full = pv.fit(m2.model, m2.guide, (x, y), batch_size=None, **kw)
    assert all(math.isfinite(h["train_loss"]) for h in full.history)


def test_an_unsized_plate_whose_size_cannot_be_read_says_so():
    def model(x):
        with pyro.plate("data"):
            pyro.sample("z", dist.Normal(0.0, 1.0))  # no batch dim: the plate's size is nowhere
            pyro.sample("x", dist.Normal(0.0, 1.0).expand([len(x), 5]).to_event(1), obs=x)

    with pytest.raises(ConfigError, match="plate 'data' has no size"):
        pv.guides.Auto(model, example=torch.zeros(2, 5))


def test_a_run_from_before_the_new_options_resumes(tmp_path):
    """Checkpoints written before optimizer=/semi_supervised= existed trained with their defaults."""
    from pyrovi.checkpoint import load_tensors, save_tensors

    out = str(tmp_path / "r")
    kw = dict(batch_size=10, progress=False, figures=False, out=out)
    pv.fit(_vae_like, _vae_like_guide, _X3, epochs=1, **kw)
    path = os.path.join(out, "checkpoint.safetensors")
    tensors, meta = load_tensors(path)
    for k in ("optimizer", "optimizer_kwargs", "semi_supervised", "extra_loss"):
        del meta["config"]["train"][k]
    save_tensors(path, tensors, meta)
    assert len(pv.fit(_vae_like, _vae_like_guide, _X3, epochs=2, resume=True, **kw).history) == 2


def test_later_option_defaults_are_trainconfigs():
    from dataclasses import asdict

    from pyrovi.train import TrainConfig
    from pyrovi.train_state import LATER_OPTION_DEFAULTS

    defaults = asdict(TrainConfig())
    assert all(defaults[k] == v for k, v in LATER_OPTION_DEFAULTS.items())
