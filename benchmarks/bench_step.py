"""Time one training step of pyrovi against hand-written PyTorch doing the same math.

VAE 784-400-20 (MLP encoder and decoder, one hidden layer of 400), batch 128, Bernoulli
likelihood with logits, diagonal-Gaussian q with scale = softplus(raw) + 1e-4, Adam (lr 1e-3).

Cases (pyrovi side: exactly what ``fit`` builds, ``BatchLoss`` + ``train_step`` + ``pyrovi.train.adam``):

- ``elbo`` (1 particle), ``meanfield`` (analytic KL), ``iwae`` (K=50 vectorized);
- ``dreg`` K=50, against the hand-written IWAE step (same forward work; the hand-written side
  does not implement the doubly reparameterized gradient, so this ratio includes DReG's own cost);
- ``flow``: pyrovi's ``Flow(flow="iaf", depth=4)`` guide with the ELBO, against a hand-written IAF
  VAE step with the same architecture (the same encoder, base head and Pyro's
  ``ConditionalAutoRegressiveNN`` networks as building blocks; the flow, the change of
  variables and the ELBO written out by hand);
- ``svi``: Pyro's plain ``SVI`` + ``Trace_ELBO`` + ``pyro.optim.Adam`` loop, a second reference.

Two hand-written steps run beside pyrovi: one with torch's **fused** Adam (``fused=True``, what
pyrovi's ``fit`` uses) and one with torch's **default** Adam (``torch.optim.Adam(params, lr)``, on
CPU a Python loop over parameters). ``ratio`` = pyrovi / hand-written with the same (fused) Adam:
like with like, the overhead of pyrovi's code. ``ratio vs default Adam`` = pyrovi / the hand-written
step with torch's default Adam: what a user gains or loses against the plain PyTorch default. Pyro's
SVI uses torch's default Adam, so its like-with-like ratio is against the default-Adam step.

The three steps run in the same process, interleaved step by step (rotating their order) after a
warm-up; printed ratios are medians of per-round ratios, with their interquartile range.

    python -m benchmarks.bench_step [--steps 200] [--threads 2] [--cases elbo,meanfield,...]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import pyro
import torch
import torch.nn.functional as F
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn

import pyrovi as pv
from pyrovi.train import BatchLoss, adam, train_step
from pyrovi.weights import guess_max_plate_nesting

D, H, L, B = 784, 400, 20, 128
DEPTH, FLOW_HIDDEN = 4, 200  # pyrovi's Flow defaults: 4 layers, MADE hidden width max(32, 10 L)
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
CASES = ("elbo", "meanfield", "iwae", "dreg", "flow", "svi")


class HandVAE(nn.Module):
    """The same networks and math as pyrovi's VAE + DiagNormal, written directly in PyTorch."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(D, H), nn.ReLU())
        self.head = nn.Linear(H, 2 * L)
        self.dec = nn.Sequential(nn.Linear(L, H), nn.ReLU(), nn.Linear(H, D))

    def loss(self, x: torch.Tensor, objective: str, K: int) -> torch.Tensor:
        loc, raw = self.head(self.enc(x)).chunk(2, -1)  # (B, L)
        scale = F.softplus(raw) + 1e-4
        S = K if objective == "iwae" else 1
        eps = torch.randn(S, *loc.shape)
        z = loc + scale * eps  # (S, B, L)
        logits = self.dec(z)  # (S, B, D)
        log_lik = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        if objective == "meanfield":
            kl = 0.5 * (loc ** 2 + scale ** 2 - 2 * torch.log(scale) - 1).sum(-1)  # (B,)
            return -(log_lik.mean(0) - kl).sum() / x.shape[0]
        log_pz = -0.5 * (z ** 2).sum(-1) - L * HALF_LOG_2PI
        log_qz = (-0.5 * eps ** 2 - torch.log(scale) - HALF_LOG_2PI).sum(-1)
        log_w = log_lik + log_pz - log_qz  # (S, B)
        bound = torch.logsumexp(log_w, 0) - math.log(S)
        return -bound.sum() / x.shape[0]


class HandIAFVAE(nn.Module):
    """VAE whose q is a Gaussian pushed through DEPTH inverse autoregressive (affine) layers.

    The architecture of pyrovi's ``Flow(flow="iaf")`` guide: context h = enc(x), base N(loc, scale)
    from a linear head, layer k: u <- exp(s_k) * u + m_k with (m_k, s_k) = MADE_k(u, h), variable
    orders alternating (identity, reversed), s_k clamped to [-5, 3] with the gradient passed
    through (as Pyro's affine autoregressive transform does). The MADE networks are Pyro's
    ``ConditionalAutoRegressiveNN`` modules (plain ``nn.Module`` s); everything else is written here.
    """

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(D, H), nn.ReLU())
        self.head = nn.Linear(H, 2 * L)
        self.made = nn.ModuleList(
            ConditionalAutoRegressiveNN(L, H, [FLOW_HIDDEN], permutation=torch.arange(L) if k % 2 == 0
                                        else torch.arange(L - 1, -1, -1)) for k in range(DEPTH))
        self.dec = nn.Sequential(nn.Linear(L, H), nn.ReLU(), nn.Linear(H, D))

    def loss(self, x: torch.Tensor, objective: str = "elbo", K: int = 1) -> torch.Tensor:
        h = self.enc(x)  # (B, H)
        loc, raw = self.head(h).chunk(2, -1)
        scale = F.softplus(raw) + 1e-4
        eps = torch.randn(1, *loc.shape)
        u = loc + scale * eps  # (1, B, L)
        log_q = (-0.5 * eps ** 2 - torch.log(scale) - HALF_LOG_2PI).sum(-1)  # (1, B)
        for made in self.made:
            m, s = made(u, h)
            s = s + (s.clamp(-5.0, 3.0) - s).detach()
            u = torch.exp(s) * u + m
            log_q = log_q - s.sum(-1)  # change of variables: log q(u_k) = log q(u_{k-1}) - log|det|
        logits = self.dec(u)
        log_lik = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        log_pz = -0.5 * (u ** 2).sum(-1) - L * HALF_LOG_2PI
        return -(log_lik + log_pz - log_q).mean(0).sum() / x.shape[0]


def _svi_step_fn(model, guide):
    """Pyro's own loop as a second reference: SVI + Trace_ELBO + pyro.optim.Adam (global param store)."""
    from pyro.infer import SVI, Trace_ELBO

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    return lambda x: svi.step(x) / x.shape[0]


_RENAME = (("heads.z.transforms.", "made."), ("heads.z.base.", "head."), ("heads.z.", "head."), ("body.", "enc."),
           ("decoder.", "dec."), (".nn.", "."))


def copy_weights(net: nn.Module, model, guide) -> nn.Module:
    """Load pyrovi's weights into the hand-written net (strict: the architectures must match exactly)."""
    state = {}
    for k, v in {**model.state_dict(), **guide.state_dict()}.items():
        for a, b in _RENAME:
            k = k.replace(a, b, 1) if (k.startswith(a) or a == ".nn.") else k
        state[k] = v.clone()
    net.load_state_dict(state, strict=True)
    return net


def _hand_step(objective: str, K: int, fused: bool, flow: bool, model, guide):
    net = copy_weights(HandIAFVAE() if flow else HandVAE(), model, guide)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True) if fused else \
        torch.optim.Adam(net.parameters(), lr=1e-3)

    return step_fn(lambda x: net.loss(x, objective, K), opt), net


def step_fn(loss, opt):
    """A hand-written training step: ``loss(x)`` (a scalar), backward, ``opt.step()``; returns the loss."""
    def step(x):
        value = loss(x)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        return value.item()

    return step


def check_same_loss(net, loss_fn, x, objective: str, K: int) -> None:
    """Same weights and seed: the hand-written loss equals pyrovi's (so both sides do the same math)."""
    with torch.no_grad():
        torch.manual_seed(123)
        mine = float(loss_fn(x))
        torch.manual_seed(123)
        hand = float(net.loss(x, objective, K))
    if not math.isclose(mine, hand, rel_tol=1e-4, abs_tol=1e-3):
        raise AssertionError(f"hand-written loss {hand} differs from pyrovi's {mine}: the two sides disagree")


def time_case(case: str, K: int, steps: int, warmup: int = 10) -> dict:
    """Median per-round ratios of one case; see the module doc."""
    torch.manual_seed(0)
    x_all = (torch.rand(B * 8, D) < 0.3).float()
    model = pv.models.VAE(D, L, hidden=(H,))
    flow = case == "flow"
    guide = pv.guides.Flow(model, flow="iaf", depth=DEPTH, hidden=(H,)) if flow else \
        pv.guides.DiagNormal(model, hidden=(H,))
    svi = case == "svi"
    # the hand-written side of "dreg" is the IWAE step (same forward, same number of backward passes)
    hand_objective = {"svi": "elbo", "dreg": "iwae", "flow": "elbo"}.get(case, case)
    obj = pv.objectives.get("elbo" if case in ("svi", "flow") else case, particles=K)
    obj.max_plate_nesting = guess_max_plate_nesting(model, guide, (x_all[:B],), {})
    hand_fused, net = _hand_step(hand_objective, K, True, flow, model, guide)  # both start from pyrovi's weights
    hand_default, _ = _hand_step(hand_objective, K, False, flow, model, guide)
    loss_fn = BatchLoss(obj, model, guide, global_sites=False)  # exactly what fit builds for this pair
    check_same_loss(net, loss_fn, x_all[:B], hand_objective, K)
    if svi:
        step = _svi_step_fn(model, guide)
    else:
        p_opt = adam(list(model.parameters()) + list(guide.parameters()), lr=1e-3)
        step = lambda x: train_step(loss_fn, p_opt, x)  # noqa: E731
    fns = (step, hand_fused, hand_default)
    times = ([], [], [])
    with pyro.get_param_store().scope():
        for i in range(warmup + steps):
            x = x_all[(i % 8) * B:(i % 8 + 1) * B]
            for j in range(3):  # rotate the order so no side always runs first
                k = (i + j) % 3
                t0 = time.perf_counter()
                fns[k](x)
                dt = time.perf_counter() - t0
                if i >= warmup:
                    times[k].append(dt)
    tp, tf, td = times
    r_f = [a / b for a, b in zip(tp, tf)]
    r_d = [a / b for a, b in zip(tp, td)]
    q_f, q_d = statistics.quantiles(r_f, n=4), statistics.quantiles(r_d, n=4)
    name = {"svi": "Pyro SVI + Trace_ELBO (reference)", "dreg": "dreg K=50 (vs hand-written IWAE)",
            "flow": "Flow(iaf) guide, elbo"}.get(case, case + (f" K={K}" if K > 1 else ""))
    return {"case": name, "pyrovi_ms": 1e3 * statistics.median(tp), "fused_ms": 1e3 * statistics.median(tf),
            "default_ms": 1e3 * statistics.median(td), "ratio": statistics.median(r_f), "q1": q_f[0], "q3": q_f[2],
            "ratio_default": statistics.median(r_d), "q1_default": q_d[0], "q3_default": q_d[2], "svi": svi}


def table(rows: list) -> str:
    out = ["| case | pyrovi ms/step | hand, fused Adam | hand, default Adam | **ratio** (same Adam) | IQR | "
           "ratio vs default Adam | IQR |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["svi"]:  # Pyro's SVI steps with torch's default Adam: like with like is the default-Adam column
            like = f"**{r['ratio_default']:.2f}** (vs default Adam) | {r['q1_default']:.2f}-{r['q3_default']:.2f}"
            other = f"{r['ratio']:.2f} (vs fused) | {r['q1']:.2f}-{r['q3']:.2f}"
        else:
            like = f"**{r['ratio']:.2f}** | {r['q1']:.2f}-{r['q3']:.2f}"
            other = f"{r['ratio_default']:.2f} | {r['q1_default']:.2f}-{r['q3_default']:.2f}"
        out.append(f"| {r['case']} | {r['pyrovi_ms']:.2f} | {r['fused_ms']:.2f} | {r['default_ms']:.2f} | "
                   f"{like} | {other} |")
    return "\n".join(out)


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="timed steps per case (iwae, dreg use a quarter)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for case in args.cases.split(","):
        if case not in CASES:
            raise SystemExit(f"unknown case {case!r}; choose from {', '.join(CASES)}")
        K = 50 if case in ("iwae", "dreg") else 1
        rows.append(time_case(case, K, max(10, args.steps // 4) if K > 1 else args.steps))
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, threads {args.threads}, VAE {D}-{H}-{L}, batch {B}")
    print(table(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
