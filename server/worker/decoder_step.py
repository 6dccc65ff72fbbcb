"""One forward's decoder-memory rows: each memory reads the tokens the base reads, then fuses where logits are wanted.

In the forward, every decoder memory of a row reads exactly the tokens the
base computes for that row this step (its span: a whole prompt, a chunk of
it, the part the prefix cache did not hold, or one decoded token), all rows of
one memory in one call (``MemoryDecoder.read``; a mixture row holds a slot in
each of its memories' pools). The memory stays aligned with the base by
position: a span that starts beyond what the memory's slot holds (a prefix-cache
hit, a resumed request, a slot the KV budget evicted) first reads the missing
context from the request's prompt and output; one that starts before it
(vLLM recomputes after a preemption) cuts the slot back. Its final hidden
state at every token of the span is kept for the step.

``compute_logits`` then hands :meth:`DecoderStep.fuse` the base's logits of
some of the step's tokens (the last token of each row for sampling, a
request's prompt positions for prompt logprobs) and which token each is;
memory rows get ``memories.fuse.fuse``'s log-distribution over the base and
all their memories, base rows are returned as they are. Memories that share
an output head (thin memories: the base's own) apply it in one matmul for all
their rows, so a mix of them costs about what one memory costs.
"""

from __future__ import annotations

import bisect
import logging

import torch

from memories.fuse import fuse
from memories.runner import MemoryDecoder
from server.worker.rows import DecoderPart, Request
from server.worker.spans import Span

log = logging.getLogger("memserve.fusion")


class DecoderStep:
    """The decoder rows of one forward and their memories' final hidden states at each of the row's tokens."""

    def __init__(self, rows: list[tuple[Request, Span]], hidden: dict[int, torch.Tensor]):
        self.rows = rows  # in row order, so spans ascend
        self.starts = [span.start for _, span in rows]
        self.hidden = hidden  # by id(part): [span length, H]

    @classmethod
    def read(cls, rows: list[tuple[Request, Span]]) -> "DecoderStep | None":
        """Advance every decoder memory of every row by the row's span; None without decoder rows."""
        rows = [(request, span) for request, span in rows if request.decoders]
        if not rows:
            return None
        by_decoder: dict[int, list[tuple[DecoderPart, Request, Span]]] = {}
        for request, span in rows:
            for part in request.decoders:
                by_decoder.setdefault(id(part.decoder), []).append((part, request, span))
        hidden: dict[int, torch.Tensor] = {}
        for entries in by_decoder.values():
            hidden |= _read(entries[0][0].decoder, entries)
        return cls(rows, hidden)

    def fuse(self, logits: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        """``logits`` (row r: the base's logits at this step's token ``tokens[r]``) with every memory row fused.

        Single-memory rows are fused per output head as their memories'
        logits come; a mixture row's memories may sit under different heads,
        so its parts are collected and fused once all are known.
        """
        entries = []  # (output row, part position, part, memory hidden state, the row's number of memories)
        for r, t in enumerate(tokens):
            i = bisect.bisect_right(self.starts, t) - 1
            if i < 0:
                continue
            request, span = self.rows[i]
            if t >= span.stop:
                continue
            for pos, part in enumerate(request.decoders):
                entries.append((r, pos, part, self.hidden[id(part)][t - span.start], len(request.decoders)))
        if not entries:
            return logits
        logits = logits.float()
        mixtures: dict[int, dict[int, tuple]] = {}  # mixture row → part position → (mem logits, weight, temperature)
        for group in _by_head(entries):
            parts = [entry[2] for entry in group]
            mem_logits = parts[0].decoder.head(torch.stack([entry[3] for entry in group])).to(logits.device)
            weight = torch.tensor([[p.weight] for p in parts], device=logits.device)
            temperature = torch.tensor([[p.temperature] for p in parts], device=logits.device)
            broken = ~torch.isfinite(mem_logits).all(dim=-1, keepdim=True)
            if broken.any():  # overflow in the memory's dtype: that memory gives its share back to the base, never NaN
                for name in sorted({p.decoder.name for p, bad in zip(parts, broken[:, 0].tolist()) if bad}):
                    _warn_once(name, f"memory {name} gave non-finite logits; the base alone serves those rows")
                mem_logits, weight = mem_logits.masked_fill(broken, 0.0), weight.masked_fill(broken, 0.0)
            single = [k for k, entry in enumerate(group) if entry[4] == 1]
            if single:
                pick = torch.tensor(single, device=logits.device)
                index = torch.tensor([group[k][0] for k in single], device=logits.device)
                logits[index] = fuse(logits[index], mem_logits[pick], weight[pick], temperature[pick])
            for k, (r, pos, _, _, size) in enumerate(group):
                if size > 1:
                    mixtures.setdefault(r, {})[pos] = (mem_logits[k], weight[k], temperature[k])
        _fuse_mixtures(logits, mixtures)
        return logits


def _read(decoder: MemoryDecoder, entries: list[tuple[DecoderPart, Request, Span]]) -> dict[int, torch.Tensor]:
    """One decoder call for every row of this memory; the final hidden state at each of the row's span tokens, by id(part).

    A row the KV budget has no slot for runs its whole context uncached.
    """
    pending = []
    for part, request, span in entries:
        held = part.held()
        if held > span.position:  # vLLM recomputes from there (preemption): the memory forgets the rest
            part.decoder.truncate(part.slot, span.position)
            held = span.position
        pending.append(request.context(held, span.position) + span.tokens)
    protect = {part.slot for part, _, _ in entries if part.slot is not None}
    for part, _, _ in entries:
        if part.slot is None and (slot := decoder.open(protect)) is not None:
            part.attach(slot)
            protect.add(slot)
    cached = [k for k, (part, _, _) in enumerate(entries) if part.slot is not None]
    out: dict[int, torch.Tensor] = {}
    if cached:
        read = decoder.read([entries[k][0].slot for k in cached], [pending[k] for k in cached])
        for k, hidden in zip(cached, read):
            part, _, span = entries[k]
            out[id(part)] = hidden[-len(span.tokens) :]
    for part, request, span in entries:
        if part.slot is None:
            _warn_once(decoder.name + " budget", f"memory {decoder.name}: more rows in one step than its KV budget holds; the rest run uncached")
            out[id(part)] = decoder.compute(request.context(0, span.position) + span.tokens)[-len(span.tokens) :]
    return out


def _by_head(entries: list[tuple]) -> list[list[tuple]]:
    """Entries by output head (the same storage): thin memories of one base share one."""
    groups: dict[tuple, list[tuple]] = {}
    for entry in entries:
        head = entry[2].decoder.head_weight
        groups.setdefault((head.data_ptr(), tuple(head.shape), head.dtype, head.device), []).append(entry)
    return list(groups.values())


def _fuse_mixtures(logits: torch.Tensor, mixtures: dict[int, dict[int, tuple]]) -> None:
    """One ``fuse`` call per mixture size K: part k of every such row stacked as the k-th memory."""
    by_size: dict[int, list[int]] = {}
    for r, parts in mixtures.items():
        by_size.setdefault(len(parts), []).append(r)
    for k, rows in by_size.items():
        ordered = [[mixtures[r][pos] for pos in sorted(mixtures[r])] for r in rows]
        index = torch.tensor(rows, device=logits.device)
        mems = [torch.stack([row[j][0] for row in ordered]) for j in range(k)]
        weights = [torch.stack([row[j][1] for row in ordered]) for j in range(k)]
        temperatures = [torch.stack([row[j][2] for row in ordered]) for j in range(k)]
        logits[index] = fuse(logits[index], mems if k > 1 else mems[0], weights if k > 1 else weights[0], temperatures if k > 1 else temperatures[0])


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)
