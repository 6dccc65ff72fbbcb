"""Which memory a request selects, what the engine is handed for it, and how the response names it."""

from __future__ import annotations

import json
import logging
import re

import pytest

from tests.app.conftest import BASE, BASE_PATH, CHAT, COMPLETION, served_count

pytestmark = pytest.mark.anyio



def decoder_args(card, key: str) -> dict:
    return {"memserve_memory": key, "memserve_weight": card.weight, "memserve_temperature": card.temperature}


@pytest.mark.parametrize(
    "body,headers",
    [({"domain": "alpha"}, None), ({}, {"X-Domain": "alpha"}), ({"model": "alpha"}, None), ({"model": "alpha", "domain": " alpha "}, {"X-Domain": "alpha"})],
    ids=["body domain", "X-Domain header", "model name", "all three agreeing"],
)
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
async def test_each_spelling_selects_the_memory(serve, cards, route, body, headers):
    served = await serve()
    fake = served.chat if "chat" in route else served.completions
    async with served.client() as http:
        r = await http.post(route, json={**(CHAT if "chat" in route else COMPLETION), **body}, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["x-memserve-memory"] == "alpha"
    (request,) = fake.requests
    assert request.model == BASE  # vLLM serves the base; the memory rides in vllm_xargs
    assert request.vllm_xargs == decoder_args(cards["alpha"], "alpha@1")
    assert r.json()["model"] == body.get("model", BASE)  # the id the client asked for


async def test_memory_weight_overrides_the_memorys_own(serve):
    served = await serve()
    async with served.client() as http:
        r = await http.post("/v1/completions", json={**COMPLETION, "domain": "beta", "memory_weight": 1})
    assert r.status_code == 200
    assert served.completions.requests[0].vllm_xargs["memserve_weight"] == 1.0
    assert served.completions.requests[0].vllm_xargs["memserve_memory"] == "beta@2"


@pytest.mark.parametrize("spelling", [{"domain": "none"}, {"domain": ""}, {"domain": None}, {}])
async def test_no_memory_is_the_base_alone(serve, spelling):
    served = await serve()
    async with served.client() as http:
        r = await http.post("/v1/completions", json={**COMPLETION, **spelling}, headers={"X-Domain": "None"} if spelling else None)
    assert r.status_code == 200 and r.headers["x-memserve-memory"] == "none" and r.json()["model"] == BASE
    (request,) = served.completions.requests
    assert request.model == BASE and request.vllm_xargs is None


@pytest.mark.parametrize("domain", [None, "alpha", "ada"])
async def test_clients_cannot_address_the_engine_directly(serve, cards, domain):
    """memserve_ keys a client sends in vllm_xargs are dropped; its other keys and the server's own reach the engine."""
    served = await serve(memories=("alpha", "ada"))
    sneaky = {"memserve_memory": "alpha@1", "memserve_weight": 1.0, "memserve_calm": "x@9", "other": 1}
    async with served.client() as http:
        r = await http.post("/v1/completions", json={**COMPLETION, "vllm_xargs": sneaky, **({"domain": domain} if domain else {})})
    assert r.status_code == 200, r.text
    expected = {"alpha": {**decoder_args(cards["alpha"], "alpha@1"), "other": 1}, "ada": {"other": 1}, None: {"other": 1}}[domain]
    assert served.completions.requests[0].vllm_xargs == expected


async def test_only_memserve_keys_sent_by_a_client_leave_no_xargs(serve):
    served = await serve()
    async with served.client() as http:
        await http.post("/v1/completions", json={**COMPLETION, "vllm_xargs": {"memserve_memory": "alpha@1"}})
    assert served.completions.requests[0].vllm_xargs is None


async def test_a_lora_memory_is_vllms_adapter_under_its_engine_key(serve):
    served = await serve(memories=("ada",))
    async with served.client() as http:
        r = await http.post("/v1/chat/completions", json={**CHAT, "model": "ada"})
    assert r.status_code == 200 and r.json()["model"] == "ada" and r.headers["x-memserve-memory"] == "ada"
    (request,) = served.chat.requests
    assert request.model == "ada@1" and request.vllm_xargs is None  # vLLM applies the adapter registered under its key


async def test_responses_name_the_memory(serve):
    served = await serve()
    async with served.client() as http:
        r = await http.post("/v1/completions", json={**COMPLETION, "model": "alpha"})
        assert r.json()["model"] == "alpha" and r.headers["x-memserve-memory"] == "alpha"
        r = await http.post("/v1/completions", json={**COMPLETION, "domain": "beta"})
        assert r.json()["model"] == BASE and r.headers["x-memserve-memory"] == "beta"
        assert (await http.post("/v1/completions", json=COMPLETION)).headers["x-memserve-memory"] == "none"
        r = await http.post("/v1/chat/completions", json={**CHAT, "model": "alpha", "stream": True})
    assert r.headers["x-memserve-memory"] == "alpha" and r.headers["content-type"].startswith("text/event-stream")
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert chunks and all(c["model"] == "alpha" for c in chunks)
    assert all("usage" not in c or c["usage"] is None for c in chunks)  # counted by us, not asked for by the client
    assert r.text.rstrip().endswith("data: [DONE]")
    assert served.chat.requests[0].stream_options.include_usage  # asked of vLLM so that the memory's tokens are counted


async def test_a_stream_that_asks_for_usage_gets_it(serve):
    served = await serve()
    async with served.client() as http:
        r = await http.post("/v1/completions", json={**COMPLETION, "domain": "alpha", "stream": True, "stream_options": {"include_usage": True}})
    usage = [json.loads(line[6:])["usage"] for line in r.text.splitlines() if line.startswith("data: {") and '"usage"' in line]
    assert usage == [{"prompt_tokens": 3, "total_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": None, "completion_tokens_details": None}]


async def test_a_base_stream_passes_through_untouched(serve):
    served = await serve()
    async with served.client() as http:
        r = await http.post("/v1/completions", json={**COMPLETION, "stream": True})
    assert r.headers["x-memserve-memory"] == "none" and served.completions.requests[0].stream_options is None
    assert [json.loads(line[6:])["model"] for line in r.text.splitlines() if line.startswith("data: {")] == [BASE]


async def test_usage_is_counted_by_memory(serve):
    served = await serve()
    async with served.client() as http:
        await http.post("/v1/completions", json={**COMPLETION, "domain": "alpha", "max_tokens": 4})
        await http.post("/v1/chat/completions", json={**CHAT, "model": "alpha", "max_tokens": 5, "stream": True})
    alpha = served.catalog.get("alpha")
    assert (alpha.requests, alpha.active, alpha.prompt_tokens, alpha.completion_tokens) == (2, 0, 6, 9)


async def test_the_request_counter_counts_served_requests_only(serve):
    served = await serve()
    async with served.client() as http:
        before = await served_count(http, "alpha"), await served_count(http, "none")
        await http.post("/v1/completions", json={**COMPLETION, "model": "alpha", "max_tokens": "many"})  # refused
        await http.post("/v1/completions", json={**COMPLETION, "max_tokens": "many"})
        assert (await served_count(http, "alpha"), await served_count(http, "none")) == before
        await http.post("/v1/completions", json={**COMPLETION, "model": "alpha"})
        assert await served_count(http, "alpha") == before[0] + 1


async def test_the_log_names_the_memory_of_each_request(serve, caplog):
    served = await serve()
    with caplog.at_level(logging.INFO, logger="memserve.requests"):
        async with served.client() as http:
            await http.post("/v1/completions", json={**COMPLETION, "domain": "beta", "max_tokens": 3})
    assert any(re.search(r"/v1/completions 200 memory=beta prompt_tokens=\d+ completion_tokens=3", m) for m in caplog.messages), caplog.messages


async def test_models_lists_the_base_and_each_memory_by_name_without_paths(serve):
    served = await serve(memories=("alpha", "ada"))
    async with served.client() as http:
        models = (await http.get("/v1/models")).json()
    assert models["object"] == "list"
    by_id = {m["id"]: m for m in models["data"]}
    assert list(by_id) == [BASE, "ada", "alpha"]  # memories by name, sorted; the adapter not under vLLM's engine key
    assert by_id[BASE]["root"] == BASE and BASE_PATH not in json.dumps(models)
    assert all(by_id[n]["parent"] == BASE and by_id[n]["root"] == n and by_id[n]["max_model_len"] == 512 for n in ("alpha", "ada"))


async def test_open_endpoints_show_no_paths(serve):
    async with (await serve()).client() as http:
        for route in ("/health", "/ready"):
            r = await http.get(route)
            assert r.status_code == 200 and r.json() == {"status": "ok", "memories": ["alpha", "beta"], "problems": []}
        assert all("/" not in (m["root"] or "") for m in (await http.get("/v1/models")).json()["data"])
