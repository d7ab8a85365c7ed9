"""Devices: explicit CPU, CUDA when present, and runs that move between the two."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

import pyrovi as pv
from byo_code import tutorial_vae
from pyrovi.checkpoint import load_tensors, save_tensors

pytestmark = pytest.mark.usefixtures("one_thread")


def param_model(x):
    loc = pyro.sample("loc", dist.Normal(torch.zeros(x.shape[-1]), 3.0).to_event(1))  # created without device=
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)


def param_guide(x):
    loc = pyro.param("q_loc", torch.zeros(x.shape[-1]))  # no device=: pyrovi puts it on the fit's device
    scale = pyro.param("q_scale", torch.ones(x.shape[-1]), constraint=constraints.positive)
    pyro.sample("loc", dist.Normal(loc, scale).to_event(1))


def _x():
    return torch.randn(64, 4, generator=torch.Generator().manual_seed(0)) + 1.0


def test_explicit_cpu(digits):
    model, guide, dec, enc = tutorial_vae(0)
    run = pv.fit(model, guide, digits, epochs=1, device="cpu", progress=False)
    assert run.device == torch.device("cpu")
    assert all(v.device.type == "cpu" for v in run.state_tensors().values())
    before = dict(run.param_state["params"])
    r = pv.evaluate(run, digits.test.x[:20], k=4, save=False, device="cpu")
    assert r["n"] == 20 and run.device.type == "cpu"
    assert all(run.param_state["params"][k] is v for k, v in before.items())  # Run.to keeps tensor identity


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(pv.ConfigError, match="no CUDA device is available"):
        pv.fit(param_model, param_guide, _x(), batch_size=16, device="cuda", progress=False)
    run = pv.fit(param_model, param_guide, _x(), batch_size=16, device="auto", epochs=1, progress=False)
    assert run.device.type == "cpu"


def _as_if_trained_on_cuda(run_dir):
    """Rewrite a checkpoint the way the CUDA path writes it: plus the CUDA generator's state.

    Tensors are always stored from CPU copies (``save_tensors``), so weights of a GPU run
    are bytes-identical in kind to a CPU run's; what only a GPU run has is ``rng/cuda``.
    """
    path = f"{run_dir}/checkpoint.safetensors"
    tensors, meta = load_tensors(path)
    tensors["rng/cuda"] = torch.get_rng_state().clone()  # a ByteTensor, as torch.cuda.get_rng_state gives
    save_tensors(path, tensors, {k: v for k, v in meta.items() if k != "format"})


def test_run_written_by_the_cuda_path_loads_and_resumes_on_cpu(tmp_path):
    out = str(tmp_path / "run")
    run = pv.fit(param_model, param_guide, _x(), batch_size=16, epochs=2, out=out, device="cpu", progress=False, figures=False)
    _as_if_trained_on_cuda(out)
    loaded = pv.load_run(out, model=param_model, guide=param_guide, device="cpu")
    with run.scope():
        want = pyro.param("q_loc").detach()
    with loaded.scope():
        got = pyro.param("q_loc").detach()
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, want)
    resumed = pv.fit(param_model, param_guide, _x(), batch_size=16, epochs=3, out=out, resume=True, device="cpu",
                     progress=False, figures=False)
    assert len(resumed.history) == 3


@pytest.mark.cuda
def test_cuda_fit_evaluate_and_load_on_cpu(tmp_path, digits):
    out = str(tmp_path / "run")
    model, guide, dec, enc = tutorial_vae(0)
    run = pv.fit(model, guide, digits, epochs=2, out=out, device="cuda", progress=False, figures=False)
    assert dec.fc1.weight.device.type == "cuda" and run.device.type == "cuda"
    pv.evaluate(run, digits.test.x[:50], k=8, save=False)
    model2, guide2, dec2, enc2 = tutorial_vae(1)
    loaded = pv.load_run(out, model=model2, guide=guide2, device="cpu")
    assert dec2.fc1.weight.device.type == "cpu"
    torch.testing.assert_close(dec2.fc1.weight, dec.fc1.weight.cpu())
    pv.evaluate(loaded, digits.test.x[:50], k=8, save=False, device="cuda")  # and back onto the GPU
    assert dec2.fc1.weight.device.type == "cuda" and loaded.device.type == "cuda"
    # plain pyro.param code without device= trains on the GPU, and a CPU run loads onto it
    out2 = str(tmp_path / "run2")
    run2 = pv.fit(param_model, param_guide, _x(), batch_size=16, epochs=2, out=out2, device="auto", progress=False, figures=False)
    with run2.scope():
        assert pyro.param("q_loc").device.type == "cuda"
    cpu_out = str(tmp_path / "run3")
    pv.fit(param_model, param_guide, _x(), batch_size=16, epochs=1, out=cpu_out, device="cpu", progress=False, figures=False)
    loaded = pv.load_run(cpu_out, model=param_model, guide=param_guide, device="cuda")
    with loaded.scope():
        assert pyro.param("q_loc").device.type == "cuda"
