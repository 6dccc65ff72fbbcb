"""Every refusal the HTTP layer makes itself has the OpenAI error shape, and nothing it refuses reaches the engine."""

from __future__ import annotations

import json

import pytest

from server.serving.completions import RequestLimits
from tests.app.conftest import BASE, CHAT, COMPLETION, served_count
from tests.openai_errors import assert_error

pytestmark = pytest.mark.anyio


def as_chat(body: dict) -> dict:
    return {**CHAT, **{k: v for k, v in body.items() if k != "prompt"}}


@pytest.mark.parametrize(
    "body,headers,status,param",
    [
        ({**COMPLETION, "domain": "nope"}, None, 404, "domain"),
        (COMPLETION, {"X-Domain": "nope"}, 404, "domain"),
        ({**COMPLETION, "domain": "alpha"}, {"X-Domain": "beta"}, 400, "domain"),
        ({**COMPLETION, "model": "alpha", "domain": "beta"}, None, 400, "domain"),
        ({**COMPLETION, "model": "alpha"}, {"X-Domain": "beta"}, 400, "domain"),
        ({**COMPLETION, "domain": 5}, None, 400, "domain"),
        ({**COMPLETION, "domain": "alpha", "memory_weight": 1.5}, None, 400, "memory_weight"),
        ({**COMPLETION, "domain": "alpha", "memory_weight": -0.1}, None, 400, "memory_weight"),
        ({**COMPLETION, "domain": "alpha", "memory_weight": "half"}, None, 400, "memory_weight"),
        ({**COMPLETION, "domain": "alpha", "memory_weight": True}, None, 400, "memory_weight"),
        ({**COMPLETION, "memory_weight": 0.5}, None, 400, "memory_weight"),
        ({**COMPLETION, "model": "ada", "memory_weight": 0.5}, None, 400, "memory_weight"),
        ({**COMPLETION, "max_tokens": "many"}, None, 400, "max_tokens"),
        ({**COMPLETION, "model": "no-such-model"}, None, 404, "model"),
    ],
)
async def test_bad_requests(serve, body, headers, status, param):
    served = await serve(memories=("alpha", "beta", "ada"))
    async with served.client() as http:
        assert_error(await http.post("/v1/completions", json=body, headers=headers), status, param)
        assert_error(await http.post("/v1/chat/completions", json=as_chat(body), headers=headers), status, param)
        assert (await http.post("/v1/completions", json=COMPLETION)).status_code == 200  # still serving
    assert len(served.completions.requests) == 1 and served.chat.requests == []  # no refused request reached vLLM


async def test_a_lora_memory_refuses_a_weight_by_name(serve):
    async with (await serve(memories=("ada",))).client() as http:
        err = assert_error(await http.post("/v1/completions", json={**COMPLETION, "domain": "ada", "memory_weight": 0.5}), 400, "memory_weight")
    assert "'ada' is a lora memory" in err["message"]


RAW_REFUSALS = {
    "not JSON": (b"{bad json", "not valid JSON"),
    "an array": (b"[1, 2]", "must be a JSON object, got list"),
    "a string": (b'"text"', "must be a JSON object, got str"),
    "bare non-UTF-8 bytes": (b"\xff\xfe", "not UTF-8"),
    "not UTF-8": (b'{"model": "tiny-base", "prompt": "\xff"}', "not UTF-8"),
    "nested 100,000 deep": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "5,000-digit integer": (b'{"model": "tiny-base", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),
}


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/admin/memories"])
@pytest.mark.parametrize("case", sorted(RAW_REFUSALS))
async def test_malformed_bodies_are_400(serve, memory_root, case, route):
    from server.serving.store import MemoryStore
    from tests.app.conftest import ADMIN

    raw, needle = RAW_REFUSALS[case]
    served = await serve(store=MemoryStore(memory_root), admin_token="s3cret-admin-token")
    async with served.client(headers={**ADMIN, "content-type": "application/json"}) as http:
        err = assert_error(await http.post(route, content=raw), 400)
    assert needle in err["message"]
    assert served.completions.requests == served.chat.requests == []
    assert served.engine.loaded == ["alpha@1", "beta@2"]  # the start-up memories only


@pytest.mark.parametrize("content_type", ["text/plain", "", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
async def test_a_body_that_is_not_declared_json_is_415(serve, route, content_type):
    """A browser sends these cross-site without asking first; an application/json POST it must ask for."""
    served = await serve()
    async with served.client() as http:
        r = await http.post(route, content=json.dumps(COMPLETION), headers={"content-type": content_type})
        err = assert_error(r, 415)
        ok = await http.post(route, content=json.dumps(COMPLETION if "chat" not in route else CHAT), headers={"content-type": "Application/JSON; charset=utf-8"})
    assert "application/json" in err["message"]
    assert ok.status_code == 200, ok.text  # the media type's case and parameters do not matter


async def test_a_body_above_max_request_bytes_is_413_naming_the_flag(serve):
    served = await serve(limits=RequestLimits(max_request_bytes=1000))
    async with served.client() as http:
        err = assert_error(await http.post("/v1/completions", json={**COMPLETION, "prompt": "x" * 1000}), 413)
        assert (await http.post("/v1/completions", json={**COMPLETION, "prompt": "x" * 900})).status_code == 200
    assert "at most 1,000" in err["message"] and "--max-request-bytes" in err["message"]


async def test_the_default_request_limit_is_4_mib(serve):
    async with (await serve()).client() as http:
        err = assert_error(await http.post("/v1/completions", content=b'{"prompt": "' + b"x" * (5 << 20) + b'"}', headers={"content-type": "application/json"}), 413)
    assert "at most 4,194,304" in err["message"]


@pytest.mark.parametrize("field,value", [("n", 17), ("best_of", 17)])
@pytest.mark.parametrize("model", [BASE, "alpha"])
async def test_choices_above_max_n_are_400_naming_the_flag(serve, model, field, value):
    served = await serve()
    body = {**COMPLETION, "model": model, field: value, **({"n": 1} if field == "best_of" else {})}
    async with served.client() as http:
        err = assert_error(await http.post("/v1/completions", json=body), 400, "n")
        assert (await http.post("/v1/completions", json={**COMPLETION, "model": model, "n": 16})).status_code == 200
    assert "limit of 16" in err["message"] and "--max-n" in err["message"]
    assert [r.n for r in served.completions.requests] == [16]


async def test_max_n_follows_the_flag(serve):
    served = await serve(limits=RequestLimits(max_n=2))
    async with served.client() as http:
        err = assert_error(await http.post("/v1/chat/completions", json={**CHAT, "n": 3}), 400, "n")
        assert (await http.post("/v1/chat/completions", json={**CHAT, "n": 2})).status_code == 200
    assert "limit of 2" in err["message"]


async def test_prompt_embeds_with_a_memory_is_refused_before_the_engine(serve):
    served = await serve()
    async with served.client() as http:
        err = assert_error(await http.post("/v1/completions", json={**COMPLETION, "model": "alpha", "prompt_embeds": "AAAA"}), 400, "prompt_embeds")
    assert "memory" in err["message"] and served.completions.requests == []


async def test_unknown_routes_and_methods_use_the_error_shape(serve):
    async with (await serve()).client() as http:
        assert_error(await http.get("/v1/nope"), 404)
        assert_error(await http.get("/v1/completions"), 405)
        assert_error(await http.post("/v1/models"), 405)


async def test_unknown_model_lists_the_memories(serve):
    async with (await serve()).client() as http:
        err = assert_error(await http.post("/v1/completions", json={**COMPLETION, "model": "no-such-model"}), 404, "model")
    assert all(name in err["message"] for name in (BASE, "alpha", "beta"))


async def test_an_error_vllm_returns_keeps_its_status_names_the_memory_and_is_not_counted(serve):
    from vllm.entrypoints.serve.engine.protocol import ErrorInfo, ErrorResponse

    served = await serve()
    served.completions.answer = ErrorResponse(error=ErrorInfo(message="max_tokens must be at least 1", type="BadRequestError", param="max_tokens", code=400))
    async with served.client() as http:
        before = await served_count(http, "alpha")
        r = await http.post("/v1/completions", json={**COMPLETION, "model": "alpha", "max_tokens": -5})
        err = assert_error(r, 400, "max_tokens")
        after = await served_count(http, "alpha")
    assert err["message"] == "max_tokens must be at least 1" and r.headers["x-memserve-memory"] == "alpha"
    assert after == before
    assert served.catalog.get("alpha").active == 0  # the memory's request count went back down


@pytest.mark.parametrize(
    "exc,status,needle",
    [(ValueError("prompt too odd"), 400, "prompt too odd"), (OverflowError("int too large"), 400, "int too large"), (KeyError("oops"), 500, "oops")],
    ids=["ValueError", "OverflowError", "KeyError"],
)
async def test_exceptions_vllm_raises_are_classified_in_place(serve, exc, status, needle):
    """vLLM's serving layer raises some refusals instead of returning them: its own classification decides, in the error shape."""
    served = await serve()
    served.completions.answer = exc
    async with served.client() as http:
        err = assert_error(await http.post("/v1/completions", json={**COMPLETION, "domain": "beta"}), status)
    assert needle in err["message"]
    assert served.catalog.get("beta").active == 0
