"""Which of a forward's tokens belong to which batch row.

vLLM's V1 runner lays a step's tokens out row after row, in the persistent
batch's row order; the attention metadata's ``query_start_loc`` says where
each row's tokens start (row i: ``[starts[i], starts[i + 1])``). A row's span
is the tokens the base computes for it this step: a whole prompt, a chunk of
it, the part the prefix cache did not hold, or one decoded token. Its token
ids are the step's ``input_ids``; with ``--enable-prompt-embeds`` vLLM's
runner passes ``inputs_embeds`` alone, and they are the request's own tokens
at those positions (its prompt, then vLLM's live list of its output).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("memserve.rows")

# Under Model Runner V2 the rows reach the forward as keyword arguments from memserve's model state
# (server/worker/v2_state.py) instead of being read here: the step's memory rows, and the step's
# token ids where vLLM passes only inputs_embeds (--enable-prompt-embeds)
ROWS_KWARG = "memserve_rows"
IDS_KWARG = "memserve_input_ids"


@dataclass(frozen=True)
class Span:
    start: int  # index of the row's first token in this step's tokens
    stop: int
    position: int | None = None  # that token's position in the request's sequence (None: not read)
    tokens: list[int] | None = None  # the row's token ids this step (None: not read)


def spans(rows: dict, input_ids: torch.Tensor | None, positions: torch.Tensor, tokens: bool = True) -> list[tuple[object, Span]]:
    """``(rows[i], span)`` of every row in ``rows`` (by batch row index, each a ``server.worker.rows.Request``) that has tokens in this step, in row order.

    ``tokens``: also each span's position and token ids (one read of the step's
    positions and ids, which on a GPU waits for them). Decoder memories need
    neither: they read the step's own tensors on the device; calm memories and
    steps without token ids (prompt embeddings) do.
    """
    if not rows:
        return []
    starts = query_start_loc()
    if starts is None:
        return []
    present = [i for i in sorted(rows) if i + 1 < len(starts) and starts[i + 1] > starts[i]]
    if not present:
        return []
    if not tokens:
        return [(rows[i], Span(starts[i], starts[i + 1])) for i in present]
    # one read of the step's positions and ids for all rows, whatever their number
    first = positions[[starts[i] for i in present]].tolist()
    ids = input_ids.tolist() if input_ids is not None else None
    out = []
    for index, position in zip(present, first):
        s, e = starts[index], starts[index + 1]
        held = ids[s:e] if ids is not None else rows[index].context(position, position + e - s)
        out.append((rows[index], Span(s, e, position, held)))
    return out


def query_start_loc() -> list[int] | None:
    """This forward's row starts, from the attention metadata; None outside a forward (or a backend without them, logged)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, dict) and metadata:
        starts = getattr(next(iter(metadata.values())), "query_start_loc", None)
        if starts is not None:
            return starts.tolist()
    if metadata is not None and not _warned:
        _warned.append(True)
        log.error("memories need per-request query_start_loc from the attention metadata; steps without it serve memory rows as the base")
    return None


_warned: list[bool] = []  # the missing-metadata error is logged once per process, not at every step
