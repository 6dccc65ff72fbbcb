"""Decoder memories on a tensor-parallel engine: each of two CPU workers holds half of every memory slot
(its attention head, half of the MLP; server/worker/bank.py ``Shard``), and requests still equal the oracle."""

from __future__ import annotations

import pytest
from openai import OpenAI

from memories.reference import ReferenceFusion
from server.launcher import ServerProcess
from tests.conftest import FP32

MAX_TOKENS = 10
TOL = 1e-4  # fp32; the ranks' partial sums are added in another order than one device adds them


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    args = ["--model", str(tiny["base"]), "--served-model-name", "tiny-base", "--max-model-len", "512", "--tensor-parallel-size", "2"]
    args += ["--memory", f"alpha={tiny['alpha']}", "--memory", f"beta={tiny['beta']}", *FP32]
    with ServerProcess(args, tmp_path_factory.mktemp("tp2")).running() as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def complete(client: OpenAI, prompt: list[int], domain=None):
    body = {"return_token_ids": True, "ignore_eos": True, **({"domain": domain} if domain is not None else {})}
    r = client.completions.create(model="tiny-base", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=1, extra_body=body)
    return list(r.choices[0].token_ids), list(r.choices[0].logprobs.token_logprobs)


@pytest.mark.parametrize(
    "domain, memories, weights, temperatures",
    [
        (None, None, 0.0, 1.0),
        ("alpha", ["alpha"], [0.5], [1.0]),  # its memory.json: λ = 0.5, T = 1
        ({"alpha": 0.3, "beta": 0.2}, ["alpha", "beta"], [0.3, 0.2], [1.0, 0.8]),  # beta's memory.json says T = 0.8
    ],
)
def test_memories_and_mixtures_equal_the_oracle(client, tiny, prompt_ids, domain, memories, weights, temperatures):
    ref = ReferenceFusion(str(tiny["base"]), [str(tiny[m]) for m in memories] if memories else None)
    base = None if memories is None else complete(client, prompt_ids[0])[0]
    for ids in prompt_ids[:2]:
        tokens, logprobs = complete(client, ids, domain)
        expected = ref.greedy(ids, MAX_TOKENS, weights, temperatures)
        assert tokens == expected.tokens
        assert logprobs == pytest.approx(expected.logprobs, abs=TOL)
    if base is not None:
        assert complete(client, prompt_ids[0], domain)[0] != base  # the memory changes the output
