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

# the calm model plugin: vLLM's Llama with calm memories composed into the rows that select one
CALM_ARCHITECTURE = "MemserveCalmLlamaForCausalLM"
CALM_MODEL = "server.worker.calm_model:CalmLlamaForCausalLM"
DECODER_PROCESSOR = "server.worker.decoder_processor:MemoryFusionProcessor"
CALM_PROCESSOR = "server.worker.calm_model:CalmRowsProcessor"
WORKER_EXTENSION = "server.worker.extension.MemoryWorkerExtension"


def decoder_args(key: str, weight: float, temperature: float) -> dict[str, Any]:
    return {DECODER_MEMORY: key, DECODER_WEIGHT: weight, DECODER_TEMPERATURE: temperature}


def read_decoder_args(extra: dict | None) -> dict | None:
    """The request's decoder memory as ``{"memory", "weight", "temperature"}``, or None."""
    extra = extra or {}
    if DECODER_MEMORY not in extra:
        return None
    return {"memory": extra[DECODER_MEMORY], "weight": extra.get(DECODER_WEIGHT), "temperature": extra.get(DECODER_TEMPERATURE, 1.0)}
