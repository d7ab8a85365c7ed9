"""``fit(precision=..., compile=...)``: mixed precision keeps log-densities and the loss in float32."""

import math

import pyro
import pytest
import torch

import pyrovi as pv
from pyrovi.loop import BatchLoss
from pyrovi.precision import autocast, canonical_compile, canonical_precision


def _conv_pair(seed=0):
    torch.manual_seed(seed)
    model = pv.models.VAE((8, 8), 3, arch="conv", hidden=16, channels=8)
    return model, pv.guides.DiagNormal(model, hidden=16)


def test_bf16_autocast_runs_the_nets_low_and_the_densities_in_float32():
    model, guide = _conv_pair()
    x = (torch.rand(16, 64, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    with autocast("bf16", x.device):
        assert guide.body(x).dtype == torch.bfloat16  # the trunk runs in bf16
        q = guide.posterior(x)["z"]
        assert q.base_dist.loc.dtype == torch.float32 and q.base_dist.scale.dtype == torch.float32
        z = q.rsample()
        assert model.likelihood(model.decoder_out(z)).log_prob(x).dtype == torch.float32
    obj = pv.objectives.get("elbo", particles=4)
    obj.max_plate_nesting = 1
    for fast in (True, False):
        obj.fast = fast
        losses = {}
        for prec in (None, "bf16"):
            pyro.set_rng_seed(5)
            losses[prec] = BatchLoss(obj, model, guide, global_sites=False, precision=prec)(x).detach()
        assert losses["bf16"].dtype == torch.float32
        # bf16 keeps 8 bits of mantissa: each net output is off by ~2^-8 relative, a few nats on ~45 nats
        assert abs(float(losses["bf16"] - losses[None])) < 0.05 * abs(float(losses[None]))


@pytest.mark.parametrize("precision", ["bf16", "16-mixed"])
def test_mixed_precision_fit_trains_and_is_recorded(precision):
    torch.manual_seed(0)
    model = pv.models.VAE(64, 3, hidden=32)
    guide = pv.guides.Flow(model, depth=1, hidden=32)
    x = (torch.rand(64, 64, generator=torch.Generator().manual_seed(2)) < 0.3).float()
    run = pv.fit(model, guide, x, epochs=3, batch_size=16, progress=False, figures=False, precision=precision,
                 lr=3e-3)
    losses = [h["train_loss"] for h in run.history]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in list(model.parameters()) + list(guide.parameters()))
    assert run.config["train"]["precision"] == precision


def test_precision_and_compile_options_are_checked():
    assert canonical_precision("BF16-mixed") == "bf16" and canonical_precision("32") is None
    assert canonical_compile(True) == "default" and canonical_compile(False) is None
    x = torch.rand(8, 4)
    with pytest.raises(pv.ConfigError, match="precision"):
        pv.fit(pv.models.VAE(4, 2), None, x, precision="int8", progress=False)
    with pytest.raises(pv.ConfigError, match="float64"):
        pv.fit(pv.models.VAE(4, 2), None, x, precision="bf16", dtype="float64", progress=False)
    with pytest.raises(pv.ConfigError, match="compile"):
        pv.fit(pv.models.VAE(4, 2), None, x, compile="fastest", progress=False)


@pytest.mark.slow
def test_compiled_nets_train_like_eager(tmp_path):
    """torch.compile of the decoder and the trunk: same weights' names, same losses to float32 rounding."""
    runs = []
    for mode in (None, True):
        model, guide = _conv_pair(seed=3)
        x = (torch.rand(32, 64, generator=torch.Generator().manual_seed(4)) < 0.4).float()
        runs.append(pv.fit(model, guide, x, epochs=2, batch_size=16, progress=False, figures=False, compile=mode,
                           out=str(tmp_path / f"r{mode}")))
    a, b = ([h["train_loss"] for h in r.history] for r in runs)
    assert a == pytest.approx(b, rel=1e-4)
    assert pv.load_run(str(tmp_path / "rTrue")).config["train"]["compile"] == "default"


@pytest.mark.cuda
@pytest.mark.parametrize("precision", [None, "tf32", "bf16"])
def test_cuda_conv_fit_keeps_data_on_the_device(precision):
    model, guide = _conv_pair()
    x = (torch.rand(256, 64) < 0.3).float()
    before = torch.backends.cuda.matmul.allow_tf32
    run = pv.fit(model, guide, x, epochs=2, batch_size=64, progress=False, figures=False, device="cuda",
                 precision=precision)
    assert next(run.model.parameters()).is_cuda and math.isfinite(run.history[-1]["train_loss"])
    assert torch.backends.cuda.matmul.allow_tf32 == before  # TF32 only while the fit ran
    m = pv.evaluate(run, x[:32], k=64)
    assert math.isfinite(m["log_likelihood"])
