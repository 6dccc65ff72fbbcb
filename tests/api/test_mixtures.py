"""Mixtures of memories through the real server and the official openai client, against the transformers oracle.

``domain`` as an object of weights or a list of names: decoder memories fused
together (p = (1 - Σλ)·p_base + Σ λ·p_mem), on the base or on a lora or calm
memory's changed base; in batches with single-memory and base rows; prompt
logprobs (echo) fused the same way; the response header, and the request
counter of every memory of the mixture.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from openai import OpenAI

from memories.reference import ReferenceFusion

MAX_TOKENS = 10
# fp32 on both sides; the memories' attention runs vLLM's CPU attention kernel (as the base's does), whose
# vectorised softmax and per-batch blocking differ from the oracle's SDPA by up to ~1.3e-5 over 10 tokens
TOL = 2e-5


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def mixture_ref(tiny) -> ReferenceFusion:
    return ReferenceFusion(str(tiny["base"]), [str(tiny["alpha"]), str(tiny["beta"])])


def complete(client: OpenAI, prompt, domain=None, max_tokens=MAX_TOKENS, **extra):
    body = {"return_token_ids": True, "ignore_eos": True, **extra, **({"domain": domain} if domain is not None else {})}
    raw = client.completions.with_raw_response.create(model="tiny-base", prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=1, extra_body=body)
    choice = raw.parse().choices[0]
    return list(choice.token_ids), list(choice.logprobs.token_logprobs), raw.headers["x-memserve-memory"]


def requests_counted(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return {m: float(v) for m, v in re.findall(r'^memserve_memory_requests_total\{memory="([^"]+)"\} (\S+)$', text, re.M)}


def test_mixture_object_matches_the_oracle_and_says_what_it_used(client, server, prompt_ids, mixture_ref):
    before = requests_counted(server)
    for ids in prompt_ids:
        tokens, logprobs, header = complete(client, ids, {"alpha": 0.3, "beta": 0.2})
        expected = mixture_ref.greedy(ids, MAX_TOKENS, [0.3, 0.2], [1.0, 0.8])  # beta's memory.json says T = 0.8
        assert tokens == expected.tokens
        assert logprobs == pytest.approx(expected.logprobs, abs=TOL)
        assert header == "alpha=0.3, beta=0.2"
    after = requests_counted(server)
    for name in ("alpha", "beta"):  # each memory of a mixture counts the request
        assert after[name] - before.get(name, 0.0) == len(prompt_ids)


def test_mixture_list_uses_each_memorys_own_weight(client, prompt_ids, mixture_ref):
    ids = prompt_ids[1]
    tokens, logprobs, header = complete(client, ids, ["alpha", "beta"])  # λ 0.5 and 0.3 from memory.json
    expected = mixture_ref.greedy(ids, MAX_TOKENS, [0.5, 0.3], [1.0, 0.8])
    assert tokens == expected.tokens and logprobs == pytest.approx(expected.logprobs, abs=TOL)
    assert header == "alpha=0.5, beta=0.3"
    # Σλ = 1: the base has no share; the mixture differs from either memory alone
    tokens_one, logprobs_one, _ = complete(client, ids, {"alpha": 0.5, "beta": 0.5})
    expected = mixture_ref.greedy(ids, MAX_TOKENS, [0.5, 0.5], [1.0, 0.8])
    assert tokens_one == expected.tokens and logprobs_one == pytest.approx(expected.logprobs, abs=TOL)


def test_a_mixture_of_one_is_that_memory(client, prompt_ids):
    ids = prompt_ids[0]
    plain = complete(client, ids, "alpha", memory_weight=0.4)
    assert complete(client, ids, {"alpha": 0.4}) == plain
    assert plain[2] == "alpha"


def test_concurrent_single_mixture_and_base_requests_equal_alone(client, prompt_ids):
    selections = [None, "alpha", {"alpha": 0.3, "beta": 0.2}, "beta", ["beta", "alpha"], {"beta": 0.6, "alpha": 0.1}]
    jobs = [(prompt_ids[i % 3], selections[i % len(selections)]) for i in range(12)]
    alone = [complete(client, ids, d)[:2] for ids, d in jobs]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda job: complete(client, *job)[:2], jobs))
    for (ids, d), a, t in zip(jobs, alone, together):
        assert t[0] == a[0], d
        assert t[1] == pytest.approx(a[1], abs=TOL), d
    assert len({tuple(alone[i][0]) for i in range(6)}) > 3  # the selections really differ


def test_echo_logprobs_of_a_mixture_equal_the_oracle(server, tiny, prompt_ids, mixture_ref):
    import torch
    from transformers import AutoTokenizer

    from memories.fuse import memory_logprobs, mix

    ids = AutoTokenizer.from_pretrained(tiny["tokenizer"])("the patient study result shows the tumor dose and the court shall notice")["input_ids"]
    body = {"model": "tiny-base", "prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 2, "temperature": 0, "domain": {"alpha": 0.3, "beta": 0.2}}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    assert r.headers["x-memserve-memory"] == "alpha=0.3, beta=0.2"
    got = r.json()["choices"][0]["logprobs"]["token_logprobs"][1 : len(ids)]
    base = httpx.post(server.url + "/v1/completions", json={**body, "domain": "none"}, timeout=300).json()["choices"][0]["logprobs"]["token_logprobs"][1 : len(ids)]
    assert max(abs(a - b) for a, b in zip(got, base)) > 0.01  # the mixture is measured

    # fp32 on both sides, but each memory's prompt pass runs on memserve's slot-pool forward
    # (memories/runner.py), whose logprobs differ from transformers' by a few 1e-5 on some positions
    # (measured: up to 2.1e-5 after mixing, also with vLLM's own base values mixed in): 5e-5, not 1e-5.
    # First the mixture on vLLM's own base prompt logprobs, each memory's prompt pass in transformers:
    with torch.inference_mode():
        context, targets = torch.tensor([ids[:-1]]), torch.tensor(ids[1:])[:, None]
        mems = [memory_logprobs(m(context).logits[0], mixture_ref.base.config.vocab_size, t).gather(-1, targets)[:, 0].double() for m, t in zip(mixture_ref.memories, (1.0, 0.8))]
    isolated = mix(torch.tensor(base, dtype=torch.float64), mems, [0.3, 0.2]).tolist()
    assert got == pytest.approx(isolated, abs=5e-5)
    # then the whole computation in transformers
    expected = [float(mixture_ref.next_logprobs(ids[:i], [0.3, 0.2], [1.0, 0.8])[ids[i]]) for i in range(1, len(ids))]
    assert got == pytest.approx(expected, abs=5e-5)


@pytest.mark.parametrize(
    "extra,status,param,says",
    [
        ({"domain": {"alpha": 0.7, "beta": 0.4}}, 400, "domain", "sum to at most 1"),
        ({"domain": {"alpha": 0.3, "beta": 0.2}, "memory_weight": 0.5}, 400, "memory_weight", "mixture"),
        ({"domain": ["alpha", "gamma"]}, 404, "domain", "'gamma' is not loaded"),
        ({"domain": {"alpha": 1.5, "beta": 0.0}}, 400, "domain", "[0, 1]"),
    ],
)
def test_mixture_refusals(client, extra, status, param, says):
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="tiny-base", prompt="the gene", max_tokens=2, extra_body=extra)
    assert e.value.status_code == status
    err = e.value.body if "error" not in (e.value.body or {}) else e.value.body["error"]
    assert err["param"] == param and says in err["message"]


# ---- on a changed base: a lora or calm memory with a decoder memory fused on top (the chunked server) ----


@pytest.fixture(scope="module")
def chunked_client(chunked) -> OpenAI:
    return OpenAI(base_url=chunked.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.mark.parametrize("changer,tol", [("ada", TOL), ("cal", 5e-5)])  # calm: vLLM's composed base differs from the hooks' by ~1e-5
def test_lora_or_calm_with_a_decoder_memory_matches_its_oracle(chunked_client, tiny, prompt_ids, lora_dir, calm_dir, changer, tol):
    ref = ReferenceFusion(str(tiny["base"]), [str(tiny["alpha"])], **({"lora_dir": str(lora_dir)} if changer == "ada" else {"calm_dir": str(calm_dir)}))
    alone = ReferenceFusion(str(tiny["base"]), None, **({"lora_dir": str(lora_dir)} if changer == "ada" else {"calm_dir": str(calm_dir)}))
    for ids in prompt_ids[:2]:
        tokens, logprobs, header = complete(chunked_client, ids, {changer: None, "alpha": 0.4})
        expected = ref.greedy(ids, MAX_TOKENS, [0.4], [1.0])
        assert tokens == expected.tokens
        assert logprobs == pytest.approx(expected.logprobs, abs=tol)
        assert header == f"{changer}, alpha=0.4"
        assert tokens != alone.greedy(ids, MAX_TOKENS, 0.0).tokens or logprobs != pytest.approx(alone.greedy(ids, MAX_TOKENS, 0.0).logprobs, abs=1e-3)


def test_two_base_changing_memories_are_refused(chunked_client):
    with pytest.raises(openai.BadRequestError) as e:
        chunked_client.completions.create(model="tiny-base", prompt="the gene", max_tokens=2, extra_body={"domain": ["ada", "cal", "alpha"]})
    err = e.value.body if "error" not in (e.value.body or {}) else e.value.body["error"]
    assert err["param"] == "domain" and "change the base model itself" in err["message"]
