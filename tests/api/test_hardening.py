"""Requests an operator's clients and a fuzzer send: every one gets a 4xx in the OpenAI shape, on a live connection."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import openai
import pytest

from tests.openai_errors import assert_error

BASE = {"model": "tiny-base", "prompt": "the gene", "max_tokens": 2}
MEMORY = {**BASE, "model": "alpha"}
CHAT = {"model": "tiny-base", "messages": [{"role": "user", "content": "the gene"}], "max_tokens": 2}

# bodies vLLM itself refuses; each was a plain-text 500 that dropped the connection
VLLM_REFUSALS = {
    "max_tokens huge": {"max_tokens": 10**9},
    "max_tokens 2**63": {"max_tokens": 2**63},
    "max_tokens negative": {"max_tokens": -5},
    "max_tokens 0 without echo": {"max_tokens": 0},
    "n 0": {"n": 0},
    "n negative": {"n": -1},
    "logprobs 1000": {"logprobs": 1000},
    "prompt too long": {"prompt": "word " * 200_000},
    "token ids out of vocabulary": {"prompt": [10**6]},
    "empty prompt": {"prompt": ""},
    "empty token list": {"prompt": []},
    "top_p 0": {"top_p": 0},
    "min_tokens above max_tokens": {"min_tokens": 5, "max_tokens": 2},
    "logit_bias out of vocabulary": {"logit_bias": {"999999": 1}},
    "prompt_embeds": {"prompt_embeds": "AAAA"},
}
# JSON Python reads but vLLM refuses (malformed bodies, the server's own limits, content type, Host,
# selection and the OpenAI error shape are tests/app's, in-process)
RAW_REFUSALS = {
    "temperature NaN": b'{"model": "tiny-base", "prompt": "x", "temperature": NaN}',
    "temperature Infinity": b'{"model": "tiny-base", "prompt": "x", "temperature": Infinity}',
}


@pytest.fixture(scope="module")
def http(server):
    """One keep-alive connection for the whole module: a refusal must not close it."""
    with httpx.Client(base_url=server.url, timeout=120, headers={"content-type": "application/json"}) as client:
        yield client


def still_serving(http) -> None:
    r = http.post("/v1/completions", json=BASE)
    assert r.status_code == 200, r.text
    assert r.headers.get("connection") != "close"


@pytest.mark.parametrize("model", ["tiny-base", "alpha"])
@pytest.mark.parametrize("case", sorted(VLLM_REFUSALS))
def test_vllm_refusals_are_4xx_on_a_live_connection(http, case, model):
    r = http.post("/v1/completions", json={**BASE, "model": model, **VLLM_REFUSALS[case]})
    assert 400 <= r.status_code < 500, r.text
    assert_error(r, r.status_code)
    assert r.headers.get("connection") != "close"
    still_serving(http)


@pytest.mark.parametrize("case", sorted(RAW_REFUSALS))
def test_malformed_bodies_are_400(http, case):
    assert_error(http.post("/v1/completions", content=RAW_REFUSALS[case]), 400)
    still_serving(http)


@pytest.mark.parametrize("body", [{"messages": []}, {"logprobs": True, "top_logprobs": 1000}], ids=["no messages", "top_logprobs 1000"])
@pytest.mark.parametrize("model", ["tiny-base", "alpha"])
def test_chat_refusals(http, body, model):
    assert_error(http.post("/v1/chat/completions", json={**CHAT, "model": model, **body}), 400)
    still_serving(http)


def test_sdk_sees_a_bad_request_and_does_not_retry(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="alpha", prompt="the gene", max_tokens=10**9)
    assert "max_model_len" in e.value.message
    assert client.completions.create(model="alpha", prompt="the gene", max_tokens=2).choices[0].text is not None


def test_rejected_requests_are_not_counted(http):
    def served(memory: str) -> float:
        text = http.get("/metrics").text
        m = re.search(rf'^memserve_memory_requests_total{{memory="{memory}"}} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0

    before = served("none"), served("alpha")
    http.post("/v1/completions", json={**BASE, "max_tokens": -5})
    http.post("/v1/completions", json={**MEMORY, "max_tokens": -5})
    assert (served("none"), served("alpha")) == before
    http.post("/v1/completions", json=MEMORY)
    assert served("alpha") == before[1] + 1


def test_server_log_names_the_memory_of_each_request(server, http):
    http.post("/v1/completions", json={**BASE, "domain": "beta", "max_tokens": 3})
    deadline = time.time() + 30
    while time.time() < deadline:
        if re.search(r"/v1/completions 200 memory=beta prompt_tokens=\d+ completion_tokens=3", server.log_path.read_text()):
            return
        time.sleep(0.2)
    pytest.fail("no request line naming memory=beta in the server log")


def test_open_endpoints_show_no_paths(server, http):
    for route in ("/health", "/ready"):
        assert "/" not in json.dumps(http.get(route).json())
    models = http.get("/v1/models").json()["data"]
    assert {m["id"] for m in models} >= {"tiny-base", "alpha", "beta"}
    assert all("/" not in (m["root"] or "") for m in models)


def test_disconnected_memory_request_stops_generating(server, http):
    """Four long memory requests whose clients give up: the engine drops them instead of finishing them."""

    def metric(name: str) -> float:
        m = re.search(rf"^{name}{{[^}}]*}} (\S+)$", http.get("/metrics").text, re.M)
        return float(m.group(1)) if m else 0.0

    generated = metric("vllm:generation_tokens_total")
    body = {**MEMORY, "max_tokens": 480, "ignore_eos": True, "n": 8}

    answered = []

    def give_up():
        try:
            answered.append(httpx.post(server.url + "/v1/completions", json=body, timeout=0.5).text[:300])
        except httpx.TimeoutException:
            pass

    threads = [threading.Thread(target=give_up) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not answered
    deadline = time.time() + 60
    while metric("vllm:num_requests_running") > 0 and time.time() < deadline:
        time.sleep(0.2)
    assert metric("vllm:num_requests_running") == 0
    # had they run to the end: 4 requests × 8 choices × 480 tokens
    assert metric("vllm:generation_tokens_total") - generated < 4 * 8 * 480
    still_serving(http)


def test_fuzzing_the_openapi_document_finds_no_server_error(server, http, tmp_path):
    """A bounded schemathesis run against the real engine: no 5xx.

    ``model`` is pinned to the served ids, or nearly every case would stop at the
    404 for an unknown model; generation lengths are capped at a few tokens, so
    the run spends its time on parameter combinations rather than on decoding
    (the large values are VLLM_REFUSALS' cases above; tests/app fuzzes the HTTP
    layer far more widely against a fake engine).
    """
    import subprocess
    import sys
    from pathlib import Path

    doc = http.get("/openapi.json").json()
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        schema = doc["components"]["schemas"][name]
        schema["properties"]["model"] = {"enum": ["tiny-base", "alpha", "beta"]}
        schema["required"] = sorted({*schema.get("required", []), "model"})
        for field in ("max_tokens", "max_completion_tokens", "min_tokens", "n", "best_of"):
            if field in schema["properties"]:
                schema["properties"][field] = {"type": "integer", "minimum": 0, "maximum": 3}
    spec = tmp_path / "openapi.json"
    spec.write_text(json.dumps(doc))
    cli = Path(sys.executable).parent / "schemathesis"
    args = [str(cli), "run", str(spec), "--url", server.url, "--checks", "not_a_server_error", "--max-examples", "20"]
    args += ["--generation-deterministic", "--request-timeout", "120", "--report-dir", str(tmp_path)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-6000:]
    still_serving(http)
