"""Prometheus counters for memories (vLLM's own engine metrics share the default registry), and a periodic log line."""

from __future__ import annotations

import asyncio
import collections
import logging

from prometheus_client import Counter, Gauge

BASE_LABEL = "none"  # requests served by the base alone

REQUESTS = Counter("memserve_memory_requests", "Completion requests by selected memory", ["memory"])
TOKENS = Counter("memserve_memory_tokens", "Tokens processed by selected memory", ["memory", "kind"])
LOADED = Gauge("memserve_memories_loaded", "Memories currently loaded")
DEVICE_BYTES = Gauge("memserve_memory_device_bytes", "Device bytes held by a memory", ["memory"])
# a decoder memory's KV pool, a calm memory's augmenting-model pool and cross-attention caches; refreshed with GET /admin/memories and every 10 s
CACHE_BYTES = Gauge("memserve_memory_cache_bytes", "Bytes of a memory's per-request caches as allocated now", ["memory"])
CACHE_BUDGET_BYTES = Gauge("memserve_memory_cache_budget_bytes", "The --memory-kv-budget a memory's caches are held to (absent: unbounded)", ["memory"])
# domain "auto": the router's choices, by memory ("none": no memory fits); exposed as memserve_routed_total
ROUTED = Counter("memserve_routed", "Requests routed by domain auto, by chosen memory", ["memory"])
# 1 per loaded memory: join on ``memory`` to split the usage counters by kind (decoder, lora)
MEMORY_INFO = Gauge("memserve_memory_info", "Loaded memories, by kind", ["memory", "memory_kind"])

log = logging.getLogger("memserve.throughput")
_generated: collections.Counter[str] = collections.Counter()  # completion tokens by memory, for the log line


def record_usage(memory: str, prompt_tokens: int, completion_tokens: int) -> None:
    TOKENS.labels(memory, "prompt").inc(prompt_tokens)
    TOKENS.labels(memory, "completion").inc(completion_tokens)
    _generated[memory] += completion_tokens


async def log_throughput(interval: float = 10.0) -> None:
    """Every ``interval`` seconds with traffic: generated tokens/s of finished requests, by memory."""
    last: collections.Counter[str] = collections.Counter()
    while True:
        await asyncio.sleep(interval)
        now = collections.Counter(_generated)
        delta = now - last
        if delta:
            log.info("generated tokens/s over the last %.0fs: %s", interval, ", ".join(f"{m} {n / interval:.1f}" for m, n in sorted(delta.items())))
        last = now
