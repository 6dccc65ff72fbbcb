"""One table from exception type to HTTP status and OpenAI error JSON.

The shape matches vLLM's own ``ErrorResponse`` (``{"error": {"message",
"type", "param", "code"}}`` with ``code`` the HTTP status), so a client sees
one error format whether memserve or vLLM refused the request. Every
exception ends here, including the ones vLLM's serving layer raises instead of
returning (they are classified by vLLM's own ``create_error_response``): an
unhandled exception would otherwise become a plain-text 500 and drop the
client's keep-alive connection.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from memories.artifact import ArtifactError

log = logging.getLogger("memserve.errors")


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


class TooLarge(MemserveError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class UnsupportedMediaType(MemserveError):
    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


class Unavailable(MemserveError):
    status = HTTPStatus.SERVICE_UNAVAILABLE

    def __init__(self, message: str, param: str | None = None, retry_after: int | None = None):
        super().__init__(message, param)
        self.retry_after = retry_after


def no_weight(name: str, kind: str) -> BadRequest:
    """``memory_weight`` for a memory that is not mixed in (a lora memory): the same refusal on requests and admin loads."""
    return BadRequest(f"memory_weight applies only to decoder memories; {name!r} is a {kind} memory, which has no weight", "memory_weight")


ERROR_TYPES = {
    HTTPStatus.BAD_REQUEST: "BadRequestError",
    HTTPStatus.UNAUTHORIZED: "AuthenticationError",
    HTTPStatus.NOT_FOUND: "NotFoundError",
    HTTPStatus.METHOD_NOT_ALLOWED: "MethodNotAllowedError",
    HTTPStatus.CONFLICT: "ConflictError",
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "RequestTooLargeError",
    HTTPStatus.UNSUPPORTED_MEDIA_TYPE: "UnsupportedMediaTypeError",
    HTTPStatus.UNPROCESSABLE_ENTITY: "UnprocessableEntityError",
    HTTPStatus.SERVICE_UNAVAILABLE: "ServiceUnavailableError",
}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    status = HTTPStatus(status)
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "InternalServerError"), "param": param, "code": int(status)}}


def error_json(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=int(status), headers=headers)


def _memserve(exc: MemserveError) -> JSONResponse:
    retry = getattr(exc, "retry_after", None)
    return error_json(exc.status, str(exc), exc.param, {"Retry-After": str(retry)} if retry else None)


def _validation(exc: ValidationError | RequestValidationError) -> JSONResponse:
    parts, param = [], None
    for e in exc.errors():
        loc = [str(p) for p in e.get("loc", ())]
        if loc and isinstance(exc, RequestValidationError) and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]  # FastAPI names where the value came from first
        param = param or (loc[0] if loc else None)
        parts.append(f"{'.'.join(loc)}: {e.get('msg')}" if loc else str(e.get("msg")))
    return error_json(HTTPStatus.BAD_REQUEST, "invalid request: " + "; ".join(parts), param)


def _http(exc: HTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    return error_json(exc.status_code, message, headers=getattr(exc, "headers", None))


def _vllm(exc: Exception) -> JSONResponse:
    """vLLM's classification: its validation errors and ValueError/TypeError/OverflowError are 400s."""
    from server.engine.vllm_openai import create_error_response

    err = create_error_response(exc).error
    if err.code >= 500:
        log.error("request failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return JSONResponse({"error": err.model_dump()}, status_code=err.code)


# exception type → response; first match wins
ERROR_TABLE: list[tuple[type[BaseException], object]] = [
    (MemserveError, _memserve),
    (ArtifactError, lambda e: error_json(HTTPStatus.BAD_REQUEST, str(e))),
    (json.JSONDecodeError, lambda e: error_json(HTTPStatus.BAD_REQUEST, f"request body is not valid JSON: {e}")),
    (ValidationError, _validation),
    (RequestValidationError, _validation),
    (HTTPException, _http),
    (Exception, _vllm),
]


def to_response(exc: BaseException) -> JSONResponse:
    for exc_type, respond in ERROR_TABLE:
        if isinstance(exc, exc_type):
            return respond(exc)
    raise exc


def install_error_handlers(app: FastAPI, on_engine_dead=None) -> None:
    """Route every exception through the table; ``on_engine_dead`` is told when the engine is gone."""
    from server.engine.vllm_openai import EngineDeadError

    async def handle(_: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, EngineDeadError) and on_engine_dead is not None:
            on_engine_dead()
            return error_json(HTTPStatus.SERVICE_UNAVAILABLE, "the inference engine has stopped; this server is shutting down")
        return to_response(exc)

    from server.engine.vllm_openai import VLLMError

    # Starlette gives a handler for ``Exception`` itself only to its outermost
    # middleware, which logs a traceback and closes the connection after
    # answering: name the usual types so they are answered in place.
    common = (ValueError, TypeError, ArithmeticError, LookupError, RuntimeError, AttributeError, AssertionError, OSError, VLLMError)
    for exc_type in [t for t, _ in ERROR_TABLE] + list(common):
        app.add_exception_handler(exc_type, handle)
