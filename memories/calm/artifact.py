"""A calm memory directory: ``memory.json``, ``augment/`` and ``composition.safetensors``.

The checks here read metadata and headers only, so the API can refuse a bad
directory before any worker loads weights; the worker's load then checks every
tensor (``Composition.load``, ``MemoryDecoder``).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from memories.artifact import MEMORY_JSON, ArtifactError, MemoryCard, check_tokenizer, content_sha256, read_card, read_memory_json, tensor_headers
from memories.calm.composition import AUGMENT_DIR, COMPOSITION_FILE, CompositionSpec, check_composition_tensors, check_layers

# the base architecture memserve's vLLM model composes calm memories into (server/worker/calm_step.py)
SUPPORTED_BASES = ("LlamaForCausalLM",)


def read_calm_card(root: Path, name: str) -> MemoryCard:
    meta = read_memory_json(root, name)
    spec = CompositionSpec.from_card(name, meta)
    if not (root / COMPOSITION_FILE).is_file():
        raise ArtifactError(name, "no composition", f"no {COMPOSITION_FILE} in {root}")
    augment = read_card(root / AUGMENT_DIR, name)  # architecture, weights present, tokenizer files
    if augment.hidden_size != spec.augment_width:
        raise ArtifactError(name, "augment width differs from memory.json", f"augment/config.json hidden_size {augment.hidden_size}, memory.json augment_width {spec.augment_width}")
    composition = tensor_headers(name, [root / COMPOSITION_FILE])
    check_composition_tensors(name, spec, composition)  # headers only: before any worker builds a connection
    return MemoryCard(
        name=name,
        path=str(root.resolve()),
        kind="calm",
        weight=0.0,  # only decoder memories have a mixing weight
        domain=meta.get("domain"),
        description=str(meta.get("description", "")),
        base_model=meta.get("base_model"),
        tokenizer_sha256=meta.get("tokenizer_sha256"),
        architecture=f"CALM({augment.architecture})",
        vocab_size=augment.vocab_size,
        num_parameters=augment.num_parameters + sum(math.prod(shape) for shape, _ in composition.values()),
        hidden_size=spec.base_width,
        content_sha256=_content_sha256(root, augment.content_sha256),
        corpus=meta.get("corpus") or {},
        metrics=meta.get("metrics") or {},
        connections=spec.connections,
    )


def check_calm_compatible(card: MemoryCard, base_tokenizer, base_config: dict | None) -> None:
    """Refuse a composition that is not for this base: architecture, width, layers, tokenizer."""
    name = card.name
    if base_config is None:
        raise ArtifactError(name, "a calm memory needs the base's config", "no base config.json was given to check it against")
    arch = (base_config.get("architectures") or [""])[0]
    if arch not in SUPPORTED_BASES:
        raise ArtifactError(name, "base architecture not supported for calm memories", f"base {arch or 'none'}, supported: {', '.join(SUPPORTED_BASES)}")
    root = Path(card.path)
    spec = CompositionSpec.from_card(name, read_memory_json(root, name))
    if spec.base_width != base_config.get("hidden_size"):
        raise ArtifactError(name, "base width differs from memory.json", f"memory.json base_width {spec.base_width}, base hidden_size {base_config.get('hidden_size')}")
    augment_layers = int(json.loads((root / AUGMENT_DIR / "config.json").read_text()).get("num_hidden_layers", 0))
    check_layers(name, spec, augment_layers, int(base_config["num_hidden_layers"]))
    # the augmenting model reads the base's token ids: its vocabulary must mean the same
    check_tokenizer(MemoryCard(name=name, path=str(root / AUGMENT_DIR), tokenizer_sha256=card.tokenizer_sha256), base_tokenizer)
    if card.vocab_size < len(base_tokenizer):  # the card's vocabulary is the augmenting model's (read_calm_card)
        raise ArtifactError(name, "augment vocabulary too small", f"augment vocab_size {card.vocab_size} < base tokenizer's {len(base_tokenizer)} tokens")


def _content_sha256(root: Path, augment_sha256: str) -> str:
    """Identifies a version across replicas: the composition and the augmenting model (whose hash its card already holds)."""
    h = hashlib.sha256()
    for part in (content_sha256(root), augment_sha256, (root / MEMORY_JSON).read_bytes()):
        h.update(part.encode() if isinstance(part, str) else hashlib.sha256(part).digest())
    return h.hexdigest()
