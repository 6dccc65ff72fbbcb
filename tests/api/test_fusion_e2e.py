"""Fusion through the real server and the official openai client, checked against the oracle."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI

from memories.reference import ReferenceFusion
from tests.conftest import MAX_TOKENS


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def complete(client: OpenAI, prompt: list[int], **kw):
    extra_body = {"return_token_ids": True, "ignore_eos": True, **kw.pop("extra_body", {})}
    r = client.completions.create(model=kw.pop("model", "tiny-base"), prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=1, extra_body=extra_body, **kw)
    choice = r.choices[0]
    return list(choice.token_ids), list(choice.logprobs.token_logprobs)


def test_no_domain_is_plain_vllm(client, prompt_ids, plain_vllm):
    for ids, expected in zip(prompt_ids, plain_vllm["plain"], strict=True):
        tokens, logprobs = complete(client, ids)
        assert tokens == expected["tokens"]
        assert logprobs == pytest.approx(expected["logprobs"], abs=1e-6)
        for none in ("none", ""):
            assert complete(client, ids, extra_body={"domain": none})[0] == expected["tokens"]


@pytest.mark.parametrize("memory", ["alpha", "beta"])
def test_weight_zero_and_one(client, tiny, prompt_ids, memory):
    base_only = ReferenceFusion(str(tiny["base"]), None)
    memory_only = ReferenceFusion(str(tiny[memory]), None)
    for ids in prompt_ids[:2]:
        zero, _ = complete(client, ids, extra_body={"domain": memory, "memory_weight": 0.0})
        assert zero == base_only.greedy(ids, MAX_TOKENS, 0.0).tokens
        one, _ = complete(client, ids, extra_body={"domain": memory, "memory_weight": 1.0})
        assert one == memory_only.greedy(ids, MAX_TOKENS, 0.0).tokens
        assert one != zero  # the memory really changes the output


def test_half_weight_matches_reference(client, tiny, prompt_ids):
    ref = ReferenceFusion(str(tiny["base"]), str(tiny["alpha"]))
    for ids in prompt_ids:
        tokens, logprobs = complete(client, ids, extra_body={"domain": "alpha", "memory_weight": 0.5})
        expected = ref.greedy(ids, MAX_TOKENS, 0.5)
        assert tokens == expected.tokens
        assert logprobs == pytest.approx(expected.logprobs, abs=1e-3)


def test_memory_defaults_and_temperature_match_reference(client, tiny, prompt_ids):
    """beta's memory.json says λ=0.3, T=0.8: the server applies both when the request says nothing."""
    ref = ReferenceFusion(str(tiny["base"]), str(tiny["beta"]))
    ids = prompt_ids[0]
    tokens, logprobs = complete(client, ids, extra_body={"domain": "beta"})
    expected = ref.greedy(ids, MAX_TOKENS, 0.3, temperature=0.8)
    assert tokens == expected.tokens
    assert logprobs == pytest.approx(expected.logprobs, abs=1e-3)


def test_three_ways_to_select(client, server, prompt_ids):
    ids = prompt_ids[1]
    by_body = complete(client, ids, extra_body={"domain": "alpha"})
    by_model = complete(client, ids, model="alpha")
    header_client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, default_headers={"X-Domain": "alpha"})
    by_header = complete(header_client, ids)
    base = complete(client, ids)
    assert by_body == by_model == by_header
    assert by_body[0] != base[0]


def _stream_tokens(client: OpenAI, ids: list[int], domain: str | None) -> list[int]:
    extra = {"return_token_ids": True, "ignore_eos": True}
    if domain:
        extra["domain"] = domain
    tokens = []
    for chunk in client.completions.create(model="tiny-base", prompt=ids, max_tokens=MAX_TOKENS, temperature=0, stream=True, extra_body=extra):
        for choice in chunk.choices:
            tokens += list(getattr(choice, "token_ids", None) or [])
    return tokens


def test_concurrent_mixed_streams_equal_alone(client, prompt_ids):
    jobs = [(prompt_ids[i % 3], [None, "alpha", "beta"][i % 3]) for i in range(8)]
    alone = [_stream_tokens(client, ids, d) for ids, d in jobs[:3]] * 3
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda job: _stream_tokens(client, *job), jobs))
    assert together == alone[:8]
    assert len({tuple(t) for t in together[:3]}) == 3


def test_chat_streamed_and_not(client):
    messages = [{"role": "user", "content": "the gene"}]
    full = client.chat.completions.create(model="alpha", messages=messages, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert full.usage.completion_tokens == 8
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model="alpha", messages=messages, max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True})
        if c.choices
    )
    assert streamed == full.choices[0].message.content


def test_sampling_parameters_keep_their_meaning(client, prompt_ids):
    ids = prompt_ids[2]
    kw = dict(model="tiny-base", prompt=ids, max_tokens=10, temperature=1.0, top_p=0.9, extra_body={"domain": "alpha", "ignore_eos": True})
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    assert a == b
    two = client.completions.create(n=2, seed=3, **kw)
    assert len(two.choices) == 2
    short = client.completions.create(model="tiny-base", prompt=ids, max_tokens=3, temperature=0, extra_body={"domain": "alpha", "ignore_eos": True})
    assert short.usage.completion_tokens == 3


def test_top_logprobs_are_fused(client, tiny, prompt_ids):
    import math

    ids = prompt_ids[0]
    r = client.completions.create(model="tiny-base", prompt=ids, max_tokens=1, temperature=0, logprobs=5, extra_body={"domain": "alpha", "memory_weight": 0.5, "return_tokens_as_token_ids": True})
    top = {int(k.removeprefix("token_id:")): v for k, v in r.choices[0].logprobs.top_logprobs[0].items()}
    ref = ReferenceFusion(str(tiny["base"]), str(tiny["alpha"])).next_logprobs(ids, 0.5)
    best = ref.topk(5)
    assert set(top) == set(best.indices.tolist())
    assert [top[i] for i in best.indices.tolist()] == pytest.approx(best.values.tolist(), abs=1e-3)
    assert sum(math.exp(v) for v in top.values()) <= 1.0 + 1e-4


def test_metrics_count_memory_requests(server, client, prompt_ids):
    import httpx

    complete(client, prompt_ids[0], extra_body={"domain": "beta"})
    text = httpx.get(server.url + "/metrics").text
    assert 'memserve_memory_requests_total{memory="beta"}' in text
    line = next(ln for ln in text.splitlines() if ln.startswith('memserve_memory_tokens_total{kind="completion",memory="beta"}'))
    assert float(line.split()[-1]) >= MAX_TOKENS
    assert "memserve_memories_loaded 2.0" in text
    assert "vllm:generation_tokens_total" in text  # vLLM's own engine metrics share the endpoint
    assert 'memserve_memory_device_bytes{memory="alpha"}' in text


def test_models_lists_memories(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) >= {"tiny-base", "alpha", "beta"}
    assert models["alpha"].parent == "tiny-base"
