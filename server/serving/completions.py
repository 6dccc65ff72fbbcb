"""Serving objects: memserve's additions around vLLM's own OpenAI serving classes.

vLLM already does chat templates, tool calls, logprobs formats, streaming
chunks and usage. This layer only reads the body once, resolves the memory
(``server.serving.selection``), applies the server's request limits, hands vLLM a
validated request whose ``vllm_xargs`` carry the memory to the fusion
processor, names the memory in the response, and counts per-memory usage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from server.engine.vllm_openai import ChatCompletionRequest, CompletionRequest, ErrorResponse, ModelCard, StreamOptions

from server import metrics
from server.config import RequestLimits
from server.serving.catalog import MemoryCatalog
from server.errors import BadRequest, Unavailable, error_body
from server.serving import routing
from server.serving.selection import Selection, select_memory

log = logging.getLogger("memserve.requests")

MEMORY_HEADER = "X-Memserve-Memory"  # on every response: the memory that served it, a mixture's "name=λ, ..." list, or "none"


class CompletionsServing:
    """``/v1/completions`` and ``/v1/chat/completions`` with per-request memories."""

    def __init__(self, state, catalog: MemoryCatalog, base_name: str, limits: RequestLimits = RequestLimits()):
        self.state = state
        self.catalog = catalog
        self.base_name = base_name
        self.limits = limits

    async def chat(self, body: dict[str, Any], raw_request: Request) -> Response:
        return await self._generate(body, raw_request, ChatCompletionRequest, self.state.openai_serving_chat.create_chat_completion)

    async def completion(self, body: dict[str, Any], raw_request: Request) -> Response:
        return await self._generate(body, raw_request, CompletionRequest, self.state.openai_serving_completion.create_completion)

    async def _generate(self, body: dict[str, Any], raw_request: Request, request_cls, handler) -> Response:
        started = time.perf_counter()
        selection = select_memory(body, raw_request.headers, self.catalog, self.base_name)
        path = _routed_path(raw_request.url.path, routing.take())  # what the request log line names
        request = _validate(request_cls, body)
        self._check_limits(request, selection)
        if selection is None:
            result = await handler(request, raw_request)
            return self._respond(result, request, None, path, started, False)

        memories = selection.memories  # one, or a mixture's
        request.vllm_xargs = {**(request.vllm_xargs or {}), **selection.engine_args()} or None
        hide_usage = False
        if request.stream and not (request.stream_options and request.stream_options.include_usage):
            # usage is how we count the memory's tokens; the client did not ask for it
            request.stream_options = StreamOptions(include_usage=True)
            hide_usage = True
        rows = _rows(request)
        _acquire(memories, rows)
        work = asyncio.ensure_future(handler(request, raw_request))
        unloaded = [asyncio.ensure_future(memory.unloaded.wait()) for memory in memories]
        try:
            await asyncio.wait([work, *unloaded], return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                raise Unavailable(_unloaded_message(next(m.name for m in memories if m.unloaded.is_set())), "domain")
            response = self._respond(work.result(), request, selection, path, started, hide_usage)
        except BaseException:
            _release(memories, rows)
            raise
        finally:
            # also on cancellation (the client went away): the engine request ends with the task
            for waiter in unloaded:
                waiter.cancel()
            work.cancel()
        if not isinstance(response, StreamingResponse):
            _release(memories, rows)
        return response

    def _check_limits(self, request, selection: Selection | None) -> None:
        n = _choices(request)
        if n > self.limits.max_n:
            raise BadRequest(f"n = {n} is above this server's limit of {self.limits.max_n} choices per request (--max-n)", "n")
        reading = [m for m in selection.memories if m.card.kind != "lora"] if selection is not None else []
        if reading and getattr(request, "prompt_embeds", None) is not None:
            raise BadRequest(f"prompt_embeds cannot be combined with a {reading[0].card.kind} memory: the memory reads token ids", "prompt_embeds")

    def _respond(self, result, request, selection: Selection | None, route: str, started: float, hide_usage: bool) -> Response:
        label = selection.label if selection else metrics.BASE_LABEL
        headers = {MEMORY_HEADER: label}
        if isinstance(result, ErrorResponse):
            log.info("%s %d memory=%s: %s", route, result.error.code, label, result.error.message)
            return JSONResponse(result.model_dump(), status_code=result.error.code, headers=headers)
        for name in [m.name for m in selection.memories] if selection else [metrics.BASE_LABEL]:
            metrics.REQUESTS.labels(name).inc()  # each memory of a mixture counts the request
        if not request.stream:
            if selection is not None:
                result.model = selection.model_id
            usage = result.usage
            prompt, completion = (usage.prompt_tokens, usage.completion_tokens or 0) if usage else (0, 0)
            self._count(selection, label, prompt, completion)
            _log_done(route, label, prompt, completion, started)
            return JSONResponse(result.model_dump(), headers=headers)
        stream = self._stream(result, selection, label, route, started, hide_usage, _rows(request))
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)

    async def _stream(self, chunks, selection: Selection | None, label: str, route: str, started: float, hide_usage: bool, rows: int = 1):
        memories = selection.memories if selection else []
        prompt = completion = 0
        try:
            async for chunk in chunks:
                if gone := [m for m in memories if m.unloaded.is_set()]:
                    yield f"data: {json.dumps(error_body(503, _unloaded_message(gone[0].name), 'domain'))}\n\n"
                    break
                if selection is None or not chunk.startswith("data: {"):
                    yield chunk
                    continue
                data = json.loads(chunk[len("data: ") :])
                data["model"] = selection.model_id
                usage = data.get("usage")
                if usage and not data.get("choices"):
                    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
                    self._count(selection, label, prompt, completion)
                    if hide_usage:
                        continue
                yield f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
        finally:
            try:
                _release(memories, rows)
            finally:
                await chunks.aclose()  # an early exit aborts the engine request
            _log_done(route, label, prompt, completion, started)

    @staticmethod
    def _count(selection: Selection | None, label: str, prompt: int, completion: int) -> None:
        if not selection:
            metrics.record_usage(label, prompt, completion)
            return
        for memory in selection.memories:  # a mixture's tokens count for each of its memories
            metrics.record_usage(memory.name, prompt, completion)
            memory.prompt_tokens += prompt
            memory.completion_tokens += completion


def _acquire(memories, rows: int) -> None:
    """Count the request on every memory it uses; if one refuses (a calm memory's row budget), undo the others."""
    done = []
    try:
        for memory in memories:
            memory.acquire(rows)
            done.append(memory)
    except BaseException:
        _release(done, rows)
        raise


def _release(memories, rows: int) -> None:
    for memory in memories:
        memory.release(rows)


def _validate(request_cls, body: dict[str, Any]):
    """vLLM's request model; its validators can fail on odd shapes with any exception, and each is the body's fault.

    vLLM's own class, not server/protocol.py's subclass of it: memserve's fields are
    gone by now, and vLLM's refusals keep vLLM's wording.
    """
    try:
        return request_cls.model_validate(body)
    except ValidationError:
        raise
    except Exception as e:
        raise BadRequest(f"invalid request: {type(e).__name__}: {e}") from None


def _rows(request) -> int:
    """Engine rows a request runs: its choices (n, best_of) for each of its prompts (a completion may carry several)."""
    prompt = getattr(request, "prompt", None)
    several = isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list))
    return _choices(request) * (len(prompt) if several else 1)


def _choices(request) -> int:
    return max(getattr(request, "n", None) or 1, getattr(request, "best_of", None) or 1)


def _routed_path(path: str, routed: routing.Routed | None) -> str:
    """The request's path for its log line; a routed request says so: ``/v1/completions (routed: auto → bio)``."""
    return path if routed is None else f"{path} (routed: auto → {routed.memory or metrics.BASE_LABEL})"


def _log_done(route: str, label: str, prompt: int, completion: int, started: float) -> None:
    log.info("%s 200 memory=%s prompt_tokens=%d completion_tokens=%d %.2fs", route, label, prompt, completion, time.perf_counter() - started)


class ModelsServing:
    def __init__(self, state, catalog: MemoryCatalog, base_name: str):
        self.state = state
        self.catalog = catalog
        self.base_name = base_name

    async def list(self) -> dict:
        models = await self.state.openai_serving_models.show_available_models()
        # vLLM lists the adapters it holds under their engine keys; the catalog lists them by name below
        models.data = [card for card in models.data if card.id not in self.state.openai_serving_models.lora_requests]
        for card in models.data:
            card.root = card.id  # vLLM puts the base's directory here; clients need no server paths
        routable = {}
        for memory in self.catalog.all():
            models.data.append(
                ModelCard(id=memory.name, root=memory.name, parent=self.base_name, owned_by="memserve", max_model_len=models.data[0].max_model_len)
            )
            routable[memory.name] = memory.profile is not None
        listing = models.model_dump()
        for card in listing["data"]:  # memory cards: whether domain "auto" can pick it (it has a routing profile)
            if card["id"] in routable:
                card["routable"] = routable[card["id"]]
        return listing


def _unloaded_message(name: str) -> str:
    return f"memory {name!r} was unloaded while this request ran and its drain timeout passed; retry with another memory"
