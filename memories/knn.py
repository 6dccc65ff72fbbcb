"""The kNN retriever: neighbour search and the one kNN distribution formula.

``knn_distribution`` is the only place where neighbour distances become a
next-token distribution (softmax of -distance / T over the neighbours, each
neighbour's weight added to the token it stored). The training targets and
the kNN-LM baseline in evaluation both call it, so the memory is trained to
imitate exactly the retriever it is compared against.
"""

from __future__ import annotations

import numpy as np
import torch


def knn_distribution(distances, values, temperature: float, vocab_size: int) -> torch.Tensor:
    """Dense ``[n, vocab_size]`` probabilities from ``[n, k]`` distances and stored tokens.

    Neighbours with a negative id/value (faiss's "no result") get no weight.
    """
    d = torch.as_tensor(np.asarray(distances, dtype=np.float32))
    v = torch.as_tensor(np.asarray(values, dtype=np.int64))
    missing = v < 0
    logits = (-d / float(temperature)).masked_fill(missing, -torch.inf)
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    probs = torch.zeros(d.shape[0], vocab_size, dtype=torch.float32)
    return probs.scatter_add_(1, v.clamp(min=0), weights)


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(squared L2 distances, row ids), each ``[n, k]``."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    return index.search(q, k)


def search_excluding_self(index, queries: np.ndarray, own_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k neighbours of datastore rows, never returning the row itself.

    A row is its own nearest neighbour (distance 0), which would teach the
    memory to copy the answer it is asked to predict. We ask for k + 1 and drop
    the row's own id; where an approximate index did not return it, we drop
    the farthest result instead so every row keeps exactly k neighbours.
    """
    dist, ids = search(index, queries, k + 1)
    own = ids == np.asarray(own_ids, dtype=np.int64)[:, None]
    no_self = ~own.any(axis=1)
    own[no_self, -1] = True
    first_own = own.argmax(axis=1)
    keep = np.ones_like(own)
    keep[np.arange(len(ids)), first_own] = False
    return dist[keep].reshape(len(ids), k), ids[keep].reshape(len(ids), k)
