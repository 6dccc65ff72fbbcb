"""Memories inside the engine's worker process, and the RPCs that manage them.

vLLM builds logits processors once, inside each worker process. Memories are
loaded at run time, so they live in a process-wide registry that the processor
reads, and the API process reaches it through vLLM's ``worker_extension_cls``
+ ``collective_rpc``. Keys are versioned (``name@generation``) so a replaced
memory and its predecessor can both serve while old requests finish.
"""

from __future__ import annotations

import gc
import logging
import threading

import torch

from memories.decoder import MemoryDecoder
from memories.fuse import memory_logprobs

log = logging.getLogger("memserve.worker")


class MemoryRegistry:
    """Loaded memories of this worker process, by versioned key."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._memories: dict[str, MemoryDecoder] = {}

    def get(self, key: str) -> MemoryDecoder | None:
        return self._memories.get(key)

    def add(self, key: str, decoder: MemoryDecoder) -> None:
        with self._lock:
            self._memories[key] = decoder

    def pop(self, key: str) -> MemoryDecoder | None:
        with self._lock:
            return self._memories.pop(key, None)


REGISTRY = MemoryRegistry()


class MemoryWorkerExtension:
    """Mixed into vLLM's worker class; each method is a ``collective_rpc`` target."""

    def memserve_load(self, key: str, path: str, kv_budget_bytes: int | None = None) -> dict:
        runner = getattr(self, "model_runner", None)
        device = getattr(runner, "device", None) or torch.device("cpu")
        # the memory runs in the engine's dtype: what vLLM chose for the base
        # (bf16 on CPUs with bf16 units, --dtype to override) suits it too
        dtype = getattr(getattr(runner, "model_config", None), "dtype", torch.float32)
        max_len = getattr(getattr(runner, "model_config", None), "max_model_len", 2048)
        decoder = MemoryDecoder(path, name=key, device=device, dtype=dtype, kv_budget_bytes=kv_budget_bytes, max_len=max_len)
        REGISTRY.add(key, decoder)
        log.info("memory %s loaded from %s on %s", key, path, device)
        return {"num_parameters": decoder.num_parameters, "bytes": decoder.nbytes}

    def memserve_unload(self, key: str) -> bool:
        """Forget the memory. Rows still decoding hold their own reference and finish on it."""
        decoder = REGISTRY.pop(key)
        gc.collect()
        return decoder is not None

    def memserve_prompt_logprobs(self, key: str, prompt: list[int], temperature: float, base_width: int, wanted: list[list[int]]) -> list[list[float]]:
        """The memory's log-probability of ``wanted[i]`` after ``prompt[:i]``, for every position i ≥ 1."""
        decoder = REGISTRY.get(key)
        if decoder is None:
            raise KeyError(f"memory {key} is not loaded in this worker")
        logp = memory_logprobs(decoder.score(prompt[:-1]), base_width, temperature)
        width = logp.shape[-1]
        out = [[]]
        for i in range(1, len(prompt)):
            out.append([float(logp[i - 1, t]) if t < width else float("-inf") for t in wanted[i]])
        return out
