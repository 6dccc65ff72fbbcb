"""memserve's wire schema (server/protocol.py): vLLM's request models plus memserve's fields, and the admin load body."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from server import protocol
from server.engine import vllm_openai
from server.errors import BadRequest

MEMSERVE = {"domain", "memory_weight"}


@pytest.mark.parametrize("ours, theirs", [(protocol.CompletionRequest, vllm_openai.CompletionRequest), (protocol.ChatCompletionRequest, vllm_openai.ChatCompletionRequest)])
def test_request_models_are_vllms_plus_memserves_fields(ours, theirs):
    assert issubclass(ours, theirs)
    assert set(ours.model_fields) == set(theirs.model_fields) | MEMSERVE
    assert not MEMSERVE & set(theirs.model_fields)  # vLLM has no field of these names to shadow
    assert ours.__name__ == theirs.__name__  # the OpenAPI document's schema names stay vLLM's


def test_pop_removes_exactly_memserves_fields():
    body = {"model": "m", "prompt": "x", "domain": "bio", "memory_weight": 0.5}
    assert protocol.pop_memory_fields(body) == {"domain": "bio", "memory_weight": 0.5}
    assert body == {"model": "m", "prompt": "x"}
    assert protocol.pop_memory_fields(body) == {"domain": None, "memory_weight": None}


@pytest.mark.parametrize("value, name", [(None, None), ("", None), ("none", None), (" None ", None), (" bio ", "bio")])
def test_memory_name(value, name):
    assert protocol.memory_name(value) == name


@pytest.mark.parametrize("value", [5, 1.5, True, ["bio"], {"a": 1}])
def test_memory_name_must_be_a_string(value):
    with pytest.raises(BadRequest, match="domain must be a string naming a memory") as e:
        protocol.memory_name(value)
    assert e.value.param == "domain"


@pytest.mark.parametrize("value, weight", [(0, 0.0), (1, 1.0), (0.25, 0.25)])
def test_memory_weight(value, weight):
    assert protocol.memory_weight(value) == weight and isinstance(protocol.memory_weight(value), float)


@pytest.mark.parametrize(
    "value, message",
    [(1.5, "must be in [0, 1], got 1.5"), (-0.1, "must be in [0, 1], got -0.1"), ("half", "must be a number"), (True, "must be a number"),
     (math.nan, "must be a number"), (math.inf, "must be a number"), (None, "must be a number"), ([0.5], "must be a number")],
)  # fmt: skip
def test_bad_memory_weights(value, message):
    with pytest.raises(BadRequest, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        protocol.memory_weight(value)
    assert e.value.param == "memory_weight"


@pytest.mark.parametrize(
    "body, field",
    [({"name": "x"}, None), ({"name": "x", "path": "a", "prompts": ["p"]}, None), ({"name": "bad name!", "path": "a"}, "name"),
     ({"name": "none", "path": "a"}, "name"), ({"name": "x", "path": "a", "memory_weight": 2}, "memory_weight"),
     ({"name": "x", "path": "a", "extra": 1}, "extra"), ({"name": "x", "prompts": ["p"], "description": "d" * 1001}, "description")],
)  # fmt: skip
def test_bad_load_bodies(body, field):
    with pytest.raises(ValidationError) as e:
        protocol.LoadRequest.model_validate(body)
    if field is not None:
        assert e.value.errors()[0]["loc"][0] == field


def test_load_body():
    req = protocol.LoadRequest.model_validate({"name": "gamma", "path": "alpha", "memory_weight": 0.6})
    assert (req.name, req.path, req.prompts, req.memory_weight, req.replace) == ("gamma", "alpha", None, 0.6, False)


def test_openapi_document_takes_the_bodies_from_the_models():
    from server.api.admin import install_admin
    from server.api.app import create_app
    from server.api.lifecycle import Lifecycle

    app = create_app(None, None, "base", Lifecycle(1.0))
    install_admin(app, None, "base", "token", False)
    doc = app.openapi()
    schemas = doc["components"]["schemas"]
    for path, model in (("/v1/completions", protocol.CompletionRequest), ("/v1/chat/completions", protocol.ChatCompletionRequest), ("/admin/memories", protocol.LoadRequest)):
        op = doc["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model.__name__}"}
        assert {"400", "401", "404", "413", "415"} <= set(op["responses"])
        assert set(schemas[model.__name__]["properties"]) == set(model.model_fields)
    props = schemas["CompletionRequest"]["properties"]
    assert props["memory_weight"]["anyOf"][0] == {"type": "number", "minimum": 0.0, "maximum": 1.0}
    assert {"type": "string"} in props["domain"]["anyOf"]
    assert schemas["LoadRequest"]["properties"]["name"]["pattern"] == protocol.NAME.pattern
    assert "409" in doc["paths"]["/admin/memories"]["post"]["responses"]
    dangling = set(_refs(doc)) - {f"#/components/schemas/{name}" for name in schemas}
    assert not dangling


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)
