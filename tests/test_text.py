"""Text data (characters) and the character-level VQ-VAE with a Transformer prior."""

import math
import os

import pytest
import torch

import pyrovi as pv
from pyrovi import priors
from pyrovi.cli import main


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def test_default_corpus_is_pydoc_topics():
    from pydoc_data import topics

    ds = pv.data.load("text")
    corpus = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    assert ds.vocab == "".join(sorted(set(corpus)))
    assert ds.shape == (64,) and ds.train.x.dtype == torch.int64
    n = len(corpus) // 64
    assert len(ds.train) + len(ds.val) + len(ds.test) == n
    assert len(ds.test) == round(0.1 * n)
    first = "".join(ds.vocab[i] for i in ds.train.x[0])
    assert first == corpus[:64]  # contiguous blocks, corpus order
    last = "".join(ds.vocab[i] for i in ds.test.x[-1])
    assert last == corpus[(n - 1) * 64: n * 64]
    assert ds.source["kind"] == "text" and ds.source["vocab"] == ds.vocab


def test_text_file_reload_and_errors(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("hello world, hello text. " * 40, encoding="utf-8")
    ds = pv.data.load(f"text:{p}", text_length=16)
    assert ds.shape == (16,) and ds.vocab == "".join(sorted(set("hello world, hello text. ")))
    back = pv.data.from_source(ds.source)
    assert torch.equal(back.test.x, ds.test.x) and back.vocab == ds.vocab
    with pytest.raises(pv.ConfigError, match="does not apply to text"):
        pv.data.load(f"text:{p}", binarize="static")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(pv.DataError, match="not UTF-8"):
        pv.data.load(f"text:{tmp_path / 'bad.txt'}")
    (tmp_path / "short.txt").write_text("abc", encoding="utf-8")
    with pytest.raises(pv.DataError, match="too few"):
        pv.data.load(f"text:{tmp_path / 'short.txt'}")
    with pytest.raises(pv.DataError, match="file not found"):
        pv.data.load(f"text:{tmp_path / 'missing.txt'}")
    with pytest.raises(pv.DataError, match="outside the vocabulary"):
        pv.data.load_text(str(p), vocab="helo")


def test_text_model_checks_indices():
    m = pv.models.VQVAE(8, 4, code_dim=2, channels=4, vocab="abc")
    assert m.cfg.likelihood == "categorical" and m.latent_sites == {"z": (4, 2)}
    with pytest.raises(pv.DataError, match=r"\[0, 3\)"):
        m(torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0]]))
    with pytest.raises(pv.ConfigError, match="categorical"):
        pv.models.VQVAE(8, 4, vocab="abc", likelihood="bernoulli")


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    from pyrovi.data import _default_corpus

    d = tmp_path_factory.mktemp("text")
    corpus = _default_corpus()[:40000]  # ~10% of the default corpus: 625 items of 64 characters
    p = d / "small.txt"
    p.write_text(corpus, encoding="utf-8")
    return str(p), d


def test_text_vqvae_cli_train_prior_and_sample(small_text, capsys):
    """Done-when 5 (fast version): train, fit the prior, held-out bits/char, `pyrovi sample` prints text."""
    path, d = small_text
    out = str(d / "run")
    assert main(["train", "--model", "vqvae", "--data", f"text:{path}", "--codebook", "64", "--downsample", "1",
                 "--channels", "32", "--code-dim", "8", "--epochs", "3", "--batch-size", "64", "--lr", "3e-3",
                 "--restart-dead", "1.0", "--out", out, "--no-progress"]) == 0
    assert main(["train-prior", out, "--epochs", "3", "--d-model", "32", "--heads", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "learned prior" in printed and "unigram" in printed
    m = priors.load_prior(out).metrics
    assert m["bits_per_dim_learned"] < m["bits_per_dim_uniform"]
    assert m["nats_per_code_uniform"] == pytest.approx(math.log(64))
    assert main(["sample", out, "--n", "3", "--temperature", "0.8", "--seed", "1"]) == 0
    lines = capsys.readouterr().out.split("-" * 20 + "\n")
    samples = [s[:-1] for s in lines if s]
    assert len(samples) == 3 and all(len(s) == 64 for s in samples)
    run = pv.load_run(out)
    assert set("".join(samples)) <= set(run.model.cfg.vocab)
    assert not os.path.isfile(os.path.join(out, "samples.png"))  # no image figures for text runs
    res = pv.evaluate(run, pv.data.from_source(run.config["data"]))
    assert res["k"] == 1 and res["bits_per_dim"] == pytest.approx(m["bits_per_dim_uniform"], rel=1e-5)


@pytest.mark.slow
def test_full_text_prior_beats_uniform_and_unigram():
    """Done-when 5 (full): default corpus, the configuration of benchmarks/vqvae.py."""
    ds = pv.data.load("text")
    model = pv.models.VQVAE(ds.shape, 256, code_dim=16, downsample=1, channels=64, vocab=ds.vocab)
    guide = pv.guides.Codebook(model, restart_dead=1.0)
    run = pv.fit(model, guide, ds, epochs=8, batch_size=128, lr=2e-3, progress=False)
    prior = priors.fit_prior(run, ds, epochs=8, d_model=128)
    m = prior.metrics
    assert m["bits_per_dim_learned"] < m["bits_per_dim_uniform"]
    assert m["bits_per_dim_learned"] < m["bits_per_dim_unigram"]
    assert len(priors.sample_run(run, prior, 2)[0]) == 64
