"""Tiny models, tokenizers and corpora for the pipeline tests; nothing comes from a hub.

The synthetic domain corpus is built so that retrieval must help: documents
are random filler words with "facts" (fixed runs of rare words) inserted; the
same facts recur across training, validation and test documents, so a model
that has memorised the training facts predicts their continuations while a
random base cannot.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

FILLER = [f"w{i}" for i in range(40)]
FACTS = [[f"k{i}", f"r{i}a", f"r{i}b", f"r{i}c"] for i in range(24)]


def synthetic_documents(n_docs: int = 320, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        words: list[str] = []
        for _ in range(6):
            words += rng.choices(FILLER, k=rng.randint(3, 8))
            words += rng.choice(FACTS)
        docs.append(" ".join(words) + f" end{d % 7}")
    return docs


def make_tokenizer(texts: list[str]):
    """A word-level tokenizer trained here, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def make_tiny_llama(vocab_size: int, layers: int = 3, seed: int = 0):
    """Random LlamaForCausalLM with head_dim 64 (hidden 128, 2 heads), tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=1,
        bos_token_id=1,
        pad_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def synthetic_corpus(tmp_path_factory) -> Path:
    """A folder of .txt documents (the form a user would point --corpus at)."""
    root = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(synthetic_documents()):
        (root / f"doc{i:04d}.txt").write_text(text)
    return root


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, synthetic_corpus) -> Path:
    texts = [p.read_text() for p in sorted(synthetic_corpus.glob("*.txt"))]
    tok = make_tokenizer(texts)
    model = make_tiny_llama(len(tok))
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_config(base: Path, corpus: Path, out: Path, **overrides):
    from memories.decoder.pipeline import BuildConfig

    opts = dict(
        base=str(base),
        corpus=str(corpus),
        name="synth",
        out=str(out),
        max_tokens=12_000,
        eval_tokens=2_000,
        validation_fraction=0.08,
        test_fraction=0.08,
        context=64,
        stride=32,
        k=64,
        top=16,
        layers=2,
        epochs=4,
        lr=3e-3,
        accumulate=2,
        threads=1,
        progress=False,
    )
    opts.update(overrides)
    return BuildConfig(**opts)


@pytest.fixture(scope="session")
def built(tmp_path_factory, tiny_base, synthetic_corpus):
    """One full build shared by the tests that only inspect its outputs."""
    from memories.decoder.pipeline import build

    out = tmp_path_factory.mktemp("build")
    cfg = tiny_config(tiny_base, synthetic_corpus, out)
    artifact = build(cfg)
    return cfg, artifact
