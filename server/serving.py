"""Serving objects: memserve's additions around vLLM's own OpenAI serving classes.

vLLM already does chat templates, tool calls, logprobs formats, streaming
chunks and usage. This layer only reads the body once, resolves the memory
(``server.selection``), hands vLLM a validated request whose ``vllm_xargs``
carry the memory to the fusion processor, and counts per-memory usage.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from vllm.entrypoints.generate.base.protocol import StreamOptions
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse, ModelCard

from server import metrics
from server.catalog import MemoryCatalog
from server.errors import BadRequest, Unavailable
from server.selection import Selection, select_memory


async def read_json_object(raw_request: Request) -> dict[str, Any]:
    content_type = raw_request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise BadRequest(f"Content-Type must be application/json, got {content_type!r}")
    body = json.loads(await raw_request.body())
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    return body


class CompletionsServing:
    """``/v1/completions`` and ``/v1/chat/completions`` with per-request memories."""

    def __init__(self, state, catalog: MemoryCatalog, base_name: str):
        self.state = state
        self.catalog = catalog
        self.base_name = base_name

    async def chat(self, body: dict[str, Any], raw_request: Request) -> Response:
        return await self._generate(body, raw_request, ChatCompletionRequest, self.state.openai_serving_chat.create_chat_completion)

    async def completion(self, body: dict[str, Any], raw_request: Request) -> Response:
        return await self._generate(body, raw_request, CompletionRequest, self.state.openai_serving_completion.create_completion)

    async def _generate(self, body: dict[str, Any], raw_request: Request, request_cls, handler) -> Response:
        selection = select_memory(body, raw_request.headers, self.catalog, self.base_name)
        request = request_cls.model_validate(body)
        label = selection.memory.name if selection else metrics.BASE_LABEL
        metrics.REQUESTS.labels(label).inc()
        if selection is None:
            return await self._respond(await handler(request, raw_request), request, None, label, False)

        memory = selection.memory
        request.vllm_xargs = {**(request.vllm_xargs or {}), **selection.engine_args()}
        hide_usage = False
        if request.stream and not (request.stream_options and request.stream_options.include_usage):
            # usage is how we count the memory's tokens; the client did not ask for it
            request.stream_options = StreamOptions(include_usage=True)
            hide_usage = True
        memory.acquire()
        try:
            work = asyncio.ensure_future(handler(request, raw_request))
            evicted = asyncio.ensure_future(memory.evicted.wait())
            await asyncio.wait([work, evicted], return_when=asyncio.FIRST_COMPLETED)
            evicted.cancel()
            if not work.done():
                work.cancel()
                raise Unavailable(_evicted_message(memory.name), "domain")
            response = await self._respond(work.result(), request, selection, label, hide_usage)
        except BaseException:
            memory.release()
            raise
        if not isinstance(response, StreamingResponse):
            memory.release()
        return response

    async def _respond(self, result, request, selection: Selection | None, label: str, hide_usage: bool) -> Response:
        if isinstance(result, ErrorResponse):
            return JSONResponse(result.model_dump(), status_code=result.error.code)
        if not request.stream:
            if result.usage is not None:
                self._count(selection, label, result.usage.prompt_tokens, result.usage.completion_tokens or 0)
            return JSONResponse(result.model_dump())
        return StreamingResponse(self._stream(result, selection, label, hide_usage), media_type="text/event-stream")

    async def _stream(self, chunks, selection: Selection | None, label: str, hide_usage: bool):
        memory = selection.memory if selection else None
        try:
            async for chunk in chunks:
                if memory is not None and memory.evicted.is_set():
                    error = {"error": {"message": _evicted_message(memory.name), "type": "ServiceUnavailableError", "param": "domain", "code": 503}}
                    yield f"data: {json.dumps(error)}\n\n"
                    break
                if selection and '"usage"' in chunk and chunk.startswith("data: {"):
                    data = json.loads(chunk[len("data: ") :])
                    usage = data.get("usage")
                    if usage and not data.get("choices"):
                        self._count(selection, label, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
                        if hide_usage:
                            continue
                yield chunk
        finally:
            await chunks.aclose()  # an early exit aborts the engine request
            if memory is not None:
                memory.release()

    @staticmethod
    def _count(selection: Selection | None, label: str, prompt: int, completion: int) -> None:
        metrics.record_usage(label, prompt, completion)
        if selection:
            selection.memory.prompt_tokens += prompt
            selection.memory.completion_tokens += completion


class ModelsServing:
    def __init__(self, state, catalog: MemoryCatalog, base_name: str):
        self.state = state
        self.catalog = catalog
        self.base_name = base_name

    async def list(self) -> dict:
        models = await self.state.openai_serving_models.show_available_models()
        for memory in self.catalog.all():
            models.data.append(
                ModelCard(id=memory.name, root=memory.card.path, parent=self.base_name, owned_by="memserve", max_model_len=models.data[0].max_model_len)
            )
        return models.model_dump()


def _evicted_message(name: str) -> str:
    return f"memory {name!r} was unloaded while this request ran and its drain timeout passed; retry with another memory"
