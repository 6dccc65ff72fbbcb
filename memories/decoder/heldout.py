"""Held-out features: the base's view of the validation and test splits.

One base pass per split gives both what evaluation needs (log p_base of each
observed token) and what kNN-LM needs (the query keys, whose neighbours are
searched here). The kNN-LM's λ and temperature are tuned on validation in
this stage because the training targets use the same temperature: the memory
imitates the retriever that works best on held-out text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from memories.decoder.datastore import base_pass
from memories.decoder.index import load_index
from memories.knn import search
from memories.mixture import LAMBDA_GRID, TEMPERATURE_FACTORS, distance_scale, knn_logprob_at_targets, mix_at_targets
from memories.perplexity import perplexity
from memories.windows import iter_windows


def build_heldout(model, streams: dict[str, np.ndarray], index_dir: Path, out: Path, context: int, stride: int, layer: int, k: int, vocab_size: int, progress=True) -> dict:
    index = load_index(index_dir)
    k = min(k, index.ntotal)
    values = np.load(index_dir / "values.npy")
    for split, tokens in streams.items():
        windows = list(iter_windows(len(tokens), context, stride))
        keys, base_lp, labels = [], [], []
        for w, key, lp in base_pass(model, tokens, windows, layer, True, f"base on {split}", progress):
            keys.append(key)
            base_lp.append(lp)
            labels.append(tokens[w.first + 1 : w.end + 1])
        dist, nbr_values = neighbours(index, values, np.concatenate(keys).astype(np.float32), k)
        np.savez(out / f"{split}.npz", base_logp=np.concatenate(base_lp), labels=np.concatenate(labels).astype(np.int32), distances=dist.astype(np.float32), values=nbr_values)
    val = np.load(out / "validation.npz")
    tuned = tune_knnlm(val, vocab_size)
    return {"k": k, "positions": {s: int(len(t) - 1) for s, t in streams.items()}, "knnlm": tuned}


def neighbours(index, values: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances, stored next tokens) of each key's ``k`` nearest datastore rows; -1 where faiss found none."""
    dist, ids = search(index, keys, k)
    return dist, np.where(ids >= 0, values[np.clip(ids, 0, None)], -1).astype(np.int32)


def tune_knnlm(data, vocab_size: int) -> dict:
    """Grid search of (temperature, λ) for base + kNN-LM on one split's features."""
    scale = distance_scale(data["distances"])
    best = None
    grid = []
    for f in TEMPERATURE_FACTORS:
        t = scale * f
        knn_lp = knn_logprob_at_targets(data["distances"], data["values"], data["labels"], t, vocab_size)
        for weight in LAMBDA_GRID[:-1]:  # λ = 1 (kNN alone) has zero probability for unseen tokens
            ppl = perplexity(mix_at_targets(data["base_logp"], knn_lp, weight))
            grid.append({"temperature": t, "lambda": weight, "ppl": ppl})
            if best is None or ppl < best["ppl"]:
                best = {"temperature": t, "lambda": weight, "ppl": ppl}
    return {"temperature": best["temperature"], "lambda": best["lambda"], "validation_ppl": best["ppl"], "distance_scale": scale, "grid": grid}


def knnlm_ppl(data, temperature: float, weight: float, vocab_size: int) -> float:
    knn_lp = knn_logprob_at_targets(data["distances"], data["values"], data["labels"], temperature, vocab_size)
    return perplexity(mix_at_targets(data["base_logp"], knn_lp, weight))
