"""Memories inside the engine's worker process, and the RPCs that manage them.

vLLM builds its model and logits processors once, inside each worker process.
Memories are loaded at run time, so they live in a process-wide registry that
the row bookkeeping (server/worker/rows.py) reads, and the API process reaches it through vLLM's ``worker_extension_cls``
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
from memories.kinds import kind_of
from server.engine.keys import MODEL_ARCHITECTURES
from server.worker import patches
from server.worker.bank import Slot

log = logging.getLogger("memserve.worker")


def install_patches() -> None:
    """The vLLM-CPU fixes (server/worker/patches.py), installed by the row processor vLLM builds in each worker at engine start.

    Never at import: vLLM also imports the processor class in the API process,
    to call its ``validate_params``, and nothing there may be patched.
    """
    installed = patches.install()
    if installed:
        log.info("vLLM-CPU fixes installed: %s", ", ".join(installed))


class MemoryRegistry:
    """Loaded memories of this worker process, by versioned key."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._memories: dict[str, Slot | CalmMemory] = {}

    def get(self, key: str) -> Slot | CalmMemory | None:
        return self._memories.get(key)

    def add(self, key: str, memory: Slot | CalmMemory) -> None:
        with self._lock:
            self._memories[key] = memory

    def pop(self, key: str) -> Slot | CalmMemory | None:
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
        kind = kind_of(Path(path), key)
        if runner is not None and not serves_memories(runner):
            architecture = (getattr(getattr(model_config, "hf_config", None), "architectures", None) or ["none"])[0]
            error = ArtifactError(key, f"{kind} memories need memserve's model", f"the base's architecture is {architecture}; memserve's model serves {', '.join(MODEL_ARCHITECTURES)}")
            _LOADING[key] = _LOADER.submit(_raise, error)
            return
        if kind == "calm":
            base_layers = getattr(getattr(model_config, "hf_config", None), "num_hidden_layers", None)
            _LOADING[key] = _LOADER.submit(
                CalmMemory, path, name=key, device=device, dtype=dtype, max_len=max_len, base_layers=base_layers, kv_budget_bytes=kv_budget_bytes
            )
            return
        bank = getattr(runner.get_model(), "memory_bank", None) if runner is not None else None
        if bank is None:
            error = ArtifactError(key, "decoder memories are off", "this server has no decoder memory slots (--decoder-slots 0)")
            _LOADING[key] = _LOADER.submit(_raise, error)
            return
        _LOADING[key] = _LOADER.submit(bank.load, path, key, rows_hold, base_tensors(runner))

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
            log.info("memory %s loaded%s", key, f" into decoder slot {decoder.index}" if isinstance(decoder, Slot) else f" on {decoder.device}")
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
        memory = REGISTRY.pop(key)
        if isinstance(memory, Slot):
            memory.retired = True  # its slot is reused once no row runs on it
        return memory is not None or loading is not None


def rows_hold(slot: Slot) -> bool:
    """Whether a row of the batch still runs on ``slot``: the V1 runner's bookkeeping (``server/worker/rows.py``) or Model Runner V2's (``server/worker/v2_state.py``)."""
    import sys

    from server.worker.rows import MemoryRows

    if MemoryRows.active is not None and MemoryRows.active.holds(slot):
        return True
    v2 = sys.modules.get("server.worker.v2_state")  # imported only where vLLM runs V2
    return v2 is not None and v2.MemserveModelState.active is not None and v2.MemserveModelState.active.holds(slot)


def cache_sizes(memory: Slot | CalmMemory) -> dict:
    """What a memory's caches hold now, what --memory-kv-budget allows them, and, for calm, how many rows that is (the API admits no more)."""
    if isinstance(memory, CalmMemory):
        return {"cache_bytes": memory.cache_bytes, "cache_budget_bytes": memory.cache_budget_bytes, "max_rows": memory.max_rows}
    return {"cache_bytes": 0, "cache_budget_bytes": None, "max_rows": None}  # a decoder memory's keys and values are in vLLM's KV cache


def base_tensors(runner) -> dict[str, torch.Tensor] | None:
    """The base's token embedding and output head as the engine holds them, for thin memories.

    Views, not copies: every thin memory of this worker reads the engine's own
    tensors, so they share one head (``DecoderStep.fuse`` applies it once for
    all their rows). vLLM pads the vocabulary dimension (to a multiple of 64);
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


def serves_memories(runner) -> bool:
    """Whether the engine runs memserve's model (server/worker/model.py), which applies calm and decoder memories."""
    from server.worker.model import MemserveModel

    try:
        return isinstance(runner.get_model(), MemserveModel)
    except AttributeError:
        return False


def _raise(error: Exception):
    raise error
