"""Data-parallel training through Lightning: sharding, identical replicas, agreement with one process, errors.

The DDP test runs ``tests/ddp_script.py`` as a user would run a script: Lightning's
launcher re-runs it for rank 1 (2 CPU processes, Gloo). Everything else here runs in
this process and needs no Lightning, except where it says so.
"""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import pyro
import torch

import pyrovi as pv
from pyrovi import distributed as dist
from pyrovi.checkpoint import load_tensors
from pyrovi.cli import main
from pyrovi.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import ddp_script  # noqa: E402

HAS_LIGHTNING = importlib.util.find_spec("lightning") is not None
needs_lightning = pytest.mark.skipif(not HAS_LIGHTNING,
                                     reason='needs PyTorch Lightning: pip install "pyrovi[distributed]"')

#: |DDP - single| bound on the held-out ELBO (nats/datapoint); see test_ddp_matches_single_process.
ELBO_TOL = 0.2


def _group_alive(pgid: int) -> list:
    """Live (non-zombie) processes of process group ``pgid``."""
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(pid))
    return alive


def _run_ddp_script(out, record_dir) -> str:
    """Run the DDP script in its own process group; wait for every rank to exit; never leave one behind."""
    # a clean launch: no cluster (SLURM, torchrun) or earlier launcher variables from this environment
    launch_vars = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in launch_vars and not k.startswith(("SLURM_", "TORCHELASTIC"))}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "ddp_script.py"), str(out), str(record_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    left = []
    try:
        log, _ = proc.communicate(timeout=400)
        deadline = time.monotonic() + 60  # rank 1 may still be shutting down after rank 0 exits
        while (left := _group_alive(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0, log[-4000:]
    assert not left, f"DDP processes {left} still running after the script ended"
    return log


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    if not HAS_LIGHTNING:
        pytest.skip('needs PyTorch Lightning: pip install "pyrovi[distributed]"')
    if not os.path.isdir("/proc"):
        pytest.skip("the process-group check reads /proc (Linux)")
    base = tmp_path_factory.mktemp("ddp")
    out, rec = base / "run", base / "record"
    rec.mkdir()
    _run_ddp_script(out, rec)
    records = {}
    for r in (0, 1):
        with open(rec / f"rank{r}.json") as f:
            records[r] = json.load(f)
        records[r]["weights"] = load_tensors(str(rec / f"weights{r}.safetensors"))[0]
    return str(out), records


@needs_lightning
def test_ranks_train_on_disjoint_shards_and_end_identical(ddp_run, digits):
    out, rec = ddp_run
    n, world, per_rank = len(digits.train), 2, ddp_script.SETTING["batch_size"] // 2
    assert [rec[r]["rank"] for r in (0, 1)] == [0, 1]
    hashes = ddp_script.row_hashes(digits.train.x)
    for epoch in range(ddp_script.SETTING["epochs"]):
        a, b = (rec[r]["shards"][str(epoch)] for r in (0, 1))
        assert len(a) == len(b) == n // world
        assert not set(a) & set(b), f"epoch {epoch}: ranks share rows"
        assert len(set(a) | set(b)) == world * (n // world) and all(0 <= i < n for i in a + b)
    assert rec[0]["shards"]["0"] != rec[0]["shards"]["1"], "shards must be reshuffled every epoch"
    for r in (0, 1):
        # the batches a rank trained on are exactly its shard, in order, per_rank rows at a time
        expected = []
        for epoch in range(ddp_script.SETTING["epochs"]):
            idx = rec[r]["shards"][str(epoch)]
            expected += [[hashes[i] for i in idx[s:s + per_rank]] for s in range(0, len(idx), per_rank)]
        assert rec[r]["batches"] == expected
    # particles differ across ranks: the RNG state differs at every step
    assert len(rec[0]["rng"]) == len(rec[1]["rng"])
    assert all(s0 != s1 for s0, s1 in zip(rec[0]["rng"], rec[1]["rng"]))
    # DDP averaged the gradients: both replicas end bit-identical, and rank 0 wrote exactly those weights
    w0, w1 = rec[0]["weights"], rec[1]["weights"]
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    saved = load_tensors(os.path.join(out, "weights.safetensors"))[0]
    assert all(torch.equal(saved[k], w0[k]) for k in w0)
    # metrics are reduced over ranks: both ranks report the same history; only rank 0 owns the directory
    losses = [[(h["train_loss"], h["val_loss"]) for h in rec[r]["history"]] for r in (0, 1)]
    assert losses[0] == losses[1] and len(losses[0]) == ddp_script.SETTING["epochs"]
    assert rec[0]["directory"] == out and rec[1]["directory"] is None
    # callbacks run on rank 0 only, with the epoch losses reduced over ranks
    hooks = rec[0]["hooks"]
    assert rec[1]["hooks"] == [] and hooks[0] == ["begin", 2] and hooks[-1] == ["end", ddp_script.SETTING["epochs"]]
    assert [h[2] for h in hooks if h[0] == "epoch"] == [h["train_loss"] for h in rec[0]["history"]]
    assert [h[1] for h in hooks if h[0] == "checkpoint"] == list(range(1, ddp_script.SETTING["epochs"] + 1))
    assert [h[1] for h in hooks if h[0] == "step"] == list(range(1, len(rec[0]["batches"]) + 1))


@needs_lightning
def test_ddp_matches_single_process(ddp_run, digits, capsys):
    """Held-out ELBO of the 2-rank run vs one process with the same global batch (128) and initial weights.

    DDP changes only the random stream (which rows share a step, which particles are
    drawn), so the two must agree to within the seed-to-seed spread of single-process
    training. Measured with ``python -m benchmarks.ddp_agreement`` (benchmarks/RESULTS.md):
    that spread has sd 0.024 nats over 6 seeds, three DDP seeds fell within 0.06 of the
    single-process mean, and the evaluation's Monte-Carlo error at k=200 is < 0.01.
    ELBO_TOL = 0.2 nats is 8 sd, while the mistakes this guards against move the ELBO
    far more: reading batch_size per rank (global 256, half the steps) by -1.6 nats,
    summing instead of averaging gradients (lr x2) by +0.9 nats.
    """
    out, _ = ddp_run
    loaded = pv.load_run(out)
    assert loaded.config["distributed"]["world_size"] == 2
    assert loaded.config["train"]["batch_size"] == 128 and loaded.config["distributed"]["batch_size_per_rank"] == 64
    assert [h["epoch"] for h in loaded.history] == list(range(1, ddp_script.SETTING["epochs"] + 1))
    torch.manual_seed(123)
    ddp_elbo = pv.evaluate(loaded, digits, k=200, save=False)["elbo"]
    model, guide = ddp_script.build(digits)
    single = pv.fit(model, guide, digits, progress=False, **ddp_script.SETTING)
    torch.manual_seed(123)
    single_elbo = pv.evaluate(single, digits, k=200, save=False)["elbo"]
    assert abs(ddp_elbo - single_elbo) < ELBO_TOL, (ddp_elbo, single_elbo)
    # and training did something: far above the untrained model's ELBO
    untrained = pv.Run(*ddp_script.build(digits), pv.objectives.get("elbo"), {})
    torch.manual_seed(123)
    assert ddp_elbo > pv.evaluate(untrained, digits, k=200, save=False)["elbo"] + 5
    # `pyrovi evaluate` on the distributed run directory
    assert main(["evaluate", out, "--k", "20"]) == 0
    assert "log_likelihood" in capsys.readouterr().out
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["test"]["k"] == 20


# --------------------------------------------------------------------------- no processes needed


def test_shard_deals_a_seeded_permutation():
    n, world = 11, 3
    for epoch in range(3):
        parts = [dist.shard(n, epoch, r, world, seed=5) for r in range(world)]
        assert all(len(p) == n // world for p in parts)
        flat = torch.cat(parts).tolist()
        assert len(set(flat)) == len(flat) == world * (n // world)
        assert all(torch.equal(p, dist.shard(n, epoch, r, world, seed=5)) for r, p in enumerate(parts))
    assert not torch.equal(dist.shard(n, 0, 0, world, 5), dist.shard(n, 1, 0, world, 5))
    assert not torch.equal(dist.shard(n, 0, 0, world, 5), dist.shard(n, 0, 0, world, 6))
    seeds = {dist.rank_seed(0, r, e) for r in range(4) for e in range(50)}
    assert len(seeds) == 200 and all(0 <= s < 2**32 for s in seeds)


def test_scale_out_options_are_checked_up_front(digits):
    model, guide = ddp_script.build(digits)
    with pytest.raises(ConfigError, match="devices=2 needs a data-parallel strategy"):
        pv.fit(model, guide, digits, devices=2)
    with pytest.raises(ConfigError, match="unknown strategy 'horovod'; valid strategys: ddp, ddp_spawn"):
        pv.fit(model, guide, digits, strategy="horovod")
    with pytest.raises(ConfigError, match="devices must be > 0"):
        pv.fit(model, guide, digits, strategy="ddp", devices=0)
    with pytest.raises(ConfigError, match="num_nodes must be a positive integer"):
        pv.fit(model, guide, digits, strategy="ddp", num_nodes=1.5)
    with pytest.raises(ConfigError, match="unknown accelerator 'tpu'"):
        pv.fit(model, guide, digits, strategy="ddp", accelerator="tpu")


@needs_lightning
def test_global_batch_must_split_evenly(digits):
    model, guide = ddp_script.build(digits)
    with pytest.raises(ConfigError, match="batch_size=129 is the global batch .* multiple of devices\\*num_nodes=2; "
                                          "use batch_size=128"):
        pv.fit(model, guide, digits, strategy="ddp", devices=2, batch_size=129, accelerator="cpu")


def test_missing_lightning_says_how_to_install(digits, monkeypatch, tmp_path, capsys):
    for name in [m for m in sys.modules if m == "lightning" or m.startswith("lightning.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lightning", None)  # `import lightning...` now raises ImportError
    model, guide = ddp_script.build(digits)
    with pytest.raises(ConfigError, match='pip install "pyrovi\\[distributed\\]"'):
        pv.fit(model, guide, digits, strategy="ddp", devices=2)
    rc = main(["train", "--strategy", "ddp", "--devices", "2", "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 2 and 'pip install "pyrovi[distributed]"' in capsys.readouterr().err
    # the single-process path does not need Lightning
    run = pv.fit(model, guide, digits, epochs=1, progress=False)
    assert len(run.history) == 1


def test_base_install_never_imports_lightning():
    code = ("import sys, pyrovi, pyrovi.distributed, pyrovi.cli; "
            "top = {'lightning', 'lightning_fabric', 'pytorch_lightning'}; "
            "bad = [m for m in sys.modules if m.split('.')[0] in top]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert not any(d.startswith("lightning") for d in project["dependencies"])
    assert any(d.startswith("lightning") for d in project["optional-dependencies"]["distributed"])


def test_cli_passes_scale_out_flags_and_only_rank0_reports(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_fit(model, guide, data, **kw):
        seen.update(kw)
        return pv.Run(model, guide, pv.objectives.get("elbo"), {}, directory=None, metrics={"epochs": 1})

    import pyrovi.train

    monkeypatch.setattr(pyrovi.train, "fit", fake_fit)  # where the CLI looks fit up
    # never start real ranks from inside the test process (Lightning would re-run pytest itself)
    monkeypatch.setattr(dist, "launch", lambda *a, **k: pytest.fail("the CLI test must not launch DDP"))
    rc = main(["train", "--strategy", "ddp", "--devices", "4", "--num-nodes", "2", "--device", "cpu",
               "--out", str(tmp_path / "r"), "--epochs", "1"])
    assert rc == 0
    assert (seen["strategy"], seen["devices"], seen["num_nodes"], seen["device"]) == ("ddp", 4, 2, "cpu")
    assert capsys.readouterr().out == ""  # a rank other than 0 (its Run has no directory) prints nothing


def test_pyro_params_of_plain_functions_become_parameters_ddp_averages():
    """A plain-function model's ``pyro.param`` lives only in the param store; DDP must see and update it."""
    import pyro
    import pyro.distributions as pdist

    def model(x):
        loc = pyro.param("loc", torch.zeros(3))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", pdist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(x):
        pass

    obj, x = pv.objectives.get("elbo"), torch.randn(5, 3) + 2
    run = pv.Run(model, guide, obj, {})
    with run.scope():
        params = dist._store_params_as_parameters(
            pv.run.discover_params(model, guide, lambda: obj(model, guide, x)))
        module = dist._ObjectiveModule(obj, model, guide, params)
        assert [id(p) for p in module.parameters()] == [id(p) for p in params]
        assert isinstance(params[0], torch.nn.Parameter) and pyro.param("loc").unconstrained() is params[0]
        module(model, guide, (x,), {}, 1.0).backward()  # loss = sum_i ||x_i - loc||^2 / 2 + const
        assert torch.allclose(params[0].grad, -x.sum(0))


def _spawn_build(data):
    """A VAE whose weights (146 KB) exceed a pipe's 64 KiB: Lightning hands a spawned worker's return value
    back through a pipe read only after every rank has exited, so weights returned that way hung rank 0."""
    torch.manual_seed(0)
    model = pv.models.VAE(data.shape, 4, hidden=(256,), image_shape=data.image_shape)
    return model, pv.guides.DiagNormal(model, hidden=(256,))


@pytest.mark.slow
@needs_lightning
def test_ddp_spawn_brings_weights_back_and_resumes_the_same_trajectory(digits, tmp_path, restore_environ):
    kw = dict(strategy="ddp_spawn", devices=2, accelerator="cpu", batch_size=128, progress=False, figures=False)
    model, guide = _spawn_build(digits)
    run = pv.fit(model, guide, digits, epochs=2, out=str(tmp_path / "a"), **kw)
    saved = load_tensors(str(tmp_path / "a" / "weights.safetensors"))[0]
    mine = run.state_tensors()
    assert saved.keys() == mine.keys() and all(torch.equal(saved[k], mine[k]) for k in saved)
    assert sum(v.numel() * v.element_size() for v in mine.values()) > 2 * 2 ** 16  # over twice a pipe's buffer
    untouched, _ = _spawn_build(digits)  # the same initial weights: training moved them
    assert not torch.equal(next(iter(model.parameters())), next(iter(untouched.parameters())))
    assert len(run.history) == 2 and run.config["distributed"]["strategy"] == "ddp_spawn"
    # one epoch, then resume to two: the same weights as two epochs straight (shards and seeds are per epoch)
    m2, g2 = _spawn_build(digits)
    pv.fit(m2, g2, digits, epochs=1, out=str(tmp_path / "b"), **kw)
    resumed = pv.fit(m2, g2, digits, epochs=2, out=str(tmp_path / "b"), resume=True, **kw)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert all(torch.equal(v, mine[k]) for k, v in resumed.state_tensors().items())


def user_model(x):
    """A user's plain-function Pyro model (module level, so spawned ranks can unpickle it)."""
    decoder = pyro.module("decoder", _DECODER)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", pyro.distributions.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.sample("x", pyro.distributions.Normal(decoder(z), 0.5).to_event(1), obs=x)


_DECODER = torch.nn.Linear(2, 3)


@needs_lightning
def test_every_fit_option_behaves_the_same_under_ddp(digits, tmp_path, restore_environ):
    """One loop for 1 or N processes: guide=None on a user model (Auto traced on the first rows), float64,
    KL warm-up and a case-insensitive schedule name behave as in single-process fit."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g) @ torch.tensor([[1.0, 0.5, -1.0], [0.0, 1.0, 2.0]])
    kw = dict(epochs=2, batch_size=16, lr=1e-2, warmup=2, lr_schedule="Cosine", progress=False, figures=False,
              val_every=2)
    ddp = dict(strategy="ddp_spawn", devices=2, accelerator="cpu")
    single = pv.fit(user_model, None, x, **kw)
    run = pv.fit(user_model, None, x, out=str(tmp_path / "user"), **ddp, **kw)
    for r in (single, run):
        assert isinstance(r.guide, pv.guides.Auto) and r.config["train"]["lr_schedule"] == "cosine"
        assert [h["beta"] for h in r.history] == [0.5, 1.0]  # KL warm-up over 2 epochs of 4 steps
        assert r.history[1]["lr"] < r.history[0]["lr"]  # the cosine schedule stepped
        assert r.history[0]["val_loss"] is None and r.history[1]["val_loss"] is not None  # val_every=2
    assert run.config["distributed"]["world_size"] == 2
    loaded = pv.load_run(str(tmp_path / "user"), model=user_model)
    assert isinstance(loaded.guide, pv.guides.Auto)
    m = pv.evaluate(loaded, x[:16], k=8, save=False)  # through load_run -> evaluate -> diagnose, as one process
    assert math.isfinite(m["log_likelihood"]) and m["log_likelihood"] >= m["elbo"] - 1e-3
    pv.diagnose(loaded, x[:4], n=4, particles=16, save=False, warn=False)

    model, guide = ddp_script.build(digits)
    run = pv.fit(model, guide, digits, dtype="Float64", out=str(tmp_path / "f64"), **ddp, **kw)
    assert run.config["train"]["dtype"] == "float64"
    assert all(p.dtype == torch.float64 for p in guide.parameters())
    loaded = pv.load_run(str(tmp_path / "f64"))
    assert loaded.dtype == torch.float64
    assert math.isfinite(pv.evaluate(loaded, k=4, save=False)["elbo"])  # finds its own (test) data
    pv.diagnose(loaded, n=4, particles=16, save=False, warn=False)
