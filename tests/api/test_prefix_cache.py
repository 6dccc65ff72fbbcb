"""A memory request whose prompt vLLM finds in its prefix cache still equals the oracle.

vLLM computes only the prompt's tokens past the cached blocks (128 tokens a
block on CPU); the memory, which keeps its own cache, must read the skipped
tokens first (server/worker/decoder_step.py), or it would fuse a distribution
conditioned on the prompt's tail alone. The usage's ``cached_tokens`` shows
the hit (the session server runs with ``--enable-prompt-tokens-details``).
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
    for _ in range(2):  # a hit on the base's blocks, then on blocks a memory request left
        tokens, logprobs, cached = complete(client, domain="alpha", memory_weight=0.5)
        assert cached >= 256
        assert tokens == expected.tokens
        assert logprobs == pytest.approx(expected.logprobs, abs=1e-3)
