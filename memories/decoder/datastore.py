"""Datastore: for every training position, the base's hidden state (key) and the next token (value).

Following the Memory Decoder paper (and kNN-LM), the key is the input of the
last decoder layer's MLP, i.e. the output of that layer's post-attention
layernorm, captured with a forward hook (``layer`` picks another layer).
Keys are stored in fp16 in memory-mapped ``.npy`` shards so that datastores
larger than RAM work and so several machines can each build a shard
(``shard i of n`` takes a contiguous block of windows).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm import tqdm

from memories.windows import Window, iter_windows, shard_windows


def key_module(model, layer: int):
    """The module whose output is the key: layer ``layer``'s post-attention norm (= MLP input)."""
    layers = model.model.layers
    try:
        return layers[layer].post_attention_layernorm
    except IndexError:
        raise ValueError(f"key layer {layer} out of range: the base has {len(layers)} layers") from None


@contextmanager
def capture_keys(model, layer: int):
    """Context manager yielding a list that receives each forward's key tensor."""
    seen: list[torch.Tensor] = []
    handle = key_module(model, layer).register_forward_hook(lambda mod, inp, out: seen.append(out.detach()))
    try:
        yield seen
    finally:
        handle.remove()


@torch.inference_mode()
def base_pass(model, tokens: np.ndarray, windows: list[Window], layer: int, with_logprobs: bool, desc: str, progress=True) -> Iterator[tuple[Window, np.ndarray, np.ndarray | None]]:
    """Run the base window by window; yield (window, fp16 keys of scored positions,
    log p_base(next token) of scored positions or None)."""
    from memories.perplexity import token_logprobs

    with capture_keys(model, layer) as seen:
        for w in tqdm(windows, desc=desc, unit="win", disable=not progress):
            ids = torch.as_tensor(tokens[w.begin : w.end], dtype=torch.long, device=model.device)[None]
            seen.clear()
            if with_logprobs:
                logits = model(input_ids=ids).logits[0, w.offset :]
                labels = torch.as_tensor(tokens[w.first + 1 : w.end + 1], dtype=torch.long, device=model.device)
                lp = token_logprobs(logits, labels).cpu().numpy()
            else:
                model.model(input_ids=ids)  # keys only: skip the vocabulary projection
                lp = None
            keys = seen[-1][0, w.offset :].to(torch.float16).cpu().numpy()
            yield w, keys, lp


def build_datastore(model, tokens: np.ndarray, out: Path, context: int, stride: int, layer: int, shard: int = 0, shards: int = 1, progress=True) -> dict:
    """Write keys.npy (fp16 [rows, hidden]), values.npy (int32) and positions.npy (int64) into ``out``."""
    windows = shard_windows(list(iter_windows(len(tokens), context, stride)), shard, shards)
    rows = sum(w.scored for w in windows)
    hidden = model.config.hidden_size
    keys = open_memmap(out / "keys.npy", mode="w+", dtype=np.float16, shape=(rows, hidden))
    values = np.empty(rows, dtype=np.int32)
    positions = np.empty(rows, dtype=np.int64)
    row = 0
    for w, k, _ in base_pass(model, tokens, windows, layer, False, f"datastore {shard + 1}/{shards}", progress):
        n = w.scored
        keys[row : row + n] = k
        positions[row : row + n] = np.arange(w.first, w.end)
        values[row : row + n] = tokens[w.first + 1 : w.end + 1]
        row += n
    keys.flush()
    del keys
    np.save(out / "values.npy", values)
    np.save(out / "positions.npy", positions)
    return {"rows": rows, "hidden": hidden, "layer": layer, "shard": shard, "shards": shards}
