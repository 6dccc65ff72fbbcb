"""calm memories inside vLLM: an out-of-tree model that composes a row's memory into the base's layers.

vLLM runs one forward for a whole batch. For rows whose request selects a
calm memory, the base's stream after each connected layer must receive that
memory's cross-attention; every other row must compute exactly the base. So
the served model is vLLM's own Llama (registered under ``server.engine.keys.CALM_ARCHITECTURE``
and selected with ``hf_overrides``), with a forward hook on each decoder
layer. A step without calm rows runs untouched; a step with some adds their
deltas into the residual stream at their rows only, out of place, so the
other rows' numbers are the base's, bit for bit.

Which rows are calm rows comes from :class:`CalmRowsProcessor`, a logits
processor that changes no logits: vLLM hands every logits processor the
batch's added, removed and moved requests before the forward, in the order of
the rows the forward computes. The tokens each row brings this step come from
the forward context's attention metadata (``query_start_loc``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from vllm import SamplingParams
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from memories.calm.runtime import CalmMemory, CalmRow
from server.engine.keys import CALM_MEMORY as ARG
from server.worker.extension import REGISTRY, install_patches

log = logging.getLogger("memserve.calm")

@dataclass
class _Request:
    memory: CalmMemory
    prompt: list[int]
    output: list[int]  # vLLM's live list of the request's sampled tokens
    row: CalmRow | None = None

    def close(self) -> None:
        if self.row is not None:
            self.memory.close(self.row)
            self.row = None


class CalmRowsProcessor(LogitsProcessor):
    """Tracks which batch rows run a calm memory; leaves logits alone."""

    active: "CalmRowsProcessor | None" = None  # the instance of this worker process

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.requests: dict[int, _Request] = {}
        CalmRowsProcessor.active = self
        install_patches()

    @classmethod
    def validate_params(cls, params: SamplingParams) -> None:
        key = (params.extra_args or {}).get(ARG)
        if key is not None and not isinstance(key, str):
            raise ValueError(f"{ARG} must be a string, got {key!r}")

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
            self._drop(index)  # a refilled slot may not have been listed as removed
            key = (params.extra_args or {}).get(ARG)
            if key is None:
                continue
            memory = REGISTRY.get(key)
            if not isinstance(memory, CalmMemory):
                log.error("request names calm memory %s, which this worker has not loaded; serving the base", key)
                continue
            if prompt is None:
                log.error("a request with prompt embeddings and no token ids selects calm memory %s; serving the base", key)
                continue
            self.requests[index] = _Request(memory, list(prompt), output)
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

    def _drop(self, index: int) -> None:
        request = self.requests.pop(index, None)
        if request is not None:
            request.close()  # a preempted request comes back as a new add and reads again

    def step(self, input_ids: torch.Tensor, positions: torch.Tensor) -> "_Step | None":
        """Read this step's tokens into each calm row's augmenting model; None without calm rows."""
        if not self.requests or input_ids is None:
            return None
        starts = _query_start_loc()
        if starts is None:
            return None
        groups: dict[int, _Group] = {}
        for index in sorted(self.requests):
            if index + 1 >= len(starts) or starts[index + 1] <= starts[index]:
                continue
            request = self.requests[index]
            s, e = starts[index], starts[index + 1]
            group = groups.setdefault(id(request.memory), _Group(request.memory))
            if request.row is None:
                request.row = request.memory.open()
            group.add(request, s, e, int(positions[s]), input_ids[s:e].tolist())
        for group in groups.values():
            group.read()
        return _Step(list(groups.values())) if groups else None


class _Group:
    """The rows of one calm memory in this step."""

    def __init__(self, memory: CalmMemory):
        self.memory = memory
        self.rows: list[CalmRow] = []
        self.counts: list[int] = []
        self.tokens: list[list[int]] = []
        self.starts: list[int] = []
        self.index: list[int] = []  # this step's token positions in the batch, row after row

    def add(self, request: _Request, s: int, e: int, position: int, chunk: list[int]) -> None:
        row = request.row
        if position > row.length:  # the start of the prompt came from vLLM's prefix cache
            context = request.prompt + list(request.output)
            self.tokens.append(context[row.length : position] + chunk)
            self.starts.append(row.length)
        else:
            self.tokens.append(chunk)
            self.starts.append(position)
        self.rows.append(row)
        self.counts.append(e - s)
        self.index.extend(range(s, e))

    def read(self) -> None:
        self.memory.read(self.rows, self.tokens, self.starts)


class _Step:
    def __init__(self, groups: list[_Group]):
        self.groups = groups
        self.layers = frozenset().union(*(g.memory.base_layers for g in groups))
        self.index: dict[int, torch.Tensor] = {}

    def after_layer(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The residual stream with the calm rows' deltas added (a new tensor; other rows unchanged)."""
        for group in self.groups:
            if layer not in group.memory.base_layers:
                continue
            index = self.index.setdefault(id(group), torch.tensor(group.index, device=hidden.device))
            stream = hidden[index] + residual[index]  # vLLM's layers hand the stream on as these two summands
            delta = group.memory.attend(layer, stream, group.rows, group.counts)
            residual = residual.index_add(0, index, delta.to(residual.dtype))
        return residual


def _query_start_loc() -> list[int] | None:
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, dict) and metadata:
        starts = getattr(next(iter(metadata.values())), "query_start_loc", None)
        if starts is not None:
            return starts.tolist()
    if metadata is not None:
        log.error("calm memories need per-request query_start_loc from the attention metadata; this step serves them as the base")
    return None


class CalmLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's Llama, with calm memories composed into the rows that select one."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._step: _Step | None = None
        model = self.model
        for layer in range(model.start_layer, model.end_layer):
            model.layers[layer].register_forward_hook(self._hook(layer))

    def _hook(self, layer: int):
        def hook(module, args, output):
            step = self._step
            if step is None or layer not in step.layers:
                return None
            hidden, residual = output
            return hidden, step.after_layer(layer, hidden, residual)

        return hook

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        rows = CalmRowsProcessor.active
        self._step = rows.step(input_ids, positions) if rows is not None else None
        try:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        finally:
            self._step = None
