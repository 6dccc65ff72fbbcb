"""What every trainer here shares: the learning-rate schedule and a model started from the base's layers.

The decoder build, the calm composition and the calm demo's augmenting model
all train with the same schedule, and a decoder memory and an augmenting model
both start as (a cut of) the base; kept beside the kinds so that none of them
reaches into another's build.
"""

from __future__ import annotations

import math

import torch

INITS = ("ends", "first")


def memory_layer_ids(total: int, layers: int, init: str) -> list[int]:
    """Which base layers the memory starts from; ``layers`` 0 means all of them (the whole base).

    The whole base is the default because it is the only start measured to
    reach the targets at the demo budget (memories/README.md): every cut of
    the 30-layer default base starts with perplexity 10^4–10^8 and stays in
    the hundreds after training, while the whole base starts as a language
    model and only has to move towards the retriever. For cuts, ``ends`` keeps
    the first ⌈N/2⌉ and the last ⌊N/2⌋ layers (the last ones shape hidden
    states for the final norm and head) and ``first`` the first N.
    """
    layers = layers or total
    if not 1 <= layers <= total:
        raise ValueError(f"memory layers must be in 1..{total} (the base's depth; 0 = all), got {layers}")
    if init == "first":
        return list(range(layers))
    if init == "ends":
        head = layers - layers // 2
        return list(range(head)) + list(range(total - layers // 2, total))
    raise ValueError(f"memory init must be one of {INITS}, got {init!r}")


def init_memory(base_dir, layers: int = 0, init: str = "ends"):
    """The base, or the base cut to ``layers`` decoder layers picked by ``memory_layer_ids``; same config otherwise."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base_dir))
    keep = memory_layer_ids(config.num_hidden_layers, layers, init)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    memory = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in base.state_dict().items():
        layer = _layer_of(key)
        if layer is None:
            state[key] = value
        elif layer in new_index:
            state[key.replace(f"layers.{layer}.", f"layers.{new_index[layer]}.", 1)] = value
    missing, unexpected = memory.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"memory init from base failed: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        memory.tie_weights()
    return memory


def _layer_of(key: str) -> int | None:
    parts = key.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def lr_schedule(total_steps: int, warmup: float):
    """Linear warm-up over a ``warmup`` fraction of the steps, then cosine decay to a tenth (every trainer here uses it)."""
    warm = max(1, int(total_steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
