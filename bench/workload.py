"""A fixed, seeded streaming workload against a memserve server, and its latency statistics."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class StreamResult:
    ttft: float
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts (no tokenizer round trip), avoiding the first 100 ids (specials)."""
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int, domain: str | dict | list | None) -> StreamResult:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    if domain:
        body["domain"] = domain
    start = time.perf_counter()
    last = None
    result = StreamResult(ttft=0.0)
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if not chunk.get("choices"):
                continue
            now = time.perf_counter()
            if last is None:
                result.ttft = now - start
            else:
                result.gaps.append(now - last)
            last = now
            result.tokens += 1
    return result


async def run_streams(url: str, model: str, prompts: list[list[int]], max_tokens: int, domains: list[str | dict | list | None]) -> dict:
    """All prompts at once, one stream each (``domains``: each request's ``domain``, a name or a mixture); throughput counts output tokens over the wall time."""
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(_one(client, url, model, p, max_tokens, d) for p, d in zip(prompts, domains)))
        wall = time.perf_counter() - start
    tokens = sum(r.tokens for r in results)
    gaps = sorted(g for r in results for g in r.gaps)
    ttfts = sorted(r.ttft for r in results)
    return {
        "output_tokens_per_s": tokens / wall,
        "ttft_p50_s": percentile(ttfts, 50),
        "itl_p50_s": percentile(gaps, 50),
        "itl_p99_s": percentile(gaps, 99),
    }


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of sorted ``values``: the smallest value with at least p% of them at or below it."""
    if not values:
        return float("nan")
    return values[max(0, math.ceil(p / 100 * len(values)) - 1)]
