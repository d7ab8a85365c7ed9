"""Convolutional VAEs: ``VAE(arch="conv")``, the guides' conv trunk under every head, the discretized logistic."""

import math

import pyro
import pytest
import torch

import pyrovi as pv
from pyrovi import fastpath
from pyrovi.cli import main, model_config
from pyrovi.distributions import DiscretizedLogistic
from pyrovi.nets import ConvTrunk

HEADS = {
    "diag_normal": lambda m: pv.guides.DiagNormal(m, hidden=16),
    "mixture": lambda m: pv.guides.Mixture(m, components=2, hidden=16),
    "flow": lambda m: pv.guides.Flow(m, depth=1, hidden=16),
    "delta": lambda m: pv.guides.Delta(m, hidden=16),
    "auto": lambda m: pv.guides.Auto(m, hidden=16),
}


def _images(n, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, math.prod(shape)), generator=g) / 255.0).float()


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("shape, likelihood", [((6, 10), "bernoulli"), ((3, 8, 4), "logistic")])
def test_every_head_on_a_conv_trunk_fast_equals_traced(head, shape, likelihood):
    """Grey (H, W) and RGB (C, H, W): every head encodes through the conv trunk; fast path == Pyro's path."""
    torch.manual_seed(0)
    model = pv.models.VAE(shape, 3, arch="conv", hidden=16, channels=4, likelihood=likelihood)
    guide = HEADS[head](model)
    assert isinstance(guide.body, ConvTrunk)
    x = _images(5, shape)
    if likelihood == "bernoulli":
        x = (x > 0.5).float()
    assert fastpath.supported(model, guide, stratify=True)
    obj = pv.objectives.get("elbo", particles=2)
    obj.max_plate_nesting = 1
    losses = []
    for fast in (True, False):
        obj.fast = fast
        pyro.set_rng_seed(3)
        losses.append(obj(model, guide, x))
    assert torch.isfinite(losses[0])
    torch.testing.assert_close(losses[0], losses[1], rtol=2e-6, atol=1e-3)
    out = model.decode(torch.zeros(2, 3))
    assert out.shape == (2, math.prod(shape)) and bool(((out >= 0) & (out <= 1)).all())


def test_conv_decoder_maps_latent_to_every_pixel_channel_first():
    model = pv.models.VAE((3, 8, 12), 2, arch="conv", hidden=8, channels=4, likelihood="logistic")
    assert model.cfg.downsample == 2  # 8 and 12 both halve twice
    assert model.decoder(torch.zeros(7, 2)).shape == (7, 2 * 3 * 8 * 12)  # mean and log-scale per pixel
    odd = pv.models.VAE((7, 9), 2, arch="conv", hidden=8, channels=4)
    assert odd.cfg.downsample == 0 and odd.decoder(torch.zeros(1, 2)).shape == (1, 63)


def test_discretized_logistic_is_a_distribution_over_256_levels():
    """Masses of the 256 levels sum to 1 per pixel and equal the CDF differences computed in float64."""
    levels = torch.arange(256, dtype=torch.float32) / 255  # (256,)
    loc = torch.tensor([0.0, 0.3, 0.5, 1.0, 1.4, -0.2])
    log_s = torch.tensor([-1.0, -3.0, -6.0, -2.0, 0.5, -4.0])
    d = DiscretizedLogistic(loc.expand(256, 6), log_s.expand(256, 6))
    per_pixel = torch.stack([DiscretizedLogistic(loc[i:i + 1].expand(256, 1), log_s[i:i + 1].expand(256, 1))
                             .log_prob(levels[:, None]) for i in range(6)], 1)  # (256, 6)
    torch.testing.assert_close(per_pixel.exp().sum(0), torch.ones(6), rtol=0, atol=2e-5)
    x64, m64, s64 = levels.double()[:, None], loc.double(), log_s.double().exp()
    h = 0.5 / 255
    hi, lo = (x64 + h - m64) / s64, (x64 - h - m64) / s64
    # the bin's mass from the nearer tail, so float64 does not cancel (1 - sigmoid(t) = sigmoid(-t))
    mid = torch.where(x64 > m64, torch.sigmoid(-lo) - torch.sigmoid(-hi), torch.sigmoid(hi) - torch.sigmoid(lo))
    ref = torch.where(x64 < h, torch.sigmoid(hi), torch.where(x64 > 1 - h, torch.sigmoid(-lo), mid))
    keep = ref > 1e-30  # the float64 reference underflows far in the tails, where float32 is still exact
    torch.testing.assert_close(per_pixel.double()[keep], ref.log()[keep], rtol=1e-4, atol=1e-4)
    assert d.log_prob(levels[:, None].expand(256, 6)).shape == (256,)
    assert float(d.sample().min()) >= 0 and float(d.sample().max()) <= 1


def test_logistic_bits_per_dim_and_range_check():
    torch.manual_seed(0)
    x = _images(40, (4, 4))
    model = pv.models.VAE((4, 4), 2, arch="conv", hidden=8, channels=4, likelihood="logistic")
    run = pv.fit(model, None, x, epochs=1, batch_size=20, progress=False, figures=False)
    m = pv.evaluate(run, x[:8], k=4)
    assert m["bits_per_dim"] == pytest.approx(-m["log_likelihood"] / (16 * math.log(2)))
    with pytest.raises(pv.DataError, match="discretized logistic"):
        pv.fit(model, None, x * 2, epochs=1, progress=False, figures=False)


def test_conditional_conv_vae_and_load_run(tmp_path):
    torch.manual_seed(0)
    x, y = (_images(30, (2, 4, 4)) > 0.5).float(), torch.arange(30) % 3
    model = pv.models.ConditionalVAE((2, 4, 4), 2, num_classes=3, arch="conv", hidden=8, channels=4)
    run = pv.fit(model, pv.guides.Flow(model, depth=1, hidden=8), (x, y), epochs=1, batch_size=10,
                 progress=False, figures=False, out=str(tmp_path / "r"))
    assert isinstance(run.guide.body, ConvTrunk) and run.model.sample(4, label=2).shape == (4, 32)
    back = pv.load_run(str(tmp_path / "r"))
    assert back.config["model"]["arch"] == "conv" and isinstance(back.guide.body, ConvTrunk)
    q1, q2 = run.guide.encode(x[:3], y[:3]), back.guide.encode(x[:3], y[:3])
    torch.testing.assert_close(q1["z"][0], q2["z"][0])


def test_conv_needs_an_image_shape_and_a_known_arch():
    with pytest.raises(pv.ConfigError, match="image_shape"):
        pv.models.VAE(64, 2, arch="conv")
    with pytest.raises(pv.ConfigError, match="arch"):
        pv.models.VAE((8, 8), 2, arch="resnet")
    with pytest.raises(pv.ConfigError, match="divisible"):
        pv.models.VAE((6, 6), 2, arch="conv", downsample=2)
    assert "arch" not in pv.models.VAE(64, 2).config()  # an MLP's config is as before


def test_cli_arch_conv(tmp_path):
    """``pyrovi train --arch conv`` on a small image file: the run's config records the conv model."""
    import numpy as np

    path = str(tmp_path / "imgs.npz")
    np.savez(path, x=(np.random.default_rng(0).random((40, 8, 8)) > 0.5).astype(np.float32))
    out = str(tmp_path / "run")
    assert main(["train", "--data", f"npz:{path}", "--arch", "conv", "--channels", "4", "--hidden", "16",
                 "--latent-dim", "2", "--epochs", "1", "--batch-size", "16", "--out", out, "--no-progress",
                 "--precision", "bf16"]) == 0
    back = pv.load_run(out)
    cfg = back.config["model"]
    assert cfg["arch"] == "conv" and cfg["channels"] == 4 and cfg["downsample"] == 2
    assert back.config["train"]["precision"] == "bf16" and back.config["train"]["compile"] is None
    args = _train_parser().parse_args(["--model", "vqvae"])  # the VQ-VAE's conv defaults stay as they were
    vq = model_config(args, pv.data.load(f"npz:{path}"))
    assert vq["channels"] == 64 and vq["downsample"] == 1


def _train_parser():
    import argparse

    from pyrovi.cli import _train_args

    p = argparse.ArgumentParser()
    _train_args(p)
    return p
