"""Admin routes: load, replace, list and unload memories on a running server.

Protected by ``Authorization: Bearer <admin token>`` (constant-time compare).
With no token configured the routes do not exist (404), unless the operator
asked for ``--admin-insecure-local`` on a loopback-only server.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse

from server.api.auth import require_bearer
from server.api.openapi import ERROR_RESPONSES, request_body
from server.protocol import LoadRequest, read_json_object
from server.serving.catalog import MemoryCatalog
from server.errors import BadRequest, no_weight
from server.serving.generation import MemoryGeneration

MAX_ROUTING_PROMPTS = 1000
ADMIN_ERRORS = {**ERROR_RESPONSES, 409: {**ERROR_RESPONSES[400], "description": "a memory of that name is loaded (without replace), or a limit is reached"}}


def install_admin(app: FastAPI, catalog: MemoryCatalog, base_name: str, token: str | None, insecure_local: bool, generation: MemoryGeneration | None = None) -> None:
    if token is None and not insecure_local:
        return  # routes absent: 404
    router = APIRouter(prefix="/admin")

    async def authorize(raw_request: Request) -> None:
        """Check the token, then converge on the store: admin calls see every replica's changes."""
        require_bearer(raw_request, token, "admin routes need 'Authorization: Bearer <admin token>'")
        await catalog.reconcile()

    @router.get("/memories")
    async def list_memories(raw_request: Request) -> JSONResponse:
        await authorize(raw_request)
        await catalog.refresh_cache_bytes()
        return JSONResponse({
            "object": "list",
            "data": [m.describe() for m in catalog.all()],
            "problems": dict(catalog.problems),
            "limits": {"max_memories": catalog.max_memories, "budget_bytes": catalog.budget_bytes, "max_loras": catalog.max_loras, "max_lora_rank": catalog.max_lora_rank},
            "generator": generation.describe() if generation else None,
        })  # fmt: skip

    @router.post("/memories", status_code=201, openapi_extra=request_body(LoadRequest), responses=ADMIN_ERRORS)
    async def load_memory(raw_request: Request) -> JSONResponse:
        await authorize(raw_request)
        req = LoadRequest.model_validate(await read_json_object(raw_request))
        if req.name == base_name:
            raise BadRequest(f"{req.name!r} is the base model's id", "name")
        if catalog.store is None:
            raise BadRequest("this server was started without --memory-root; admin loads are off", "path")
        if req.prompts is not None:
            if generation is None:
                raise BadRequest("this server has no generator (start it with --generator DIR and LoRA on); load a path instead", "prompts")
            if req.memory_weight is not None:
                raise no_weight(req.name, "lora")
            card = await generation.create(req.name, req.prompts, replace=req.replace, description=req.description)
            return JSONResponse(card, status_code=201)
        path = catalog.store.resolve(req.path)
        if req.routing_prompts is not None:
            from memories.lora.generate import PromptError, validate_prompts

            try:
                validate_prompts(req.routing_prompts, max_count=MAX_ROUTING_PROMPTS)
            except PromptError as e:
                raise BadRequest(f"routing_prompts: {e}", "routing_prompts") from None
        loaded = await catalog.load_dir(req.name, str(path), req.memory_weight, replace=req.replace, routing_prompts=req.routing_prompts)
        return JSONResponse(loaded.describe(), status_code=201)

    @router.delete("/memories/{name}")
    async def unload_memory(name: str, raw_request: Request, timeout: float | None = Query(None, ge=0, le=3600, allow_inf_nan=False)) -> JSONResponse:
        """``timeout``: seconds to wait for running requests before ending them (default --unload-timeout)."""
        await authorize(raw_request)
        start = time.perf_counter()
        loaded, drained = await catalog.unload(name, timeout=timeout)
        return JSONResponse({"name": name, "status": "unloaded", "freed_bytes": loaded.device_bytes, "drained": drained, "seconds": round(time.perf_counter() - start, 3)})

    app.include_router(router)
