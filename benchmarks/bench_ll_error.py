"""Does ``evaluate``'s ``log_likelihood_mc_se`` predict the seed-to-seed spread of ``log_likelihood``?

Trains a small VAE (and a Flow guide) on ``digits``, then evaluates the same test rows with
``--seeds`` different seeds and compares the standard deviation of ``log_likelihood`` across
seeds with the mean reported ``log_likelihood_mc_se`` and ``log_likelihood_se_over_data``.

    PYTHONPATH=. python benchmarks/bench_ll_error.py [--seeds 10] [--n 200]
"""

import argparse
import statistics

import pyro
import torch

import pyrovi as pv


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=10)
    a = ap.parse_args()
    torch.set_num_threads(1)
    data = pv.data.load("digits")
    test = data.test.x[:a.n]
    print(f"| guide | k | sd of log_likelihood over {a.seeds} seeds | mean log_likelihood_mc_se | ratio | "
          "log_likelihood_se_over_data |")
    print("|---|---|---|---|---|---|")
    for gname in ("diag_normal", "flow"):
        pyro.set_rng_seed(0)
        model = pv.models.VAE(data.shape, 4, hidden=(64,))
        guide = pv.guides.build(model, {"name": gname, "hidden": [64]})
        run = pv.fit(model, guide, data, epochs=a.epochs, seed=0, progress=False, figures=False)
        for k in (10, 100, 1000):
            res = [pv.evaluate(run, test, k=k, seed=s, save=False) for s in range(a.seeds)]
            sd = statistics.stdev(r["log_likelihood"] for r in res)
            mc = statistics.mean(r["log_likelihood_mc_se"] for r in res)
            so = statistics.mean(r["log_likelihood_se_over_data"] for r in res)
            print(f"| {gname} | {k} | {sd:.4f} | {mc:.4f} | {mc / sd:.2f} | {so:.3f} |", flush=True)


if __name__ == "__main__":
    main()
