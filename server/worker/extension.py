"""Memories inside the engine's worker process, and the RPCs that manage them.

vLLM builds logits processors once, inside each worker process. Memories are
loaded at run time, so they live in a process-wide registry that the processor
reads, and the API process reaches it through vLLM's ``worker_extension_cls``
+ ``collective_rpc``. Keys are versioned (``name@generation``) so a replaced
memory and its predecessor can both serve while old requests finish.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from pathlib import Path

from memories.artifact import ArtifactError
from memories.calm.runtime import CalmMemory
from memories.runner import MemoryDecoder
from memories.kinds import kind_of
from memories.fuse import memory_logprobs
from server.worker import patches

log = logging.getLogger("memserve.worker")


def install_patches() -> None:
    """The vLLM-CPU fixes (server/worker/patches.py), installed by the processors vLLM builds in each worker at engine start.

    Never at import: vLLM also imports the processor classes in the API process,
    to call their ``validate_params``, and nothing there may be patched.
    """
    installed = patches.install()
    if installed:
        log.info("vLLM-CPU fixes installed: %s", ", ".join(installed))


class MemoryRegistry:
    """Loaded memories of this worker process, by versioned key."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._memories: dict[str, MemoryDecoder | CalmMemory] = {}

    def get(self, key: str) -> MemoryDecoder | CalmMemory | None:
        return self._memories.get(key)

    def add(self, key: str, memory: MemoryDecoder | CalmMemory) -> None:
        with self._lock:
            self._memories[key] = memory

    def pop(self, key: str) -> MemoryDecoder | CalmMemory | None:
        with self._lock:
            return self._memories.pop(key, None)


REGISTRY = MemoryRegistry()


# Weights are read and placed here, beside the engine loop, not between its steps.
_LOADER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memserve-load")
_LOADING: dict[str, Future] = {}


class MemoryWorkerExtension:
    """Mixed into vLLM's worker class; each method is a ``collective_rpc`` target.

    Every call runs in the engine-core loop between steps, so each returns at once.
    """

    def memserve_load(self, key: str, path: str, kv_budget_bytes: int | None = None) -> None:
        """Start loading; :meth:`memserve_loaded` says when it is done."""
        runner = getattr(self, "model_runner", None)
        device = getattr(runner, "device", None) or torch.device("cpu")
        # the memory runs in the engine's dtype: what vLLM chose for the base
        # (bf16 on CPUs with bf16 units, --dtype to override) suits it too
        dtype = getattr(getattr(runner, "model_config", None), "dtype", torch.float32)
        model_config = getattr(runner, "model_config", None)
        max_len = getattr(model_config, "max_model_len", 2048)
        if kind_of(Path(path), key) == "calm":
            base_layers = getattr(getattr(model_config, "hf_config", None), "num_hidden_layers", None)
            _LOADING[key] = _LOADER.submit(
                CalmMemory, path, name=key, device=device, dtype=dtype, max_len=max_len, base_layers=base_layers, kv_budget_bytes=kv_budget_bytes
            )
            return
        _LOADING[key] = _LOADER.submit(
            MemoryDecoder, path, name=key, device=device, dtype=dtype, kv_budget_bytes=kv_budget_bytes, max_len=max_len, base_tensors=base_tensors(runner)
        )

    def memserve_loaded(self, key: str) -> dict | None:
        """None while loading; then the memory's sizes, or ``{"error": ...}``.

        Errors travel as data: vLLM turns an exception in an RPC into a plain
        ``Exception`` carrying only its message, and the API needs to know an
        artifact's fault (a client error) from the server's.
        """
        future = _LOADING.get(key)
        if future is not None:
            if not future.done():
                return None
            try:
                decoder = future.result()
            except ArtifactError as e:  # kept for later polls until memserve_unload
                return {"error": {"memory": e.memory, "check": e.check, "detail": e.detail}}
            except Exception as e:
                return {"error": {"message": f"loading memory {key} failed: {type(e).__name__}: {e}"}}
            REGISTRY.add(key, decoder)
            del _LOADING[key]
            log.info("memory %s loaded on %s", key, decoder.device)
        decoder = REGISTRY.get(key)
        if decoder is None:
            return {"error": {"message": f"memory {key} is neither loaded nor loading in this worker"}}
        return {"num_parameters": decoder.num_parameters, "bytes": decoder.nbytes, **cache_sizes(decoder)}

    def memserve_cache_bytes(self, keys: list[str]) -> dict[str, int]:
        """Each loaded memory's caches as allocated now (they grow and shrink with its rows), by key."""
        out = {}
        for key in keys:
            memory = REGISTRY.get(key)
            if memory is not None:
                out[key] = cache_sizes(memory)["cache_bytes"]
        return out

    def memserve_unload(self, key: str) -> bool:
        """Forget the memory (and a load of it still under way). Rows still decoding hold their own reference and finish on it."""
        loading = _LOADING.pop(key, None)
        if loading is not None:
            loading.cancel()
        return REGISTRY.pop(key) is not None or loading is not None

    def memserve_prompt_logprobs(self, key: str, prompt: list[int], temperature: float, base_width: int, wanted: list[list[int]]) -> list[list[float] | None]:
        """The memory's log-probability of ``wanted[i]`` after ``prompt[:i]``, for every position i ≥ 1.

        A position where the memory's distribution is not finite is None: the base alone answers there.
        """
        decoder = REGISTRY.get(key)
        if not isinstance(decoder, MemoryDecoder):
            raise KeyError(f"decoder memory {key} is not loaded in this worker")
        out: list[list[float] | None] = [[]]  # the first token has no logprob
        if len(prompt) < 2:
            return out
        for logits in decoder.score(prompt[:-1]):
            logp = memory_logprobs(logits, base_width, temperature)  # [chunk, V]
            out += _gather(logp, wanted[len(out) : len(out) + len(logp)])
        return out


def cache_sizes(memory: MemoryDecoder | CalmMemory) -> dict:
    """What a memory's caches hold now, what --memory-kv-budget allows them, and, for calm, how many rows that is (the API admits no more)."""
    if isinstance(memory, CalmMemory):
        return {"cache_bytes": memory.cache_bytes, "cache_budget_bytes": memory.cache_budget_bytes, "max_rows": memory.max_rows}
    return {"cache_bytes": memory.pool_bytes, "cache_budget_bytes": memory.kv_budget_bytes, "max_rows": None}  # decoder rows are evicted and recomputed


def base_tensors(runner) -> dict[str, torch.Tensor] | None:
    """The base's token embedding and output head as the engine holds them, for thin memories.

    Views, not copies: every thin memory of this worker reads the engine's own
    tensors, so they share one head (``fuse_batch`` applies it once for all
    their rows). vLLM pads the vocabulary dimension (to a multiple of 64);
    the views stop at the model's vocabulary. None where the model does not
    expose them whole (another architecture, or a vocabulary split across
    tensor-parallel ranks): a thin memory is then refused at load.
    """
    try:
        model = runner.get_model()
        vocab = runner.model_config.get_vocab_size()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    except (AttributeError, ValueError):
        return None
    if embed.dim() != 2 or head.dim() != 2 or min(embed.shape[0], head.shape[0]) < vocab:
        return None
    return {"embed_tokens.weight": embed[:vocab], "lm_head.weight": head[:vocab]}


def _gather(logp: torch.Tensor, wanted: list[list[int]]) -> list[list[float] | None]:
    """``logp[i, wanted[i]]`` for every row at once; ids beyond the memory's width get -inf.

    Indices and results stay on ``logp``'s device (a GPU's, where the memory runs there) until the one copy out.
    """
    width, device = logp.shape[-1], logp.device
    rows = torch.tensor([i for i, ids in enumerate(wanted) for _ in ids], dtype=torch.long, device=device)
    ids = torch.tensor([t for ids in wanted for t in ids], dtype=torch.long, device=device)
    inside = ids < width
    values = torch.full(ids.shape, float("-inf"), device=device)
    values[inside] = logp[rows[inside], ids[inside]].to(values.dtype)
    finite = torch.isfinite(logp).all(-1).tolist()
    out, flat, start = [], values.tolist(), 0
    for i, row_ids in enumerate(wanted):
        out.append(flat[start : start + len(row_ids)] if finite[i] else None)
        start += len(row_ids)
    return out
