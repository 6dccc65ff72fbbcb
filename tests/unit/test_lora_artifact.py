"""lora memory checks: kind dispatch, and each refusal naming the memory, the check and both sides' values."""

import json
import shutil

import pytest

from memories.artifact import ArtifactError
from memories.kinds import check_any_compatible, read_any_card
from tests.tiny_models import build_llama, build_lora, edit_lora

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


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


def with_config(lora, out, **changes):
    """A copy of the adapter whose adapter_config.json has ``changes`` (JSON NaN included, as Python's reader accepts it)."""
    d = shutil.copytree(lora, out)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
    return d


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), "sixteen", None, True])
def test_lora_alpha_must_be_a_finite_number(lora, tmp_path, base_tok, base_config, alpha):
    e = refused(with_config(lora, tmp_path / "a", lora_alpha=alpha), base_tok, base_config)
    assert e.check == "adapter_config.json lora_alpha is not a finite number" and e.detail == repr(alpha)


def test_lora_scale_is_bounded(lora, tmp_path, base_tok, base_config):
    e = refused(with_config(lora, tmp_path / "a", lora_alpha=1e38), base_tok, base_config)
    assert e.check == "LoRA scale out of range" and "lora_alpha 1e+38 / r 8" in e.detail and "≤ 1000" in e.detail
    e = refused(with_config(lora, tmp_path / "rs", lora_alpha=4000, use_rslora=True), base_tok, base_config)  # 4000 / sqrt(8) ≈ 1414
    assert e.check == "LoRA scale out of range" and "sqrt(r 8)" in e.detail and "1414.2" in e.detail
    e = refused(with_config(lora, tmp_path / "yes", use_rslora="yes"), base_tok, base_config)
    assert e.check == "adapter_config.json use_rslora is not true or false"
    card = check(with_config(lora, tmp_path / "ok", lora_alpha=32, use_rslora=True), base_tok, base_config)
    assert card.lora_scale == pytest.approx(32 / 8**0.5)


def test_an_update_that_overflows_fp16_is_refused(lora, tmp_path, base_tok, base_config):
    def amplify(t):
        t[A.replace("lora_A", "lora_B")].mul_(1e4)

    e = refused(edit_lora(lora, tmp_path / "big", amplify), base_tok, base_config)
    assert e.check == "LoRA update can overflow" and "layers.0.self_attn.q_proj" in e.detail and "65504" in e.detail


@pytest.mark.parametrize("dtype", ["int8", "int32"])
def test_integer_adapter_tensors_are_refused_like_decoder_weights(lora, tmp_path, base_tok, base_config, dtype):
    import torch

    def quantize(t):
        t[A] = t[A].round().to(getattr(torch, dtype))

    e = refused(edit_lora(lora, tmp_path / dtype, quantize), base_tok, base_config)
    assert e.check == "unsupported dtype" and A in e.detail and "floating point" in e.detail


@pytest.mark.parametrize("drop", ["A", "B"])
def test_every_lora_a_needs_its_lora_b(lora, tmp_path, base_tok, base_config, drop):
    gone = A.replace("lora_A", f"lora_{drop}")
    kept = A.replace("lora_A", "lora_B" if drop == "A" else "lora_A")
    e = refused(edit_lora(lora, tmp_path / drop, lambda t: t.pop(gone)), base_tok, base_config)
    assert e.check.endswith(f"without its lora_{drop}") and e.detail == f"{kept} has no {gone}"


def test_layers_to_transform_beyond_the_base_is_refused(lora, tmp_path, base_tok, base_config):
    e = refused(with_config(lora, tmp_path / "seven", layers_to_transform=[7]), base_tok, base_config)
    assert e.check == "layers_to_transform beyond the base" and "layer 7" in e.detail and "2 layers" in e.detail
    e = refused(with_config(lora, tmp_path / "one", layers_to_transform=1), base_tok, base_config)  # the adapter has layer-0 tensors
    assert e.check == "tensor for a layer not in layers_to_transform" and "layer 0" in e.detail
    for bad in ("0", [0.0], [True], []):
        e = refused(with_config(lora, tmp_path / f"bad{len(str(bad))}{type(bad).__name__}", layers_to_transform=bad), base_tok, base_config)
        assert e.check == "adapter_config.json layers_to_transform is not a layer index or a list of them", bad
    assert check(with_config(lora, tmp_path / "both", layers_to_transform=[1, 0]), base_tok, base_config).layers_to_transform == (0, 1)
