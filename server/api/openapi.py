"""The OpenAPI document: request bodies and error responses, so schema-driven clients and fuzzers see them.

Routes read their bodies themselves (the size and content-type checks come
first, and memory selection must see the raw JSON before vLLM's request models
do), so FastAPI does not infer the bodies from the routes' signatures: each
route names its model from server/protocol.py (``request_body``), and the
document's schemas are generated from those models.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server import protocol

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


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose JSON body follows ``model`` (one of ``protocol.BODIES``)."""
    assert protocol.BODIES.get(model.__name__) is model, f"{model.__name__} is not a body in server/protocol.py"
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _bodies(doc: dict[str, Any]) -> list[type[BaseModel]]:
    """The protocol models the document's routes name as their bodies."""
    prefix = "#/components/schemas/"
    refs = {
        body["content"]["application/json"]["schema"].get("$ref", "")
        for item in doc.get("paths", {}).values()
        for op in item.values()
        if isinstance(op, dict) and (body := op.get("requestBody"))
    }
    return [model for name, model in protocol.BODIES.items() if prefix + name in refs]


def install_openapi(app: FastAPI) -> None:
    """Add the routes' request bodies (server/protocol.py's models) and the error shape to the document."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            models = [(model, "validation") for model in _bodies(doc)]
            if models:
                _, generated = models_json_schema(models, ref_template="#/components/schemas/{model}")
                schemas.update(generated.get("$defs", {}))
            schemas["ErrorResponse"] = ERROR_SCHEMA
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = build
