"""Callbacks, the TensorBoard logger and validating every N epochs, on a VAE for digits.

A callback of your own (here: one that keeps every step's loss and stops nothing) is
passed as ``fit(callbacks=[...])``; ``logger="tensorboard"`` adds pyrovi's TensorBoard
logger, another callback, writing ``RUN/tensorboard``; ``val_every=2`` validates after
every second epoch and the last. The script then reads the event files back with
TensorBoard's own reader and draws the step losses beside the epoch means.

    python examples/callbacks_tensorboard.py [--quick] [--out DIR]
    tensorboard --logdir DIR/run/tensorboard

Writes DIR/run (the run directory), DIR/step_losses.png and DIR/results.json.
Needs ``pip install "pyrovi[tensorboard]"``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import pyrovi as pv


class StepLosses(pv.callbacks.Callback):
    """Keeps (step, loss) of every optimizer step, and the epoch a checkpoint was written for."""

    def __init__(self):
        self.steps, self.checkpoints = [], []

    def on_step_end(self, state, record):
        self.steps.append((record["step"], record["loss"]))

    def on_checkpoint(self, state, path):
        self.checkpoints.append(state.epoch)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny budget for a smoke test (numbers not meaningful)")
    p.add_argument("--out", default=os.path.join("runs", "examples", "callbacks_tensorboard"),
                   help="output directory")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pyrovi import plots

    args = parse(argv)
    os.makedirs(args.out, exist_ok=True)
    epochs = 4 if args.quick else 40
    torch.manual_seed(args.seed)
    data = pv.data.load("digits", seed=args.seed)
    model = pv.models.VAE(data.shape, latent_dim=8, image_shape=data.image_shape)
    mine = StepLosses()
    run = pv.fit(model, pv.guides.DiagNormal(model), data, epochs=epochs, seed=args.seed, val_every=2,
                 logger="tensorboard", callbacks=[mine], out=os.path.join(args.out, "run"), overwrite=True,
                 progress=not args.quick, figures=not args.quick)

    events = EventAccumulator(os.path.join(run.directory, pv.loggers.TENSORBOARD_DIR))
    events.Reload()
    val = [(e.step, e.value) for e in events.Scalars("epoch/val_loss")]
    results = {"epochs": epochs, "steps": len(mine.steps), "checkpoints": mine.checkpoints,
               "tensorboard_tags": sorted(events.Tags()["scalars"]),
               "validated_epochs": [h["epoch"] for h in run.history if h["val_loss"] is not None],
               "val_loss_from_tensorboard": val, "best_epoch": run.metrics["best_epoch"]}

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*mine.steps), lw=0.8, alpha=0.6, label="step loss (one batch)")
    train = events.Scalars("epoch/train_loss")
    ax.plot([e.step for e in train], [e.value for e in train], "o-", label="epoch train loss")
    ax.plot(*zip(*val), "s--", label="validation loss (every 2nd epoch and the last)")
    ax.set(xlabel="optimizer step", ylabel="loss = -ELBO (nats / datapoint)",
           title="What the callback and the TensorBoard logger saw")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    plots.save(fig, os.path.join(args.out, "step_losses.png"))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
