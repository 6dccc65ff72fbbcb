"""``domain: "auto"``: the API process picks the memory a prompt belongs to, or none, before the engine sees it.

The scoring is ``memories.routing.Router`` over the loaded memories' profiles
(``routing.json``, or one made from an admin's ``routing_prompts``); this module
finds the text to route on, tokenizes it with the base's tokenizer, counts the
choice in ``/metrics`` and leaves the decision where the serving layer reads it
for the log line (:func:`take`).
"""

from __future__ import annotations

import contextvars
import logging
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

from memories.routing import Route
from server import metrics

AUTO = "auto"
HEADER = "x-domain"  # as selection reads it
TEXT_CHARS = 16_000  # the routed text's last this-many characters (the router itself reads the last MAX_ROUTING_TOKENS tokens)

log = logging.getLogger("memserve.routing")


@dataclass(frozen=True)
class Routed:
    memory: str | None  # the chosen memory, or None
    route: Route
    tokens: int  # token ids routed on


_last: contextvars.ContextVar[Routed | None] = contextvars.ContextVar("memserve_routed", default=None)


def take() -> Routed | None:
    """The routing decision of the request this task is serving (None: it was not routed), and forget it."""
    routed = _last.get()
    _last.set(None)
    return routed


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == AUTO


def route_auto(body: dict[str, Any], headers: Mapping[str, str], catalog, base_name: str) -> Mapping[str, str]:
    """Resolve ``"auto"`` in body ``domain`` / header ``X-Domain`` before selection reads them.

    ``body["domain"]`` becomes the routed memory's name or ``"none"``, and the returned headers
    (what selection reads next) lose ``X-Domain``. A request that also names a memory
    explicitly (``model`` or the other spelling) is served by that one: ``auto`` is dropped.
    With ``--default-domain auto`` (``catalog.default_domain``) a request that names nothing
    (no ``domain``, no ``X-Domain``, ``model`` the base) is routed too. ``memory_weight``
    applies only when a decoder memory is chosen. Anything else is returned unchanged.
    """
    _last.set(None)
    raw_body, raw_header = body.get("domain"), headers.get(HEADER)
    model = body.get("model")
    from_model = isinstance(model, str) and model != "" and model != base_name
    asked = [is_auto(v) for v in (raw_body, raw_header)]
    default = raw_body is None and raw_header is None and not from_model and getattr(catalog, "default_domain", "none") == AUTO
    if not (any(asked) or default):
        return headers
    rest = {k.lower(): v for k, v in headers.items() if k.lower() != HEADER}
    others = [v for v, auto in zip((raw_body, raw_header), asked) if not auto and v is not None]
    if others or from_model:  # named explicitly as well: that name decides (selection checks it)
        if asked[0]:
            body.pop("domain")
        if not asked[1] and raw_header is not None:
            rest[HEADER] = raw_header
        return rest
    routed = route_body(body, catalog)
    _last.set(routed)
    metrics.ROUTED.labels(routed.memory or metrics.BASE_LABEL).inc()
    body["domain"] = routed.memory or "none"
    memory = catalog.get(routed.memory) if routed.memory else None
    if memory is None or memory.card.kind != "decoder":
        body.pop("memory_weight", None)
    return rest


def route_body(body: dict[str, Any], catalog) -> Routed:
    router = catalog.router
    if len(router) == 0:
        return Routed(None, Route(None, {}, {}), 0)
    ids = prompt_ids(body, catalog.base_tokenizer)
    route = router.route(ids)
    return Routed(route.memory, route, len(ids))


def prompt_ids(body: dict[str, Any], tokenizer) -> list[int]:
    """The token ids to route on: a completion's ``prompt`` (text or ids, every prompt of a batch), or the text of a chat's user messages."""
    if "messages" in body:
        texts = [_content_text(m.get("content")) for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
        return _tokenize("\n".join(t for t in texts if t), tokenizer)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return _tokenize(prompt, tokenizer)
    if isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        return list(prompt)
    if isinstance(prompt, list):
        ids: list[int] = []
        for p in prompt:
            if isinstance(p, str):
                ids += _tokenize(p, tokenizer)
            elif isinstance(p, list):
                ids += [i for i in p if isinstance(i, int) and not isinstance(i, bool)]
        return ids
    return []


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: only the text ones
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
    return ""


def _tokenize(text: str, tokenizer) -> list[int]:
    if not text or tokenizer is None:
        return []
    return tokenizer(text[-TEXT_CHARS:], add_special_tokens=False)["input_ids"]
