"""Semi-supervised VAE (M2, Kingma et al. 2014): Pyro's SS-VAE trained by pyrovi and by Pyro's own loop.

The first half is the model of Pyro's ``examples/vae/ss_vae_M2.py``: its ``model``,
``guide``, ``model_classify`` and ``guide_classify`` as Pyro writes them (the only
change: a small MLP stands in for the example's ``utils.custom_mlp.MLP``). The second
half trains it on mnist5k with 1000 of the 4000 training labels twice, on the same
budget (same initial weights, epochs, batch size, Adam with the same lr and betas):

* **pyrovi**: ``fit(..., (x, y), semi_supervised=True, extra_loss=aux)``, where the
  missing labels are rows of NaN in the one-hot ``y``: every batch's labelled rows
  are one call ``model(x_l, y_l)``, the rest one call ``model(x_u)``; ``aux`` is the
  example's auxiliary classifier loss (``model_classify``/``guide_classify`` through
  Pyro's ``Trace_ELBO``), added on the labelled rows.
* **Pyro**: the example's own loop (``run_inference_for_epoch``: separate labelled and
  unlabelled batches, one ``SVI.step`` per loss).

Both use ``Trace_ELBO``-style sampling of the unobserved digit y (no enumeration).
Reported: test accuracy of q(y|x), and the held-out ELBO of the test images without
labels, computed for both by the same code (Pyro's ``TraceEnum_ELBO`` summing y out
exactly, z sampled), in nats per image.

    python examples/ss_vae_m2.py [--quick] [--epochs N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.optim import Adam

# --------------------------------------------------------------------------- Pyro's SS-VAE (M2)


class Exp(nn.Module):
    def forward(self, val):
        return torch.exp(val)


class MLP(nn.Module):
    """Stands in for the example's ``custom_mlp.MLP``: concatenates (broadcast) list inputs, splits list outputs."""

    def __init__(self, sizes, activation, output_activation):
        super().__init__()
        layers = []
        for a, b in zip(sizes[:-2], sizes[1:-1]):
            layers += [nn.Linear(a, b), activation()]
        self.body = nn.Sequential(*layers)
        outs = sizes[-1] if isinstance(sizes[-1], (list, tuple)) else [sizes[-1]]
        acts = output_activation if isinstance(output_activation, (list, tuple)) else [output_activation]
        self.heads = nn.ModuleList([nn.Linear(sizes[-2], o) for o in outs])
        self.acts = [(a(dim=-1) if a is nn.Softmax else a()) if a is not None else nn.Identity() for a in acts]
        self.many = isinstance(sizes[-1], (list, tuple))

    def forward(self, x):
        if isinstance(x, (list, tuple)):  # broadcast batch dims (enumerated y has a leading dim), as the example's MLP
            batch = torch.broadcast_shapes(*(t.shape[:-1] for t in x))
            x = torch.cat([t.expand(batch + t.shape[-1:]) for t in x], -1)
        h = self.body(x)
        out = [act(head(h)) for head, act in zip(self.heads, self.acts)]
        return out if self.many else out[0]


class SSVAE(nn.Module):
    def __init__(self, output_size=10, input_size=784, z_dim=50, hidden_layers=(500,), aux_loss_multiplier=46):
        super().__init__()
        self.output_size, self.input_size, self.z_dim = output_size, input_size, z_dim
        self.aux_loss_multiplier = aux_loss_multiplier
        hidden = list(hidden_layers)
        self.encoder_y = MLP([input_size] + hidden + [output_size], nn.Softplus, nn.Softmax)
        self.encoder_z = MLP([input_size + output_size] + hidden + [[z_dim, z_dim]], nn.Softplus, [None, Exp])
        self.decoder = MLP([z_dim + output_size] + hidden + [input_size], nn.Softplus, nn.Sigmoid)

    # model, guide, classifier, model_classify and guide_classify: as in Pyro's ss_vae_M2.py
    def model(self, xs, ys=None):
        pyro.module("ss_vae", self)
        batch_size = xs.size(0)
        options = dict(dtype=xs.dtype, device=xs.device)
        with pyro.plate("data"):
            prior_loc = torch.zeros(batch_size, self.z_dim, **options)
            prior_scale = torch.ones(batch_size, self.z_dim, **options)
            zs = pyro.sample("z", dist.Normal(prior_loc, prior_scale).to_event(1))
            alpha_prior = torch.ones(batch_size, self.output_size, **options) / (1.0 * self.output_size)
            ys = pyro.sample("y", dist.OneHotCategorical(alpha_prior), obs=ys)
            loc = self.decoder([zs, ys])
            pyro.sample("x", dist.Bernoulli(loc, validate_args=False).to_event(1), obs=xs)
            return loc

    def guide(self, xs, ys=None):
        with pyro.plate("data"):
            if ys is None:
                alpha = self.encoder_y(xs)
                ys = pyro.sample("y", dist.OneHotCategorical(alpha))
            loc, scale = self.encoder_z([xs, ys])
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def classifier(self, xs):
        alpha = self.encoder_y(xs)
        res, ind = torch.topk(alpha, 1)
        return torch.zeros_like(alpha).scatter_(1, ind, 1.0)

    def model_classify(self, xs, ys=None):
        pyro.module("ss_vae", self)
        with pyro.plate("data"):
            if ys is not None:
                alpha = self.encoder_y(xs)
                with pyro.poutine.scale(scale=self.aux_loss_multiplier):
                    pyro.sample("y_aux", dist.OneHotCategorical(alpha), obs=ys)

    def guide_classify(self, xs, ys=None):
        pass


# --------------------------------------------------------------------------- data, metrics

NAME = "ss_vae_m2"


def load(seed: int, labels: int, quick: bool):
    """mnist5k (static binarization, seeded train/val/test split) with one-hot labels kept for ``labels`` rows."""
    import pyrovi as pv

    ds = pv.data.load("mnist5k", seed=seed)
    x, y = ds.train.x, nn.functional.one_hot(ds.train.y, 10).float()
    xt, yt = ds.test.x, nn.functional.one_hot(ds.test.y, 10).float()
    if quick:
        x, y, xt, yt = x[:400], y[:400], xt[:100], yt[:100]
    # which labels to keep: a stream of its own (a generator seeded with `seed` alone would give the very
    # permutation the training loops shuffle with, so the first batches would hold every labelled row)
    keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(10_000 + seed))[:labels]
    sup = torch.zeros(len(x), dtype=torch.bool)
    sup[keep] = True
    return x, y, sup, xt, yt


@torch.no_grad()
def metrics(ss: SSVAE, xt, yt, repeats: int = 5) -> dict:
    """Test accuracy of q(y|x) and the held-out ELBO of unlabelled test images (y summed out), nats per image."""
    acc = float((ss.classifier(xt) * yt).sum(-1).mean())
    elbo = TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False)
    guide = config_enumerate(ss.guide, "parallel", expand=True)
    with pyro.poutine.block():
        loss = sum(elbo.loss(ss.model, guide, xt) for _ in range(repeats)) / repeats
    return {"test_accuracy": acc, "test_elbo": -loss / len(xt)}


def aux_loss(ss: SSVAE):
    """The example's auxiliary loss, alpha * -log q(y|x) on labelled rows, through Pyro's Trace_ELBO."""
    elbo = Trace_ELBO()
    return lambda xs, ys: elbo.differentiable_loss(ss.model_classify, ss.guide_classify, xs, ys)


# --------------------------------------------------------------------------- the two training loops


def train_pyrovi(ss, x, y, sup, epochs, batch_size, lr, seed, out):
    import pyrovi as pv

    y_marked = y.clone()
    y_marked[~sup] = float("nan")  # missing labels: rows of NaN
    t0 = time.perf_counter()
    run = pv.fit(ss.model, ss.guide, (x, y_marked), semi_supervised=True, extra_loss=aux_loss(ss), epochs=epochs,
                 batch_size=batch_size, lr=lr, seed=seed, val_fraction=0, out=out, overwrite=True, progress=False,
                 figures=False)
    return run, time.perf_counter() - t0


def train_pyro(ss, x, y, sup, epochs, batch_size, lr, seed):
    """Pyro's ``run_inference_for_epoch``: labelled batches every ``periodic`` steps, one SVI step per loss."""
    pyro.clear_param_store()
    optimizer = Adam({"lr": lr, "betas": (0.9, 0.999)})
    losses = [SVI(ss.model, ss.guide, optimizer, loss=Trace_ELBO()),
              SVI(ss.model_classify, ss.guide_classify, optimizer, loss=Trace_ELBO())]
    xs_sup, ys_sup, xs_uns = x[sup], y[sup], x[~sup]
    g = torch.Generator().manual_seed(seed)
    periodic = int(len(x) / (1.0 * len(xs_sup)))
    t0 = time.perf_counter()
    for _ in range(epochs):
        ps, pu = torch.randperm(len(xs_sup), generator=g), torch.randperm(len(xs_uns), generator=g)
        sup_batches = [ps[i:i + batch_size] for i in range(0, len(ps), batch_size)]
        uns_batches = [pu[i:i + batch_size] for i in range(0, len(pu), batch_size)]
        ctr_sup, it_uns = 0, iter(uns_batches)
        for i in range(len(sup_batches) + len(uns_batches)):
            if (i % periodic == 1) and ctr_sup < len(sup_batches):
                idx = sup_batches[ctr_sup]
                ctr_sup += 1
                for loss in losses:
                    loss.step(xs_sup[idx], ys_sup[idx])
            else:
                idx = next(it_uns, None)
                if idx is None:  # the unlabelled batches ran out first: the rest are labelled
                    idx = sup_batches[ctr_sup]
                    ctr_sup += 1
                    for loss in losses:
                        loss.step(xs_sup[idx], ys_sup[idx])
                    continue
                for loss in losses:
                    loss.step(xs_uns[idx])
    return time.perf_counter() - t0


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny budget for a smoke test (numbers not meaningful)")
    p.add_argument("--out", default=os.path.join("runs", "examples", NAME), help="output directory")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 15; 1 with --quick)")
    p.add_argument("--labels", type=int, default=None, help="labelled training rows (default 1000; 100 with --quick)")
    p.add_argument("--batch-size", type=int, default=200, help="rows per step (Pyro's example: 200)")
    p.add_argument("--lr", type=float, default=4.2e-4, help="Adam learning rate (Pyro's example: 0.00042)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    epochs = args.epochs or (1 if args.quick else 15)
    labels = args.labels or (100 if args.quick else 1000)
    hidden = (64,) if args.quick else (500,)
    os.makedirs(args.out, exist_ok=True)
    x, y, sup, xt, yt = load(args.seed, labels, args.quick)
    results = {"epochs": epochs, "labels": labels, "train_rows": len(x), "test_rows": len(xt)}

    torch.manual_seed(args.seed)
    ss = SSVAE(hidden_layers=hidden)
    run, secs = train_pyrovi(ss, x, y, sup, epochs, args.batch_size, args.lr, args.seed,
                             os.path.join(args.out, "pyrovi"))
    with run.scope():
        results["pyrovi"] = {**metrics(ss, xt, yt), "train_seconds": secs}

    torch.manual_seed(args.seed)  # the same initial weights
    ss2 = SSVAE(hidden_layers=hidden)
    pyro.set_rng_seed(args.seed)
    secs = train_pyro(ss2, x, y, sup, epochs, args.batch_size, args.lr, args.seed)
    results["pyro_svi"] = {**metrics(ss2, xt, yt), "train_seconds": secs}

    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    for name in ("pyrovi", "pyro_svi"):
        r = results[name]
        print(f"{name:8s} test accuracy {r['test_accuracy']:.3f}  held-out ELBO {r['test_elbo']:9.2f} nats/image  "
              f"({r['train_seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
