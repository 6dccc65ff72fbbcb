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
import math

import torch
import torch.nn.functional as F

from memories.fuse import fuse
from server.worker.bank import LaneGroup, MemoryBank
from server.worker.rows import Request
from server.worker.spans import Span

log = logging.getLogger("memserve.fusion")


class DecoderStep:
    """The decoder rows of one forward and the memories' final hidden states at the step's tokens."""

    def __init__(self, rows: list[tuple[Request, Span]], hidden: torch.Tensor, bank: MemoryBank):
        self.rows = rows  # in row order, so spans ascend
        self.starts = [span.start for _, span in rows]
        self.hidden = hidden  # [lanes, step tokens, H]: lane k holds each row's k-th memory
        self.bank = bank

    @classmethod
    def read(cls, rows: list[tuple[Request, Span]], input_ids: torch.Tensor | None, positions: torch.Tensor, bank: MemoryBank | None) -> "DecoderStep | None":
        """Run every decoder memory of every row over the row's span; None without decoder rows."""
        rows = [(request, span) for request, span in rows if request.decoders]
        if not rows or bank is None:
            return None
        device = positions.device
        if input_ids is None:  # prompt embeddings: the rows' own token ids
            ids = [0] * positions.shape[0]
            for _, span in rows:
                ids[span.start : span.stop] = span.tokens
            input_ids = torch.tensor(ids, device=device)
        tokens: list[dict[int, tuple]] = [{} for _ in range(bank.lanes)]  # lane → slot index → (slot, the step's token indices)
        for request, span in rows:
            for lane, part in enumerate(request.decoders[: bank.lanes]):
                tokens[lane].setdefault(part.slot.index, (part.slot, []))[1].extend(range(span.start, span.stop))
        lanes = [[LaneGroup(slot, torch.tensor(index, device=device)) for slot, index in by_slot.values()] for by_slot in tokens]
        return cls(rows, bank(input_ids, positions, lanes), bank)

    def fuse(self, logits: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        """``logits`` (row r: the base's logits at this step's token ``tokens[r]``) with every memory row fused.

        The plan (which memory hidden state, head, weight and temperature each
        row's memories use) is built here from host-side lists; the tensor work
        is :func:`fuse_rows`, whose number of operations depends on the heads
        and mixture sizes in the step, never on its number of rows.
        """
        entries = []  # (output row, lane, part, step token)
        sizes: dict[int, list[int]] = {}  # a row's number of memories → its output rows
        for r, t in enumerate(tokens):
            i = bisect.bisect_right(self.starts, t) - 1
            if i < 0 or t >= self.rows[i][1].stop:
                continue
            parts = self.rows[i][0].decoders[: self.bank.lanes]
            sizes.setdefault(len(parts), []).append(r)
            entries += [(r, lane, part, t) for lane, part in enumerate(parts)]
        if not entries:
            return logits
        device = logits.device
        at = {(r, lane): e for e, (r, lane, _, _) in enumerate(entries)}
        heads = []
        for group in _by_head(list(enumerate(entries))):
            columns = list(zip(*[(e, lane, t) for e, (_, lane, _, t) in group]))
            heads.append((self.bank.head_weight(group[0][1][2].slot), *(torch.tensor(c, device=device) for c in columns)))
        weight = torch.tensor([[part.weight] for _, _, part, _ in entries], device=device)
        temperature = torch.tensor([[part.temperature] for _, _, part, _ in entries], device=device)
        mixes = [(torch.tensor(rows, device=device), torch.tensor([[at[r, lane] for lane in range(k)] for r in rows], device=device)) for k, rows in sorted(sizes.items())]
        fused, broken = fuse_rows(logits, self.hidden, heads, weight, temperature, mixes)
        if broken.device.type == "cpu" and broken.any():  # reading it on a GPU would wait for the step
            for name in sorted({entries[e][2].slot.name for e in broken.nonzero()[:, 0].tolist()}):
                _warn_once(name, f"memory {name} gave non-finite logits; the base alone serves those rows")
        return fused


def fuse_rows(
    logits: torch.Tensor,
    hidden: torch.Tensor,
    heads: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    weight: torch.Tensor,
    temperature: torch.Tensor,
    mixes: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused log-distributions of the memory rows of ``logits`` (fp32), and which memory entries gave non-finite logits.

    ``hidden`` ``[lanes, tokens, H]``; ``heads``: per output head, (its weight
    ``[V, H]``, and per entry using it: the entry's number, lane and token);
    ``weight`` / ``temperature`` ``[entries, 1]``; ``mixes``: per mixture size
    k, (its output rows ``[R]``, their entries ``[R, k]`` in lane order). A
    memory whose logits are not finite (overflow in its dtype) gives its share
    back to the base: its weight counts as 0. Pure tensor work, no host reads.
    """
    logits = logits.float()
    width = max(head.shape[0] for head, *_ in heads)
    mem = logits.new_full((weight.shape[0], width), -math.inf)  # a narrower head's missing tokens: no share
    broken = torch.zeros(weight.shape[0], dtype=torch.bool, device=logits.device)
    for head, entry, lane, token in heads:
        m = F.linear(hidden[lane, token], head).float()
        mem[entry, : head.shape[0]] = m
        broken[entry] = ~torch.isfinite(m).all(dim=-1)
    weight = weight.masked_fill(broken[:, None], 0.0)
    mem = mem.masked_fill(broken[:, None], 0.0)
    out = logits.clone()
    for rows, entry in mixes:
        k = entry.shape[1]
        if k == 1:
            e = entry[:, 0]
            out[rows] = fuse(logits[rows], mem[e], weight[e], temperature[e])
        else:
            out[rows] = fuse(logits[rows], [mem[entry[:, j]] for j in range(k)], [weight[entry[:, j]] for j in range(k)], [temperature[entry[:, j]] for j in range(k)])
    return out, broken


def _by_head(entries: list[tuple]) -> list[list[tuple]]:
    """Numbered entries ``(e, (row, lane, part, token))`` by output head: thin memories share the base's."""
    groups: dict[object, list[tuple]] = {}
    for entry in entries:
        slot = entry[1][2].slot
        groups.setdefault("base" if slot.thin else slot.index, []).append(entry)
    return list(groups.values())


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)
