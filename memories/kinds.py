"""Which kind a memory directory is, and the one place that sends it to that kind's checks.

A decoder memory is a causal-LM directory; a lora memory is a PEFT adapter
directory. ``memory.json`` ``kind`` says which (absent: decoder), and an
adapter directory without ``memory.json`` is a lora memory, so any PEFT LoRA a
user already has for the base loads as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

from memories.artifact import ArtifactError, MemoryCard, check_compatible, read_card, read_memory_json
from memories.calm.artifact import check_calm_compatible, read_calm_card
from memories.lora.artifact import check_lora_compatible, is_lora_dir, read_lora_card

KINDS = ("decoder", "lora", "calm")


def kind_of(root: Path, name: str) -> str:
    meta = read_memory_json(root, name)
    kind = meta.get("kind", "lora" if not meta and is_lora_dir(root) else "decoder")
    if kind not in KINDS:
        raise ArtifactError(name, "unknown memory.json kind", f"memory has {kind!r}, this server serves kinds: {', '.join(KINDS)}")
    return kind


def read_any_card(path: str | os.PathLike, name: str, default_weight: float | None = None) -> MemoryCard:
    """The card of a memory of any served kind (metadata and weight headers only)."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(name, "not a directory", str(root))
    kind = kind_of(root, name)
    if kind == "lora":
        return read_lora_card(root, name)
    if kind == "calm":
        return read_calm_card(root, name)
    return read_card(root, name, default_weight)


def check_any_compatible(card: MemoryCard, base_tokenizer, base_config: dict | None, max_lora_rank: int | None) -> None:
    """The kind's checks against the base (``max_lora_rank`` None: LoRA memories are off)."""
    if card.kind == "lora":
        check_lora_compatible(card, base_tokenizer, base_config, max_lora_rank)
    elif card.kind == "calm":
        check_calm_compatible(card, base_tokenizer, base_config)
    else:
        check_compatible(card, base_tokenizer, base_config)
