"""Bring your own Pyro VAE: train, evaluate and diagnose tutorial-style Pyro code with pyrovi.

The first half of this file is a VAE written the way Pyro's tutorials write
one (an ``nn.Module`` whose ``model``/``guide`` methods register their
networks with ``pyro.module``), with nothing pyrovi-specific in it. The
second half hands it to pyrovi as it is: ``fit`` trains it in a
param-store scope of its own, ``evaluate`` gives held-out ELBO and IWAE
log p(x), ``diagnose`` (when present) gives PSIS k-hat. Then the guide is
swapped for a pyrovi guide and the objective for ``iwae`` in one line each.

    python examples/byo_pyro_vae.py [--quick] [--out DIR]

Writes DIR/results.json, DIR/training_curves.png, DIR/reconstructions.png and
the run directories DIR/own_guide and DIR/pyrovi_guide_iwae.
"""

from __future__ import annotations

import argparse
import json
import os

import pyro
import pyro.distributions as dist
import torch
from torch import nn

# --------------------------------------------------------------------------- the user's Pyro code


class Encoder(nn.Module):
    def __init__(self, x_dim, hidden_dim, z_dim):
        super().__init__()
        self.fc1 = nn.Linear(x_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, z_dim)
        self.fc22 = nn.Linear(hidden_dim, z_dim)

    def forward(self, x):
        hidden = nn.functional.softplus(self.fc1(x))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))  # z_loc, z_scale


class Decoder(nn.Module):
    def __init__(self, z_dim, hidden_dim, x_dim):
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, x_dim)

    def forward(self, z):
        return self.fc21(nn.functional.softplus(self.fc1(z)))  # Bernoulli logits


class VAE(nn.Module):
    def __init__(self, x_dim=64, z_dim=8, hidden_dim=128):
        super().__init__()
        self.encoder = Encoder(x_dim, hidden_dim, z_dim)
        self.decoder = Decoder(z_dim, hidden_dim, x_dim)
        self.z_dim = z_dim

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            logits = self.decoder(z)
            pyro.sample("obs", dist.Bernoulli(logits=logits, validate_args=False).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


# --------------------------------------------------------------------------- with pyrovi

NAME = "byo_pyro_vae"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny budget for a smoke test (numbers not meaningful)")
    p.add_argument("--out", default=os.path.join("runs", "examples", NAME), help="output directory")
    p.add_argument("--epochs", type=int, default=None, help="training epochs per run (default 100; 2 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import pyrovi as pv
    from pyrovi import plots

    args = parse(argv)
    epochs = args.epochs or (2 if args.quick else 100)
    k = 50 if args.quick else 1000
    os.makedirs(args.out, exist_ok=True)
    data = pv.data.load("digits", seed=args.seed)
    common = dict(epochs=epochs, batch_size=128, lr=3e-3, seed=args.seed, overwrite=True, progress=not args.quick)

    # 1. The user's model and guide, as they are.
    torch.manual_seed(args.seed)
    vae = VAE(x_dim=data.shape[0])
    run = pv.fit(vae.model, vae.guide, data, out=os.path.join(args.out, "own_guide"), **common)
    results = {"own_guide": pv.evaluate(run, data.test, k=k)}
    if hasattr(pv, "diagnose"):  # PSIS k-hat of the user's guide as an importance proposal
        idata = pv.diagnose(run, data.test)
        khat = idata.sample_stats.get("khat") if hasattr(idata, "sample_stats") else None
        if khat is not None:
            results["own_guide"]["khat_share_above_0.7"] = float((khat > 0.7).mean())

    # 2. The same model with a pyrovi normalizing-flow guide and the IWAE objective: the guide
    #    traces the user's model once on example rows to find its latent sites.
    torch.manual_seed(args.seed)
    vae2 = VAE(x_dim=data.shape[0])
    guide = pv.guides.Flow(vae2.model, flow="iaf", depth=2, hidden=(128,), example=data.train.x[:2])
    run2 = pv.fit(vae2.model, guide, data, objective="iwae", particles=8,
                  out=os.path.join(args.out, "pyrovi_guide_iwae"), **common)
    results["pyrovi_guide_iwae"] = pv.evaluate(run2, data.test, k=k)

    # Figures: training curves of both runs; test digits and their reconstructions by the user's guide.
    plots.training_curves({"own guide, elbo": run.history, "Flow(iaf), iwae": run2.history},
                          path=os.path.join(args.out, "training_curves.png"))
    x = data.test.x[:8]
    with torch.no_grad():
        z_loc, _ = vae.encoder(x)
        x_hat = torch.sigmoid(vae.decoder(z_loc))
    plots.reconstructions(x, x_hat, data.image_shape, path=os.path.join(args.out, "reconstructions.png"))

    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    for name, r in results.items():
        print(f"{name:18s} test ELBO {r['elbo']:8.3f}  IWAE-{r['k']} log p(x) {r['log_likelihood']:8.3f} nats/digit")
    return results


if __name__ == "__main__":
    main()
