"""Reconstruction, prior sampling and interpolation (pyrovi.uses) and the `pyrovi interpolate` command."""

import math

import pytest
import torch

import pyrovi as pv
from pyrovi import uses
from pyrovi.errors import ConfigError


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = pv.data.load("digits")
    torch.manual_seed(0)
    model = pv.models.VAE(data.shape, 4, hidden=(64,), image_shape=data.image_shape)
    out = tmp_path_factory.mktemp("uses") / "run"
    run = pv.fit(model, pv.guides.DiagNormal(model, hidden=(64,)), data, epochs=3, progress=False, out=out)
    return data, run, out


# ------------------------------------------------------------------ interpolation formulas


def test_weights_run_from_one_to_zero():
    a = uses.interpolation_weights(5)
    torch.testing.assert_close(a, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    with pytest.raises(ConfigError, match="steps"):
        uses.interpolation_weights(1)


def test_lerp_is_the_seed_formula():
    z1, z2 = torch.randn(3, 4), torch.randn(3, 4)
    a = torch.tensor([1.0, 0.3, 0.0])
    out = uses.lerp(z1, z2, a)  # (A, P, L)
    assert out.shape == (3, 3, 4)
    for i, ai in enumerate(a):
        torch.testing.assert_close(out[i], ai * z1 + (1 - ai) * z2)


def test_slerp_on_orthogonal_unit_vectors_is_a_quarter_circle():
    z1, z2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])  # Omega = pi/2
    a = torch.linspace(1, 0, 7)
    out = uses.slerp(z1, z2, a)
    expect = torch.stack([torch.sin(a * math.pi / 2), torch.cos(a * math.pi / 2)], -1)
    torch.testing.assert_close(out, expect)


def test_slerp_keeps_norm_of_equal_norm_codes_and_moves_at_constant_angle():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    z2 = z2 / z2.norm(dim=-1, keepdim=True) * z1.norm(dim=-1, keepdim=True)  # equal norms per pair
    path = uses.slerp(z1, z2, uses.interpolation_weights(9))  # (9, 5, 8)
    torch.testing.assert_close(path.norm(dim=-1), z1.norm(dim=-1).expand(9, 5), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(path[0], z1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(path[-1], z2, rtol=1e-5, atol=1e-6)
    unit = path / path.norm(dim=-1, keepdim=True)
    steps = torch.arccos((unit[1:] * unit[:-1]).sum(-1).clamp(-1, 1))  # (8, 5) angle per step
    torch.testing.assert_close(steps, steps[:1].expand_as(steps), rtol=1e-3, atol=1e-4)
    # a straight line between the same codes dips below their norm in the middle
    assert (uses.lerp(z1, z2, torch.tensor([0.5]))[0].norm(dim=-1) < z1.norm(dim=-1)).all()


def test_slerp_of_parallel_codes_falls_back_to_lerp():
    z1 = torch.tensor([[1.0, 2.0, 2.0]])
    a = torch.tensor([0.25])
    torch.testing.assert_close(uses.slerp(z1, 2 * z1, a), uses.lerp(z1, 2 * z1, a))


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="linear.*slerp"):
        uses.interpolate_codes(torch.zeros(2), torch.ones(2), 3, "cubic")


# ------------------------------------------------------------------ with a trained run


def test_reconstruct_encode_and_sample_shapes(trained):
    data, run, _ = trained
    x = data.test.x[:5]
    z = uses.encode(run, x)
    assert z.shape == (5, 4)
    x_hat = uses.reconstruct(run, x)
    assert x_hat.shape == (5, 64) and ((x_hat >= 0) & (x_hat <= 1)).all()
    torch.testing.assert_close(x_hat, run.model.decode(z))
    assert uses.reconstruct((run.model, run.guide), x[0]).shape == (1, 64)  # a (model, guide) pair, one item
    torch.testing.assert_close(uses.sample_prior(run, 6, seed=1), uses.sample_prior(run, 6, seed=1))
    assert not torch.allclose(uses.sample_prior(run, 6, seed=1), uses.sample_prior(run, 6, seed=2))
    with pytest.raises(ConfigError, match="does not condition on labels"):
        uses.sample_prior(run, 2, label=3)
    with pytest.raises(ConfigError, match="Run or a \\(model, guide\\)"):
        uses.encode(object(), x)


def test_interpolate_ends_at_the_two_reconstructions(trained):
    data, run, _ = trained
    x1, x2 = data.test.x[:3], data.test.x[3:6]
    for method in ("linear", "slerp"):
        path = uses.interpolate(run, x1, x2, steps=6, method=method)
        assert path.shape == (3, 6, 64)
        torch.testing.assert_close(path[:, 0], uses.reconstruct(run, x1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(path[:, -1], uses.reconstruct(run, x2), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="same shape"):
        uses.interpolate(run, x1, data.test.x[:2])


def test_pick_pairs(trained):
    data, _, _ = trained
    y = data.test.y
    i1, i2 = uses.pick_pairs(y, 10, seed=0)
    assert (y[i1] != y[i2]).all() and len(set(i1.tolist()) | set(i2.tolist())) == 20
    j1, j2 = uses.pick_pairs(y, 5, same_label=True, seed=0)
    assert (y[j1] == y[j2]).all()
    with pytest.raises(ConfigError, match="different labels"):
        uses.pick_pairs(torch.zeros(6, dtype=torch.long), 1)


def test_cli_interpolate_writes_png(trained, tmp_path):
    from pyrovi.cli import main

    _, _, out = trained
    png = tmp_path / "i.png"
    assert main(["interpolate", str(out), "--pairs", "3", "--steps", "5", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["interpolate", str(out), "--out", str(tmp_path / "i.jpg")]) == 2


def test_a_model_without_decode_or_sample_is_refused_by_name():
    """A user's model with neither decode(z) nor sample(n): the uses say which method is missing."""
    class Bare(torch.nn.Module):
        def forward(self, x, y=None):
            return x

    with pytest.raises(ConfigError, match="Bare has no sample"):
        uses.sample_prior((Bare(), None), 3)
    with pytest.raises(ConfigError, match="Bare has no decode"):
        uses._decode(Bare(), torch.enable_grad(), torch.zeros(2, 1))


def test_linear_gaussian_decodes_to_its_mean_and_samples_from_its_prior():
    W, b = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]), torch.tensor([0.5, -1.0, 0.0])
    m = pv.models.LinearGaussian(W, b, sigma=0.5)
    z = torch.tensor([[1.0, -1.0]])
    assert torch.allclose(m.decode(z), torch.tensor([[1.5, -3.0, 0.0]]))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(m.sample(5, generator=g1), torch.randn(5, 2, generator=g2) @ W.T + b)
