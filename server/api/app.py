"""HTTP routes. Thin: parse, call a serving object, return; errors go through server.errors."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.auth import require_bearer
from server.errors import install_error_handlers
from server.api.lifecycle import Lifecycle
from server.api.openapi import ERROR_RESPONSES, install_openapi, request_body
from server.config import RequestLimits
from server.protocol import ChatCompletionRequest, CompletionRequest, read_json_object
from server.serving.completions import CompletionsServing, ModelsServing


def create_app(engine, catalog, base_name: str, lifecycle: Lifecycle, api_key: str | None = None, limits: RequestLimits = RequestLimits()) -> FastAPI:
    """The app; ``app.state`` must then be filled by vLLM's ``init_app_state``."""
    app = FastAPI(title="memserve", description="OpenAI-compatible server with per-request memories")
    install_error_handlers(app, on_engine_dead=lifecycle.engine_dead)
    install_openapi(app)
    completions = CompletionsServing(app.state, catalog, base_name, limits)
    models = ModelsServing(app.state, catalog, base_name)

    def check_api_key(raw_request: Request) -> None:
        require_bearer(raw_request, api_key, "missing or wrong API key (Authorization: Bearer <key>)")

    @app.post("/v1/chat/completions", openapi_extra=request_body(ChatCompletionRequest), responses=ERROR_RESPONSES)
    async def chat_completions(raw_request: Request) -> Response:
        check_api_key(raw_request)
        body = await read_json_object(raw_request, limits.max_request_bytes)
        return await _cancel_on_disconnect(completions.chat(body, raw_request), raw_request)

    @app.post("/v1/completions", openapi_extra=request_body(CompletionRequest), responses=ERROR_RESPONSES)
    async def text_completions(raw_request: Request) -> Response:
        check_api_key(raw_request)
        body = await read_json_object(raw_request, limits.max_request_bytes)
        return await _cancel_on_disconnect(completions.completion(body, raw_request), raw_request)

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def list_models(raw_request: Request) -> JSONResponse:
        check_api_key(raw_request)
        return JSONResponse(await models.list())

    async def engine_status() -> Response:
        """Open to anyone, so it names memories but never paths or error details."""
        if lifecycle.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        try:
            await engine.check_health()
        except Exception:
            return JSONResponse({"status": "unhealthy", "error": "the inference engine is not running"}, status_code=503)
        return JSONResponse({"status": "ok", "memories": catalog.names(), "problems": sorted(catalog.problems)})

    @app.get("/health")
    async def health() -> Response:
        return await engine_status()

    @app.get("/ready")
    async def ready() -> Response:
        """The same check as /health: the server listens only once the persisted memory set is loaded."""
        return await engine_status()

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _cancel_on_disconnect(work, raw_request: Request) -> Response:
    """Abort the engine request when the client goes away before a non-streamed answer.

    The body has been read already, so listening for the disconnect message
    loses nothing; a streamed answer watches for disconnects itself.
    Cancelling ``task`` cancels the serving coroutine, which cancels the
    engine request it awaits.
    """
    from server.engine.vllm_openai import listen_for_disconnect

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(listen_for_disconnect(raw_request))
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    return Response(status_code=499)
