"""Every bad request gets the OpenAI error shape and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest


def post(server, body, path="/v1/completions", headers=None, raw=None):
    h = {"content-type": "application/json", **(headers or {})}
    return httpx.post(server.url + path, content=raw if raw is not None else None, json=None if raw is not None else body, headers=h, timeout=120)


def assert_error(r: httpx.Response, status: int, param: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["code"] == status and err["message"]
    if param is not None:
        assert err["param"] == param


BASE = {"model": "tiny-base", "prompt": "the gene", "max_tokens": 2}


@pytest.mark.parametrize(
    "body,headers,status,param",
    [
        ({**BASE, "domain": "nope"}, None, 404, "domain"),
        (BASE, {"X-Domain": "nope"}, 404, "domain"),
        ({**BASE, "domain": "alpha"}, {"X-Domain": "beta"}, 400, "domain"),
        ({**BASE, "model": "alpha", "domain": "beta"}, None, 400, "domain"),
        ({**BASE, "domain": 5}, None, 400, "domain"),
        ({**BASE, "domain": "alpha", "memory_weight": 1.5}, None, 400, "memory_weight"),
        ({**BASE, "domain": "alpha", "memory_weight": -0.1}, None, 400, "memory_weight"),
        ({**BASE, "domain": "alpha", "memory_weight": "half"}, None, 400, "memory_weight"),
        ({**BASE, "domain": "alpha", "memory_weight": True}, None, 400, "memory_weight"),
        ({**BASE, "memory_weight": 0.5}, None, 400, "memory_weight"),
        ({**BASE, "max_tokens": "many"}, None, 400, None),
        ({**BASE, "model": "no-such-model"}, None, 404, None),
    ],
)
def test_bad_requests(server, body, headers, status, param):
    assert_error(post(server, body, headers=headers), status, param)
    assert_error(post(server, {"model": "tiny-base", "messages": [{"role": "user", "content": "x"}], **{k: v for k, v in body.items() if k not in ("prompt",)}}, "/v1/chat/completions", headers), status, param)


@pytest.mark.parametrize("raw", [b"{bad json", b"[1, 2]", b"\xff\xfe"])
def test_malformed_bodies(server, raw):
    assert_error(post(server, None, raw=raw), 400)


def test_memserve_engine_args_cannot_be_injected(server):
    """A client naming the engine key directly gets the base, not an unvalidated memory."""
    plain = post(server, {**BASE, "temperature": 0}).json()["choices"][0]["text"]
    sneaky = post(server, {**BASE, "temperature": 0, "vllm_xargs": {"memserve_memory": "alpha@1", "memserve_weight": 1.0}}).json()
    assert sneaky["choices"][0]["text"] == plain


def test_still_serving_after_errors(server):
    r = post(server, {**BASE, "domain": "alpha"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
