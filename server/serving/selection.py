"""Which memory a request selects, and with what weight (docs/CONTRACT.md, "Request contract").

Three spellings name a memory: body ``domain``, header ``X-Domain``, or
``model`` set to a memory's name (so a stock OpenAI client needs nothing
extra). They must agree. ``memory_weight`` overrides the memory's own λ.
The body fields are declared in server/api/protocol.py (``MemoryFields``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from server.api import protocol
from server.engine import keys
from server.serving.catalog import LoadedMemory, MemoryCatalog
from server.serving.routing import route_auto
from server.errors import BadRequest, Unavailable, UnknownMemory, no_weight

HEADER = "x-domain"


@dataclass(frozen=True)
class Selection:
    memory: LoadedMemory
    weight: float
    model_id: str  # what responses report as "model": the id the client asked for

    def engine_args(self) -> dict[str, Any]:
        """The ``vllm_xargs`` entries the engine-side code reads (none for a lora memory: vLLM applies it)."""
        if self.memory.card.kind == "lora":
            return {}
        if self.memory.card.kind == "calm":
            return {keys.CALM_MEMORY: self.memory.key}
        return keys.decoder_args(self.memory.key, self.weight, self.memory.card.temperature)


def calm_cache_salt(key: str, salt: Any) -> str:
    """A prefix-cache salt of the request's own for a calm memory's rows.

    A calm memory changes the base's keys and values from its first connected
    layer on, so its rows must never share cached prompt blocks with base rows
    or with another memory's; they do share them with each other. A client's
    own salt is kept (folded into ours), and a malformed one still reaches
    vLLM's check.
    """
    if salt is not None and not isinstance(salt, str):
        return salt
    return "memserve-calm-" + hashlib.sha256(f"{key}\0{salt or ''}".encode()).hexdigest()[:32]


def select_memory(body: dict[str, Any], headers: Mapping[str, str], catalog: MemoryCatalog, base_name: str) -> Selection | None:
    """Resolve and remove memserve's fields from ``body``; point ``model`` at the base.

    Raises ``BadRequest`` (400) for conflicting or malformed selections and
    ``UnknownMemory`` (404) for a name that is not loaded.
    """
    headers = route_auto(body, headers, catalog, base_name)  # "auto": the routed memory's name, or none (server/serving/routing.py)
    fields = protocol.pop_memory_fields(body)
    from_body = protocol.memory_name(fields["domain"], "domain")
    from_header = protocol.memory_name(headers.get(HEADER), "X-Domain header")
    weight = fields["memory_weight"]
    xargs = body.get("vllm_xargs")
    if isinstance(xargs, dict):  # clients cannot address the engine directly
        body["vllm_xargs"] = {k: v for k, v in xargs.items() if not str(k).startswith(keys.PREFIX)} or None

    model = body.get("model")
    from_model = None
    if isinstance(model, str) and model and model != base_name:
        if catalog.get(model) is None and not catalog.is_desired(model):
            known = ", ".join([base_name, *catalog.names()])
            raise UnknownMemory(f"model {model!r} does not exist; this server serves: {known}", "model")
        from_model = model
    named = {n for n in (from_body, from_header, from_model) if n}
    if len(named) > 1:
        sources = ", ".join(f"{src}={n!r}" for src, n in (("domain", from_body), ("X-Domain", from_header), ("model", from_model)) if n)
        raise BadRequest(f"request names different memories: {sources}", "domain")
    if from_model:
        body["model"] = base_name
    if not named:
        if weight is not None:
            raise BadRequest("memory_weight given but no memory selected (set domain, X-Domain or model)", "memory_weight")
        return None
    name = named.pop()
    memory = catalog.get(name)
    if memory is None and catalog.is_desired(name):
        raise Unavailable(f"memory {name!r} is in the store but not loaded on this replica yet; retry shortly", "domain", retry_after=catalog.retry_after)
    if memory is None:
        loaded = ", ".join(catalog.names()) or "none"
        raise UnknownMemory(f"memory {name!r} is not loaded (loaded: {loaded})", "domain")
    if memory.card.kind == "lora":
        if weight is not None:
            raise no_weight(name, "lora")
        body["model"] = memory.key  # vLLM's serving classes attach the adapter registered under this key
    if memory.card.kind == "calm":
        if weight is not None:
            raise no_weight(name, "calm")
        body["cache_salt"] = calm_cache_salt(memory.key, body.get("cache_salt"))
    return Selection(memory, memory.card.weight if weight is None else protocol.memory_weight(weight), model if isinstance(model, str) and model else base_name)
