"""A memory's arithmetic per token: what the compute bound of serving it, and the comparison's FLOPs column, are made of."""

from __future__ import annotations

import json
from pathlib import Path


def flops_per_token(config_dir: str | Path) -> float:
    """Forward FLOPs per decoded token of a Llama-family model (2 per multiply-add; attention over a short context ignored)."""
    c = json.loads((Path(config_dir) / "config.json").read_text())
    h, layers, inter, vocab = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or h // heads
    kv = (c.get("num_key_value_heads") or heads) * head_dim
    q = heads * head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * inter
    return 2.0 * (layers * per_layer + h * vocab)


def memory_flops_per_token(memory_dir: str | Path) -> float:
    """A memory's own FLOPs per token: a decoder memory's forward; a lora memory's adapter (every
    parameter once per token); a calm memory's augmenting model without its output head (never
    applied) plus its composition (every parameter once per token)."""
    memory_dir = Path(memory_dir)
    if (memory_dir / "adapter_config.json").exists():
        from safetensors import safe_open

        with safe_open(str(memory_dir / "adapter_model.safetensors"), "pt") as f:
            params = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys())
        return 2.0 * params
    card = memory_dir / "memory.json"
    meta = json.loads(card.read_text()) if card.exists() else {}
    if meta.get("kind") != "calm":
        return flops_per_token(memory_dir)
    augment = memory_dir / "augment"
    c = json.loads((augment / "config.json").read_text())
    d_a, d_b = meta["augment_width"], meta["base_width"]
    composition = len(meta["connections"]) * (d_a * d_b + 4 * d_b * d_b)
    return flops_per_token(augment) - 2.0 * c["hidden_size"] * c["vocab_size"] + 2.0 * composition
