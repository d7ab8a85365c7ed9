"""fit: learning, the untouched test split, checkpoints, resume, isolation, errors."""

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pyro
import pytest
import torch

import pyrovi as pv
import pyrovi.loop
from pyrovi.traces import ScaleLatents
from pyrovi.checkpoint import load_tensors
from pyrovi.run_files import checkpoint_history
from pyrovi.errors import CheckpointError, ConfigError, DataError, TrainingError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small(data, latent=4, hidden=(64,), seed=0):
    torch.manual_seed(seed)
    model = pv.models.VAE(data.shape, latent, hidden=hidden, image_shape=data.image_shape)
    return model, pv.guides.DiagNormal(model, hidden=hidden)


def test_vae_improves_held_out_elbo(digits):
    model, guide = small(digits)
    before = pv.evaluate(pv.Run(model, guide, pv.objectives.get("elbo"), {}), digits, k=50, save=False)
    run = pv.fit(model, guide, digits, epochs=15, progress=False, seed=0)
    after = pv.evaluate(run, digits, k=50, save=False)
    assert [h["epoch"] for h in run.history] == list(range(1, 16))
    assert run.history[-1]["val_loss"] < run.history[0]["val_loss"] - 5
    # held-out (test) ELBO improves by far more than its Monte-Carlo noise (< 0.1 nats at k=50)
    assert after["elbo"] > before["elbo"] + 10
    assert after["log_likelihood"] >= after["elbo"] - 1e-4


class _NoTest(pv.data.Dataset):
    def __getattribute__(self, name):
        if name == "test":
            raise AssertionError("fit touched the test split")
        return super().__getattribute__(name)


def test_fit_never_reads_the_test_split(digits, tmp_path):
    poisoned = pv.data.Split(torch.full_like(digits.test.x, float("nan")), digits.test.y)
    ds = _NoTest(name="digits", train=digits.train, val=digits.val, test=poisoned,
                 image_shape=digits.image_shape, num_classes=10, binarize="static", source=digits.source)
    model, guide = small(digits)
    run = pv.fit(model, guide, ds, epochs=2, progress=False, patience=1, out=str(tmp_path / "r"))
    assert all(torch.isfinite(torch.tensor(h["val_loss"])) for h in run.history)


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_resume_continues_the_same_trajectory(digits, tmp_path, ctrl_c_at_validation):
    kw = dict(epochs=4, objective="iwae", particles=3, progress=False, seed=1, lr_schedule="cosine")
    m1, g1 = small(digits)
    straight = pv.fit(m1, g1, digits, out=str(tmp_path / "a"), **kw)
    # interrupt the same run (Ctrl-C) during epoch 3: the checkpoint of epoch 2 stays
    undo = ctrl_c_at_validation(3)
    m2, g2 = small(digits)
    with pytest.raises(KeyboardInterrupt):
        pv.fit(m2, g2, digits, out=str(tmp_path / "b"), **kw)
    undo()
    _, meta = load_tensors(str(tmp_path / "b" / "checkpoint.safetensors"))
    assert meta["loop"]["epoch"] == 2
    m3, g3 = small(digits, seed=99)  # fresh objects with different initial weights
    resumed = pv.fit(m3, g3, digits, out=str(tmp_path / "b"), resume=True, **kw)
    assert _max_diff(m1.state_dict(), m3.state_dict()) == 0.0
    assert _max_diff(g1.state_dict(), g3.state_dict()) == 0.0
    assert [h["val_loss"] for h in straight.history] == [h["val_loss"] for h in resumed.history]


def test_existing_run_is_not_overwritten_silently(digits, tmp_path):
    m, g = small(digits)
    pv.fit(m, g, digits, epochs=1, progress=False, out=str(tmp_path / "r"))
    with pytest.raises(ConfigError, match="resume=True"):
        pv.fit(m, g, digits, epochs=1, progress=False, out=str(tmp_path / "r"))
    pv.fit(m, g, digits, epochs=1, progress=False, out=str(tmp_path / "r"), overwrite=True)


def test_resume_with_other_settings_is_refused(digits, tmp_path):
    m, g = small(digits)
    pv.fit(m, g, digits, epochs=1, progress=False, out=str(tmp_path / "r"))
    with pytest.raises(CheckpointError, match="different"):
        pv.fit(m, g, digits, epochs=2, objective="iwae", progress=False, out=str(tmp_path / "r"), resume=True)


_KILL_SCRIPT = textwrap.dedent("""
    import sys, torch, pyrovi as pv
    data = pv.data.load("digits")
    torch.manual_seed(0)
    model = pv.models.VAE(data.shape, 4, hidden=(64,))
    guide = pv.guides.DiagNormal(model, hidden=(64,))
    pv.fit(model, guide, data, epochs=1000, batch_size=16, progress=False, seed=2, out=sys.argv[1])
""")


def test_killed_run_resumes_from_its_last_checkpoint(digits, tmp_path):
    out = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, out], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT})
    ckpt = os.path.join(out, "checkpoint.safetensors")
    deadline = time.time() + 120
    while time.time() < deadline:
        if os.path.isfile(ckpt):
            _, meta = load_tensors(ckpt)
            if meta["loop"]["epoch"] >= 2:
                break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    tensors, meta = load_tensors(ckpt)  # the file is whole: never a torn write
    epoch = meta["loop"]["epoch"]
    history = checkpoint_history(ckpt, meta)
    assert epoch >= 2 and len(history) == epoch
    model = pv.models.VAE(digits.shape, 4, hidden=(64,))
    guide = pv.guides.DiagNormal(model, hidden=(64,))
    run = pv.fit(model, guide, digits, epochs=epoch, batch_size=16, progress=False, seed=2, out=out,
                 resume=True, figures=False)
    # nothing left to train: the weights are exactly the checkpoint's
    for k, v in model.state_dict().items():
        assert torch.equal(v, tensors[f"model/{k}"])
    assert len(run.history) == epoch
    more = pv.fit(model, guide, digits, epochs=epoch + 1, batch_size=16, progress=False, seed=2, out=out,
                  resume=True, figures=False)
    assert [h["epoch"] for h in more.history] == list(range(1, epoch + 2))
    assert more.history[:epoch] == history


def test_loading_never_unpickles(digits, tmp_path, monkeypatch):
    m, g = small(digits)
    out = str(tmp_path / "r")
    pv.fit(m, g, digits, epochs=1, progress=False, out=out)

    def forbidden(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    run = pv.load_run(out)
    for k, v in m.state_dict().items():
        assert torch.equal(v, run.model.state_dict()[k])
    # a pickle payload in place of the weights is refused and never executed
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    monkeypatch.undo()
    with open(os.path.join(out, "weights.safetensors"), "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(CheckpointError, match="pickle"):
        pv.load_run(out)
    torch.save({"x": Payload()}, os.path.join(out, "weights.safetensors"))
    with pytest.raises(CheckpointError):
        pv.load_run(out)
    assert not marker.exists()


def test_run_directory_contents_and_load_run(digits, tmp_path):
    m, g = small(digits)
    out = str(tmp_path / "r")
    run = pv.fit(m, g, digits, epochs=2, progress=False, out=out)
    for f in ("config.json", "weights.safetensors", "checkpoint.safetensors", "history.csv", "metrics.json",
              "reconstructions.png", "samples.png", "training_curves.png", "report.md"):
        assert os.path.isfile(os.path.join(out, f)), f
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model"]["name"] == "vae" and cfg["guide"]["name"] == "diag_normal"
    loaded = pv.load_run(out)
    assert loaded.history == run.history  # floats round-trip exactly through history.csv
    x = digits.val.x[:5]
    with torch.no_grad():
        a = g.encode(x)["z"][0]
        b = loaded.guide.encode(x)["z"][0]
    assert torch.equal(a, b)


def test_two_fits_do_not_share_parameters_or_touch_the_global_store(digits):
    pyro.param("user_thing", torch.ones(3))
    m1, g1 = small(digits, seed=0)
    m2, g2 = small(digits, seed=0)
    snap = {k: v.clone() for k, v in m2.state_dict().items()}
    pv.fit(m1, g1, digits, epochs=1, progress=False)
    assert _max_diff(snap, m2.state_dict()) == 0.0  # the second model is untouched by the first fit
    pv.fit(m2, g2, digits, epochs=1, progress=False, seed=5)
    assert _max_diff(m1.state_dict(), m2.state_dict()) > 0
    assert list(pyro.get_param_store().keys()) == ["user_thing"]
    assert torch.equal(pyro.param("user_thing"), torch.ones(3))


class _NaNAfter(pv.objectives.ELBO):
    """ELBO whose loss turns NaN after `steps` differentiable calls (fit makes one to find parameters)."""

    def __init__(self, steps):
        super().__init__()
        self.steps, self.calls = steps, 0

    def __call__(self, model, guide, *args, **kwargs):
        loss = super().__call__(model, guide, *args, **kwargs)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls > self.steps:
                return loss * float("nan")
        return loss


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(digits, tmp_path):
    m, g = small(digits)
    out = str(tmp_path / "r")
    steps_per_epoch = -(-len(digits.train) // 128)
    with pytest.raises(TrainingError, match=rf"epoch 2, step {steps_per_epoch + 1}.*last good checkpoint \(epoch 1\)"):
        pv.fit(m, g, digits, objective=_NaNAfter(steps_per_epoch + 1), epochs=3, progress=False, out=out)
    tensors, meta = load_tensors(os.path.join(out, "checkpoint.safetensors"))
    assert meta["loop"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith(("model/", "guide/")))


def test_early_stopping_returns_best_weights(digits, tmp_path):
    m, g = small(digits)
    run = pv.fit(m, g, digits, epochs=40, lr=0.05, patience=2, progress=False, out=str(tmp_path / "r"))
    best = min(h["val_loss"] for h in run.history)
    assert run.metrics["val_loss"] == best
    if len(run.history) < 40:  # it stopped early: the run holds the best epoch's weights
        assert run.history[-1]["val_loss"] > best
        loss_fn = pv.train.BatchLoss(pv.objectives.get("elbo", particles=1), m, g, global_sites=False)
        val = pyrovi.loop.mean_loss(loss_fn, digits.val, 2000)
        assert abs(val - best) < 2.0  # one-particle noise only; the last epoch's weights were worse


def test_beta_scales_only_the_latent_terms():
    model = pv.models.VAE(6, 2, hidden=(4,))
    guide = pv.guides.DiagNormal(model, hidden=(4,))
    x = (torch.rand(3, 6) < 0.5).float()
    obj = pv.objectives.get("elbo")
    obj.max_plate_nesting = 1  # as fit sets it (the wrapped callables hide the attribute)
    pyro.set_rng_seed(0)
    zero = obj(ScaleLatents(0.0)(model), ScaleLatents(0.0)(guide), x)
    pyro.set_rng_seed(0)
    tr = pyro.poutine.trace(guide).get_trace(x)
    mt = pyro.poutine.trace(pyro.poutine.replay(model, trace=tr)).get_trace(x)
    assert float(zero) == pytest.approx(-float(mt.nodes["x"]["fn"].log_prob(x).sum()), rel=1e-6)


@pytest.mark.parametrize("kw, msg", [
    ({"lr": -1.0}, "lr must be > 0"),
    ({"epochs": 0}, "epochs must be > 0"),
    ({"particles": 0}, "particles"),
    ({"batch_size": 10_000}, "batch_size=10000 is larger"),
    ({"objective": "nope"}, "valid objectives"),
    ({"lr_schedule": "sometimes"}, "valid lr_schedules"),
    ({"device": "tpu"}, "device"),
])
def test_bad_arguments_fail_before_training(digits, kw, msg):
    m, g = small(digits)
    with pytest.raises(ConfigError, match=msg):
        pv.fit(m, g, digits, progress=False, **kw)


def test_wrong_data_shape_and_range(digits):
    m, g = small(digits)
    with pytest.raises(DataError, match="expects"):
        pv.fit(m, g, torch.rand(50, 10), progress=False)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        pv.fit(m, g, torch.rand(50, 64) * 3, progress=False)
    with pytest.raises(DataError, match="NaN"):
        pv.fit(m, g, torch.full((50, 64), float("nan")), progress=False)


def test_fit_on_arrays_and_pairs(digits):
    m, g = small(digits)
    run = pv.fit(m, g, digits.train.x.numpy(), epochs=1, progress=False)
    assert run.config["data"]["n_val"] == round(0.1 * len(digits.train))
    run = pv.fit(m, g, (digits.train.x, digits.train.y), epochs=1, progress=False)
    assert len(run.history) == 1


def test_safetensors_whose_header_length_starts_with_0x80_loads(tmp_path):
    """A real safetensors file is never mistaken for a pickle by its first byte."""
    from pyrovi.checkpoint import save_tensors

    for n in range(256):
        p = str(tmp_path / f"c{n}.safetensors")
        save_tensors(p, {"x": torch.arange(3.0)}, {"pad": "a" * n})
        if open(p, "rb").read(1) == b"\x80":
            tensors, meta = load_tensors(p)
            assert torch.equal(tensors["x"], torch.arange(3.0)) and meta["pad"] == "a" * n
            return
    pytest.fail("no header length with low byte 0x80 in range")
