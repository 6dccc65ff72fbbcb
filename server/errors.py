"""One table from exception type to HTTP status and OpenAI error JSON.

The shape matches vLLM's own ``ErrorResponse`` (``{"error": {"message",
"type", "param", "code"}}`` with ``code`` the HTTP status), so a client sees
one error format whether memserve or vLLM refused the request.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from memories.artifact import ArtifactError


class MemserveError(Exception):
    status = HTTPStatus.BAD_REQUEST
    param: str | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        if param is not None:
            self.param = param


class BadRequest(MemserveError):
    pass


class UnknownMemory(MemserveError):
    status = HTTPStatus.NOT_FOUND
    param = "domain"


class Unauthorized(MemserveError):
    status = HTTPStatus.UNAUTHORIZED


class Conflict(MemserveError):
    status = HTTPStatus.CONFLICT


class Unavailable(MemserveError):
    status = HTTPStatus.SERVICE_UNAVAILABLE

    def __init__(self, message: str, param: str | None = None, retry_after: int | None = None):
        super().__init__(message, param)
        self.retry_after = retry_after


# exception type → (status, OpenAI error type); first match wins
ERROR_TABLE: list[tuple[type[Exception], HTTPStatus | None]] = [
    (MemserveError, None),  # carries its own status
    (ArtifactError, HTTPStatus.BAD_REQUEST),
    (json.JSONDecodeError, HTTPStatus.BAD_REQUEST),
    (ValidationError, HTTPStatus.BAD_REQUEST),
    (RequestValidationError, HTTPStatus.BAD_REQUEST),
]


def error_json(status: HTTPStatus, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    err_type = {
        HTTPStatus.BAD_REQUEST: "BadRequestError",
        HTTPStatus.UNAUTHORIZED: "AuthenticationError",
        HTTPStatus.NOT_FOUND: "NotFoundError",
        HTTPStatus.CONFLICT: "ConflictError",
        HTTPStatus.SERVICE_UNAVAILABLE: "ServiceUnavailableError",
    }.get(status, "InternalServerError")
    body = {"error": {"message": message, "type": err_type, "param": param, "code": int(status)}}
    return JSONResponse(body, status_code=int(status), headers=headers)


def to_response(exc: Exception) -> JSONResponse:
    for exc_type, status in ERROR_TABLE:
        if isinstance(exc, exc_type):
            if isinstance(exc, MemserveError):
                retry = getattr(exc, "retry_after", None)
                return error_json(exc.status, str(exc), exc.param, {"Retry-After": str(retry)} if retry else None)
            if isinstance(exc, json.JSONDecodeError):
                return error_json(status, f"request body is not valid JSON: {exc}")
            if isinstance(exc, (ValidationError, RequestValidationError)):
                return error_json(status, _validation_message(exc), _validation_param(exc))
            return error_json(status, str(exc))
    return error_json(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(exc).__name__}: {exc}")


def _validation_message(exc) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return "invalid request: " + "; ".join(parts)


def _validation_param(exc) -> str | None:
    errors = exc.errors()
    if errors:
        loc = [str(p) for p in errors[0].get("loc", ()) if p != "body"]
        return loc[0] if loc else None
    return None


def install_error_handlers(app: FastAPI) -> None:
    async def handle(_: Request, exc: Exception) -> JSONResponse:
        return to_response(exc)

    for exc_type, _ in ERROR_TABLE:
        app.add_exception_handler(exc_type, handle)
