"""Which memory a request selects, and with what weight (docs/CONTRACT.md, "Request contract").

Three spellings name a memory: body ``domain``, header ``X-Domain``, or
``model`` set to a memory's name (so a stock OpenAI client needs nothing
extra). They must agree. ``memory_weight`` overrides the memory's own λ.
The body fields are declared in server/protocol.py (``MemoryFields``).
``domain`` may also be a mixture (``select_mixture``): an object of names to
weights, or a list of names, each decoder memory with its own λ.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from server import protocol
from memories.fuse import check_weights
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
    others: tuple[tuple[LoadedMemory, float], ...] = ()  # a mixture's further memories and weights, in the request's order

    @property
    def parts(self) -> tuple[tuple[LoadedMemory, float], ...]:
        return ((self.memory, self.weight), *self.others)

    @property
    def memories(self) -> list[LoadedMemory]:
        return [m for m, _ in self.parts]

    @property
    def label(self) -> str:
        """What the response header and the log line name: a memory's name, or a mixture's ``name=λ`` list."""
        if not self.others:
            return self.memory.name
        return ", ".join(f"{m.name}={w:g}" if m.card.kind == "decoder" else m.name for m, w in self.parts)

    def engine_args(self) -> dict[str, Any]:
        """The ``vllm_xargs`` entries the engine-side code reads (none for a lora memory: vLLM applies it)."""
        if not self.others:
            if self.memory.card.kind == "lora":
                return {}
            if self.memory.card.kind == "calm":
                return {keys.CALM_MEMORY: self.memory.key}
            return keys.decoder_args(self.memory.key, self.weight, self.memory.card.temperature)
        args: dict[str, Any] = {keys.CALM_MEMORY: m.key for m in self.memories if m.card.kind == "calm"}
        decoders = [(m, w) for m, w in self.parts if m.card.kind == "decoder"]
        if decoders:
            args.update(keys.mixture_args([m.key for m, _ in decoders], [w for _, w in decoders], [m.card.temperature for m, _ in decoders]))
        return args


def memory_cache_salt(memory_keys: list[str], salt: Any) -> str:
    """A prefix-cache salt of the request's own for rows of calm and decoder memories (versioned keys, in the request's order).

    A calm memory changes the base's keys and values from its first connected
    layer on, and a decoder memory keeps its own keys and values in the
    blocks of its rows (lane k for a request's k-th decoder memory), so such
    rows must never share cached prompt blocks with base rows or with rows of
    other memories; they do share them with rows of the same memories. A
    client's own salt is kept (folded into ours), and a malformed one still
    reaches vLLM's check.
    """
    if salt is not None and not isinstance(salt, str):
        return salt
    return "memserve-" + hashlib.sha256("\0".join([*memory_keys, salt or ""]).encode()).hexdigest()[:32]


def select_memory(body: dict[str, Any], headers: Mapping[str, str], catalog: MemoryCatalog, base_name: str) -> Selection | None:
    """Resolve and remove memserve's fields from ``body``; point ``model`` at the base; salt the prefix cache for calm and decoder memories.

    Raises ``BadRequest`` (400) for conflicting or malformed selections and
    ``UnknownMemory`` (404) for a name that is not loaded.
    """
    selection = _select(body, headers, catalog, base_name)
    salted = [m.key for m in selection.memories if m.card.kind in ("calm", "decoder")] if selection is not None else []
    if salted:
        body["cache_salt"] = memory_cache_salt(salted, body.get("cache_salt"))
    return selection


def _select(body: dict[str, Any], headers: Mapping[str, str], catalog: MemoryCatalog, base_name: str) -> Selection | None:
    headers = route_auto(body, headers, catalog, base_name)  # "auto": the routed memory's name, or none (server/serving/routing.py)
    fields = protocol.pop_memory_fields(body)
    domain, weight = fields["domain"], fields["memory_weight"]
    xargs = body.get("vllm_xargs")
    if isinstance(xargs, dict):  # clients cannot address the engine directly
        body["vllm_xargs"] = {k: v for k, v in xargs.items() if not str(k).startswith(keys.PREFIX)} or None
    if isinstance(domain, (dict, list)):
        return select_mixture(domain, weight, body, headers, catalog, base_name)
    from_body = protocol.memory_name(domain, "domain")
    from_header = protocol.memory_name(headers.get(HEADER), "X-Domain header")

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
    if memory.card.kind == "calm" and weight is not None:
        raise no_weight(name, "calm")
    return Selection(memory, memory.card.weight if weight is None else protocol.memory_weight(weight), model if isinstance(model, str) and model else base_name)


def select_mixture(domain: dict | list, weight: Any, body: dict[str, Any], headers: Mapping[str, str], catalog: MemoryCatalog, base_name: str) -> Selection:
    """``domain`` as a mixture: ``{"name": λ, ...}`` or ``["name", ...]`` (each decoder memory's own λ; ``null`` in an object too).

    Decoder memories fuse together, their weights summing to at most 1; a lora
    or calm memory changes the base itself, so at most one of them, with any
    number of decoder memories fused on top. A mixture of one name is that
    memory, selected as a plain ``domain`` would select it. Refusals: 400 with
    ``param`` ``domain`` (malformed, a name twice, two base-changing memories,
    a weight for a lora or calm memory, weights out of range or above 1 in
    sum), 400 ``memory_weight`` (given with an object, or with a list of
    several), 404 for a name not loaded, 503 for one still loading here.
    """
    entries = _mixture_entries(domain)
    if weight is not None and (isinstance(domain, dict) or len(entries) > 1):
        raise BadRequest("memory_weight cannot be combined with a mixture: give each memory's weight in the domain object", "memory_weight")
    if len(entries) == 1:  # just that memory
        name, value = entries[0]
        body["domain"] = name
        if value is not None or weight is not None:
            body["memory_weight"] = value if value is not None else weight
        return _select(body, headers, catalog, base_name)
    from_header = protocol.memory_name(headers.get(HEADER), "X-Domain header")
    model = body.get("model")
    if isinstance(model, str) and model and model != base_name and catalog.get(model) is None and not catalog.is_desired(model):
        known = ", ".join([base_name, *catalog.names()])
        raise UnknownMemory(f"model {model!r} does not exist; this server serves: {known}", "model")
    for source, named in (("X-Domain", from_header), ("model", model if isinstance(model, str) and model != base_name else None)):
        if named:
            raise BadRequest(f"domain is a mixture of {', '.join(n for n, _ in entries)}; {source}={named!r} names another selection (give the mixture alone, model = the base)", "domain")

    parts: list[tuple[LoadedMemory, float]] = []
    for name, value in entries:
        memory = catalog.get(name)
        if memory is None and catalog.is_desired(name):
            raise Unavailable(f"memory {name!r} is in the store but not loaded on this replica yet; retry shortly", "domain", retry_after=catalog.retry_after)
        if memory is None:
            loaded = ", ".join(catalog.names()) or "none"
            raise UnknownMemory(f"memory {name!r} is not loaded (loaded: {loaded})", "domain")
        kind = memory.card.kind
        if kind != "decoder" and value is not None:
            raise BadRequest(f"{name!r} is a {kind} memory, which has no weight: list it with null (or in a list of names); only decoder memories are weighted", "domain")
        parts.append((memory, memory.card.weight if value is None else value))
    changing = [m for m, _ in parts if m.card.kind != "decoder"]
    if len(changing) > 1:
        names = " and ".join(f"{m.name!r} ({m.card.kind})" for m in changing)
        raise BadRequest(
            f"memories {names} both change the base model itself (lora and calm memories are not mixed by weight): "
            "a request may combine at most one lora or calm memory with any number of decoder memories",
            "domain",
        )
    decoder_weights = [w for m, w in parts if m.card.kind == "decoder"]
    try:
        check_weights(decoder_weights)
    except ValueError:
        listed = ", ".join(f"{m.name}={w:g}" for m, w in parts if m.card.kind == "decoder")
        raise BadRequest(
            f"decoder memory weights must sum to at most 1 (the base keeps 1 - their sum), got {listed} (sum {sum(decoder_weights):.6g})"
            + ("; give smaller weights in an object" if isinstance(domain, list) else ""),
            "domain",
        ) from None
    if len(decoder_weights) > catalog.mixture_size:
        raise BadRequest(
            f"a request may fuse at most {catalog.mixture_size} decoder memories (the server's --mixture-size), got {len(decoder_weights)}", "domain"
        )
    for memory in changing:
        if memory.card.kind == "lora":
            body["model"] = memory.key  # vLLM's serving classes attach the adapter registered under this key
    (first, first_weight), *others = parts
    return Selection(first, first_weight, base_name, tuple(others))


def _mixture_entries(domain: dict | list) -> list[tuple[str, float | None]]:
    """A mixture's ``(name, weight or None)`` in the request's order; 400 (``param`` domain) for a malformed one."""
    if isinstance(domain, dict):
        items = list(domain.items())
    else:
        for value in domain:
            if not isinstance(value, str):
                raise BadRequest(f"a domain list names memories: strings, got {type(value).__name__} {value!r}", "domain")
        items = [(value, None) for value in domain]
    if not items:
        raise BadRequest("domain is an empty mixture: name at least one memory, or leave domain out for the base alone", "domain")
    entries: list[tuple[str, float | None]] = []
    for name, value in items:
        name = name.strip()
        if name.lower() in protocol.NO_MEMORY:
            raise BadRequest(f"a mixture names memories; {name!r} is not one (leave domain out for the base alone)", "domain")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value <= 1.0):
            raise BadRequest(f"the weight of {name!r} in domain must be a number in [0, 1] (or null for its own), got {value!r}", "domain")
        entries.append((name, None if value is None else float(value)))
    names = [n for n, _ in entries]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise BadRequest(f"domain names {', '.join(map(repr, dupes))} more than once", "domain")
    return entries
