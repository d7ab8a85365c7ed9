"""Time one training epoch on ``mnist5k``: ``pyrovi.fit`` against a hand-written PyTorch epoch loop.

The model of ``bench_step`` (VAE 784-400-20, DiagNormal guide with hidden 400, Bernoulli
logits, ``elbo``, Adam lr 1e-3), batch 128, on the 4000 training and 500 validation images of
``mnist5k`` (static binarization, split (0.1, 0.1)), as tensors in memory.

One epoch is what ``fit`` does per epoch: shuffle, 32 optimizer steps of 128 rows (the last
one 32 rows), then the validation loss (no gradients, batches of 256). The hand-written loop
does exactly that with ``bench_step.HandVAE`` (same starting weights, same fused Adam as
``fit``; a second copy with torch's default Adam is timed too).

Two pyrovi numbers are reported:

- ``fit(epochs=1)`` call: the whole call, including what ``fit`` does once per run
  (checking the data, one trace of model and guide to find the plates and parameters,
  building the optimizer) — what a one-epoch call costs;
- the epoch alone: ``fit``'s own timer for the epoch (``run.history[0]["seconds"]``), what
  every further epoch of a longer fit costs.

Pairs run interleaved (rotating order) after a warm-up pair; medians of per-pair ratios.

    python -m benchmarks.bench_epoch [--repeats 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import pyrovi as pv
from benchmarks.bench_step import HandVAE, copy_weights

BATCH, VAL_BATCH = 128, 256


def hand_epoch(net, opt, train_x: torch.Tensor, val_x: torch.Tensor, gen: torch.Generator) -> tuple:
    """One epoch the way a PyTorch user writes it: shuffled minibatch steps, then the validation loss."""
    net.train()
    perm = torch.randperm(train_x.shape[0], generator=gen)
    total = 0.0
    for i in range(0, train_x.shape[0], BATCH):
        xb = train_x[perm[i:i + BATCH]]
        loss = net.loss(xb, "elbo", 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * xb.shape[0]
    net.eval()
    with torch.no_grad():
        val = sum(float(net.loss(val_x[i:i + VAL_BATCH], "elbo", 1)) * val_x[i:i + VAL_BATCH].shape[0]
                  for i in range(0, val_x.shape[0], VAL_BATCH))
    return total / train_x.shape[0], val / val_x.shape[0]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7, help="timed pairs after one warm-up pair")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds = pv.data.load("mnist5k", split=(0.1, 0.1), seed=0)
    train_x, val_x = ds.train.x, ds.val.x

    torch.manual_seed(0)
    model = pv.models.VAE(ds.shape, latent_dim=20, hidden=(400,), image_shape=ds.image_shape)
    guide = pv.guides.DiagNormal(model, hidden=(400,))
    start = {k: v.clone() for k, v in {**{"m." + k: v for k, v in model.state_dict().items()},
                                      **{"g." + k: v for k, v in guide.state_dict().items()}}.items()}
    nets = {fused: copy_weights(HandVAE(), model, guide) for fused in (True, False)}
    hand_start = {k: v.clone() for k, v in nets[True].state_dict().items()}

    def pyrovi_epoch():
        # each call trains the same starting weights for one epoch, as a fresh one-epoch fit would
        model.load_state_dict({k[2:]: v for k, v in start.items() if k.startswith("m.")})
        guide.load_state_dict({k[2:]: v for k, v in start.items() if k.startswith("g.")})
        t = time.perf_counter()
        run = pv.fit(model, guide, ds, epochs=1, batch_size=BATCH, lr=1e-3, progress=False, device="cpu")
        return time.perf_counter() - t, run.history[0]["seconds"], run.history[0]["train_loss"]

    def hand(fused):
        # the same starting weights every time, and a fresh optimizer, as for the one-epoch fit
        net = nets[fused]
        net.load_state_dict(hand_start)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True) if fused else \
            torch.optim.Adam(net.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        t = time.perf_counter()
        train_loss, _ = hand_epoch(net, opt, train_x, val_x, gen)
        return time.perf_counter() - t, train_loss

    fns = [pyrovi_epoch, lambda: hand(True), lambda: hand(False)]
    res = [[], [], []]
    for i in range(args.repeats + 1):
        for j in range(3):
            k = (i + j) % 3
            r = fns[k]()
            if i:
                res[k].append(r)
    call = [r[0] for r in res[0]]
    epoch = [r[1] for r in res[0]]
    fused_s = [r[0] for r in res[1]]
    default_s = [r[0] for r in res[2]]

    def ratio(a, b):
        rs = [x / y for x, y in zip(a, b)]
        return statistics.median(rs), min(rs), max(rs)

    out = {"fit_call": ratio(call, fused_s), "epoch": ratio(epoch, fused_s), "epoch_vs_default": ratio(epoch, default_s),
           "pyrovi_call_s": statistics.median(call), "pyrovi_epoch_s": statistics.median(epoch),
           "hand_fused_s": statistics.median(fused_s), "hand_default_s": statistics.median(default_s),
           "pyrovi_train_loss": res[0][-1][2], "hand_train_loss": res[1][-1][1]}
    print(f"mnist5k: {train_x.shape[0]} train / {val_x.shape[0]} validation images, batch {BATCH}, "
          f"{args.threads} threads, {args.repeats} pairs, torch {torch.__version__}")
    print("| what | pyrovi s | hand-written s (fused Adam) | **ratio** (same Adam; range) | hand, default Adam s | "
          "ratio vs default Adam (range) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, key, rkey in (("one epoch (fit's epoch timer)", "pyrovi_epoch_s", "epoch"),
                            ("whole `fit(epochs=1)` call", "pyrovi_call_s", "fit_call")):
        r = out[rkey]
        rd = ratio(epoch if rkey == "epoch" else call, default_s)
        print(f"| {name} | {out[key]:.3f} | {out['hand_fused_s']:.3f} | **{r[0]:.2f}** ({r[1]:.2f}-{r[2]:.2f}) | "
              f"{out['hand_default_s']:.3f} | {rd[0]:.2f} ({rd[1]:.2f}-{rd[2]:.2f}) |")
    print(f"training loss of the epoch (nats/image, same starting weights): pyrovi {out['pyrovi_train_loss']:.2f}, "
          f"hand-written {out['hand_train_loss']:.2f}", flush=True)
    return out


if __name__ == "__main__":
    main()
