"""A calm memory at serving time: its augmenting model read incrementally, and the cross-attention it feeds.

Inside the engine, each row (request) that selects a calm memory keeps two
caches that grow with it: the augmenting model's own keys and values (a slot
of :class:`memories.runner.MemoryDecoder`'s pool, the same Llama forward that
serves decoder memories), and, per connection, the cross-attention's keys and
values computed from the augmenting model's stream. Each engine step the
augmenting model reads the row's new tokens (the whole prompt, or a chunk of
it, then one token per step; all single-token rows of a memory in one batch),
and then the base's stream after each connected layer attends to the row's
cache up to each token's own position.

A row's cache follows the positions vLLM computes: a step that starts before
the cache's end (vLLM recomputes after a preemption) cuts it back; one that
starts after it (vLLM found the prompt's start in its prefix cache) first
reads the tokens in between, which the caller passes along.

Both caches count against one budget (``kv_budget_bytes``, the server's
``--memory-kv-budget``): it is divided into rows of up to ``max_len`` tokens,
each an augmenting-model slot plus its connections' caches, and
:attr:`CalmMemory.max_rows` says how many. The server admits no more running
rows than that; running rows are never evicted (their cross-attention caches
are what the base attends to mid-step), so a row beyond the budget that still
arrives gets a slot past it, with an error logged. Rows free their caches when
they leave, and the pool is given back whenever no row runs, so idle memory
does not stay grown.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memories.artifact import MEMORY_JSON, ArtifactError
from memories.calm.composition import AUGMENT_DIR, COMPOSITION_FILE, Composition, CompositionSpec, causal_mask, check_layers
from memories.runner import MemoryDecoder

log = logging.getLogger("memserve.calm")


@dataclass
class CalmRow:
    """One request's caches on one calm memory."""

    slot: int
    length: int = 0  # positions read by the augmenting model (and cached per connection)
    keys: list[torch.Tensor] = field(default_factory=list)  # per connection [heads, capacity, head_dim]
    values: list[torch.Tensor] = field(default_factory=list)


class CalmMemory:
    """The augmenting model, the composition, and the rows running on them."""

    def __init__(
        self,
        path: str | Path,
        name: str = "memory",
        device: str | torch.device = "cpu",
        dtype=torch.float32,
        max_len: int = 2048,
        base_layers: int | None = None,
        kv_budget_bytes: int | None = None,
    ):
        path = Path(path)
        meta = json.loads((path / MEMORY_JSON).read_text())
        self.spec = CompositionSpec.from_card(name, meta)
        self.name = name
        self.device, self.dtype = torch.device(device), dtype
        self.max_len = max_len
        self._rows: dict[int, CalmRow] = {}  # open rows by augment slot
        # per connection, keys and values [heads, max_len, head_dim]: heads × head_dim is the base's width
        row_bytes = len(self.spec.connections) * 2 * self.spec.base_width * max_len * torch.empty(0, dtype=dtype).element_size()
        self.augment = MemoryDecoder(
            path / AUGMENT_DIR, name=name, device=device, dtype=dtype, max_len=max_len, kv_budget_bytes=kv_budget_bytes, row_bytes=row_bytes
        )
        if self.augment.cfg.hidden != self.spec.augment_width:
            raise ArtifactError(name, "augment width differs from memory.json", f"augment hidden_size {self.augment.cfg.hidden}, memory.json augment_width {self.spec.augment_width}")
        check_layers(name, self.spec, self.augment.cfg.layers, base_layers if base_layers is not None else max(b for _, b in self.spec.connections) + 1)
        self.composition = Composition.load(path / COMPOSITION_FILE, self.spec, name).to(device=self.device, dtype=dtype).eval()
        for p in self.composition.parameters():
            if not torch.isfinite(p).all():  # values beyond the engine dtype's range
                raise ArtifactError(name, "composition weights are not finite", f"a tensor overflows {dtype}")
        self.tapped = sorted({a for a, _ in self.spec.connections})  # augment layers read
        self.base_layers = frozenset(b for _, b in self.spec.connections)

    @property
    def num_parameters(self) -> int:
        return self.augment.num_parameters + self.composition.num_parameters()

    @property
    def nbytes(self) -> int:
        """Weights plus the caches as allocated now."""
        return self.augment.nbytes + sum(p.numel() * p.element_size() for p in self.composition.parameters()) + self._connection_bytes()

    @property
    def cache_bytes(self) -> int:
        """The rows' caches as allocated now: the augmenting model's slot pool and every open row's cross-attention keys and values."""
        return self.augment.pool_bytes + self._connection_bytes()

    @property
    def cache_budget_bytes(self) -> int | None:
        return self.augment.kv_budget_bytes

    @property
    def max_rows(self) -> int | None:
        """Rows the cache budget holds at once; None without a budget."""
        return self.augment.max_slots

    def _connection_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for row in self._rows.values() for t in (*row.keys, *row.values))

    # ---- rows ------------------------------------------------------------

    def open(self) -> CalmRow:
        """A row for a new request; past the budget only if more rows run than the server admits (logged)."""
        slot = self.augment.open(protect=self._rows.keys())  # running rows are never evicted
        if slot is None:
            log.error("calm memory %s: more than %d rows run at once, beyond its cache budget (--memory-kv-budget); growing past it", self.name, self.max_rows)
            slot = self.augment.open(overflow=True)
        row = self._rows[slot] = CalmRow(slot)
        return row

    def close(self, row: CalmRow) -> None:
        """Free the row's caches; with no row left the augmenting model's pool shrinks back."""
        self._rows.pop(row.slot, None)
        row.keys, row.values = [], []
        self.augment.close(row.slot)

    @torch.inference_mode()
    def read(self, rows: list[CalmRow], tokens: list[list[int]], starts: list[int]) -> None:
        """Row ``i`` reads ``tokens[i]``, which begin at position ``starts[i]`` ≤ its length."""
        for row, start in zip(rows, starts):
            if start > row.length:
                raise ValueError(f"calm row starts at {start} but has read {row.length} positions: pass the tokens in between")
            if start < row.length:
                self.augment.truncate(row.slot, start)
                row.length = start
        states = self.augment.advance_layers([r.slot for r in rows], tokens, self.tapped)  # per row [len(tapped), M, augment_width]
        single = [i for i, t in enumerate(tokens) if len(t) == 1]
        for c, ((a, _), conn) in enumerate(zip(self.spec.connections, self.composition.connections)):
            tap = self.tapped.index(a)
            if single:  # decoding rows: one projection for all of them
                k, v = conn.keys_values(torch.stack([states[i][tap] for i in single]))  # [R, heads, 1, head_dim]
                for j, i in enumerate(single):
                    self._store(rows[i], c, k[j], v[j])
            for i, t in enumerate(tokens):
                if len(t) > 1:
                    self._store(rows[i], c, *conn.keys_values(states[i][tap]))
        for row, t in zip(rows, tokens):
            row.length += len(t)

    def _store(self, row: CalmRow, c: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write connection ``c``'s keys and values ``[heads, M, head_dim]`` for the row's next M positions."""
        if len(row.keys) <= c:
            row.keys.append(k.new_zeros(k.shape[0], 0, k.shape[2]))
            row.values.append(v.new_zeros(v.shape[0], 0, v.shape[2]))
        row.keys[c] = _append(row.keys[c], row.length, k, self.max_len)
        row.values[c] = _append(row.values[c], row.length, v, self.max_len)

    @torch.inference_mode()
    def attend(self, layer: int, hidden: torch.Tensor, rows: list[CalmRow], counts: list[int]) -> torch.Tensor | None:
        """What to add to the base's stream after ``layer`` for these rows' tokens; None if no connection ends there.

        ``hidden`` ``[sum(counts), base_width]`` holds the rows' tokens in order,
        ``counts[i]`` of them for row ``i``: the last ones it has read.
        Connections into the same layer apply in order, each seeing the last's output.
        """
        connections = self.composition.at_base_layer(layer)
        if not connections:
            return None
        x = hidden.to(self.dtype)
        for c in connections:
            x = x + self._attend_one(c, x, rows, counts)
        return (x - hidden.to(self.dtype)).to(hidden.dtype)

    def _attend_one(self, c: int, x: torch.Tensor, rows: list[CalmRow], counts: list[int]) -> torch.Tensor:
        conn = self.composition.connections[c]
        out = torch.empty_like(x)
        starts = [0]
        for n in counts:
            starts.append(starts[-1] + n)
        single = [i for i, n in enumerate(counts) if n == 1]
        if single:
            total = max(rows[i].length for i in single)
            keys = torch.stack([_padded(rows[i].keys[c], total) for i in single])  # [R, heads, T, head_dim]
            values = torch.stack([_padded(rows[i].values[c], total) for i in single])
            lengths = torch.tensor([rows[i].length for i in single], device=x.device)
            mask = causal_mask((lengths - 1)[:, None], total)  # [R, 1, T]
            index = torch.tensor([starts[i] for i in single], device=x.device)
            out[index] = conn.attend(x[index][:, None], keys, values, mask)[:, 0]
        for i, n in enumerate(counts):
            if n > 1:
                row = rows[i]
                positions = torch.arange(row.length - n, row.length, device=x.device)
                mask = causal_mask(positions, row.length)
                out[starts[i] : starts[i] + n] = conn.attend(x[starts[i] : starts[i] + n], row.keys[c][:, : row.length], row.values[c][:, : row.length], mask)
        return out


def _append(cache: torch.Tensor, at: int, new: torch.Tensor, limit: int) -> torch.Tensor:
    """``cache[:, at:at+M] = new``, growing the capacity by doubling, past ``limit`` (what the budget counts) only as needed."""
    need = at + new.shape[1]
    if need > cache.shape[1]:
        grown = cache.new_zeros(cache.shape[0], max(need, min(max(2 * cache.shape[1], 16), limit)), cache.shape[2])  # zeros: masked slots must stay finite
        grown[:, :at] = cache[:, :at]
        cache = grown
    cache[:, at:need] = new
    return cache


def _padded(cache: torch.Tensor, total: int) -> torch.Tensor:
    if cache.shape[1] >= total:
        return cache[:, :total]
    return torch.nn.functional.pad(cache, (0, 0, 0, total - cache.shape[1]))
