"""Artifact checks: each refusal names the memory, the check and both sides' values."""

import json
import shutil

import pytest
from transformers import AutoTokenizer

from memories.artifact import ArtifactError, check_compatible, read_card, tokenizer_sha256
from tests.tiny_models import build_llama, build_tokenizer


@pytest.fixture(scope="module")
def base_tok(tiny):
    return AutoTokenizer.from_pretrained(tiny["tokenizer"])


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
