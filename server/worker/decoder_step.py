"""One forward's decoder-memory rows: each memory reads the tokens the base reads, then fuses where logits are wanted.

In the forward, every decoder memory of a row reads exactly the tokens the
base computes for that row this step (its span: a whole prompt, a chunk of
it, the part the prefix cache did not hold, or one decoded token), all rows of
all memories in one call of the model's :class:`server.worker.bank.MemoryBank`
(a row's k-th memory in lane k). The memories' keys and values are vLLM's
paged KV cache, so under chunked prefill, prefix caching and preemption a
memory holds exactly what the base holds; nothing here tracks positions.

The memories' output heads run in the forward too, at the tokens whose
logits vLLM will ask for: each row's last token (sampling) and, for a
request that wants prompt logprobs, all of its tokens. ``compute_logits``
then hands :meth:`DecoderStep.fuse` the base's logits of some of the step's
tokens with a device tensor saying which token each is; memory rows get
``memories.fuse.fuse``'s log-distribution over the base and all their
memories, gathered on the device, base rows are returned as they are. Memories
that share an output head (thin memories: the base's own) apply it in one
matmul for all their rows, so a mix of them costs about what one memory costs.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from memories.fuse import fuse
from server.worker.bank import LaneGroup, MemoryBank
from server.worker.rows import Request
from server.worker.spans import Span
from server.worker.upload import upload

log = logging.getLogger("memserve.fusion")


class DecoderStep:
    """The decoder rows of one forward and, at the tokens whose logits will be asked for, their memories' logits."""

    def __init__(self, token_row: torch.Tensor, mem: torch.Tensor, weight: torch.Tensor, temperature: torch.Tensor):
        self.token_row = token_row  # [step tokens]: the planned row of each token, -1 for tokens no memory fuses
        self.mem = mem  # [planned rows, lanes, width]: each row's memories' logits (a missing memory: zeros at weight 0)
        self.weight = weight  # [planned rows, lanes]
        self.temperature = temperature  # [planned rows, lanes]

    @classmethod
    def read(cls, rows: list[tuple[Request, Span]], input_ids: torch.Tensor | None, positions: torch.Tensor, bank: MemoryBank | None) -> "DecoderStep | None":
        """Run every decoder memory of every row over the row's span; None without decoder rows.

        ``compute_logits`` only ever asks for a row's last token (sampling) or,
        for a request that wants prompt logprobs, any of its tokens; the memories'
        output heads run here, in the forward, for exactly those tokens, so that
        ``compute_logits`` fuses by gathering on the device and never reads back
        which tokens it was given.
        """
        rows = [(request, span) for request, span in rows if request.decoders]
        if not rows or bank is None:
            return None
        device = positions.device
        if input_ids is None:  # prompt embeddings: the rows' own token ids
            ids = [0] * positions.shape[0]
            for _, span in rows:
                ids[span.start : span.stop] = span.tokens
            input_ids = upload(ids, device)
        tokens: list[dict[int, tuple]] = [{} for _ in range(bank.lanes)]  # lane → slot index → (slot, the step's token indices)
        for request, span in rows:
            for lane, part in enumerate(request.decoders[: bank.lanes]):
                tokens[lane].setdefault(part.slot.index, (part.slot, []))[1].extend(range(span.start, span.stop))
        lanes = [[LaneGroup(slot, upload(index, device)) for slot, index in by_slot.values()] for by_slot in tokens]
        hidden = bank(input_ids, positions, lanes)

        planned = []  # (step token, its row's memories)
        for request, span in rows:
            wanted = range(span.start, span.stop) if request.prompt_logprobs else (span.stop - 1,)
            planned += [(t, request.decoders[: bank.lanes]) for t in wanted]
        k = max(len(parts) for _, parts in planned)
        entries = [(n, lane, part, t) for n, (t, parts) in enumerate(planned) for lane, part in enumerate(parts)]
        heads = []
        for group in _by_head(entries):  # one upload per head: its uses' rows, lanes and tokens as one [3, uses] tensor
            columns = upload(list(zip(*[(n, lane, t) for n, lane, _, t in group])), device)
            heads.append((bank.head_weight(group[0][2].slot), *columns.unbind(0)))
        weight = [[0.0] * k for _ in planned]
        temperature = [[1.0] * k for _ in planned]
        for n, lane, part, _ in entries:
            weight[n][lane], temperature[n][lane] = part.weight, part.temperature
        token_row = [-1] * positions.shape[0]
        for n, (t, _) in enumerate(planned):
            token_row[t] = n
        mem, broken = memory_logits(hidden, heads, len(planned), k)
        if broken.device.type == "cpu":  # reading it on a GPU would wait for the step
            _report_non_finite(broken, entries)
        weight = upload(weight, device).masked_fill(broken, 0.0)
        return cls(upload(token_row, device), mem, weight, upload(temperature, device))

    def fuse(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``logits`` (row r: the base's logits at this step's token ``index[r]``, a device tensor) with every memory row fused."""
        return fuse_rows(logits, index, self.token_row, self.mem, self.weight, self.temperature)


def memory_logits(hidden: torch.Tensor, heads: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]], rows: int, lanes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The memories' logits ``[rows, lanes, width]`` (fp32), and which gave non-finite ones ``[rows, lanes]``.

    ``hidden`` ``[lanes, tokens, H]``; ``heads``: per output head, (its weight
    ``[V, H]``, and per use: the planned row, the lane and the step token). A
    narrower head leaves its missing tokens at -inf (no share); a lane a row
    does not use, and a memory whose logits are not finite (overflow in its
    dtype), is left at zeros, which its weight 0 gives no share. Pure tensor
    work, no host reads.
    """
    width = max(head.shape[0] for head, *_ in heads)
    mem = hidden.new_zeros((rows, lanes, width), dtype=torch.float32)
    broken = torch.zeros(rows, lanes, dtype=torch.bool, device=hidden.device)
    for head, row, lane, token in heads:
        m = F.linear(hidden[lane, token], head).float()
        finite = torch.isfinite(m).all(dim=-1)
        mem[row, lane] = F.pad(m, (0, width - head.shape[0]), value=-math.inf).masked_fill(~finite[:, None], 0.0)
        broken[row, lane] = ~finite
    return mem, broken


def fuse_rows(logits: torch.Tensor, index: torch.Tensor, token_row: torch.Tensor, mem: torch.Tensor, weight: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Rows of ``logits`` (fp32 out) whose step token ``index`` has memories: ``memories.fuse.fuse`` over the base and all of them; others unchanged.

    Every row is gathered and fused, then base rows are taken back as they
    were, so the work does not depend on which rows are which and nothing is
    read back to the host. Pure tensor work.
    """
    logits = logits.float()
    row = token_row[index]
    planned = row.clamp(min=0)
    m, w, t = mem[planned], weight[planned], temperature[planned]
    if m.shape[1] == 1:
        fused = fuse(logits, m[:, 0], w, t)
    else:
        lanes = range(m.shape[1])
        fused = fuse(logits, [m[:, k] for k in lanes], [w[:, k : k + 1] for k in lanes], [t[:, k : k + 1] for k in lanes])
    return torch.where((row >= 0)[:, None], fused, logits)


def _by_head(entries: list[tuple]) -> list[list[tuple]]:
    """Entries ``(row, lane, part, token)`` by output head: thin memories share the base's."""
    groups: dict[object, list[tuple]] = {}
    for entry in entries:
        slot = entry[2].slot
        groups.setdefault("base" if slot.thin else slot.index, []).append(entry)
    return list(groups.values())


def _report_non_finite(broken: torch.Tensor, entries: list[tuple]) -> None:
    if broken.any():
        for n, lane, part, _ in entries:
            if broken[n, lane]:
                _warn_once(part.slot.name, f"memory {part.slot.name} gave non-finite logits; the base alone serves those rows")


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)
