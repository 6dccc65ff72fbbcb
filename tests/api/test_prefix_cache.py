"""A memory request whose prompt vLLM finds in its prefix cache still equals the oracle.

vLLM computes only the prompt's tokens past the cached blocks (128 tokens a
block on CPU); a decoder memory's keys and values live in those same blocks
(server/worker/bank.py), so a hit must come from a request of the same memory:
memory requests carry a prefix-cache salt of their memories' keys. The usage's
``cached_tokens`` shows the hit (the session server runs with
``--enable-prompt-tokens-details``).
"""

from __future__ import annotations

import pytest
from openai import OpenAI

from memories.reference import ReferenceFusion

MAX_TOKENS = 8
PROMPT = [(11 * i + 5) % 300 + 10 for i in range(300)]  # two whole blocks and a remainder


def complete(client: OpenAI, **extra):
    body = {"return_token_ids": True, "ignore_eos": True, **extra}
    r = client.completions.create(model="tiny-base", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, logprobs=1, extra_body=body)
    details = r.usage.prompt_tokens_details
    return list(r.choices[0].token_ids), list(r.choices[0].logprobs.token_logprobs), details.cached_tokens if details else 0


def test_a_prefix_cache_hit_on_a_memory_request_equals_the_oracle(server, tiny):
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    base = complete(client)  # the base computes the prompt and caches its whole blocks
    assert base[0] == ReferenceFusion(str(tiny["base"]), None).greedy(PROMPT, MAX_TOKENS, 0.0).tokens
    expected = ReferenceFusion(str(tiny["base"]), str(tiny["alpha"])).greedy(PROMPT, MAX_TOKENS, 0.5)
    runs = [complete(client, domain="alpha", memory_weight=0.5) for _ in range(2)]
    assert runs[0][2] == 0  # the base's blocks hold no memory keys and values: no hit
    assert runs[1][2] >= 256  # the first memory request's blocks
    for tokens, logprobs, _ in runs:
        assert tokens == expected.tokens
        assert logprobs == pytest.approx(expected.logprobs, abs=1e-4)  # 300 tokens through vLLM's CPU attention kernel, chunked on a hit
    assert complete(client, domain="beta")[2] == 0  # another memory's rows do not share them
    assert complete(client)[2] >= 256  # the base's own blocks are still there
