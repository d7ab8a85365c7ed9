"""One of each: one data resolver, one training loop, defaults that agree between the API and the CLI."""

import json
import os
import pyro
import pytest
import torch

import pyrovi as pv


def test_a_loaded_run_finds_its_own_data(digits, tmp_path):
    model = pv.models.VAE(digits.shape, 2, hidden=(16,), image_shape=digits.image_shape)
    pv.fit(model, pv.guides.DiagNormal(model, hidden=(16,)), digits, epochs=1, progress=False, figures=False,
           out=str(tmp_path / "r"))
    run = pv.load_run(str(tmp_path / "r"))
    assert run.data is None  # nothing carried over: the resolver reloads the source config.json names
    m = pv.evaluate(run, k=2, save=False)
    assert m["n"] == len(digits.test)
    assert pv.inputs.split(None, run, "test").x.shape == digits.test.x.shape
    assert torch.equal(pv.inputs.split(None, run, "test").x, digits.test.x)
    # a name is loaded with the run's seed, so its test split is the run's
    assert torch.equal(pv.inputs.split("digits", run).x, digits.test.x)


def test_arrays_runs_say_to_pass_data(tmp_path):
    x = (torch.rand(40, 6) < 0.5).float()
    model = pv.models.VAE(6, 2, hidden=(8,))
    pv.fit(model, pv.guides.DiagNormal(model, hidden=(8,)), x, epochs=1, batch_size=16, progress=False,
           figures=False, out=str(tmp_path / "a"))
    with pytest.raises(pv.ConfigError, match="in-memory arrays; pass the data explicitly"):
        pv.evaluate(pv.load_run(str(tmp_path / "a")), k=2, save=False)


@pytest.mark.parametrize("name", ["Cosine", "EXPONENTIAL"])
def test_schedule_names_are_case_insensitive_and_applied(name):
    x = (torch.rand(60, 6) < 0.5).float()
    model = pv.models.VAE(6, 2, hidden=(8,))
    run = pv.fit(model, pv.guides.DiagNormal(model, hidden=(8,)), x, epochs=3, batch_size=27, progress=False,
                 figures=False)
    assert run.config["train"]["lr_schedule"] == "constant"
    run = pv.fit(model, pv.guides.DiagNormal(model, hidden=(8,)), x, epochs=3, batch_size=27, progress=False,
                 figures=False, lr_schedule=name)
    lrs = [h["lr"] for h in run.history]
    assert run.config["train"]["lr_schedule"] == name.lower()
    assert lrs[0] == pytest.approx(1e-3) and lrs[2] < lrs[1] < lrs[0]


def test_guide_none_builds_the_models_default_guide(digits):
    small = pv.data.Split(digits.train.x[:64], None)
    ae = pv.models.Autoencoder(digits.shape, 2, hidden=(8,))
    assert isinstance(pv.fit(ae, None, small, epochs=1, batch_size=32, progress=False, figures=False).guide, pv.guides.Delta)
    vq = pv.models.VQVAE(digits.shape, 8, code_dim=4, channels=8, image_shape=digits.image_shape)
    assert isinstance(pv.fit(vq, None, small, epochs=1, batch_size=32, progress=False, figures=False).guide, pv.guides.Codebook)
    vae = pv.models.VAE(digits.shape, 2, hidden=(8,))
    assert isinstance(pv.fit(vae, None, small, epochs=1, batch_size=32, progress=False, figures=False).guide, pv.guides.DiagNormal)


def test_fast_path_is_taken_under_warmup_and_beta_and_recorded(monkeypatch):
    from pyrovi import fastpath

    calls = []
    real = fastpath.fast_log_weights

    def spy(*args, **kw):
        calls.append(kw.get("beta", 1.0))
        return real(*args, **kw)

    monkeypatch.setattr(fastpath, "fast_log_weights", spy)
    x = (torch.rand(60, 6, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    model = pv.models.VAE(6, 2, hidden=(8,))
    run = pv.fit(model, pv.guides.DiagNormal(model, hidden=(8,)), x, epochs=2, batch_size=27, warmup=1, beta=0.5,
                 progress=False, figures=False)
    assert run.metrics["estimator_path"] == "fast" and run.metrics["estimator_calls"]["traced"] == 0
    train_betas = [b for b in calls if b != 1.0]
    assert train_betas and max(train_betas) == pytest.approx(0.5)  # warm-up ramps beta up to 0.5 on the fast path
    assert min(train_betas) < 0.5
    # a user's model goes through Pyro's traces, and the run says so
    def user_model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", pyro.distributions.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", pyro.distributions.Bernoulli(logits=z.sum(-1, keepdim=True).expand(-1, 6)).to_event(1),
                        obs=x)

    run = pv.fit(user_model, None, x, epochs=1, batch_size=27, progress=False, figures=False)
    assert run.metrics["estimator_path"] == "traced"


def test_a_stop_in_the_first_epoch_says_no_checkpoint_exists(tmp_path):
    class NaNFromStep2(pv.objectives.ELBO):
        calls = 0

        def _bound(self, *a, **k):
            b = super()._bound(*a, **k)
            if torch.is_grad_enabled():
                NaNFromStep2.calls += 1
                if NaNFromStep2.calls > 2:  # the parameter probe, then one good step
                    return b * float("nan")
            return b

    x = (torch.rand(60, 6, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    model = pv.models.VAE(6, 2, hidden=(8,))
    with pytest.raises(pv.TrainingError, match="no checkpoint was written yet") as err:
        pv.fit(model, pv.guides.DiagNormal(model, hidden=(8,)), x, objective=NaNFromStep2(), epochs=2, batch_size=27,
               progress=False, figures=False, out=str(tmp_path / "r"))
    assert "epoch 1, step 2" in str(err.value) and "last good checkpoint" not in str(err.value)


def test_a_failed_fit_frees_its_run_directory_at_once(tmp_path):
    """The writer's lock is released when fit fails, so the same process (or another) can resume at once."""
    x = (torch.rand(60, 6, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    model = pv.models.VAE(6, 2, hidden=(8,))
    guide = pv.guides.DiagNormal(model, hidden=(8,))
    out = str(tmp_path / "r")
    pv.fit(model, guide, x, epochs=1, batch_size=27, progress=False, figures=False, out=out)

    class Boom(pv.objectives.ELBO):
        def _bound(self, *a, **k):
            if torch.is_grad_enabled() and getattr(self, "armed", False):
                raise KeyboardInterrupt
            self.armed = True  # after the parameter probe
            return super()._bound(*a, **k)

    with pytest.raises(KeyboardInterrupt):
        pv.fit(model, guide, x, objective=Boom(), epochs=2, batch_size=27, progress=False, figures=False, out=out,
               resume=True)
    import subprocess
    import sys
    code = ("import pyrovi.run_files as r, sys; r.lock_run(sys.argv[1]); print('locked')")
    proc = subprocess.run([sys.executable, "-c", code, out], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "locked" in proc.stdout, proc.stderr[-500:]


def test_resume_refuses_changed_settings_and_keeps_held_out_results(tmp_path, capsys):
    from pyrovi.cli import main

    out = str(tmp_path / "r")

    def train(epochs="1", lr="0.002", *extra):
        return main(["train", "--data", "digits", "--latent-dim", "2", "--hidden", "16", "--epochs", epochs,
                     "--batch-size", "256", "--lr", lr, "--out", out, "--no-progress", *extra])

    assert train() == 0
    assert main(["evaluate", out, "--k", "2", "--no-progress"]) == 0
    capsys.readouterr()
    # a new lr on resume would be half-applied (Adam's state and the scheduler come from the checkpoint): refused
    assert train("2", "0.01", "--resume") == 2
    err = capsys.readouterr().err
    assert "--lr 0.01 (the run has 0.002)" in err and "--overwrite" in err and "Traceback" not in err
    # the same settings, nothing left to train: the run and its test metrics stay as they were
    assert train("1", "0.002", "--resume") == 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert "test" in metrics and metrics["epochs"] == 1
    # more epochs are what resume is for; the test metrics of the old weights do not carry over
    assert train("2", "0.002", "--resume") == 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["epochs"] == 2 and "test" not in metrics


def test_evaluate_and_diagnose_no_save_on_a_read_only_run(tmp_path, capsys):
    from pyrovi.cli import main

    out = str(tmp_path / "r")
    assert main(["train", "--data", "digits", "--latent-dim", "2", "--hidden", "16", "--epochs", "1",
                 "--out", out, "--no-progress"]) == 0
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    os.chmod(out, 0o555)  # a colleague's run: readable, not writable
    try:
        capsys.readouterr()
        assert main(["evaluate", out, "--k", "2", "--no-save", "--no-progress"]) == 0
        assert "log_likelihood" in capsys.readouterr().out
        nc = str(tmp_path / "d.nc")
        assert main(["diagnose", out, "--n", "4", "--particles", "8", "--no-save", "--out", nc,
                     "--no-progress"]) == 0
        assert os.path.isfile(nc)
    finally:
        os.chmod(out, 0o755)
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)} == before
