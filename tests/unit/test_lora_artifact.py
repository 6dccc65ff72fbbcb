"""lora memory checks: kind dispatch, and each refusal naming the memory, the check and both sides' values."""

import json
import shutil

import pytest
from transformers import AutoTokenizer

from memories.artifact import ArtifactError
from memories.kinds import check_any_compatible, read_any_card
from tests.tiny_models import build_llama, build_lora, edit_lora

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture(scope="module")
def base_tok(tiny):
    return AutoTokenizer.from_pretrained(tiny["tokenizer"])


@pytest.fixture(scope="module")
def base_config(tiny):
    return json.loads((tiny["base"] / "config.json").read_text())


@pytest.fixture(scope="module")
def lora(tiny, tmp_path_factory):
    return build_lora(tmp_path_factory.mktemp("lora") / "a", tiny["base"], rank=8)


def check(path, base_tok, base_config, name="m", max_rank=16):
    card = read_any_card(path, name)
    check_any_compatible(card, base_tok, base_config, max_rank)
    return card


def refused(path, base_tok, base_config, max_rank=16) -> ArtifactError:
    with pytest.raises(ArtifactError) as e:
        check(path, base_tok, base_config, max_rank=max_rank)
    assert e.value.memory == "m"
    return e.value


def test_a_peft_directory_is_a_lora_memory(lora, base_tok, base_config):
    card = check(lora, base_tok, base_config)
    assert (card.kind, card.rank, card.target_modules) == ("lora", 8, ("down_proj", "o_proj", "q_proj", "v_proj"))
    assert card.num_parameters > 0 and len(card.content_sha256) == 64


def test_memory_json_kind_and_generator_fields_pass_through(lora, tmp_path, base_tok, base_config):
    d = shutil.copytree(lora, tmp_path / "g")
    (d / "memory.json").write_text(json.dumps({"format": 1, "kind": "lora", "generator": "ab" * 32, "prompts": {"count": 64, "sha256": "cd" * 32}, "domain": "law"}))
    card = check(d, base_tok, base_config)
    assert (card.generator, card.prompts, card.domain) == ("ab" * 32, {"count": 64, "sha256": "cd" * 32}, "law")


def test_decoder_memories_keep_their_kind(tiny, base_tok, base_config):
    assert check(tiny["alpha"], base_tok, base_config).kind == "decoder"


@pytest.mark.parametrize("kind,check_name", [("calm", "memory.json calm fields missing or malformed"), ("prefix", "unknown memory.json kind")])
def test_other_kinds_are_refused(lora, tmp_path, base_tok, base_config, kind, check_name):
    d = shutil.copytree(lora, tmp_path / kind)
    (d / "memory.json").write_text(json.dumps({"kind": kind}))
    assert refused(d, base_tok, base_config).check == check_name


def test_lora_for_another_base_names_the_shapes(tiny, tmp_path, base_tok, base_config):
    other = build_llama(tmp_path / "other-base", base_tok, layers=2, seed=5, hidden=192)
    e = refused(build_lora(tmp_path / "other", other), base_tok, base_config)
    assert e.check == "tensor shape does not match the base"
    assert "is [8, 384]" in e.detail and "needs [8, 256]" in e.detail  # down_proj: intermediate 2 × 192 vs 2 × 128


def test_rank_above_the_limit(lora, base_tok, base_config):
    e = refused(lora, base_tok, base_config, max_rank=1)
    assert e.check == "rank above the server's limit" and "r 8" in e.detail and "--max-lora-rank 1" in e.detail


def test_lora_disabled_names_the_flag(lora, base_tok, base_config):
    assert "--max-loras" in refused(lora, base_tok, base_config, max_rank=None).detail


def test_target_module_the_base_lacks(lora, tmp_path, base_tok, base_config):
    d = shutil.copytree(lora, tmp_path / "t")
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj", "qkv_proj"]}))
    e = refused(d, base_tok, base_config)
    assert e.check == "target modules the base lacks" and "qkv_proj" in e.detail


def test_layer_beyond_the_base(lora, tmp_path, base_tok, base_config):
    def add_layer(t):
        t[A.replace("layers.0", "layers.7")] = t[A].clone()

    e = refused(edit_lora(lora, tmp_path / "l", add_layer), base_tok, base_config)
    assert e.check == "layer index beyond the base" and "layer 7" in e.detail and "2 layers" in e.detail


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_name_the_tensor(lora, tmp_path, base_tok, base_config, value):
    def poison(t):
        t[A][0, 0] = value

    e = refused(edit_lora(lora, tmp_path / "n", poison), base_tok, base_config)
    assert e.check == "weights are not finite" and A in e.detail


def test_embedding_lora_is_refused(lora, tmp_path, base_tok, base_config):
    def add_embedding(t):
        t["base_model.model.model.embed_tokens.lora_embedding_A"] = t[A].clone()

    assert refused(edit_lora(lora, tmp_path / "e", add_embedding), base_tok, base_config).check == "unsupported tensor in the adapter"


@pytest.mark.parametrize(
    "extra,reason",
    [({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"), ({"peft_type": "IA3"}, "peft_type"), ({"r": 0}, "r")],
)
def test_unsupported_adapter_configs(lora, tmp_path, base_tok, base_config, extra, reason):
    d = shutil.copytree(lora, tmp_path / "c")
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, **extra}))
    e = refused(d, base_tok, base_config)
    assert reason in str(e)


def test_shipped_tokenizer_must_be_the_bases(lora, tmp_path, base_tok, base_config):
    from tests.tiny_models import build_tokenizer

    d = shutil.copytree(lora, tmp_path / "tok")
    build_tokenizer(d, vocab_size=300)
    assert refused(d, base_tok, base_config).check == "tokenizer differs from the base's"
