"""Which batch row runs which memories: the one per-row bookkeeping of calm and decoder memories.

vLLM's V1 runner tells every logits processor, before each forward, which
requests were added to, removed from or moved between the rows of its
persistent batch (``BatchUpdate``), in the order of the rows the forward
computes. :class:`MemoryRows` is such a processor that changes no logits: it
only keeps, per row, the request's prompt ids, vLLM's live list of its output
ids and the memories its ``SamplingParams.extra_args`` select (keys in
``server/engine/keys.py``). memserve's model (``server/worker/model.py``)
reads it at each forward. A refilled row may not be listed as removed: "added
at i" and "moved into i" overwrite row i.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from memories.calm.runtime import CalmMemory, CalmRow
from memories.fuse import check_weights
from server.engine.keys import CALM_MEMORY, read_decoder_parts
from server.worker.bank import Slot
from server.worker.extension import REGISTRY, install_patches

log = logging.getLogger("memserve.rows")


@dataclass(frozen=True)
class DecoderPart:
    """One decoder memory of a row: the slot holding it and how that request weighs it (a mixture row has one per memory)."""

    slot: Slot
    weight: float
    temperature: float


@dataclass
class Request:
    """One row's request: its tokens so far and the memories it selects."""

    prompt: list[int]
    output: list[int]  # vLLM's live list: grows as the request decodes, and names the request
    calm: CalmMemory | None = None
    calm_row: CalmRow | None = None
    decoders: list[DecoderPart] = field(default_factory=list)
    prompt_logprobs: bool = False  # whether vLLM will ask for logits at every prompt token, not only the last

    def context(self, start: int, stop: int) -> list[int]:
        """The request's tokens ``start:stop`` (prompt, then output)."""
        n = len(self.prompt)
        return self.prompt[start:stop] + list(self.output[max(start - n, 0) : max(stop - n, 0)])

    def leave(self) -> None:
        """The row left the batch (finished or preempted: a preempted request comes back as a new add)."""
        if self.calm_row is not None:
            self.calm.close(self.calm_row)
            self.calm_row = None


class MemoryRows(LogitsProcessor):
    """Tracks which batch rows run which memories; leaves logits alone."""

    active: "MemoryRows | None" = None  # the instance of this worker process

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.requests: dict[int, Request] = {}
        MemoryRows.active = self
        install_patches()

    @classmethod
    def validate_params(cls, params: SamplingParams) -> None:
        key = (params.extra_args or {}).get(CALM_MEMORY)
        if key is not None and not isinstance(key, str):
            raise ValueError(f"{CALM_MEMORY} must be a string, got {key!r}")
        parts = read_decoder_parts(params.extra_args)  # malformed mixture lists: ValueError
        for spec in parts or ():
            if not isinstance(spec["memory"], str):
                raise ValueError(f"memserve_memory must be a string, got {spec['memory']!r}")
            w, t = spec.get("weight"), spec.get("temperature", 1.0)
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not 0.0 <= w <= 1.0:
                raise ValueError(f"memory weight must be a number in [0, 1], got {w!r}")
            if not isinstance(t, (int, float)) or isinstance(t, bool) or not (t > 0 and math.isfinite(t)):
                raise ValueError(f"memory temperature must be a positive number, got {t!r}")
        if parts and len(parts) > 1:
            names = [spec["memory"] for spec in parts]
            if len(set(names)) != len(names):
                raise ValueError(f"a mixture names a memory twice: {names!r}")
            check_weights([spec["weight"] for spec in parts])

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._drop(index)
        for index, params, prompt, output in batch_update.added:
            self._drop(index)  # a refilled row may not have been listed as removed
            request = _request(params, prompt, output)
            if request is not None:
                self.requests[index] = request
        for a, b, direction in batch_update.moved:
            at_a = self.requests.pop(a, None)
            if direction == MoveDirectionality.SWAP:
                at_b = self.requests.pop(b, None)
                if at_b is not None:
                    self.requests[a] = at_b
            else:
                self._drop(b)
            if at_a is not None:
                self.requests[b] = at_a

    def holds(self, slot: Slot) -> bool:
        """Whether a row of the batch runs on ``slot`` (a retired slot is reused only once none does)."""
        return any(part.slot is slot for request in list(self.requests.values()) for part in request.decoders)

    def _drop(self, index: int) -> None:
        request = self.requests.pop(index, None)
        if request is not None:
            request.leave()


def _request(params: SamplingParams, prompt: list[int] | None, output: list[int]) -> Request | None:
    """The row's memories as this worker has them loaded; None for a row that runs the base alone."""
    extra = params.extra_args or {}
    calm_key, specs = extra.get(CALM_MEMORY), read_decoder_parts(extra) or []
    if calm_key is None and not specs:
        return None
    if prompt is None:
        log.error("a request with prompt embeddings and no token ids selects a memory; the base alone serves it")
        return None
    request = Request(list(prompt), output, prompt_logprobs=params.prompt_logprobs is not None)
    if calm_key is not None:
        memory = REGISTRY.get(calm_key)
        if isinstance(memory, CalmMemory):
            request.calm = memory
        else:
            log.error("request names calm memory %s, which this worker has not loaded; serving the base", calm_key)
    request.decoders = decoder_parts(specs)
    return request if request.calm is not None or request.decoders else None


def decoder_parts(specs: list[dict]) -> list[DecoderPart]:
    """The decoder memories ``specs`` name (``read_decoder_parts``), in order, as this worker has them loaded; one it has not is left out, logged.

    Shared by both runners' bookkeeping: this module's (V1) and ``server/worker/v2_state.py``'s (Model Runner V2).
    """
    parts = []
    for spec in specs:
        slot = REGISTRY.get(spec["memory"])
        if not isinstance(slot, Slot):
            log.error("request names memory %s, which this worker has not loaded; the row goes without it", spec["memory"])
            continue
        parts.append(DecoderPart(slot, float(spec["weight"]), float(spec.get("temperature", 1.0))))
    return parts
