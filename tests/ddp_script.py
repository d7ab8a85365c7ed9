"""A user's script training with ``strategy="ddp", devices=2`` on CPU; run by ``tests/test_distributed.py``.

Lightning's launcher re-runs this file for rank 1 (as it would any script), so every
rank wraps ``pyrovi.distributed.shard`` and ``train_step`` the same way and records
what it trained on: its shard of row indices per epoch, a hash of every row of every
batch, and a hash of the torch RNG state at every step. Each rank then writes its
record and its final weights into RECORD_DIR.

    python tests/ddp_script.py OUT RECORD_DIR
"""

import hashlib
import json
import os
import sys

import torch

import pyrovi as pv
import pyrovi.distributed as dist
import pyrovi.loop as loop_mod
from pyrovi.checkpoint import save_tensors

#: shared with tests/test_distributed.py and benchmarks/ddp_agreement.py (SETTING there)
SETTING = dict(epochs=5, batch_size=128, lr=5e-3, seed=0)


def build(data):
    torch.manual_seed(0)  # the single-process reference starts from these weights too
    model = pv.models.VAE(data.shape, 4, hidden=(32,), image_shape=data.image_shape)
    return model, pv.guides.DiagNormal(model, hidden=(32,))


def row_hashes(x: torch.Tensor) -> list:
    return [hashlib.sha1(row.cpu().numpy().tobytes()).hexdigest()[:16] for row in x]


class HookLog(pv.callbacks.Callback):
    """Records which callback hooks this rank called (only rank 0 should)."""

    def __init__(self, calls: list):
        self.calls = calls

    def on_train_begin(self, state):
        self.calls.append(["begin", state.world_size])

    def on_step_end(self, state, record):
        self.calls.append(["step", record["step"]])

    def on_epoch_end(self, state, record):
        self.calls.append(["epoch", record["epoch"], record["train_loss"]])

    def on_checkpoint(self, state, path):
        self.calls.append(["checkpoint", state.epoch])

    def on_train_end(self, state):
        self.calls.append(["end", state.epoch])


def main(out: str, record_dir: str) -> None:
    record = {"shards": {}, "batches": [], "rng": [], "hooks": []}
    real_shard, real_step = dist.shard, loop_mod.train_step

    def shard(n, epoch, rank, world_size, seed):
        idx = real_shard(n, epoch, rank, world_size, seed)
        record["shards"][str(epoch)] = idx.tolist()
        return idx

    def train_step(loss_fn, optimizer, x, *args, **kw):
        record["batches"].append(row_hashes(x))
        record["rng"].append(hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16])
        return real_step(loss_fn, optimizer, x, *args, **kw)

    dist.shard, loop_mod.train_step = shard, train_step  # batch_step looks train_step up in pyrovi.loop
    data = pv.data.load("digits")
    model, guide = build(data)
    run = pv.fit(model, guide, data, out=out, progress=False, figures=False, strategy="ddp", devices=2,
                 accelerator="cpu", callbacks=[HookLog(record["hooks"])], **SETTING)
    rank = dist.rank()
    save_tensors(os.path.join(record_dir, f"weights{rank}.safetensors"), run.state_tensors())
    with open(os.path.join(record_dir, f"rank{rank}.json"), "w") as f:
        json.dump({**record, "rank": rank, "directory": run.directory, "history": run.history}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
