"""The names the API process and the engine's worker processes agree on, written once.

The API process puts a request's memory into ``SamplingParams.extra_args``
(vLLM's ``vllm_xargs``) under these keys; the worker-side code reads them back.
Neither side imports the other: both import this module, which imports nothing.
"""

from __future__ import annotations

from typing import Any

PREFIX = "memserve_"  # a client-sent vllm_xargs key with this prefix is dropped: only the server addresses the workers
DECODER_MEMORY = "memserve_memory"  # a decoder memory's versioned key
DECODER_WEIGHT = "memserve_weight"  # its λ for this request
DECODER_TEMPERATURE = "memserve_temperature"  # its temperature T
CALM_MEMORY = "memserve_calm"  # a calm memory's versioned key
# a mixture of K ≥ 2 decoder memories: three lists of K, in the request's order (one decoder uses the keys above)
MIXTURE_MEMORIES = "memserve_memories"  # the decoder memories' versioned keys
MIXTURE_WEIGHTS = "memserve_weights"  # their λᵢ (summing to at most 1)
MIXTURE_TEMPERATURES = "memserve_temperatures"  # their temperatures Tᵢ

# memserve's model: vLLM's own model of the base's architecture, with calm and decoder memories applied
# to the rows that select one (server/worker/model.py); one per base architecture it serves
MODEL_ARCHITECTURES = {arch: "Memserve" + arch for arch in ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")}
MODEL_MODULE = "server.worker.model"
# hf_overrides that size the model's decoder memory slots (server/worker/bank.py)
MEMORY_SLOTS = "memserve_memory_slots"  # --max-memories
MEMORY_LANES = "memserve_memory_lanes"  # --max-memories-per-request
MEMORY_LAYERS = "memserve_memory_layers"  # --memory-layers (0: the base's)
ROWS_PROCESSOR = "server.worker.rows:MemoryRows"  # the per-row bookkeeping of both kinds (changes no logits)
WORKER_EXTENSION = "server.worker.extension.MemoryWorkerExtension"


def decoder_args(key: str, weight: float, temperature: float) -> dict[str, Any]:
    return {DECODER_MEMORY: key, DECODER_WEIGHT: weight, DECODER_TEMPERATURE: temperature}


def mixture_args(keys: list[str], weights: list[float], temperatures: list[float]) -> dict[str, Any]:
    """The decoder memories of a request, in order: one memory keeps the single-memory keys."""
    if len(keys) == 1:
        return decoder_args(keys[0], weights[0], temperatures[0])
    return {MIXTURE_MEMORIES: list(keys), MIXTURE_WEIGHTS: list(weights), MIXTURE_TEMPERATURES: list(temperatures)}


def read_decoder_args(extra: dict | None) -> dict | None:
    """The request's single decoder memory as ``{"memory", "weight", "temperature"}``, or None."""
    extra = extra or {}
    if DECODER_MEMORY not in extra:
        return None
    return {"memory": extra[DECODER_MEMORY], "weight": extra.get(DECODER_WEIGHT), "temperature": extra.get(DECODER_TEMPERATURE, 1.0)}


def read_decoder_parts(extra: dict | None) -> list[dict] | None:
    """The request's decoder memories, one ``{"memory", "weight", "temperature"}`` each (a single memory: a list of one), or None.

    Malformed lists (not lists, different lengths) come back as they are, for the worker's validation to refuse.
    """
    extra = extra or {}
    single = read_decoder_args(extra)
    if MIXTURE_MEMORIES not in extra:
        return None if single is None else [single]
    names, weights = extra[MIXTURE_MEMORIES], extra.get(MIXTURE_WEIGHTS)
    temperatures = extra.get(MIXTURE_TEMPERATURES)
    if single is not None or not all(isinstance(v, list) for v in (names, weights, temperatures)) or not len(names) == len(weights) == len(temperatures):
        raise ValueError(
            f"{MIXTURE_MEMORIES}, {MIXTURE_WEIGHTS} and {MIXTURE_TEMPERATURES} must be lists of one length, without {DECODER_MEMORY}; "
            f"got {names!r}, {weights!r}, {temperatures!r}"
        )
    return [{"memory": m, "weight": w, "temperature": t} for m, w, t in zip(names, weights, temperatures)]
