"""pythae's VAE with the same convolutional networks as pyrovi's ``VAE(arch="conv")``, on mnist5k.

Runs inside a separate virtual environment that has pythae (``benchmarks/pythae_conv.sh``
builds it and exports the data); it does not import pyrovi. Reads
``--data`` (an ``.npz`` with ``train``, ``val``, ``test`` arrays ``(N, 1, 28, 28)`` of
0/1 pixels: pyrovi's mnist5k split, static binarization), trains pythae's ``VAE``
(Bernoulli likelihood: ``reconstruction_loss="bce"``) with its ``TrainingPipeline``
(Adam, lr 1e-3, batch 100, ``--epochs``), and estimates the test log p(x) with pythae's
own ``get_nll`` (importance sampling with ``--k`` samples; it returns the mean log p(x), in nats per
image, despite its name).

The networks are pyrovi's conv VAE's, layer for layer (32 channels, two stride-2 stages
28 -> 14 -> 7, a 256-wide layer on both sides of the 16-d latent, leaky ReLU 0.2 in the
conv stages); pythae's encoder gives a log-variance where pyrovi's head gives
``softplus(.) + 1e-4``.

    /tmp/pythae-venv/bin/python benchmarks/pythae_conv.py --data mnist5k.npz --epochs 10 --k 1000
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch import nn
from pythae.models import VAE, VAEConfig
from pythae.models.base.base_utils import ModelOutput
from pythae.models.nn import BaseDecoder, BaseEncoder
from pythae.pipelines import TrainingPipeline
from pythae.trainers import BaseTrainerConfig

C, L, H = 32, 16, 256


def _act():
    return nn.LeakyReLU(0.2)


class Encoder(BaseEncoder):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, C, 4, 2, 1), _act(), nn.Conv2d(C, C, 4, 2, 1), _act(),
                                  nn.Conv2d(C, C, 3, padding=1), _act(), nn.Conv2d(C, C, 1))
        self.fc = nn.Sequential(nn.Linear(7 * 7 * C, H), nn.ReLU())
        self.mu, self.log_var = nn.Linear(H, L), nn.Linear(H, L)

    def forward(self, x):
        h = self.fc(self.conv(x.reshape(-1, 1, 28, 28)).flatten(1))
        return ModelOutput(embedding=self.mu(h), log_covariance=self.log_var(h))


class Decoder(BaseDecoder):
    def __init__(self):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(L, H), nn.ReLU(), nn.Linear(H, 7 * 7 * C), nn.ReLU())
        self.conv = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), _act(), nn.Conv2d(C, C, 3, padding=1), _act(),
                                  nn.ConvTranspose2d(C, C, 4, 2, 1), _act(), nn.ConvTranspose2d(C, 1, 4, 2, 1))

    def forward(self, z):
        out = self.conv(self.fc(z).reshape(-1, C, 7, 7))
        return ModelOutput(reconstruction=torch.sigmoid(out))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="/tmp/pythae_conv_run")
    p.add_argument("--test-rows", type=int, default=None, help="evaluate on the first N test images only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d = np.load(args.data)
    train, val, test = (torch.from_numpy(d[k]).float() for k in ("train", "val", "test"))
    test = test if args.test_rows is None else test[:args.test_rows]
    cfg = VAEConfig(input_dim=(1, 28, 28), latent_dim=L, reconstruction_loss="bce")
    model = VAE(cfg, encoder=Encoder(), decoder=Decoder())
    tcfg = BaseTrainerConfig(output_dir=args.out, num_epochs=args.epochs, learning_rate=1e-3,
                             per_device_train_batch_size=100, per_device_eval_batch_size=100, seed=0,
                             no_cuda=True, steps_saving=None)
    t0 = time.perf_counter()
    TrainingPipeline(training_config=tcfg, model=model)(train_data=train, eval_data=val)
    train_s = time.perf_counter() - t0
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        # despite its name, pythae's get_nll returns the mean log p(x) (logsumexp of the log weights - log K)
        ll = float(model.get_nll(test, n_samples=args.k, batch_size=min(args.k, 100)))
    row = {"library": "pythae", "model": "VAE (conv, same nets)", "epochs": args.epochs, "k": args.k,
           "test_rows": len(test),
           "test_log_likelihood": ll, "s_per_epoch": train_s / args.epochs, "eval_s": time.perf_counter() - t0,
           "params": sum(t.numel() for t in model.parameters())}
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
