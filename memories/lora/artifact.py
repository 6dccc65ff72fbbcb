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

from memories.artifact import ArtifactError, MemoryCard, check_floating, check_tokenizer, content_sha256, finite_number, is_int, read_json_object, read_memory_json, tensor_shapes

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Bases whose decoder layers use these projection names (and vLLM's LoRA supports them)
SUPPORTED_BASES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# PEFT tensor names: base_model.model.model.layers.<i>.<self_attn|mlp>.<module>.lora_<A|B>.weight
TENSOR = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
# |lora_alpha / r| (/ sqrt(r) with use_rslora): PEFT's usual choices give 0.5-4; far beyond is a broken config
MAX_LORA_SCALE = 1000.0
# The largest entry the update scale · B·A can have, |scale| · r · max|A| · max|B|, must stay a finite fp16 value
MAX_UPDATE = 65504.0


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


def _scale(name: str, cfg: dict[str, Any], rank: int) -> float:
    """The factor vLLM multiplies every update by: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.

    vLLM computes it from the config unchecked: a string fails inside the engine with
    Python's own message, and NaN or 1e38 loads and then poisons the batch it runs in.
    """
    alpha = finite_number(name, "adapter_config.json lora_alpha", cfg.get("lora_alpha"))
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise ArtifactError(name, "adapter_config.json use_rslora is not true or false", repr(rslora))
    scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    if abs(scale) > MAX_LORA_SCALE:
        divisor = f"sqrt(r {rank})" if rslora else f"r {rank}"
        raise ArtifactError(name, "LoRA scale out of range", f"lora_alpha {alpha:g} / {divisor} = {scale:g}; memserve serves |scale| ≤ {MAX_LORA_SCALE:g}")
    return scale


def _layers_to_transform(name: str, cfg: dict[str, Any]) -> tuple[int, ...]:
    """The layers PEFT adapts (absent: every layer the tensors name); vLLM ignores the field, so memserve checks it."""
    layers = cfg.get("layers_to_transform")
    if layers is None:
        return ()
    layers = [layers] if is_int(layers) else layers
    if not isinstance(layers, list) or not layers or not all(is_int(i) and i >= 0 for i in layers):
        raise ArtifactError(name, "adapter_config.json layers_to_transform is not a layer index or a list of them", repr(cfg.get("layers_to_transform")))
    return tuple(sorted(set(layers)))


def read_lora_card(root: Path, name: str) -> MemoryCard:
    """The adapter's metadata and what it claims (rank, targets); nothing about the base yet."""
    cfg = read_json_object(name, root / ADAPTER_CONFIG, ADAPTER_CONFIG)
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise ArtifactError(name, "not a LoRA adapter", f"adapter_config.json peft_type is {cfg.get('peft_type')!r}, memserve serves 'LORA'")
    rank = cfg.get("r")
    if not is_int(rank) or rank < 1:
        raise ArtifactError(name, "adapter_config.json r is not a positive integer", repr(rank))
    scale, layers = _scale(name, cfg, rank), _layers_to_transform(name, cfg)
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
        lora_scale=scale,
        layers_to_transform=layers,
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
    layers = int(base_config["num_hidden_layers"])
    beyond = [i for i in card.layers_to_transform if i >= layers]
    if beyond:
        raise ArtifactError(name, "layers_to_transform beyond the base", f"adapter_config.json layers_to_transform has layer {beyond[0]}, the base has {layers} layers (0-{layers - 1})")
    _check_tensors(card, dims, layers)
    check_tokenizer(card, base_tokenizer)


def _check_tensors(card: MemoryCard, dims: dict[str, tuple[int, int]], layers: int) -> None:
    """Every tensor is a floating-point, finite lora_A/lora_B of a target module in an existing layer, shaped for the base; A and B come in pairs."""
    from safetensors import safe_open

    name = card.name
    peaks: dict[tuple[int, str], dict[str, tuple[str, float]]] = {}  # (layer, module) → A/B → (tensor name, max |value|)
    with safe_open(str(Path(card.path) / ADAPTER_WEIGHTS), framework="pt") as st:
        for key in st.keys():
            layer, module, ab = _place(card, key, layers)
            fan_in, fan_out = dims[module]
            want = [card.rank, fan_in] if ab == "A" else [fan_out, card.rank]
            header = st.get_slice(key)
            if list(header.get_shape()) != want:
                raise ArtifactError(name, "tensor shape does not match the base", f"{key} is {list(header.get_shape())}, the base's {module} with r {card.rank} needs {want} (in {fan_in}, out {fan_out})")
            check_floating(name, key, header.get_dtype())  # before reading it
            tensor = st.get_tensor(key)
            bad = int((~tensor.isfinite()).sum())
            if bad:
                raise ArtifactError(name, "weights are not finite", f"{key} has {bad:,} NaN or infinite values")
            peaks.setdefault((layer, module), {})[ab] = (key, float(tensor.abs().max()) if tensor.numel() else 0.0)
    if not peaks:
        raise ArtifactError(name, "no LoRA weights", f"{ADAPTER_WEIGHTS} holds no lora_A/lora_B tensors")
    for pair in peaks.values():
        _check_pair(card, pair)


def _place(card: MemoryCard, key: str, layers: int) -> tuple[int, str, str]:
    """(layer, module, "A" or "B") of a tensor name, refused unless it adapts a target module in a layer the base has and the config lets it adapt."""
    name = card.name
    m = TENSOR.match(key)
    if m is None:
        raise ArtifactError(name, "unsupported tensor in the adapter", f"{key} is not a lora_A/lora_B weight of a decoder layer's projection (embedding or head LoRA is not served)")
    layer, module, ab = int(m[1]), m[2], m[3]
    if module not in card.target_modules:
        raise ArtifactError(name, "tensor for a module not in target_modules", f"{key}; target_modules: {', '.join(card.target_modules)}")
    if layer >= layers:
        raise ArtifactError(name, "layer index beyond the base", f"{key}: layer {layer}, the base has {layers} layers (0-{layers - 1})")
    if card.layers_to_transform and layer not in card.layers_to_transform:  # PEFT would skip it, vLLM would apply it
        raise ArtifactError(name, "tensor for a layer not in layers_to_transform", f"{key}: layer {layer}; layers_to_transform {list(card.layers_to_transform)}")
    return layer, module, ab


def _check_pair(card: MemoryCard, pair: dict[str, tuple[str, float]]) -> None:
    """A lora_A needs its lora_B (and back): vLLM fails on a lone one inside the engine. Their update must fit fp16."""
    if len(pair) == 1:
        ((have, (key, _)),) = pair.items()
        other = "B" if have == "A" else "A"
        raise ArtifactError(card.name, f"lora_{have} without its lora_{other}", f"{key} has no {key.replace(f'.lora_{have}.', f'.lora_{other}.')}")
    (key, a), (_, b) = pair["A"], pair["B"]
    bound = abs(card.lora_scale) * card.rank * a * b
    if bound > MAX_UPDATE:
        where = key.removesuffix(".lora_A.weight")
        raise ArtifactError(card.name, "LoRA update can overflow", f"{where}: scale {card.lora_scale:g} × r {card.rank} × max|A| {a:g} × max|B| {b:g} = {bound:g} > {MAX_UPDATE:g} (fp16's largest value)")
