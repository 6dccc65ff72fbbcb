"""One forward's calm rows: their augmenting models read the step's tokens, then the base's layers receive their deltas.

For rows whose request selects a calm memory, the base's stream after each
connected layer must receive that memory's cross-attention; every other row
must compute exactly the base. Each row's augmenting model first reads the
tokens vLLM computes for the row this step (tokens the prefix cache skipped
are read first, from the request's known tokens; a step that starts before
the row's end cuts its caches back: ``memories/calm/runtime.py``), single-token
rows of one memory in one batch. After each connected layer the calm rows'
deltas are added into the residual stream at their rows only, out of place, so
the other rows' numbers are the base's, bit for bit.
"""

from __future__ import annotations

import torch

from memories.calm.runtime import CalmMemory, CalmRow
from server.worker.rows import Request
from server.worker.spans import Span
from server.worker.upload import upload


class _Group:
    """The rows of one calm memory in this step."""

    def __init__(self, memory: CalmMemory):
        self.memory = memory
        self.rows: list[CalmRow] = []
        self.counts: list[int] = []
        self.tokens: list[list[int]] = []
        self.starts: list[int] = []
        self.index: list[int] = []  # this step's token positions in the batch, row after row

    def add(self, request: Request, span: Span) -> None:
        row = request.calm_row
        if span.position > row.length:  # the start of the prompt came from vLLM's prefix cache
            self.tokens.append(request.context(row.length, span.position) + span.tokens)
            self.starts.append(row.length)
        else:
            self.tokens.append(span.tokens)
            self.starts.append(span.position)
        self.rows.append(row)
        self.counts.append(span.stop - span.start)
        self.index.extend(range(span.start, span.stop))


class CalmStep:
    """The calm rows of one forward, read; :meth:`after_layer` adds their deltas."""

    def __init__(self, groups: list[_Group]):
        self.groups = groups
        self.layers = frozenset().union(*(g.memory.base_layers for g in groups))
        self.index: dict[int, torch.Tensor] = {}

    @classmethod
    def read(cls, rows: list[tuple[Request, Span]]) -> "CalmStep | None":
        """Read this step's tokens into each calm row's augmenting model; None without calm rows."""
        groups: dict[int, _Group] = {}
        for request, span in rows:
            if request.calm is None:
                continue
            if request.calm_row is None:
                request.calm_row = request.calm.open()
            groups.setdefault(id(request.calm), _Group(request.calm)).add(request, span)
        for group in groups.values():
            group.memory.read(group.rows, group.tokens, group.starts)
        return cls(list(groups.values())) if groups else None

    def after_layer(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The residual stream with the calm rows' deltas added (a new tensor; other rows unchanged)."""
        for group in self.groups:
            if layer not in group.memory.base_layers:
                continue
            index = self.index.setdefault(id(group), upload(group.index, hidden.device))
            stream = hidden[index] + residual[index]  # vLLM's layers hand the stream on as these two summands
            delta = group.memory.attend(layer, stream, group.rows, group.counts)
            residual = residual.index_add(0, index, delta.to(residual.dtype))
        return residual
