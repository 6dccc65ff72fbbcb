"""A memory under chunked prefill: the base computes a long prompt in 32-token chunks, the memory alongside.

The memory must end up where one pass over the prompt leaves it, so the fused
(or, for a calm memory, composed) greedy tokens and logprobs equal the
oracle's, also while other rows decode in the same batches.
"""

from __future__ import annotations

import pytest
from openai import OpenAI

from memories.reference import ReferenceFusion
from tests.api.conftest import LONG

MAX_TOKENS = 12
SHORT = [11, 12, 13, 14, 15]
STREAMED = 150  # long enough to be still decoding while the long prompt is prefilled


def complete(client: OpenAI, prompt: list[int], domain: str | None):
    extra = {"return_token_ids": True, "ignore_eos": True, **({"domain": domain, "memory_weight": 0.5} if domain else {})}
    r = client.completions.create(model="tiny-base", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=1, extra_body=extra)
    return list(r.choices[0].token_ids), list(r.choices[0].logprobs.token_logprobs)


def test_chunked_prompt_matches_one_pass(chunked, tiny):
    client = OpenAI(base_url=chunked.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    fused, base = ReferenceFusion(str(tiny["base"]), str(tiny["alpha"])), ReferenceFusion(str(tiny["base"]), None)
    for domain, ref, weight in (("alpha", fused, 0.5), (None, base, 0.0)):
        tokens, logprobs = complete(client, LONG, domain)
        expected = ref.greedy(LONG, MAX_TOKENS, weight)
        assert tokens == expected.tokens
        assert logprobs == pytest.approx(expected.logprobs, abs=1e-3)


def test_chunked_prompt_beside_a_decoding_memory_row(chunked, tiny):
    """The long prompt arrives while a short memory request streams: chunk and decode rows share steps."""
    client = OpenAI(base_url=chunked.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    ref = ReferenceFusion(str(tiny["base"]), str(tiny["alpha"]))
    extra = {"return_token_ids": True, "ignore_eos": True, "domain": "alpha", "memory_weight": 0.5}
    stream = client.completions.create(model="tiny-base", prompt=SHORT, max_tokens=STREAMED, temperature=0, stream=True, extra_body=extra)
    chunks = iter(stream)
    streamed = list(next(chunks).choices[0].token_ids)  # the short row is decoding now
    tokens, logprobs = complete(client, LONG, "alpha")
    for chunk in chunks:
        for choice in chunk.choices:
            streamed += list(choice.token_ids or [])
    assert streamed == ref.greedy(SHORT, STREAMED, 0.5).tokens
    expected = ref.greedy(LONG, MAX_TOKENS, 0.5)
    assert tokens == expected.tokens
    assert logprobs == pytest.approx(expected.logprobs, abs=1e-3)


def test_chunked_prompt_of_a_calm_row_beside_a_decoding_calm_row(chunked, tiny, calm_dir):
    """The augmenting model reads the long prompt chunk by chunk, as vLLM computes it, while another calm row decodes."""
    client = OpenAI(base_url=chunked.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    ref = ReferenceFusion(str(tiny["base"]), None, calm_dir=str(calm_dir))
    stream = client.completions.create(model="cal", prompt=SHORT, max_tokens=STREAMED, temperature=0, stream=True, extra_body={"return_token_ids": True, "ignore_eos": True})
    chunks = iter(stream)
    streamed = list(next(chunks).choices[0].token_ids)
    r = client.completions.create(model="cal", prompt=LONG, max_tokens=MAX_TOKENS, temperature=0, logprobs=1, extra_body={"return_token_ids": True, "ignore_eos": True})
    for chunk in chunks:
        for choice in chunk.choices:
            streamed += list(choice.token_ids or [])
    expected = ref.greedy(LONG, MAX_TOKENS, 0.0)
    assert list(r.choices[0].token_ids) == expected.tokens
    assert list(r.choices[0].logprobs.token_logprobs) == pytest.approx(expected.logprobs, abs=1e-3)
    assert streamed[:40] == ref.greedy(SHORT, 40, 0.0).tokens
