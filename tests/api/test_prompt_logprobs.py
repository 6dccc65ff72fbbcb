"""Scoring text through the API measures base + memory: fused prompt logprobs (echo + logprobs), computed by vLLM itself."""

from __future__ import annotations

import httpx
import pytest

from memories.perplexity import perplexity
from memories.reference import ReferenceFusion

TEXT = "the patient study result shows the tumor dose and the trial growth rate. the court shall notice the clause."


def api_prompt_logprobs(server, ids, **extra):
    body = {"model": "tiny-base", "prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 2, "temperature": 0, **extra}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    return lp["token_logprobs"][1 : len(ids)], lp["top_logprobs"][1 : len(ids)]


def offline(ref: ReferenceFusion, ids, weight):
    return [float(ref.next_logprobs(ids[:i], weight)[ids[i]]) for i in range(1, len(ids))]


@pytest.fixture(scope="module")
def ids(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny["tokenizer"])(TEXT)["input_ids"]


def test_api_perplexity_equals_offline_evaluation(server, tiny, ids):
    ref = ReferenceFusion(str(tiny["base"]), str(tiny["alpha"]))
    fused_api, top = api_prompt_logprobs(server, ids, domain="alpha", memory_weight=0.5, return_tokens_as_token_ids=True)
    fused_offline = offline(ref, ids, 0.5)
    assert perplexity(fused_api) == pytest.approx(perplexity(fused_offline), rel=1e-3)
    assert fused_api == pytest.approx(fused_offline, abs=1e-3)

    base_api, _ = api_prompt_logprobs(server, ids)
    base_offline = offline(ReferenceFusion(str(tiny["base"]), None), ids, 0.0)
    assert perplexity(base_api) == pytest.approx(perplexity(base_offline), rel=1e-3)
    assert abs(perplexity(base_api) - perplexity(fused_api)) > 0.01 * perplexity(base_api)  # the memory is measured

    # vLLM's own prompt logprobs of the fused distribution: the alternatives are its top tokens, with their fused values
    full = ref.next_logprobs(ids[:1], 0.5)
    best = full.topk(2)
    reported = {int(token.removeprefix("token_id:")): value for token, value in top[0].items()}
    assert set(best.indices.tolist()) <= set(reported)
    for token, value in reported.items():
        assert value == pytest.approx(float(full[token]), abs=1e-3)
