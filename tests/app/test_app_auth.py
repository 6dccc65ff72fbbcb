"""Who may call what: --api-key on /v1, the admin token on /admin, and the Host a loopback server answers to."""

from __future__ import annotations

import json

import pytest

from server.serving.store import MemoryStore
from tests.app.conftest import ADMIN, ADMIN_TOKEN, CHAT, COMPLETION
from tests.openai_errors import assert_error

pytestmark = pytest.mark.anyio

KEY = {"Authorization": "Bearer client-key"}


@pytest.mark.parametrize("method,route,body", [("POST", "/v1/completions", COMPLETION), ("POST", "/v1/chat/completions", CHAT), ("GET", "/v1/models", None)])
async def test_the_api_key_guards_v1(serve, method, route, body):
    served = await serve(api_key="client-key")
    async with served.client() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "client-key"}, ADMIN):
            err = assert_error(await http.request(method, route, json=body, headers=headers), 401)
            assert "API key" in err["message"] and err["type"] == "AuthenticationError"
        assert (await http.request(method, route, json=body, headers=KEY)).status_code == 200
        assert (await http.get("/health")).status_code == 200  # probes need no key
        assert (await http.get("/metrics")).status_code == 200
    assert len(served.completions.requests + served.chat.requests) == (1 if method == "POST" else 0)


async def test_the_key_is_checked_before_the_body(serve):
    async with (await serve(api_key="client-key")).client() as http:
        assert_error(await http.post("/v1/completions", content=b"{bad json", headers={"content-type": "application/json"}), 401)


async def test_without_an_api_key_v1_is_open(serve):
    async with (await serve()).client() as http:
        assert (await http.post("/v1/completions", json=COMPLETION, headers={"Authorization": "Bearer anything"})).status_code == 200


async def test_admin_needs_the_token(serve, memory_root):
    served = await serve(admin_token=ADMIN_TOKEN, store=MemoryStore(memory_root), api_key="client-key")
    async with served.client() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, KEY):
            assert_error(await http.get("/admin/memories", headers=headers), 401)
            assert_error(await http.post("/admin/memories", json={"name": "x", "path": "alpha"}, headers=headers), 401)
            assert_error(await http.delete("/admin/memories/alpha", headers=headers), 401)
        assert (await http.get("/admin/memories", headers=ADMIN)).status_code == 200
        assert_error(await http.get("/v1/models", headers=ADMIN), 401)  # the admin token is not an API key
    assert served.catalog.names() == ["alpha", "beta"] and served.engine.loaded == ["alpha@1", "beta@2"]


async def test_admin_routes_do_not_exist_without_a_token(serve, memory_root):
    async with (await serve(store=MemoryStore(memory_root))).client() as http:
        for headers in ({}, ADMIN):
            assert_error(await http.get("/admin/memories", headers=headers), 404)
            assert_error(await http.post("/admin/memories", json={"name": "x", "path": "alpha"}, headers=headers), 404)
            assert_error(await http.delete("/admin/memories/alpha", headers=headers), 404)


async def test_admin_insecure_local_opens_the_routes_without_a_token(serve, memory_root):
    async with (await serve(admin_insecure_local=True, store=MemoryStore(memory_root))).client() as http:
        r = await http.get("/admin/memories")
    assert r.status_code == 200 and [m["name"] for m in r.json()["data"]] == ["alpha", "beta"]


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8000", "127.0.0.1:9999", "localhost.attacker.example", ""])
@pytest.mark.parametrize("route", ["/v1/completions", "/health", "/admin/memories", "/openapi.json"])
async def test_a_loopback_server_answers_only_to_loopback_names(serve, memory_root, route, host):
    """A page on another site resolving its own name to 127.0.0.1 (DNS rebinding) is refused on every route."""
    served = await serve(admin_token=ADMIN_TOKEN, store=MemoryStore(memory_root))
    async with served.client(headers={**ADMIN, "host": host}) as http:
        r = await http.request("POST" if route == "/v1/completions" else "GET", route, json=COMPLETION if route == "/v1/completions" else None)
    err = assert_error(r, 400)
    assert "Host" in err["message"] and r.headers["connection"] == "close"
    assert served.completions.requests == []


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000", "127.0.0.1"])
async def test_loopback_names_are_served(serve, host):
    async with (await serve()).client(headers={"host": host}) as http:
        assert (await http.post("/v1/completions", content=json.dumps(COMPLETION), headers={"content-type": "application/json"})).status_code == 200


async def test_a_server_on_a_public_address_checks_no_host(serve):
    async with (await serve(allowed_hosts=None)).client(headers={"host": "memserve.example.com"}) as http:
        assert (await http.post("/v1/completions", json=COMPLETION)).status_code == 200
