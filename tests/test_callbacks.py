"""Callbacks, loggers (TensorBoard) and val_every (issue 20, item 6)."""

import csv
import io
import math
import os
import sys

import numpy as np
import pytest
import pyro
import torch

import pyrovi as pv
from pyrovi.callbacks import Callback
from pyrovi.cli import main
from pyrovi.errors import ConfigError

TINY = dict(batch_size=256, lr=1e-3, figures=False, progress=False)


def _vae(data):
    pyro.set_rng_seed(0)
    model = pv.models.VAE(data.shape, 2, hidden=(16,), image_shape=data.image_shape)
    return model, pv.guides.DiagNormal(model, hidden=(16,))


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_train_begin(self, state):
        self.calls.append(("begin", state.epoch, state.step, state.epochs))

    def on_step_end(self, state, record):
        self.calls.append(("step", record["step"], record["epoch"], record["loss"]))

    def on_epoch_end(self, state, record):
        self.calls.append(("epoch", state.epoch, state.step, dict(record)))

    def on_checkpoint(self, state, path):
        assert os.path.isfile(path)
        self.calls.append(("checkpoint", state.epoch, path))

    def on_train_end(self, state):
        self.calls.append(("end", state.epoch))


def _history_csv(d):
    with open(os.path.join(d, "history.csv")) as fh:
        return list(csv.DictReader(fh))


def test_callbacks_see_every_step_epoch_and_checkpoint_in_order(digits, tmp_path):
    rec = Recorder()
    run = pv.fit(*_vae(digits), digits, epochs=2, out=str(tmp_path / "r"), callbacks=[rec], **TINY)
    steps_per_epoch = math.ceil(len(digits.train) / 256)
    kinds = [c[0] for c in rec.calls]
    one_epoch = ["step"] * steps_per_epoch + ["checkpoint", "epoch"]
    assert kinds == ["begin"] + one_epoch * 2 + ["end"]
    assert rec.calls[0] == ("begin", 0, 0, 2)
    steps = [c for c in rec.calls if c[0] == "step"]
    assert [c[1] for c in steps] == list(range(1, 2 * steps_per_epoch + 1))
    assert [c[2] for c in steps] == [1] * steps_per_epoch + [2] * steps_per_epoch
    epochs = [c for c in rec.calls if c[0] == "epoch"]
    assert [c[3] for c in epochs] == run.history  # the epoch record is the history row
    assert [(c[1], c[2]) for c in epochs] == [(1, steps_per_epoch), (2, 2 * steps_per_epoch)]
    ckpt = os.path.join(str(tmp_path / "r"), "checkpoint.safetensors")
    assert [c[1:] for c in rec.calls if c[0] == "checkpoint"] == [(1, ckpt), (2, ckpt)]
    # the mean of an epoch's step losses (equal batches but the last) is close to its train_loss
    first = [c[3] for c in steps[:steps_per_epoch]]
    assert abs(np.mean(first) - run.history[0]["train_loss"]) < 0.05 * abs(run.history[0]["train_loss"])


def test_train_end_is_called_when_a_callback_stops_the_fit(digits):
    class Boom(Recorder):
        def on_epoch_end(self, state, record):
            raise RuntimeError("stop here")

    rec = Boom()
    with pytest.raises(RuntimeError, match="stop here"):
        pv.fit(*_vae(digits), digits, epochs=3, callbacks=rec, **TINY)
    assert rec.calls[-1] == ("end", 1)


def test_bad_callbacks_and_loggers_are_refused_up_front(digits):
    model, guide = _vae(digits)
    with pytest.raises(ConfigError, match="callbacks must hold"):
        pv.fit(model, guide, digits, epochs=1, callbacks=[print], **TINY)
    with pytest.raises(ConfigError, match="unknown logger 'wandb'; valid loggers: csv, tensorboard"):
        pv.fit(model, guide, digits, epochs=1, logger="wandb", **TINY)
    with pytest.raises(ConfigError, match="pass out="):
        pv.fit(model, guide, digits, epochs=1, logger="tensorboard", **TINY)
    with pytest.raises(ConfigError, match="val_every must be > 0, got 0"):
        pv.fit(model, guide, digits, epochs=1, val_every=0, **TINY)


def test_missing_tensorboard_says_how_to_install(digits, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    assert main(["train", "--epochs", "1", "--latent-dim", "2", "--hidden", "16", "--no-progress",
                 "--logger", "tensorboard", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert 'pip install "pyrovi[tensorboard]"' in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_training_bar_is_a_callback_that_prints_whole_lines_in_a_log(digits):
    from pyrovi.progress import TrainingBar

    buf = io.StringIO()
    pv.fit(*_vae(digits), digits, epochs=4, callbacks=[TrainingBar(file=buf)], **TINY)
    lines = buf.getvalue().splitlines()
    assert "\r" not in buf.getvalue() and len(lines) == 4  # one line per quarter
    assert lines[-1].startswith("elbo: 4/4 epoch (100%)") and "loss=" in lines[-1] and "val=" in lines[-1]


# --------------------------------------------------------------------------- TensorBoard


def test_cli_tensorboard_logger_writes_events_tensorboard_reads_back(tmp_path, capsys):
    pytest.importorskip("tensorboard", reason='needs tensorboard: pip install "pyrovi[tensorboard]"')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d = str(tmp_path / "tb")
    assert main(["train", "--epochs", "3", "--latent-dim", "2", "--hidden", "16", "--batch-size", "512",
                 "--val-every", "2", "--logger", "tensorboard", "--no-progress", "--out", d]) == 0
    acc = EventAccumulator(os.path.join(d, "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"step/loss", "step/beta", "step/lr", "epoch/train_loss", "epoch/val_loss", "epoch/lr",
            "epoch/items_per_second", "epoch/epoch"} <= tags
    hist = _history_csv(d)
    steps = [e.step for e in acc.Scalars("step/loss")]
    per_epoch = len(steps) // 3
    assert steps == list(range(1, 3 * per_epoch + 1))  # every optimizer step
    for tag, col in (("epoch/train_loss", "train_loss"), ("epoch/lr", "lr"), ("epoch/epoch", "epoch")):
        got = [e.value for e in acc.Scalars(tag)]
        want = [float(h[col]) for h in hist]
        # TensorBoard stores float32: equal to history.csv up to float32 rounding
        np.testing.assert_allclose(got, want, rtol=2 * np.finfo(np.float32).eps, atol=0)
    assert [e.step for e in acc.Scalars("epoch/train_loss")] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    val = acc.Scalars("epoch/val_loss")  # --val-every 2 of 3 epochs: epochs 2 and 3 (the last) validate
    assert [e.step for e in val] == [2 * per_epoch, 3 * per_epoch]
    np.testing.assert_allclose([e.value for e in val], [float(h["val_loss"]) for h in hist[1:]],
                               rtol=2 * np.finfo(np.float32).eps, atol=0)


# --------------------------------------------------------------------------- val_every


def test_val_every_validates_every_nth_and_the_last_epoch(digits, tmp_path):
    d = str(tmp_path / "v")
    run = pv.fit(*_vae(digits), digits, epochs=5, val_every=2, out=d, **TINY)
    assert [h["val_loss"] is not None for h in run.history] == [False, True, False, True, True]
    assert [h["val_loss"] for h in _history_csv(d)][0] == ""  # an empty cell in history.csv
    loaded = pv.load_run(d)
    assert [h["val_loss"] for h in loaded.history] == [h["val_loss"] for h in run.history]
    best = min((h["val_loss"], h["epoch"]) for h in run.history if h["val_loss"] is not None)
    assert run.metrics["val_loss"] == best[0] and run.metrics["best_epoch"] == best[1]
    # killed after epoch 3's checkpoint, then resumed: the same trajectory as 5 epochs straight
    class Kill(Callback):
        def on_checkpoint(self, state, path):
            if state.epoch == 3:
                raise KeyboardInterrupt

    d2 = str(tmp_path / "w")
    with pytest.raises(KeyboardInterrupt):
        pv.fit(*_vae(digits), digits, epochs=5, val_every=2, out=d2, callbacks=[Kill()], **TINY)
    resumed = pv.fit(*_vae(digits), digits, epochs=5, val_every=2, out=d2, resume=True, **TINY)
    for a, b in zip(resumed.history, run.history):
        for k in ("train_loss", "val_loss"):
            assert (a[k] is None) == (b[k] is None)
            if a[k] is not None:  # the same code path and seeds: equal up to float32 rounding of a sum
                assert abs(a[k] - b[k]) <= 1e-5 * abs(b[k])


def test_patience_counts_validations(digits, capsys):
    # lr ~ 0: the validation loss only wanders with the particles, so some validation is the best and
    # the fit stops at the 2nd validation after it, never between validations
    run = pv.fit(*_vae(digits), digits, epochs=40, val_every=2, patience=2, batch_size=256, lr=1e-12,
                 figures=False, progress=False)
    validated = [h["epoch"] for h in run.history if h["val_loss"] is not None]
    after = [e for e in validated if e > run.metrics["best_epoch"]]
    assert after == validated[-2:] and run.history[-1]["epoch"] == validated[-1] < 40
    assert all(e % 2 == 0 for e in validated)
    assert "no validation improvement for 2 validations" in capsys.readouterr().out


def test_example_runs_quick(tmp_path):
    pytest.importorskip("tensorboard", reason='needs tensorboard: pip install "pyrovi[tensorboard]"')
    import runpy

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                          "callbacks_tensorboard.py")
    results = runpy.run_path(script, run_name="example")["main"](["--quick", "--out", str(tmp_path)])
    assert results["validated_epochs"] == [2, 4] and results["checkpoints"] == [1, 2, 3, 4]
    assert [s for s, _ in results["val_loss_from_tensorboard"]] == [results["steps"] // 2, results["steps"]]
    assert (tmp_path / "step_losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_val_every_may_change_on_resume_and_lr_still_may_not(digits, tmp_path):
    d = str(tmp_path / "r")
    pv.fit(*_vae(digits), digits, epochs=1, out=d, **TINY)
    run = pv.fit(*_vae(digits), digits, epochs=4, val_every=3, out=d, resume=True, **TINY)
    assert [h["val_loss"] is not None for h in run.history] == [True, False, True, True]
    assert run.config["train"]["val_every"] == 3  # config.json records what the epochs after the resume used
    with pytest.raises(ConfigError, match="only epochs, patience and val_every may change"):
        pv.fit(*_vae(digits), digits, epochs=5, out=d, resume=True, **{**TINY, "lr": 0.5})
