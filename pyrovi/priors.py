"""Learned priors over a VQ-VAE's discrete codes: a small causal Transformer.

A trained VQ-VAE (:class:`pyrovi.models.VQVAE` + :class:`pyrovi.guides.Codebook`)
maps each datapoint to a grid of code indices :math:`k_{1..L}`. The uniform
prior gives every grid probability :math:`K^{-L}`; an autoregressive prior

.. math::

    p_\\psi(k \\mid c) = \\prod_{l=1}^{L} p_\\psi(k_l \\mid k_{<l}, c)

fitted to the training set's codes (optionally given a class label c) spends
fewer bits on the grids that occur. Since the guide's q is one-hot, swapping
the prior in the ELBO gives a bound in bits per dimension,

.. math::

    \\text{bits/dim} = -\\frac{\\log p(x \\mid z_q(x)) + \\log p_\\psi(k(x))}{D \\ln 2},

compared with :math:`\\log p_\\psi = -L\\log K` for the uniform prior
(van den Oord et al. 2017, sec. 3.2, with PixelCNN there; a Transformer here,
Vaswani et al. 2017). Samples draw codes left to right in raster order
(temperature, top-k) and decode them with the VQ-VAE's decoder.

Files in the run directory: ``prior.safetensors`` (weights) and
``prior.json`` (config and metrics), written atomically, no pickle.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._version import __version__
from . import data as data_mod
from . import inputs
from .checkpoint import load_tensors, read_json, save_tensors, write_json
from .run_files import update_metrics
from .errors import CheckpointError, ConfigError, DataError, check_positive

__all__ = ["CodeTransformer", "PriorConfig", "fit_prior", "encode_codes", "evaluate_prior", "save_prior",
           "load_prior", "sample_codes", "decode", "sample_run", "conditional_accuracy", "PRIOR_WEIGHTS",
           "PRIOR_CONFIG"]

PRIOR_WEIGHTS = "prior.safetensors"
PRIOR_CONFIG = "prior.json"


@dataclass
class PriorConfig:
    """Options of :class:`CodeTransformer` (stored in ``prior.json``)."""

    num_codes: int  # K, code vocabulary
    length: int  # L, code positions per datapoint
    num_classes: Optional[int] = None  # class-conditional when set: one start token per class
    d_model: int = 128  # width of the Transformer
    layers: int = 2  # Transformer blocks
    heads: int = 4  # attention heads (must divide d_model)
    dropout: float = 0.1

    def validate(self) -> None:
        for k in ("num_codes", "length", "d_model", "layers", "heads"):
            check_positive(k, getattr(self, k), integer=True)
        if self.num_classes is not None:
            check_positive("num_classes", self.num_classes, integer=True)
        if self.d_model % self.heads:
            raise ConfigError(f"heads={self.heads} must divide d_model={self.d_model}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")


class CodeTransformer(nn.Module):
    """Causal Transformer over code grids ``(B, L)`` flattened in raster order.

    The input at position l is the code at l-1 (a start token at l = 0: one
    per class when class-conditional), so the output at l gives
    :math:`p(k_l \\mid k_{<l}, c)` over the K codes. Pre-norm blocks
    (``torch.nn.TransformerEncoderLayer`` with a causal mask), learned
    positional embeddings.
    """

    def __init__(self, num_codes: int, length: int, *, num_classes: Optional[int] = None, d_model: int = 128,
                 layers: int = 2, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        self.cfg = PriorConfig(num_codes, length, num_classes, d_model, layers, heads, dropout)
        self.cfg.validate()
        n_start = num_classes or 1
        self.tok = nn.Embedding(num_codes + n_start, d_model)  # codes 0..K-1, then start tokens
        self.pos = nn.Parameter(torch.randn(length, d_model) * 0.02)
        block = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_codes)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length), persistent=False)
        self.metrics: dict = {}  # set by fit_prior / load_prior

    @property
    def conditional(self) -> bool:
        return self.cfg.num_classes is not None

    def config(self) -> dict:
        return asdict(self.cfg)

    def _start(self, n: int, y: Optional[torch.Tensor], device) -> torch.Tensor:
        K = self.cfg.num_codes
        if not self.conditional:
            if y is not None:
                raise ConfigError("this prior is not class-conditional: drop the label "
                                  "(or fit it with conditional=True)")
            return torch.full((n, 1), K, dtype=torch.long, device=device)
        if y is None:
            raise ConfigError(f"this prior is class-conditional: pass a label in [0, {self.cfg.num_classes})")
        y = torch.as_tensor(y, device=device).long().reshape(-1)
        if y.numel() == 1:
            y = y.expand(n)
        if y.shape[0] != n or int(y.min()) < 0 or int(y.max()) >= self.cfg.num_classes:
            raise ConfigError(f"labels must be {n} integers in [0, {self.cfg.num_classes}), got {y.tolist()[:10]}")
        return (K + y)[:, None]

    def forward(self, codes: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``(B, L, K)`` of :math:`p(k_l \\mid k_{<l}, c)` for codes ``(B, L)`` int64."""
        B, L = codes.shape
        inp = torch.cat([self._start(B, y, codes.device), codes[:, :-1]], 1)  # (B, L): shifted right
        h = self.tok(inp) + self.pos[:L]  # (B, L, D)
        h = self.blocks(h, mask=self.mask[:L, :L], is_causal=True)  # (B, L, D)
        return self.head(self.norm(h))  # (B, L, K)

    def log_prob(self, codes: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:math:`\\log p(k \\mid c)` in nats, ``(B,)``."""
        logits = self(codes, y)  # (B, L, K)
        return -F.cross_entropy(logits.transpose(1, 2), codes, reduction="none").sum(-1)

    @torch.no_grad()
    def sample(self, n: int, y=None, *, temperature: float = 1.0, top_k: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draw ``n`` code grids ``(n, L)`` position by position.

        Args:
            y: class label(s) for a conditional prior (an int or ``(n,)``).
            temperature: divides the logits (< 1 sharper, > 1 flatter).
            top_k: keep only the k most likely codes at each step (None: all).
            generator: a CPU ``torch.Generator`` for reproducible draws.
        """
        check_positive("n", n, integer=True)
        check_positive("temperature", temperature)
        if top_k is not None:
            check_positive("top_k", top_k, integer=True)
        was = self.training
        self.eval()
        dev = self.head.weight.device
        codes = torch.zeros(n, self.cfg.length, dtype=torch.long, device=dev)
        for i in range(self.cfg.length):
            logits = self(codes, y)[:, i] / temperature  # (n, K): position i sees codes < i only
            if top_k is not None and top_k < logits.shape[-1]:
                kth = logits.topk(top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = logits.softmax(-1).cpu()
            codes[:, i] = torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(dev)
        self.train(was)
        return codes


# --------------------------------------------------------------------------- codes of a run


def _is_vq(run) -> None:
    if not hasattr(run.guide, "quantize") or not hasattr(run.model, "decode_codes"):
        raise ConfigError(f"code priors need a VQ-VAE run (models.VQVAE + guides.Codebook); this run has "
                          f"{type(run.model).__name__} / {type(run.guide).__name__}")


@torch.no_grad()
def encode_codes(run, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Code indices ``(N, L)`` of data ``x`` ``(N, D)`` under the run's guide (eval mode, nearest codes)."""
    _is_vq(run)
    guide = run.guide
    was = guide.training
    guide.eval()
    out = []
    with run.scope():
        for i in range(0, x.shape[0], batch_size):
            out.append(guide.quantize(x[i:i + batch_size].to(run.device)).codes)
    guide.train(was)
    return torch.cat(out) if out else torch.zeros(0, run.model.length, dtype=torch.long)


def _dataset(run, data) -> data_mod.Dataset:
    ds = inputs.dataset(data, run)  # None: the run's own data, reloaded from its config when it came from disk
    if ds is None:
        raise ConfigError("fit_prior needs a pyrovi Dataset (train/val/test splits), e.g. data.load('digits'); "
                          f"got {type(data).__name__}")
    return ds


# --------------------------------------------------------------------------- fitting


def fit_prior(
    run,
    data: Any = None,
    *,
    conditional: Optional[bool] = None,
    epochs: int = 40,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    d_model: int = 128,
    layers: int = 2,
    heads: int = 4,
    dropout: float = 0.1,
    seed: int = 0,
    save: bool = True,
    progress: bool = False,
) -> CodeTransformer:
    """Fit a :class:`CodeTransformer` to the codes of ``data``'s training split under ``run``.

    Args:
        run: a VQ-VAE run (``fit`` or ``load_run``).
        data: a Dataset or name (default: the run's own data).
        conditional: condition on class labels; None = when the data has labels.
        epochs: passes over the training split's code grids.
        batch_size: code grids per step.
        lr: peak learning rate of AdamW, decayed on a cosine schedule (the loss is nats per code).
        weight_decay: AdamW's weight decay.
        d_model: width of the Transformer (:class:`PriorConfig`).
        layers: Transformer blocks.
        heads: attention heads (must divide ``d_model``).
        dropout: dropout rate in [0, 1).
        seed: seeds initialisation, dropout and shuffling.
        save: write ``prior.safetensors`` / ``prior.json`` into the run directory (if it has one).

    Returns:
        The prior with the validation split's best weights, in eval mode;
        ``prior.metrics`` holds :func:`evaluate_prior` on the test split
        and the training record.
    """
    _is_vq(run)
    ds = _dataset(run, data)
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        check_positive(name, v, integer=True)
    check_positive("lr", lr)
    check_positive("weight_decay", weight_decay, allow_zero=True)
    if conditional is None:
        conditional = ds.train.y is not None
    if conditional and (ds.train.y is None or not ds.num_classes):
        raise DataError(f"conditional=True needs labels, and dataset {ds.name!r} has none")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tr_codes, va_codes = encode_codes(run, ds.train.x), encode_codes(run, ds.val.x)
    tr_y = ds.train.y.to(run.device) if conditional else None
    va_y = ds.val.y.to(run.device) if conditional else None
    prior = CodeTransformer(run.model.num_codes, run.model.length, num_classes=ds.num_classes if conditional else None,
                            d_model=d_model, layers=layers, heads=heads, dropout=dropout).to(run.device)
    opt = torch.optim.AdamW(prior.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(tr_codes) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    best, best_val, best_epoch, history = None, math.inf, 0, []
    for epoch in tqdm(range(1, epochs + 1), disable=not progress, unit="epoch", desc="prior"):
        prior.train()
        perm = torch.randperm(len(tr_codes), generator=gen).to(run.device)
        total = 0.0
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            loss = -prior.log_prob(tr_codes[idx], None if tr_y is None else tr_y[idx]).mean() / prior.cfg.length
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        val = _nats_per_code(prior, va_codes, va_y)
        history.append({"epoch": epoch, "train_nats_per_code": total / len(perm), "val_nats_per_code": val})
        if val < best_val:
            best_val, best_epoch = val, epoch
            best = {k: v.detach().clone() for k, v in prior.state_dict().items()}
    prior.load_state_dict(best)
    prior.eval()
    metrics = evaluate_prior(run, prior, ds)
    metrics["train"] = {"epochs": epochs, "best_epoch": best_epoch, "best_val_nats_per_code": best_val,
                        "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed,
                        "uniform_nats_per_code": math.log(run.model.num_codes), "history": history}
    prior.metrics = metrics
    if save and run.directory:
        save_prior(prior, run.directory)
        run.metrics = update_metrics(run.directory, "prior", {k: v for k, v in metrics.items() if k != "train"})
    return prior


@torch.no_grad()
def _nats_per_code(prior, codes, y, batch_size: int = 512) -> float:
    prior.eval()
    total = 0.0
    for i in range(0, len(codes), batch_size):
        total -= float(prior.log_prob(codes[i:i + batch_size], None if y is None else y[i:i + batch_size]).sum())
    return total / (len(codes) * prior.cfg.length)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_prior(run, prior: CodeTransformer, data: Any = None, *, batch_size: int = 256) -> dict:
    """Held-out bits per dimension (bits/char for text) under the learned and the uniform prior.

    On ``data``'s test split (a Dataset; default the run's data):
    ``bits_per_dim_learned`` and ``bits_per_dim_uniform`` (see the module
    doc; the same reconstruction term, only the prior differs),
    ``nats_per_code_learned`` vs ``nats_per_code_uniform`` = log K, and for
    text ``bits_per_dim_unigram``: characters coded independently with
    their training-split frequencies (add-one smoothed), no VQ-VAE at all.
    """
    from .vq_evaluation import vq_terms

    _is_vq(run)
    ds = _dataset(run, data)
    split = ds.test
    model, guide = run.model, run.guide
    prior.eval()
    recon = log_prior = 0.0
    with run.scope():
        for i in range(0, len(split), batch_size):
            x = split.x[i:i + batch_size].to(run.device)
            t = vq_terms(model, guide, x)
            y = split.y[i:i + batch_size].to(run.device) if prior.conditional else None
            recon += float(t.reconstruction.sum())
            log_prior += float(prior.log_prob(t.codes, y).sum())
    n, D, L, K = len(split), split.x[0].numel(), model.length, model.num_codes
    out = {
        "bits_per_dim_learned": -(recon + log_prior) / (n * D * math.log(2)),
        "bits_per_dim_uniform": -(recon - n * L * math.log(K)) / (n * D * math.log(2)),
        "nats_per_code_learned": -log_prior / (n * L),
        "nats_per_code_uniform": math.log(K),
        "reconstruction": recon / n,
        "n": n,
    }
    if model.is_text:
        V = len(model.cfg.vocab)
        counts = torch.bincount(ds.train.x.reshape(-1).long(), minlength=V).double() + 1.0
        logp = (counts / counts.sum()).log()
        out["bits_per_dim_unigram"] = float(-logp[split.x.reshape(-1).long()].mean() / math.log(2))
    return out


# --------------------------------------------------------------------------- files


def save_prior(prior: CodeTransformer, directory: str) -> None:
    """Write ``prior.safetensors`` (weights) and ``prior.json`` (config, metrics) into ``directory``."""
    os.makedirs(directory, exist_ok=True)
    save_tensors(os.path.join(directory, PRIOR_WEIGHTS), prior.state_dict(),
                 {"pyrovi_version": __version__, "config": prior.config()})
    write_json(os.path.join(directory, PRIOR_CONFIG),
               {"pyrovi_version": __version__, "config": prior.config(), "metrics": prior.metrics})


def load_prior(run_or_directory, device: Any = "cpu") -> CodeTransformer:
    """Load the prior saved in a run directory (or a :class:`~pyrovi.run.Run` with one)."""
    from .run import resolve_device

    d = getattr(run_or_directory, "directory", run_or_directory)
    if getattr(run_or_directory, "device", None) is not None and device == "cpu":
        device = run_or_directory.device
    if not isinstance(d, (str, os.PathLike)) or not os.path.isfile(os.path.join(d, PRIOR_CONFIG)):
        raise CheckpointError(f"no code prior in {d!r}; fit one with pyrovi.priors.fit_prior(run) "
                              "or `pyrovi train-prior RUN`")
    meta = read_json(os.path.join(d, PRIOR_CONFIG), "prior config")
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{d}/{PRIOR_CONFIG} has no valid 'config' section")
    cfg = dict(meta["config"])
    try:
        prior = CodeTransformer(cfg.pop("num_codes"), cfg.pop("length"), **cfg)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{d}/{PRIOR_CONFIG} does not describe a CodeTransformer: {e}") from None
    dev = resolve_device(device)
    tensors, _ = load_tensors(os.path.join(d, PRIOR_WEIGHTS), dev)
    try:
        prior.load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"{d}/{PRIOR_WEIGHTS} does not fit its prior.json: {e}") from None
    prior.metrics = meta.get("metrics", {})
    return prior.to(dev).eval()


# --------------------------------------------------------------------------- sampling


def sample_codes(run, prior: Optional[CodeTransformer], n: int, *, label: Optional[int] = None,
                 temperature: float = 1.0, top_k: Optional[int] = None, seed: int = 0) -> torch.Tensor:
    """``n`` code grids ``(n, L)`` from ``prior`` (uniform codes when ``prior`` is None)."""
    _is_vq(run)
    check_positive("n", n, integer=True)
    run.check_rows(f"n={n}", n)  # before drawing: a typo of a few zeros is an error, not a kill
    g = torch.Generator().manual_seed(seed)
    if prior is None:
        if label is not None:
            raise ConfigError("a label needs a class-conditional prior; fit one with fit_prior(run, conditional=True)")
        return torch.randint(run.model.num_codes, (n, run.model.length), generator=g).to(run.device)
    return prior.sample(n, label, temperature=temperature, top_k=top_k, generator=g)


@torch.no_grad()
def decode(run, codes: torch.Tensor):
    """Code grids ``(n, L)`` -> image means ``(n, D)``, or a list of n strings for text runs."""
    _is_vq(run)
    with run.scope():
        out = run.model.decode_codes(codes.to(run.device))
    return run.model.text(out) if run.model.is_text else out


def sample_run(run, prior: Optional[CodeTransformer] = None, n: int = 16, **kwargs):
    """Decoded samples of a VQ-VAE run: :func:`sample_codes` then :func:`decode`."""
    return decode(run, sample_codes(run, prior, n, **kwargs))


def conditional_accuracy(run, prior: CodeTransformer, data: Any = None, *, labels=None, n: int = 100,
                         temperature: float = 1.0, top_k: Optional[int] = None, seed: int = 0) -> dict:
    """How often class-conditional samples are recognized as their label.

    A scikit-learn ``LogisticRegression`` is trained on ``data``'s training
    split (the same data the VQ-VAE saw) and classifies ``n`` decoded samples
    per label. Returns ``{"rate": mean over labels, "per_label": {label: rate},
    "classifier_test_accuracy": its accuracy on the test split, "chance": 1/C}``.
    """
    from sklearn.linear_model import LogisticRegression

    ds = _dataset(run, data)
    if not prior.conditional:
        raise ConfigError("conditional_accuracy needs a class-conditional prior")
    if run.model.is_text:
        raise ConfigError("conditional_accuracy classifies images; this is a text run")
    clf = LogisticRegression(max_iter=2000).fit(ds.train.x.numpy(), ds.train.y.numpy())
    labels = list(range(prior.cfg.num_classes)) if labels is None else list(labels)
    per = {}
    for i, c in enumerate(labels):
        x = sample_run(run, prior, n, label=c, temperature=temperature, top_k=top_k, seed=seed + i)
        per[int(c)] = float((clf.predict(x.cpu().numpy()) == c).mean())
    return {"rate": sum(per.values()) / len(per), "per_label": per,
            "classifier_test_accuracy": float(clf.score(ds.test.x.numpy(), ds.test.y.numpy())),
            "chance": 1.0 / prior.cfg.num_classes, "n_per_label": n}
