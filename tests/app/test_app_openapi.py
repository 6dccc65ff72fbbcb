"""The OpenAPI document declares what the routes read and refuse, and a schema-driven fuzzer finds no server error in-process."""

from __future__ import annotations

import asyncio
import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from server.serving.store import MemoryStore
from tests.app.conftest import ADMIN, ADMIN_TOKEN, BASE, URL, build_app


@pytest.mark.anyio
async def test_openapi_declares_bodies_and_errors(serve, memory_root):
    async with (await serve(admin_token=ADMIN_TOKEN, store=MemoryStore(memory_root))).client() as http:
        doc = (await http.get("/openapi.json")).json()
    for path, schema in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest")):
        op = doc["paths"][path]["post"]
        assert op["requestBody"]["required"] is True
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"] == f"#/components/schemas/{schema}"
        assert {"400", "401", "404", "413", "415", "503"} <= set(op["responses"])
        assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/ErrorResponse"
        props = doc["components"]["schemas"][schema]["properties"]
        assert {"domain", "memory_weight", "max_tokens", "model"} <= set(props)
        weight = next(b for b in props["memory_weight"].get("anyOf", [props["memory_weight"]]) if b.get("type") == "number")
        assert weight["minimum"] == 0 and weight["maximum"] == 1
        domain = {b.get("type") for b in props["domain"]["anyOf"]}
        assert {"string", "object", "array"} <= domain  # a name, or a mixture as an object or a list
    assert {"400", "404"} <= set(doc["paths"]["/v1/models"]["get"]["responses"])
    assert doc["components"]["schemas"]["ErrorResponse"]["required"] == ["error"]
    assert {"get", "post"} <= set(doc["paths"]["/admin/memories"]) and "delete" in doc["paths"]["/admin/memories/{name}"]
    refs = json.dumps(doc).replace("#/components/schemas/", "\0").split("\0")[1:]
    missing = {r.split('"')[0] for r in refs} - set(doc["components"]["schemas"])
    assert not missing  # every reference resolves


# ---- a bounded, deterministic schemathesis run against the in-process app ----

MODELS = [BASE, "alpha", "beta", "ada"]


@pytest.fixture(scope="module")
def fuzzed(tok, base_config, cards, tmp_path_factory):
    """One app on one event loop for every case (the catalog's events belong to the loop that serves it)."""
    import httpx

    root = tmp_path_factory.mktemp("fuzz-root")
    with asyncio.Runner() as runner:
        served = runner.run(build_app(tok, base_config, cards, memories=("alpha", "beta", "ada"), admin_token=ADMIN_TOKEN, store=MemoryStore(root)))
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=served.asgi), base_url=URL, headers=ADMIN, timeout=60)
        yield runner, served, http
        runner.run(http.aclose())


@pytest.fixture(scope="module")
def openapi_schema(fuzzed):
    """The app's own document, ``model`` pinned to the served ids (or nearly every case would stop at the 404 for an unknown model)."""
    runner, _, http = fuzzed
    doc = runner.run(http.get("/openapi.json")).json()
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        schema = doc["components"]["schemas"][name]
        schema["properties"]["model"] = {"enum": MODELS}
        schema["required"] = sorted({*schema.get("required", []), "model"})
    return schemathesis.openapi.from_dict(doc)


OPERATIONS = [
    ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/health"), ("GET", "/ready"), ("GET", "/metrics"),
    ("GET", "/admin/memories"), ("POST", "/admin/memories"), ("DELETE", "/admin/memories/{name}"),
]  # fmt: skip


def test_every_operation_is_fuzzed(openapi_schema):
    listed = {(op.ok().method.upper(), op.ok().path) for op in openapi_schema.get_all_operations()}
    assert listed == set(OPERATIONS)


# negative cases (bodies and parameters that break the schema) where the operation declares something to break
NEGATED = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("DELETE", "/admin/memories/{name}")]
CASES = [(*op, GenerationMode.POSITIVE) for op in OPERATIONS] + [(*op, GenerationMode.NEGATIVE) for op in NEGATED]


@pytest.mark.parametrize("method,path,mode", CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_fuzzing_the_openapi_document_finds_no_server_error(openapi_schema, fuzzed, method, path, mode):
    """A bounded deterministic schemathesis run: 30 cases per operation and mode, every answer below 500
    (and none an exception escaping the app, which the transport would raise)."""
    runner, served, http = fuzzed
    operation = openapi_schema[path][method]
    fake = {"/v1/completions": served.completions, "/v1/chat/completions": served.chat}.get(path)
    reached = len(fake.requests) if fake else 0

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=30, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case):
        kw = case.as_transport_kwargs(base_url=URL)
        content = json.dumps(kw["json"]).encode() if "json" in kw else kw.get("data")
        request = http.request(kw["method"], kw["url"], params=kw.get("params"), headers=kw.get("headers"), cookies=kw.get("cookies"), content=content)
        case.validate_response(runner.run(request), checks=[not_a_server_error])

    check()
    if fake is not None and mode is GenerationMode.POSITIVE:
        assert len(fake.requests) > reached  # the run got past the HTTP layer's checks to vLLM's serving object
