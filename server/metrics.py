"""Prometheus counters for memories; vLLM's own engine metrics share the default registry."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

BASE_LABEL = "none"  # requests served by the base alone

REQUESTS = Counter("memserve_memory_requests", "Completion requests by selected memory", ["memory"])
TOKENS = Counter("memserve_memory_tokens", "Tokens processed by selected memory", ["memory", "kind"])
LOADED = Gauge("memserve_memories_loaded", "Memories currently loaded")
DEVICE_BYTES = Gauge("memserve_memory_device_bytes", "Device bytes held by a memory", ["memory"])


def record_usage(memory: str, prompt_tokens: int, completion_tokens: int) -> None:
    TOKENS.labels(memory, "prompt").inc(prompt_tokens)
    TOKENS.labels(memory, "completion").inc(completion_tokens)
