"""Artifact checks: each refusal names the memory, the check and both sides' values."""

import json
import shutil

import pytest

from memories.artifact import ArtifactError, check_compatible, read_card, tokenizer_sha256
from tests.tiny_models import build_llama, build_tokenizer


def copy(src, tmp_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_good_memory_card(tiny, base_tok):
    card = read_card(tiny["beta"], "beta")
    assert (card.weight, card.temperature, card.architecture) == (0.3, 0.8, "LlamaForCausalLM")
    assert card.num_parameters > 0 and len(card.content_sha256) == 64
    check_compatible(card, base_tok)


def test_default_weight_applies_without_memory_json(tiny):
    d = read_card(tiny["base"], "plain", default_weight=0.2)
    assert d.weight == 0.2


@pytest.mark.parametrize(
    "mutate,check",
    [
        (lambda d: shutil.rmtree(d), "not a directory"),
        (lambda d: (d / "config.json").unlink(), "config.json missing"),
        (lambda d: (d / "model.safetensors").unlink(), "no weights"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64), "unreadable safetensors"),
        (lambda d: (d / "memory.json").write_text("{not json"), "memory.json is not valid JSON"),
        (lambda d: (d / "memory.json").write_text(json.dumps({"lambda": 3})), "lambda out of range"),
        (lambda d: (d / "memory.json").write_text(json.dumps({"format": 9})), "unknown memory.json format"),
        (lambda d: (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]})), "unsupported architecture"),
    ],
)
def test_bad_artifacts(tiny, tmp_path, mutate, check):
    d = copy(tiny["alpha"], tmp_path)
    mutate(d)
    with pytest.raises(ArtifactError, match=check) as e:
        read_card(d, "m")
    assert "memory 'm'" in str(e.value)


def test_truncated_weights(tiny, tmp_path):
    d = copy(tiny["alpha"], tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="unreadable safetensors"):
        read_card(d, "m")


def test_wrong_tokenizer_names_both_sides(tmp_path, base_tok):
    other = build_tokenizer(tmp_path / "other_tok", vocab_size=300)
    mem = build_llama(tmp_path / "mem", other, layers=1, seed=5, vocab_size=len(base_tok))
    with pytest.raises(ArtifactError, match="tokenizer differs") as e:
        check_compatible(read_card(mem, "m"), base_tok)
    assert tokenizer_sha256(other)[:16] in str(e.value) and tokenizer_sha256(base_tok)[:16] in str(e.value)


def test_vocab_too_small_names_both_sides(tmp_path, base_tok):
    mem = build_llama(tmp_path / "mem", base_tok, layers=1, seed=5, vocab_size=100, ship_tokenizer=False)
    with pytest.raises(ArtifactError, match=f"vocab_size 100 < base tokenizer's {len(base_tok)}"):
        check_compatible(read_card(mem, "m"), base_tok)


def test_declared_tokenizer_hash_is_checked(tmp_path, base_tok):
    mem = build_llama(tmp_path / "mem", base_tok, layers=1, seed=5, ship_tokenizer=False, memory_json={"tokenizer_sha256": "0" * 64})
    with pytest.raises(ArtifactError, match="tokenizer_sha256 differs"):
        check_compatible(read_card(mem, "m"), base_tok)


def test_thin_memory_card(tiny, tmp_path, base_tok, base_config):
    from tests.tiny_models import base_embedding_pair

    full, thin = base_embedding_pair(tiny["beta"], tiny["base"], tmp_path)
    full_card, thin_card = read_card(full, "f"), read_card(thin, "t")
    assert (full_card.embeddings, thin_card.embeddings) == (None, "base")
    assert full_card.num_parameters - thin_card.num_parameters == 2 * 320 * 128  # embedding + head, not stored
    check_compatible(thin_card, base_tok, base_config)
    with pytest.raises(ArtifactError, match="embeddings 'base' need the base's config"):
        check_compatible(thin_card, base_tok)


def test_thin_memory_of_another_width_names_both_sides(tiny, tmp_path, base_tok, base_config):
    from tests.tiny_models import base_embedding_pair

    narrow = build_llama(tmp_path / "narrow", base_tok, layers=1, seed=5, hidden=64, ship_tokenizer=False)
    _, thin = base_embedding_pair(narrow, tiny["base"], tmp_path)
    with pytest.raises(ArtifactError, match="hidden_size differs from the base's: memory hidden_size 64, base 128") as e:
        check_compatible(read_card(thin, "m"), base_tok, base_config)
    assert "memory 'm'" in str(e.value)


@pytest.mark.parametrize(
    "card,check",
    [
        ({"embeddings": "base"}, "says embeddings 'base' but the weights hold them: lm_head.weight, model.embed_tokens.weight"),
        ({"embeddings": "own-ish"}, "unknown memory.json embeddings"),
    ],
)
def test_bad_embeddings_field(tiny, tmp_path, card, check):
    d = copy(tiny["alpha"], tmp_path)
    (d / "memory.json").write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match=check):
        read_card(d, "m")
