"""kNN training targets: for every datastore row, the retriever's next-token distribution.

The row itself is excluded from its own neighbours (see ``search_excluding_self``),
otherwise the target would contain the answer with weight ~1. The dense
distribution over the vocabulary is cut to its ``top`` largest entries,
renormalised, and stored sparsely: ``ids.npy`` (int32) and ``probs.npy``
(fp16), both ``[rows, top]`` and memory-mapped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm import tqdm

from memories.decoder.index import iter_keys, load_index
from memories.knn import knn_distribution, search_excluding_self


def build_targets(index_dir: Path, shard_dirs: list[str], out: Path, k: int, temperature: float, top: int, vocab_size: int, chunk: int = 1024, progress=True) -> dict:
    index = load_index(index_dir)
    values = np.load(index_dir / "values.npy")
    rows = len(values)
    k = max(1, min(k, rows - 1))
    top = min(top, vocab_size)
    ids_out = open_memmap(out / "ids.npy", mode="w+", dtype=np.int32, shape=(rows, top))
    probs_out = open_memmap(out / "probs.npy", mode="w+", dtype=np.float16, shape=(rows, top))
    with tqdm(total=rows, desc="targets", unit="pos", disable=not progress) as bar:
        for first, keys in iter_keys(shard_dirs, chunk):
            own = np.arange(first, first + len(keys))
            dist, nbr = search_excluding_self(index, keys, own, k)
            nbr_values = np.where(nbr >= 0, values[np.clip(nbr, 0, None)], -1)
            pi, pv = sparse_targets(dist, nbr_values, temperature, top, vocab_size)
            ids_out[first : first + len(keys)] = pi
            probs_out[first : first + len(keys)] = pv
            bar.update(len(keys))
    ids_out.flush()
    probs_out.flush()
    return {"rows": rows, "k": k, "top": top, "temperature": temperature}


def sparse_targets(distances, values, temperature: float, top: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The kNN distribution cut to its ``top`` largest entries and renormalised: (int32 ids, fp16 probs).

    Training targets and the held-out targets the training stage measures
    its fit on both come from here, so "KL to the kNN distribution" means one thing.
    """
    p = knn_distribution(distances, values, temperature, vocab_size)
    pv, pi = torch.topk(p, min(top, vocab_size), dim=-1)
    pv = pv / pv.sum(-1, keepdim=True).clamp(min=1e-12)
    return pi.numpy().astype(np.int32), pv.numpy().astype(np.float16)


def heldout_targets(heldout_dir: Path, split: str, temperature: float, top: int, vocab_size: int, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Sparse kNN targets at a held-out split's positions, from the neighbours the heldout stage stored."""
    data = np.load(Path(heldout_dir) / f"{split}.npz")
    parts = [sparse_targets(data["distances"][s : s + chunk], data["values"][s : s + chunk], temperature, top, vocab_size) for s in range(0, len(data["values"]), chunk)]
    return np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])


def load_targets(targets_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids [rows, top] int32, probs [rows, top] fp16), memory-mapped."""
    d = Path(targets_dir)
    return np.load(d / "ids.npy", mmap_mode="r"), np.load(d / "probs.npy", mmap_mode="r")
