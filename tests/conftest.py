"""Shared fixtures. Tests run on CPU with fixed seeds; CUDA tests skip without a GPU."""

import contextlib
import os

import pyro
import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _fresh_pyro():
    """Each test starts with seeded RNGs and an empty global param store."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One torch thread for a test of tiny nets: on a shared 2-core CPU, thread synchronization dominates.

    Use as ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with _torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_per_module():
    """:func:`one_thread` held for a whole module, so its module-scoped fixtures (trained runs) use it too."""
    with _torch_threads(1):
        yield


@pytest.fixture
def restore_environ():
    """Lightning's spawn launcher sets MASTER_PORT in this process; put the environment back afterwards."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def ctrl_c_at_validation(monkeypatch):
    """``ctrl_c_at_validation(k)``: the fit's k-th validation pass raises KeyboardInterrupt (Ctrl-C during epoch
    k, after the checkpoint of epoch k - 1); returns ``undo``, which puts the real pass back."""
    import pyrovi.loop

    def arm(k: int):
        real, calls = pyrovi.loop.mean_loss, []

        def interrupt(*a, **kw):
            calls.append(1)
            if len(calls) == k:
                raise KeyboardInterrupt
            return real(*a, **kw)

        monkeypatch.setattr(pyrovi.loop, "mean_loss", interrupt)
        return monkeypatch.undo

    return arm


@pytest.fixture(scope="session")
def digits():
    import pyrovi as pv

    return pv.data.load("digits")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
