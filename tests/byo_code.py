"""Pyro code written the way Pyro's tutorials write it, for the "bring your own" tests.

Nothing here imports pyrovi: these are the user's model and guide.
"""

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from torch import nn


class Decoder(nn.Module):
    def __init__(self, z_dim, hidden_dim, x_dim):
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, x_dim)

    def forward(self, z):
        return self.fc21(torch.relu(self.fc1(z)))  # logits


class Encoder(nn.Module):
    def __init__(self, x_dim, hidden_dim, z_dim):
        super().__init__()
        self.fc1 = nn.Linear(x_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, z_dim)
        self.fc22 = nn.Linear(hidden_dim, z_dim)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc21(h), torch.exp(self.fc22(h))


def tutorial_vae(seed=0, x_dim=64, hidden_dim=64, z_dim=4):
    """A VAE as in Pyro's VAE tutorial: ``pyro.module`` inside plain functions. Returns (model, guide, dec, enc)."""
    torch.manual_seed(seed)
    decoder, encoder = Decoder(z_dim, hidden_dim, x_dim), Encoder(x_dim, hidden_dim, z_dim)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            pyro.sample("obs", dist.Bernoulli(logits=decoder(z), validate_args=False).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))

    return model, guide, decoder, encoder


def train_svi(model, guide, x, *, epochs, batch_size, lr, seed=0):
    """Plain Pyro training: SVI + Trace_ELBO + pyro.optim.Adam over shuffled minibatches (no clear)."""
    svi = SVI(model, guide, Adam({"lr": lr}), loss=Trace_ELBO())
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(math.ceil(n / batch_size)):
            svi.step(x[perm[i * batch_size:(i + 1) * batch_size]])
    return svi


@torch.no_grad()
def heldout_elbo(model, guide, x, particles=200, seed=123):
    """Held-out ELBO per datapoint (nats), by Pyro's own Trace_ELBO, in a scope of its own."""
    pyro.set_rng_seed(seed)
    with pyro.get_param_store().scope():
        loss = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1).loss(model, guide, x)
    return -loss / x.shape[0]

