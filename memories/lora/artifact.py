"""A ``lora`` memory on disk: a PEFT LoRA adapter directory for the base, checked before vLLM sees it.

vLLM's own LoRA loader would refuse some of these adapters with a generic
error from inside the engine, and accept others that silently do the wrong
thing (an adapter for another base with matching module names but no
matching layers). Checking here, from the adapter's config and the
safetensors headers against the base's ``config.json``, gives every refusal
the memory's name, the check and both sides' numbers, and never touches the
engine.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from memories.artifact import ArtifactError, MemoryCard, read_json_object, check_tokenizer, content_sha256, read_memory_json, tensor_shapes

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Bases whose decoder layers use these projection names (and vLLM's LoRA supports them)
SUPPORTED_BASES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# PEFT tensor names: base_model.model.model.layers.<i>.<self_attn|mlp>.<module>.lora_<A|B>.weight
TENSOR = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def is_lora_dir(root: Path) -> bool:
    """A PEFT adapter directory: what ``save_pretrained`` of a PEFT model writes."""
    return (root / ADAPTER_CONFIG).is_file()


def module_dims(base_config: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each adaptable projection in one decoder layer of the base."""
    hidden, heads = int(base_config["hidden_size"]), int(base_config["num_attention_heads"])
    head_dim = int(base_config.get("head_dim") or hidden // heads)
    kv = int(base_config.get("num_key_value_heads") or heads) * head_dim
    inter = int(base_config["intermediate_size"])
    q = heads * head_dim
    return {
        "q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
        "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
    }  # fmt: skip


def _unsupported(cfg: dict[str, Any]) -> list[str]:
    """What vLLM cannot serve, or serves differently from PEFT, each with its reason."""
    reasons = []
    if cfg.get("modules_to_save"):
        reasons.append(f"modules_to_save {cfg['modules_to_save']} (fully trained copies of base modules; vLLM serves only the low-rank update)")
    if cfg.get("use_dora"):
        reasons.append("use_dora (DoRA's magnitude vector is not supported by vLLM)")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        reasons.append(f"bias {cfg.get('bias')!r} / lora_bias (trained biases are not supported by vLLM)")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            reasons.append(f"{key} (per-module ranks or alphas; memserve checks one rank)")
    if cfg.get("layer_replication"):
        reasons.append("layer_replication (not supported by vLLM)")
    return reasons


def _target_modules(name: str, cfg: dict[str, Any]) -> tuple[str, ...]:
    targets = cfg.get("target_modules")
    if isinstance(targets, str):  # PEFT allows a regex; only a plain module name is accepted
        targets = [targets]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ArtifactError(name, "adapter_config.json target_modules is not a list of module names", repr(cfg.get("target_modules")))
    return tuple(sorted(set(targets)))


def read_lora_card(root: Path, name: str) -> MemoryCard:
    """The adapter's metadata and what it claims (rank, targets); nothing about the base yet."""
    cfg = read_json_object(name, root / ADAPTER_CONFIG, ADAPTER_CONFIG)
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise ArtifactError(name, "not a LoRA adapter", f"adapter_config.json peft_type is {cfg.get('peft_type')!r}, memserve serves 'LORA'")
    rank = cfg.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ArtifactError(name, "adapter_config.json r is not a positive integer", repr(rank))
    reasons = _unsupported(cfg)
    if reasons:
        raise ArtifactError(name, "unsupported LoRA features", "; ".join(reasons))
    if not (root / ADAPTER_WEIGHTS).is_file():
        raise ArtifactError(name, "no weights", f"no {ADAPTER_WEIGHTS} in {root}")
    meta = read_memory_json(root, name)
    shapes = tensor_shapes(name, [root / ADAPTER_WEIGHTS])
    return MemoryCard(
        name=name,
        path=str(root.resolve()),
        kind="lora",
        weight=0.0,  # a LoRA memory has no mixing weight (only decoder memories do)
        domain=meta.get("domain"),
        description=str(meta.get("description", "")),
        base_model=meta.get("base_model") or cfg.get("base_model_name_or_path"),
        tokenizer_sha256=meta.get("tokenizer_sha256"),
        architecture="LoRA",
        num_parameters=sum(math.prod(s) for s in shapes.values()),
        rank=rank,
        target_modules=_target_modules(name, cfg),
        content_sha256=content_sha256(root),
        corpus=meta.get("corpus") or {},
        metrics=meta.get("metrics") or {},
        generator=meta.get("generator"),
        prompts=meta.get("prompts") or {},
    )


def check_lora_compatible(card: MemoryCard, base_tokenizer, base_config: dict | None, max_rank: int | None) -> None:
    """Refuse an adapter that is not for this base or not servable under the server's LoRA limits.

    ``max_rank`` None: the server serves no LoRA memories (``--max-loras 0``).
    """
    name = card.name
    if max_rank is None:
        raise ArtifactError(name, "LoRA memories are disabled on this server", "start it with --max-loras N (N ≥ 1) to serve them")
    if card.rank > max_rank:
        raise ArtifactError(name, "rank above the server's limit", f"adapter r {card.rank}, server --max-lora-rank {max_rank}")
    if base_config is None:
        raise ArtifactError(name, "a LoRA needs the base's config", "no base config.json was given to check it against")
    arch = (base_config.get("architectures") or [""])[0]
    if arch not in SUPPORTED_BASES:
        raise ArtifactError(name, "base architecture not supported for LoRA memories", f"base {arch or 'none'}, supported: {', '.join(SUPPORTED_BASES)}")
    dims = module_dims(base_config)
    missing = [m for m in card.target_modules if m not in dims]
    if missing:
        raise ArtifactError(name, "target modules the base lacks", f"adapter targets {', '.join(missing)}; the base's adaptable modules are {', '.join(MODULES)}")
    _check_tensors(card, dims, int(base_config["num_hidden_layers"]))
    check_tokenizer(card, base_tokenizer)


def _check_tensors(card: MemoryCard, dims: dict[str, tuple[int, int]], layers: int) -> None:
    """Every tensor is a lora_A/lora_B of a target module in an existing layer, shaped for the base, and finite."""
    from safetensors import safe_open

    name, r = card.name, card.rank
    seen = 0
    with safe_open(str(Path(card.path) / ADAPTER_WEIGHTS), framework="pt") as st:
        for key in st.keys():
            m = TENSOR.match(key)
            if m is None:
                raise ArtifactError(name, "unsupported tensor in the adapter", f"{key} is not a lora_A/lora_B weight of a decoder layer's projection (embedding or head LoRA is not served)")
            layer, module, ab = int(m[1]), m[2], m[3]
            if module not in card.target_modules:
                raise ArtifactError(name, "tensor for a module not in target_modules", f"{key}; target_modules: {', '.join(card.target_modules)}")
            if layer >= layers:
                raise ArtifactError(name, "layer index beyond the base", f"{key}: layer {layer}, the base has {layers} layers (0-{layers - 1})")
            fan_in, fan_out = dims[module]
            want = [r, fan_in] if ab == "A" else [fan_out, r]
            shape = st.get_slice(key).get_shape()
            if list(shape) != want:
                raise ArtifactError(name, "tensor shape does not match the base", f"{key} is {list(shape)}, the base's {module} with r {r} needs {want} (in {fan_in}, out {fan_out})")
            tensor = st.get_tensor(key)
            bad = int((~tensor.isfinite()).sum())
            if bad:
                raise ArtifactError(name, "weights are not finite", f"{key} has {bad:,} NaN or infinite values")
            seen += 1
    if not seen:
        raise ArtifactError(name, "no LoRA weights", f"{ADAPTER_WEIGHTS} holds no lora_A/lora_B tensors")
