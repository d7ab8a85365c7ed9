"""Issue 17: a fit that goes wrong says so (divergence, overflowed optimizer state), seeds, precision, copies."""

import math
import os

import pytest
import torch

import pyrovi as pv
from pyrovi.checkpoint import load_tensors
from pyrovi.errors import TrainingError
from pyrovi.loop import DivergenceWatch, diverged, optimizer_state_finite

pytestmark = pytest.mark.usefixtures("one_thread")


def _small(data, sigma=None, seed=0):
    torch.manual_seed(seed)
    kw = {} if sigma is None else dict(likelihood="gaussian", sigma=sigma)
    model = pv.models.VAE(data.shape, 2, hidden=(16,), **kw)
    return model, pv.guides.DiagNormal(model, hidden=(16,))


# --------------------------------------------------------------------------- divergence (item 3)


def test_divergence_rule():
    assert not diverged(1e30, math.inf)  # nothing to compare with before the first step
    assert not diverged(900.0, 0.5)  # within 1000 nats of a small best
    assert diverged(1200.0, 0.5)
    assert not diverged(1e14, 1.26e13)  # a large-scale loss may move by a lot in absolute terms
    assert diverged(3e28, 1.26e13)  # the sigma=1e-6, lr=10 blow-up
    assert not diverged(-4000.0, -5000.0) and diverged(1e6, -5000.0)


def test_tiny_sigma_and_huge_lr_stop_with_a_training_error(digits):
    """The issue's case: Gaussian likelihood with sigma=1e-6 and lr=10 used to exit 0 with a loss of 7.6e28."""
    model, guide = _small(digits, sigma=1e-6)
    with pytest.raises(TrainingError, match=r"diverged at epoch 1, step 2: .*lower lr \(now 10\).*clip_norm"):
        pv.fit(model, guide, digits, epochs=3, lr=10, progress=False, figures=False)


class _BlowUpAfter(pv.objectives.ELBO):
    """ELBO whose value is multiplied by `factor` after `steps` differentiable calls (fit makes one to find params,
    so the first changed training step is step `steps`)."""

    def __init__(self, steps, factor=1e20, grad_only=False):
        super().__init__()
        self.steps, self.calls, self.factor, self.grad_only = steps, 0, factor, grad_only

    def __call__(self, model, guide, *args, **kwargs):
        loss = super().__call__(model, guide, *args, **kwargs)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls > self.steps:
                if self.grad_only:  # same value, gradient times factor: overflows Adam's second moment
                    return loss.detach() + self.factor * (loss - loss.detach())
                return loss * self.factor
        return loss


def _steps_per_epoch(digits, batch=128):
    return -(-len(digits.train) // batch)


def test_finite_blow_up_stops_at_its_step_and_keeps_the_last_good_checkpoint(digits, tmp_path):
    model, guide = _small(digits)
    out = str(tmp_path / "r")
    spe = _steps_per_epoch(digits)
    with pytest.raises(TrainingError, match=rf"diverged at epoch 2, step {spe + 2}: .*last good checkpoint "
                                            r"\(epoch 1\) is kept"):
        pv.fit(model, guide, digits, objective=_BlowUpAfter(spe + 2), epochs=3, progress=False, out=out,
               figures=False)
    tensors, meta = load_tensors(os.path.join(out, "checkpoint.safetensors"))
    assert meta["loop"]["epoch"] == 1 and math.isfinite(meta["loop"]["best_train"])
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())


def test_non_finite_optimizer_state_stops_even_when_the_loss_stays_finite(digits, tmp_path):
    model, guide = _small(digits)
    out = str(tmp_path / "r")
    spe = _steps_per_epoch(digits)
    obj = _BlowUpAfter(spe + 1, factor=1e30, grad_only=True)  # |g| ~ 1e30: g^2 overflows float32
    with pytest.raises(TrainingError, match=r"optimizer's state .* non-finite during epoch 2 .*last good checkpoint "
                                            r"\(epoch 1\)"):
        pv.fit(model, guide, digits, objective=obj, epochs=3, progress=False, out=out, figures=False)
    tensors, meta = load_tensors(os.path.join(out, "checkpoint.safetensors"))
    assert meta["loop"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("optim/"))


def test_optimizer_state_finite():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([p])
    assert optimizer_state_finite(opt)  # no state yet
    p.grad = torch.ones(3)
    opt.step()
    assert optimizer_state_finite(opt)
    opt.state[p]["exp_avg_sq"][1] = float("inf")
    assert not optimizer_state_finite(opt)


class _TwoRanks(pv.loop.World):
    """A rank of a world of two whose other rank saw `other` (diverged steps, bad optimizer state)."""

    size = 2
    where = " (on some rank)"

    def __init__(self, other):
        super().__init__("cpu")
        self.other = other

    def sum(self, *values):
        return [float(v) + o for v, o in zip(values, self.other)]


class _Cfg:
    beta, lr, clip_norm = 1.0, 1e-3, None


def test_ranks_stop_together_on_reduced_numbers():
    """Under N ranks one rank's diverged step is remembered, not raised; every rank raises at the epoch's end."""
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])
    loop = {"epoch": 3, "step": 40}
    calm = DivergenceWatch(_TwoRanks(other=(1.0, 0.0)), _Cfg(), dict(loop), None)  # the other rank diverged
    calm.step(1.0, 1.0)
    with pytest.raises(TrainingError, match=r"diverged at epoch 4.*1 diverged step\(s\) over all ranks"):
        calm.end_epoch(opt)
    wild = DivergenceWatch(_TwoRanks(other=(0.0, 0.0)), _Cfg(), dict(loop), None)
    wild.step(1.0, 1.0)
    wild.step(1e9, 1.0)  # diverged here: remembered, not raised (the other rank would wait in all-reduce)
    with pytest.raises(TrainingError, match=r"epoch 4, step 41 \(this rank; 1 diverged"):
        wild.end_epoch(opt)
    fine = DivergenceWatch(_TwoRanks(other=(0.0, 1.0)), _Cfg(), dict(loop), None)  # other rank: bad Adam state
    with pytest.raises(TrainingError, match=r"optimizer's state .*epoch 4 \(by step 40\) \(on some rank\)"):
        fine.end_epoch(opt)
    ok = DivergenceWatch(_TwoRanks(other=(0.0, 0.0)), _Cfg(), dict(loop), None)
    ok.step(1.0, 1.0)
    ok.end_epoch(opt)


def test_warm_up_steps_are_not_compared():
    """During KL warm-up each step's loss is a different function: the best is tracked at full beta only."""
    w = DivergenceWatch(pv.loop.World("cpu"), _Cfg(), {"epoch": 0, "step": 0}, None)
    w.step(0.1, 0.01)
    w.step(5000.0, 0.5)
    assert w.loop["best_train"] == math.inf
    w.step(3.0, 1.0)
    assert w.loop["best_train"] == 3.0
