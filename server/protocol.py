"""memserve's wire schema: the request bodies it accepts, as pydantic models.

- :class:`CompletionRequest` and :class:`ChatCompletionRequest` are vLLM's own
  request models plus memserve's fields (:class:`MemoryFields`: ``domain``,
  ``memory_weight``). They give ``/openapi.json`` its request bodies
  (server/api/openapi.py) and define memserve's fields, which memory selection
  (server/serving/selection.py) removes from the body and checks with
  :func:`memory_name` and :func:`memory_weight`. The rest of the body is then
  validated by vLLM's own models, unchanged, so vLLM's refusals read as vLLM
  wrote them.
- :class:`LoadRequest` is the body of ``POST /admin/memories``.
- :func:`read_json_object` reads any of these bodies: a JSON object, or a 4xx.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError, field_validator, model_validator

from server.config import RequestLimits
from server.engine import vllm_openai
from server.errors import BadRequest, TooLarge, UnsupportedMediaType

NO_MEMORY = ("", "none")  # a name (any case, blanks stripped) that selects the base alone
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # a memory's name, as an admin load gives it

MemoryName = Annotated[str, StringConstraints(strict=True, strip_whitespace=True)]
MemoryWeight = Annotated[float, Field(strict=True, ge=0.0, le=1.0, allow_inf_nan=False)]


class MemoryFields(BaseModel):
    """memserve's own fields of a completion or chat body; removed before the body reaches vLLM."""

    domain: MemoryName | dict[str, MemoryWeight | None] | list[str] | None = Field(
        default=None,
        description="name of a loaded memory to fuse into this request ('none' or empty: the base alone; 'auto': the memory "
        "the router picks for the prompt, or none). The X-Domain header, or 'model' set to a memory's name, selects one too; "
        "all that are given must agree. Or a mixture: an object of memory names to weights (null: the memory's own; decoder "
        "weights sum to at most 1; at most one lora or calm memory, with null), or a list of names, each with its own weight",
    )  # fmt: skip
    memory_weight: MemoryWeight | None = Field(
        default=None, description="λ for this request, in [0, 1]; default: the memory's own. Decoder memories only: a lora or calm memory has no weight",
    )  # fmt: skip


class CompletionRequest(vllm_openai.CompletionRequest, MemoryFields):
    """The body of POST /v1/completions: vLLM's CompletionRequest plus memserve's domain and memory_weight."""


class ChatCompletionRequest(vllm_openai.ChatCompletionRequest, MemoryFields):
    """The body of POST /v1/chat/completions: vLLM's ChatCompletionRequest plus memserve's domain and memory_weight."""


class LoadRequest(BaseModel):
    """The body of POST /admin/memories: load a memory from a path, or generate one from prompts; replace swaps a loaded one."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="name requests use to select the memory; not 'none'", json_schema_extra={"pattern": NAME.pattern})
    path: str | None = Field(default=None, description="artifact directory, relative to or inside --memory-root")
    prompts: list[str] | None = Field(
        default=None,
        description="instead of a path: unlabeled texts of the domain; the server's --generator turns them into a lora memory",
    )  # fmt: skip
    description: str = Field(default="", max_length=1000, description="with prompts: the generated memory's description")
    routing_prompts: list[str] | None = Field(
        default=None,
        description="with path: texts of the memory's domain; domain 'auto' routes on a profile made from them (default: the artifact's routing.json, if any)",
    )  # fmt: skip
    memory_weight: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False, description="λ; default: the memory's own")
    replace: bool = Field(default=False, description="swap a loaded memory of the same name")

    @model_validator(mode="after")
    def _path_or_prompts(self) -> LoadRequest:
        if (self.path is None) == (self.prompts is None):
            raise ValueError("give exactly one of 'path' (an artifact directory) and 'prompts' (texts to generate a lora memory from)")
        if self.routing_prompts is not None and self.path is None:
            raise ValueError("'routing_prompts' goes with 'path'; a memory generated from 'prompts' is routed on those prompts")
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME.match(v) or v.lower() == "none":
            raise ValueError("must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit, and not 'none'")
        return v


BODIES: dict[str, type[BaseModel]] = {m.__name__: m for m in (CompletionRequest, ChatCompletionRequest, LoadRequest)}  # by schema name

_NAME = TypeAdapter(MemoryName)
_WEIGHT = TypeAdapter(MemoryWeight)


def pop_memory_fields(body: dict[str, Any]) -> dict[str, Any]:
    """Remove every :class:`MemoryFields` field from ``body``; their raw values (None where absent)."""
    return {name: body.pop(name, None) for name in MemoryFields.model_fields}


def memory_name(value: Any, where: str = "domain") -> str | None:
    """The memory a ``domain`` value or ``X-Domain`` header (``where``) names; None: the base alone."""
    if value is None:
        return None
    try:
        name = _NAME.validate_python(value)
    except ValidationError:
        raise BadRequest(f"{where} must be a string naming a memory, got {type(value).__name__}", "domain") from None
    return None if name.lower() in NO_MEMORY else name


def memory_weight(value: Any) -> float:
    """A ``memory_weight`` value: a number (not a boolean) in [0, 1]."""
    try:
        return _WEIGHT.validate_python(value)
    except ValidationError as e:
        if e.errors()[0]["type"] in ("greater_than_equal", "less_than_equal"):
            raise BadRequest(f"memory_weight must be in [0, 1], got {value}", "memory_weight") from None
        raise BadRequest(f"memory_weight must be a number in [0, 1], got {value!r}", "memory_weight") from None


async def read_json_object(raw_request: Request, max_bytes: int = RequestLimits.max_request_bytes) -> dict[str, Any]:
    """The body as a JSON object; anything else is a 4xx, never a 500.

    A JSON content type is required: a browser can send a cross-site
    ``text/plain`` POST without asking first, but not an ``application/json`` one.
    """
    content_type = raw_request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise UnsupportedMediaType(f"Content-Type must be application/json, got {content_type or 'none'!r}")
    raw = await raw_request.body()
    if len(raw) > max_bytes:
        raise TooLarge(f"request body is {len(raw):,} bytes; this server accepts at most {max_bytes:,} (--max-request-bytes)")
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadRequest(f"request body is not UTF-8: {e}") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and integers beyond Python's digit limit
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    return body
