"""The shared formulas and building blocks: windows, kNN distribution, self-exclusion, mixture, index."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from memories.fuse import fuse
from memories.knn import knn_distribution, search_excluding_self
from memories.mixture import mix_at_targets
from memories.perplexity import perplexity, token_logprobs
from memories.windows import iter_windows, shard_windows


@pytest.mark.parametrize("length, context, stride", [(2, 4, 4), (10, 4, 2), (100, 16, 16), (101, 16, 5), (7, 64, 32)])
def test_windows_score_every_position_once(length, context, stride):
    windows = list(iter_windows(length, context, stride))
    scored = [t for w in windows for t in range(w.first, w.end)]
    assert scored == list(range(length - 1))
    for w in windows:
        assert 0 <= w.begin <= w.first < w.end <= length - 1
        assert w.end - w.begin <= context
    parts = [shard_windows(windows, i, 3) for i in range(3)]
    assert [w for p in parts for w in p] == windows


def test_knn_distribution_sums_onto_vocab():
    d = np.array([[0.0, 1.0, 1.0, 5.0], [2.0, 2.0, 0.5, 9.0]])
    v = np.array([[3, 3, 1, 0], [2, -1, 2, 4]])
    p = knn_distribution(d, v, temperature=1.0, vocab_size=6)
    assert torch.allclose(p.sum(-1), torch.ones(2))
    w = torch.softmax(torch.tensor([0.0, -1.0, -1.0, -5.0]), 0)
    assert math.isclose(p[0, 3].item(), (w[0] + w[1]).item(), rel_tol=1e-6)
    assert p[1, 5].item() == 0.0 and p[1, 2].item() > p[1, 4].item()  # the -1 neighbour carries no weight


def test_search_never_returns_the_row_itself():
    import faiss

    rng = np.random.default_rng(0)
    keys = rng.normal(size=(200, 8)).astype(np.float32)
    keys[100:] = keys[:100]  # exact duplicates: the row's twin may be returned, the row itself never
    index = faiss.IndexFlatL2(8)
    index.add(keys)
    own = np.arange(200)
    dist, ids = search_excluding_self(index, keys, own, k=10)
    assert ids.shape == (200, 10)
    assert not (ids == own[:, None]).any()
    assert (ids[:, 0] == (own + 100) % 200).all()  # the twin is the nearest neighbour


def test_two_bucket_mixture_equals_full_fuse():
    torch.manual_seed(0)
    base, mem = torch.randn(50, 30) * 3, torch.randn(50, 30) * 3
    labels = torch.randint(0, 30, (50,))
    for lam, temp in ((0.0, 1.0), (0.3, 1.0), (0.3, 2.5), (1.0, 1.5)):
        full = fuse(base, mem, lam, temp).gather(1, labels[:, None])[:, 0]
        fast = mix_at_targets(token_logprobs(base, labels), token_logprobs(mem / temp, labels), lam)
        assert torch.allclose(full.double(), fast.double(), atol=1e-5)


def test_perplexity():
    assert math.isclose(perplexity([math.log(0.5)] * 4), 2.0)
    assert math.isclose(perplexity(torch.log(torch.tensor([0.25, 0.25]))), 4.0, rel_tol=1e-6)
    with pytest.raises(ValueError):
        perplexity([])


def _fake_shard(path, keys, values):
    path.mkdir(parents=True)
    np.save(path / "keys.npy", keys.astype(np.float16))
    np.save(path / "values.npy", values.astype(np.int32))
    np.save(path / "positions.npy", np.arange(len(values)) + _fake_shard.offset)
    _fake_shard.offset += len(values)


def test_targets_exclude_own_entry_and_sum_to_one(tmp_path):
    """Every row stores a different token: any mass on a row's own token would be its own entry."""
    from memories.decoder.index import build_index
    from memories.decoder.targets import build_targets, load_targets

    rng = np.random.default_rng(1)
    n, vocab = 300, 300
    keys = rng.normal(size=(n, 16))
    values = rng.permutation(n)
    _fake_shard.offset = 0
    shards = [tmp_path / "s0", tmp_path / "s1"]
    _fake_shard(shards[0], keys[:120], values[:120])
    _fake_shard(shards[1], keys[120:], values[120:])
    (tmp_path / "index").mkdir()
    info = build_index(shards, tmp_path / "index", progress=False)
    assert info["rows"] == n and info["kind"] == "flat"
    (tmp_path / "targets").mkdir()
    build_targets(tmp_path / "index", shards, tmp_path / "targets", k=32, temperature=4.0, top=16, vocab_size=vocab, chunk=64, progress=False)
    ids, probs = load_targets(tmp_path / "targets")
    assert ids.shape == (n, 16) and ids.dtype == np.int32 and probs.dtype == np.float16
    assert np.allclose(probs.astype(np.float64).sum(1), 1.0, atol=5e-3)
    own_mass = np.where(ids == values[:, None], probs.astype(np.float64), 0.0).sum(1)
    assert (own_mass == 0).all()


def test_ivfpq_above_threshold(tmp_path):
    from memories.decoder.index import build_index, load_index
    from memories.knn import search

    rng = np.random.default_rng(2)
    keys = rng.normal(size=(3000, 16))
    _fake_shard.offset = 0
    _fake_shard(tmp_path / "s0", keys, rng.integers(0, 50, 3000))
    (tmp_path / "index").mkdir()
    info = build_index([tmp_path / "s0"], tmp_path / "index", flat_max=1000, train_sample=2000, progress=False)
    assert info["kind"].startswith("ivfpq")
    dist, ids = search(load_index(tmp_path / "index"), keys[:20].astype(np.float16).astype(np.float32), 5)
    assert (ids[:, 0] == np.arange(20)).mean() > 0.8  # approximate, but finds itself nearly always


def test_bf16_training_step_where_native(tiny_base, tmp_path):
    """--bf16 trains under autocast only where bf16 is native, and the loss stays finite either way."""
    from memories.decoder.train import native_bf16, train_memory

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, 200).astype(np.int32)
    ids = np.tile(np.arange(4, dtype=np.int32), (199, 1))
    probs = np.full((199, 4), 0.25, dtype=np.float16)
    rec = train_memory(tiny_base, tokens, ids, probs, None, tmp_path, layers=1, init="first", context=64, stride=64, epochs=1, lr=1e-3, beta=0.5, accumulate=2, warmup=0.1, weight_decay=0.0, seed=0, bf16=True, progress=False)
    assert rec["bf16"] == native_bf16(torch.device("cpu"))
    assert np.isfinite(rec["history"][-1]["loss"])


def test_stage_tokens_for_the_throughput_log():
    from memories.decoder.pipeline import stage_tokens

    corpus = {"summary": {"splits": {"train": {"tokens": 1000}, "validation": {"tokens": 50}, "test": {"tokens": 70}}}}
    assert stage_tokens("datastore", corpus, 2) == 1000
    assert stage_tokens("train", corpus, 2) == 2000
    assert stage_tokens("evaluate", corpus, 2) == 120
    assert stage_tokens("package", corpus, 2) is None
    assert stage_tokens("datastore", None, 2) is None
