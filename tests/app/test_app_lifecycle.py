"""The app around its requests: health, draining, a dead engine, a client that goes away, a memory unloaded under a request.

Signals and the process exit are tests/api/test_lifecycle.py's (a real server);
here the same gate and routes run in-process, each request held by an event.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import uvicorn

from server.api.lifecycle import ENGINE_DEAD_EXIT
from server.serving.store import MemoryStore
from tests.app.conftest import ADMIN, ADMIN_TOKEN, COMPLETION
from tests.fakes import WatchedEvent
from tests.openai_errors import assert_error

pytestmark = pytest.mark.anyio


async def test_health_and_ready(serve):
    served = await serve()
    async with served.client() as http:
        for route in ("/health", "/ready"):
            r = await http.get(route)
            assert r.status_code == 200 and r.json()["status"] == "ok"
        served.health.healthy = False
        for route in ("/health", "/ready"):
            r = await http.get(route)
            assert r.status_code == 503 and r.json() == {"status": "unhealthy", "error": "the inference engine is not running"}  # no details


async def start_held(served, http, body):
    """A request that reaches the engine and stays there until ``served.completions.hold`` is set."""
    served.completions.hold = asyncio.Event()
    running = asyncio.ensure_future(http.post("/v1/completions", json=body))
    await served.completions.running.wait()
    return running


@pytest.mark.parametrize("stream", [False, True])
async def test_draining_finishes_running_requests_and_refuses_new_ones(serve, memory_root, stream):
    served = await serve(admin_token=ADMIN_TOKEN, store=MemoryStore(memory_root))
    server = served.lifecycle.make_server(uvicorn.Config(served.asgi))
    async with served.client() as http:
        running = await start_held(served, http, {**COMPLETION, "model": "alpha", "stream": stream})
        assert served.lifecycle.in_flight == 1
        draining = asyncio.ensure_future(served.lifecycle.drain())
        await asyncio.sleep(0)  # one turn of the loop: drain has begun and waits for the running request
        for method, route in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/admin/memories")):
            r = await http.request(method, route, json=COMPLETION if method == "POST" else None, headers=ADMIN)
            assert_error(r, 503)
            assert r.headers["retry-after"] == "1" and "shutting down" in r.json()["error"]["message"]
        assert (await http.get("/health")).json() == {"status": "draining"}
        assert not draining.done() and not server.should_exit
        served.completions.hold.set()
        finished = await running
        await draining
    assert finished.status_code == 200 and finished.headers["x-memserve-memory"] == "alpha"
    assert server.should_exit and served.lifecycle.in_flight == 0
    assert len(served.completions.requests) == 1  # the refused ones never reached vLLM


async def test_a_dead_engine_answers_503_and_stops_the_server(serve):
    from server.engine.vllm_openai import EngineDeadError

    served = await serve()
    server = served.lifecycle.make_server(uvicorn.Config(served.asgi))
    served.completions.answer = EngineDeadError()
    async with served.client() as http:
        err = assert_error(await http.post("/v1/completions", json={**COMPLETION, "domain": "alpha"}), 503)
        assert "engine has stopped" in err["message"]
        assert (served.lifecycle.exit_code, served.lifecycle.draining, server.should_exit) == (ENGINE_DEAD_EXIT, True, True)
        assert_error(await http.post("/v1/completions", json=COMPLETION), 503)
        assert (await http.get("/health")).status_code == 503
    assert served.catalog.get("alpha").active == 0


async def test_a_client_that_goes_away_cancels_its_engine_request(serve):
    """Drive the ASGI app by hand: the body, then a disconnect while vLLM still works on the request."""
    served = await serve()
    served.completions.hold = asyncio.Event()
    gone = asyncio.Event()
    body = json.dumps({**COMPLETION, "model": "alpha"}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    sent = []

    async def send(message):
        sent.append(message)

    headers = [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "headers": headers, "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000), "root_path": ""}
    call = asyncio.ensure_future(served.asgi(scope, receive, send))
    await served.completions.running.wait()
    gone.set()
    await call
    await asyncio.wait_for(served.completions.cancelled.wait(), 60)  # the request vLLM was working on is cancelled, not finished
    assert sent[0]["status"] == 499 and not served.completions.hold.is_set()
    assert served.catalog.get("alpha").active == 0 and served.lifecycle.in_flight == 0


async def test_unloading_with_timeout_0_ends_a_running_request_with_503(serve, memory_root):
    served = await serve(admin_token=ADMIN_TOKEN, store=MemoryStore(memory_root))
    async with served.client() as http:
        running = await start_held(served, http, {**COMPLETION, "domain": "alpha"})
        r = await http.delete("/admin/memories/alpha", params={"timeout": 0}, headers=ADMIN)
        ended = await running
    assert r.status_code == 200 and r.json()["drained"] is False
    err = assert_error(ended, 503, "domain")
    assert "unloaded while this request ran" in err["message"]
    await asyncio.wait_for(served.completions.cancelled.wait(), 60)
    assert served.engine.unloaded == ["alpha@1"]


async def test_unloading_waits_for_a_running_request(serve, memory_root):
    served = await serve(admin_token=ADMIN_TOKEN, store=MemoryStore(memory_root))
    async with served.client() as http:
        running = await start_held(served, http, {**COMPLETION, "domain": "alpha"})
        memory = served.catalog.get("alpha")
        memory.idle = WatchedEvent()  # (a request runs: not set)
        unloading = asyncio.ensure_future(http.delete("/admin/memories/alpha", headers=ADMIN))
        await memory.idle.waited.wait()  # the unload waits for the running request
        assert "alpha" not in served.catalog.names()  # hidden at once: new requests get 404 while this one runs
        assert_error(await http.post("/v1/completions", json={**COMPLETION, "domain": "alpha"}), 404, "domain")
        assert served.engine.unloaded == []
        served.completions.hold.set()
        finished, r = await running, await unloading
    assert finished.status_code == 200 and finished.headers["x-memserve-memory"] == "alpha"
    assert r.json()["drained"] is True and served.engine.unloaded == ["alpha@1"]
