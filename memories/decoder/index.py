"""Index over the datastore keys: exact search when small, IVF-PQ when large.

An exact ``IndexFlatL2`` costs rows x dim per query, fine up to a few million
rows; above ``flat_max`` rows the keys are compressed with product
quantisation in an inverted-file index trained on a random sample, which is
what makes billion-token datastores searchable. Shards are merged here, in
shard order, so row ids are stream positions of the training split.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

INDEX_FILE = "index.faiss"


def _pq_subquantizers(dim: int) -> int:
    """Largest divisor of dim giving >= 4 dims per sub-quantiser, at most 64 codes."""
    for m in range(min(64, dim // 4), 0, -1):
        if dim % m == 0:
            return m
    return 1


def build_index(shard_dirs: list[Path], out: Path, flat_max: int = 2_000_000, train_sample: int = 200_000, nprobe: int = 32, seed: int = 0, progress=True) -> dict:
    import faiss

    key_sets = [np.load(d / "keys.npy", mmap_mode="r") for d in shard_dirs]
    values = np.concatenate([np.load(d / "values.npy") for d in shard_dirs])
    positions = np.concatenate([np.load(d / "positions.npy") for d in shard_dirs])
    if not np.array_equal(positions, np.arange(len(positions))):
        raise ValueError("datastore shards do not cover the training positions in order: rebuild the missing or stale shards")
    rows, dim = len(values), key_sets[0].shape[1]
    if rows < 2:
        raise ValueError(f"datastore has {rows} rows; need at least 2 for neighbour search")
    if rows <= flat_max:
        index, kind = on_gpu(faiss.IndexFlatL2(dim)), "flat"
    else:
        nlist = int(min(65536, max(16, 4 * math.sqrt(rows))))
        m = _pq_subquantizers(dim)
        index = on_gpu(faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, nlist, m, 8))
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(rows, size=min(rows, max(train_sample, 40 * nlist)), replace=False))
        index.train(_gather(key_sets, sample))
        index.nprobe = nprobe
        kind = f"ivfpq(nlist={nlist},m={m},nbits=8,nprobe={nprobe})"
    chunk = 65536
    with tqdm(total=rows, desc="index", unit="key", disable=not progress) as bar:
        for keys in key_sets:
            for s in range(0, len(keys), chunk):
                block = np.asarray(keys[s : s + chunk], dtype=np.float32)
                index.add(block)
                bar.update(len(block))
    faiss.write_index(faiss.index_gpu_to_cpu(index) if _gpu_count() else index, str(out / INDEX_FILE))
    np.save(out / "values.npy", values)
    return {"rows": rows, "dim": dim, "kind": kind, "shards": [str(d) for d in shard_dirs]}


def _gather(key_sets, rows: np.ndarray) -> np.ndarray:
    offsets = np.cumsum([0] + [len(k) for k in key_sets])
    parts = []
    for i, keys in enumerate(key_sets):
        sel = rows[(rows >= offsets[i]) & (rows < offsets[i + 1])] - offsets[i]
        if len(sel):
            parts.append(np.asarray(keys[sel], dtype=np.float32))
    return np.ascontiguousarray(np.concatenate(parts))


def load_index(index_dir: Path, nprobe: int | None = None):
    import faiss

    index = on_gpu(faiss.read_index(str(Path(index_dir) / INDEX_FILE)))
    if nprobe is not None and hasattr(index, "nprobe"):
        index.nprobe = nprobe
    return index


def _gpu_count() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


_GPU_RESOURCES = []


def on_gpu(index):
    """The index moved to this process's GPU when faiss was built with GPU support and sees one
    (faiss-gpu); unchanged otherwise (the CPU wheels have no ``StandardGpuResources``)."""
    if not _gpu_count():
        return index
    import faiss

    from memories.distributed import world

    if not _GPU_RESOURCES:
        _GPU_RESOURCES.append(faiss.StandardGpuResources())
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES[0], world().local_rank % _gpu_count(), index)


def iter_keys(shard_dirs: list[str | Path], chunk: int):
    """(first row id, fp32 keys) blocks of ``chunk`` rows over all shards in order.

    Blocks start at multiples of ``chunk`` whatever the shard boundaries, so
    neighbour searches batch the same queries (and round the same way) however
    the datastore was sharded: a build split over processes gets the same
    targets as one process.
    """
    key_sets = [np.load(Path(d) / "keys.npy", mmap_mode="r") for d in shard_dirs]
    rows = sum(len(k) for k in key_sets)
    for first in range(0, rows, chunk):
        yield first, _gather(key_sets, np.arange(first, min(first + chunk, rows)))
