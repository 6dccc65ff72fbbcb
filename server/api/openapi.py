"""The OpenAPI document: request bodies and error responses, so schema-driven clients and fuzzers see them.

Routes read their bodies themselves (memory selection must see the raw JSON
before vLLM's request models do), so FastAPI cannot infer the bodies: they are
declared here from vLLM's own request models plus memserve's two fields.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

MEMSERVE_FIELDS = {
    "domain": {
        "anyOf": [
            {"type": ["string", "null"]},
            {"type": "object", "additionalProperties": {"type": ["number", "null"], "minimum": 0, "maximum": 1}, "minProperties": 1},
            {"type": "array", "items": {"type": "string"}, "minItems": 1},
        ],
        "description": "name of a loaded memory to fuse into this request ('none' or empty: the base alone); or a mixture: "
        "an object of memory names to weights (null: the memory's own; decoder weights sum to at most 1; "
        "at most one lora or calm memory, with null), or a list of names, each with its own weight",
    },
    "memory_weight": {"type": ["number", "null"], "minimum": 0, "maximum": 1, "description": "λ for this request; default: the memory's own"},
}

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]}, "code": {"type": "integer"}},
        }
    },
}

_ERROR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "invalid request", **_ERROR},
    401: {"description": "missing or wrong bearer token", **_ERROR},
    404: {"description": "unknown model or memory", **_ERROR},
    413: {"description": "request body too large", **_ERROR},
    415: {"description": "body is not application/json", **_ERROR},
    503: {"description": "memory not loaded on this replica yet, unloaded mid-request, or server shutting down", **_ERROR},
}


def request_body(schema_name: str) -> dict[str, Any]:
    """``openapi_extra`` for a route whose JSON body follows ``schema_name``."""
    ref = {"$ref": f"#/components/schemas/{schema_name}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def install_openapi(app: FastAPI) -> None:
    """Add vLLM's request models (with memserve's fields) and the error shape to the document."""
    from server.engine.vllm_openai import ChatCompletionRequest, CompletionRequest

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for model in (CompletionRequest, ChatCompletionRequest):
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schema["properties"].update(MEMSERVE_FIELDS)
                schemas[model.__name__] = schema
            schemas["ErrorResponse"] = ERROR_SCHEMA
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = build
