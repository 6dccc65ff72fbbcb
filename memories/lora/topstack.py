"""Running only the top of the base: the LoRAs here touch the last K decoder layers.

Training, prompt encoding and evaluation all feed the same frozen lower
layers, so their output (the hidden state entering layer ``L - K``) is
computed once per window and reused: every LoRA training step, every
evaluated variant (base, mean, generated, trained) then costs only K layers
and the head. ``top_only`` swaps the model's layer list for its top slice and
the caller passes the cached state as ``inputs_embeds``; the layers (and any
LoRA modules PEFT put inside them) are the model's own objects, so nothing is
copied and the PEFT key names keep the original layer numbers.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from memories.perplexity import perplexity, token_logprobs


def decoder(model):
    """The LlamaModel-like stack inside a causal LM, PEFT-wrapped or not."""
    inner = model
    while not hasattr(inner, "layers"):
        inner = inner.model if hasattr(inner, "model") else inner.base_model
    return inner


def num_layers(model) -> int:
    return len(decoder(model).layers)


def attention_shapes(model, modules: list[str]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each targeted projection (the same in every layer)."""
    attn = decoder(model).layers[0].self_attn
    return {m: (getattr(attn, m).in_features, getattr(attn, m).out_features) for m in modules}


@contextlib.contextmanager
def top_only(model, first: int, stop: int | None = None):
    """Inside, the model runs layers ``first..stop-1`` (default: to the last) on ``inputs_embeds`` = the state entering layer ``first``."""
    inner = decoder(model)
    layers = inner.layers
    inner.layers = torch.nn.ModuleList(list(layers)[first:stop])
    try:
        yield model
    finally:
        inner.layers = layers


@torch.no_grad()
def states_entering(model, windows: np.ndarray, layer: int, batch: int = 8, bf16: bool = False, progress=None) -> torch.Tensor:
    """Hidden states entering decoder layer ``layer`` for token windows [n, T] (layer 0 = embeddings)."""
    out = []
    inner = decoder(model)
    norm = inner.norm
    inner.norm = torch.nn.Identity()  # the truncated stack's "last hidden state" is then exactly the state entering ``layer``
    try:
        with top_only(model, 0, layer):  # the layers from ``layer`` up are not run at all
            for s in range(0, len(windows), batch):
                ids = torch.as_tensor(windows[s : s + batch], dtype=torch.long)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    hidden = inner(input_ids=ids, use_cache=False).last_hidden_state
                out.append(hidden.float())
                if progress is not None:
                    progress.update(len(ids))
    finally:
        inner.norm = norm
    return torch.cat(out) if out else torch.zeros(0)


def run_top(model, first: int, states: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """Logits of layers ``first..`` + norm + head on cached states [n, T, H]."""
    with top_only(model, first), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(inputs_embeds=states, use_cache=False).logits


@contextlib.contextmanager
def deltas_merged(model, deltas: dict[tuple[int, str], torch.Tensor] | None):
    """Adds ΔW to the named projections for the duration of the block, then restores the exact weights."""
    saved = []
    try:
        for (layer, module), delta in (deltas or {}).items():
            lin = getattr(decoder(model).layers[layer].self_attn, module)
            saved.append((lin, lin.weight.data.clone()))
            lin.weight.data += delta.to(lin.weight.dtype)
        yield model
    finally:
        for lin, w in saved:
            lin.weight.data.copy_(w)


@torch.no_grad()
def top_perplexity(model, first: int, states: torch.Tensor, windows: np.ndarray, batch: int = 4) -> float:
    """Perplexity of every next token inside the windows, given their cached lower states."""
    logprobs = []
    for s in range(0, len(windows), batch):
        logits = run_top(model, first, states[s : s + batch])
        ids = torch.as_tensor(windows[s : s + batch], dtype=torch.long)
        logprobs.append(token_logprobs(logits[:, :-1], ids[:, 1:]).flatten())
    return perplexity(torch.cat(logprobs))


def cut_windows(stream: np.ndarray, length: int, limit: int | None = None) -> np.ndarray:
    """Non-overlapping windows of ``length`` tokens from a token stream (the tail that does not fill one is dropped)."""
    n = len(stream) // length
    if limit is not None:
        n = min(n, limit)
    return np.asarray(stream[: n * length], dtype=np.int64).reshape(n, length)
