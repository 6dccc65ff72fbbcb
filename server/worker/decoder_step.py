"""One forward's decoder-memory rows: each memory reads the tokens the base reads, then fuses where logits are wanted.

In the forward, every decoder memory of a row reads exactly the tokens the
base computes for that row this step (its span: a whole prompt, a chunk of
it, the part the prefix cache did not hold, or one decoded token), all rows of
all memories in one call of the model's :class:`server.worker.bank.MemoryBank`
(a row's k-th memory in lane k). The memories' keys and values are vLLM's
paged KV cache, so under chunked prefill, prefix caching and preemption a
memory holds exactly what the base holds; nothing here tracks positions.

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
from server.worker.bank import LaneGroup, MemoryBank
from server.worker.rows import Request
from server.worker.spans import Span

log = logging.getLogger("memserve.fusion")


class DecoderStep:
    """The decoder rows of one forward and each lane's final memory hidden states at the step's tokens."""

    def __init__(self, rows: list[tuple[Request, Span]], hidden: list[torch.Tensor | None], bank: MemoryBank):
        self.rows = rows  # in row order, so spans ascend
        self.starts = [span.start for _, span in rows]
        self.hidden = hidden  # by lane: [step tokens, H]
        self.bank = bank

    @classmethod
    def read(cls, rows: list[tuple[Request, Span]], input_ids: torch.Tensor | None, positions: torch.Tensor, bank: MemoryBank | None) -> "DecoderStep | None":
        """Run every decoder memory of every row over the row's span; None without decoder rows."""
        rows = [(request, span) for request, span in rows if request.decoders]
        if not rows or bank is None:
            return None
        device, count = positions.device, positions.shape[0]
        if input_ids is None:  # prompt embeddings: the rows' own token ids
            input_ids = torch.zeros(count, dtype=torch.long)
            for _, span in rows:
                input_ids[span.start : span.stop] = torch.tensor(span.tokens)
            input_ids = input_ids.to(device)
        ranges: list[dict[int, tuple]] = [{} for _ in range(bank.lanes)]
        for request, span in rows:
            for lane, part in enumerate(request.decoders[: bank.lanes]):
                ranges[lane].setdefault(part.slot.index, (part.slot, []))[1].append((span.start, span.stop))
        lanes = [
            [LaneGroup(slot, torch.cat([torch.arange(a, b) for a, b in spans]).to(device)) for slot, spans in by_slot.values()]
            for by_slot in ranges
        ]
        return cls(rows, bank(input_ids, positions, lanes), bank)

    def fuse(self, logits: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        """``logits`` (row r: the base's logits at this step's token ``tokens[r]``) with every memory row fused.

        Single-memory rows are fused per output head as their memories'
        logits come; a mixture row's memories may sit under different heads,
        so its parts are collected and fused once all are known.
        """
        entries = []  # (output row, lane, part, memory hidden state, the row's number of memories)
        for r, t in enumerate(tokens):
            i = bisect.bisect_right(self.starts, t) - 1
            if i < 0:
                continue
            request, span = self.rows[i]
            if t >= span.stop:
                continue
            for pos, part in enumerate(request.decoders[: self.bank.lanes]):
                entries.append((r, pos, part, self.hidden[pos][t], len(request.decoders)))
        if not entries:
            return logits
        logits = logits.float()
        mixtures: dict[int, dict[int, tuple]] = {}  # mixture row → part position → (mem logits, weight, temperature)
        for group in _by_head(entries):
            parts = [entry[2] for entry in group]
            head = self.bank.head_weight(parts[0].slot)
            mem_logits = torch.nn.functional.linear(torch.stack([entry[3] for entry in group]), head).float()
            weight = torch.tensor([[p.weight] for p in parts], device=logits.device)
            temperature = torch.tensor([[p.temperature] for p in parts], device=logits.device)
            broken = ~torch.isfinite(mem_logits).all(dim=-1, keepdim=True)
            if broken.any():  # overflow in the memory's dtype: that memory gives its share back to the base, never NaN
                for name in sorted({p.slot.name for p, bad in zip(parts, broken[:, 0].tolist()) if bad}):
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


def _by_head(entries: list[tuple]) -> list[list[tuple]]:
    """Entries by output head: thin memories share the base's."""
    groups: dict[object, list[tuple]] = {}
    for entry in entries:
        slot = entry[2].slot
        groups.setdefault("base" if slot.thin else slot.index, []).append(entry)
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
