"""Data in any form, and the calling rule: which arguments the user's model and guide receive."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule
from torch.utils.data import DataLoader, Dataset, TensorDataset

import pyrovi as pv
from pyrovi.inputs import as_split, takes_y

pytestmark = pytest.mark.usefixtures("one_thread")

D = 3


def _xy(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    return x, x.sum(-1) + 0.1 * torch.randn(n, generator=g)


class Recorder:
    """A regression model/guide pair ``model(x, y=None)`` that records every call it gets."""

    def __init__(self):
        self.calls = []

    def model(self, x, y=None, **kw):
        self.calls.append(("model", tuple(x.shape), None if y is None else (tuple(y.shape), y.dtype), dict(kw)))
        w = pyro.sample("w", dist.Normal(torch.zeros(D), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal((x * w).sum(-1), 0.5), obs=y)

    def guide(self, x, y=None, **kw):
        self.calls.append(("guide", tuple(x.shape), None if y is None else (tuple(y.shape), y.dtype), dict(kw)))
        loc = pyro.param("loc", torch.zeros(D))
        pyro.sample("w", dist.Normal(loc, 0.1).to_event(1))


def _fit(model, guide, data, **kw):
    return pv.fit(model, guide, data, epochs=8, batch_size=16, lr=0.1, progress=False, device="cpu", **kw)


class PairDataset(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i].numpy(), float(self.y[i])  # NumPy items, Python float targets


def _forms():
    x, y = _xy()
    split = pv.data.Split
    ds = pv.data.Dataset("own", train=split(x[:48], y[:48]), val=split(x[48:], y[48:]), test=split(x[48:], y[48:]))
    return {
        "tensor pair": (x, y),
        "numpy pair": (x.numpy(), y.numpy().astype(np.float64)),
        "pyrovi Dataset": ds,
        "TensorDataset": TensorDataset(x, y),
        "torch Dataset": PairDataset(x, y),
        "DataLoader": DataLoader(TensorDataset(x, y), batch_size=7, shuffle=True),
    }


@pytest.mark.parametrize("form", sorted(_forms()))
def test_every_form_trains_and_passes_y(form):
    rec = Recorder()
    run = _fit(rec.model, rec.guide, _forms()[form])
    assert rec.calls
    for who, xs, ys, _ in rec.calls:
        assert xs[1:] == (D,)
        assert ys is not None and ys[0] == (xs[0],) and ys[1] == torch.float32, (who, ys)
    assert run.config["data"]["passes_y"] and run.config["data"]["y_dtype"] == "float32"
    with run.scope():
        loc = pyro.param("loc").detach()
    assert (loc - 1.0).abs().max() < 0.5  # regression weights ~1 learned from y


def test_unlabelled_forms():
    x, _ = _xy()
    for data in (x, x.numpy(), TensorDataset(x), DataLoader(TensorDataset(x), batch_size=9)):
        split = as_split(data)
        assert split.y is None and split.x.shape == (60, D) and split.x.dtype == torch.float32


def test_labels_stay_integers():
    x, _ = _xy()
    labels = torch.arange(60) % 3
    assert as_split((x, labels)).y.dtype == torch.int64
    assert as_split(TensorDataset(x, labels.int())).y.dtype == torch.int64
    assert as_split((x.numpy(), labels.numpy())).y.dtype == torch.int64


def test_calling_rule():
    def m1(x):
        pass

    def m2(x, y=None):
        pass

    def m3(*args):
        pass

    def m4(x, *, scale=1.0):
        pass

    class Fwd(PyroModule):
        def forward(self, x, y=None):
            pass

    class FwdX(PyroModule):
        def forward(self, x):
            pass

    assert [takes_y(m) for m in (m1, m2, m3, m4, Fwd(), FwdX())] == [False, True, True, False, True, False]
    assert takes_y(pv.models.VAE((4,), 2)) is False  # declares uses_labels = False, despite forward(x, y=None)


def test_labels_are_not_passed_to_a_model_without_y(digits):
    seen = []

    def model(x):
        seen.append(x.shape)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True).expand(x.shape), 1.0).to_event(1), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.zeros(2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    run = pv.fit(model, guide, (digits.train.x[:100], digits.train.y[:100]), epochs=1, batch_size=50,
                 progress=False, device="cpu")
    assert seen and not run.config["data"]["passes_y"]


def test_model_kwargs_reach_every_call(tmp_path):
    rec = Recorder()
    x, y = _xy()
    run = pv.fit(rec.model, rec.guide, (x, y), epochs=1, batch_size=16, progress=False, device="cpu",
                 model_kwargs={"temperature": 0.5}, out=str(tmp_path / "run"), figures=False)
    assert all(kw == {"temperature": 0.5} for *_, kw in rec.calls)
    assert run.config["data"]["model_kwargs"] == ["temperature"]
    rec2 = Recorder()
    pv.load_run(str(tmp_path / "run"), model=rec2.model, guide=rec2.guide, model_kwargs={"temperature": 0.5})
    assert rec2.calls and all(kw == {"temperature": 0.5} for *_, kw in rec2.calls)
    rec3 = Recorder()
    with pytest.warns(UserWarning, match="model_kwargs"):
        pv.load_run(str(tmp_path / "run"), model=rec3.model, guide=rec3.guide)


@pytest.mark.parametrize("bad,match", [
    ([1, 2], "model_kwargs must be a dict"),
    ({"y": 1}, "must not hold 'y'"),
])
def test_bad_model_kwargs(bad, match):
    rec = Recorder()
    with pytest.raises(pv.ConfigError, match=match):
        _fit(rec.model, rec.guide, _xy(), model_kwargs=bad)


def test_bad_data_is_named():
    rec = Recorder()
    x, y = _xy()
    with pytest.raises(pv.DataError, match="y must have one row per row of x"):
        _fit(rec.model, rec.guide, (x, y[:10]))
    y[3] = float("nan")
    with pytest.raises(pv.DataError, match="NaN"):
        _fit(rec.model, rec.guide, (x, y))
    with pytest.raises(pv.DataError, match="items of 3 parts"):
        as_split(TensorDataset(x, x, x))
