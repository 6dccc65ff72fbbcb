"""Which batch row runs which decoder memories under vLLM's Model Runner V2: a model state class.

Model Runner V2 (``vllm/v1/worker/gpu/model_runner.py``) refuses V1 logits
processors, so :class:`server.worker.rows.MemoryRows` cannot keep the rows
there. V2's extension point for per-request model inputs is the model state
(``vllm/v1/worker/gpu/model_states/``): memserve's model names this class in
``get_model_state_cls``, and the runner

- calls :meth:`add_request` with each newly scheduled request (a preempted one
  comes back as a new one) and its index in the runner's request states, and
  :meth:`remove_request` when it finishes or is preempted (before the index is
  freed);
- calls :meth:`prepare_inputs` before every forward, real or dummy, and merges
  the dict it returns into the forward's keyword arguments
  (``model_inputs = {..., **model_state.prepare_inputs(...)}``); CUDA-graph
  capture uses :meth:`prepare_dummy_inputs` instead.

So this state learns each request's decoder memories at ``add_request`` (the
same ``SamplingParams.extra_args`` keys and registry look-up as the V1
bookkeeping, ``server.worker.rows.decoder_parts``), and hands the forward,
under the keyword ``memserve_rows`` (``server.worker.spans.ROWS_KWARG``), the
list ``[(Request, Span(start, stop)), ...]`` of the step's memory rows in
batch-row order, built from the input batch's host arrays alone
(``idx_mapping_np``, ``query_start_loc_np``, ``req_ids``): no read of a device
tensor, and no need for the attention metadata's ``query_start_loc``, so any
attention backend will do. With ``--enable-prompt-embeds`` the runner passes
the forward ``inputs_embeds`` and no ``input_ids``; the step's token ids are
then handed over too (``memserve_input_ids``: the input batch's device
tensor, not read on the host).

Not served under V2:

- calm memories: calm's augmenting model needs each row's token lists (and
  forward hooks inside the base's layers); a request naming one is served
  without it (logged once per worker), and the server refuses to start with
  V2 and calm memories accepted (``server/engine/client.py``);
- memories of a prompt-embeddings request (as under V1): its rows run the base.

vLLM calls no ``validate_params`` of memserve's under V2 (that is a method of
the V1 processor); the API process writes these keys itself, and a malformed
request reaching here is served by the base, logged.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm.v1.core.sched.output import NewRequestData
from vllm.v1.worker.gpu.input_batch import InputBatch
from vllm.v1.worker.gpu.model_states.default import DefaultModelState
from vllm.v1.worker.gpu.states import RequestState

from server.engine.keys import CALM_MEMORY, read_decoder_parts
from server.worker.bank import Slot
from server.worker.rows import MemoryRows, Request, decoder_parts
from server.worker.spans import IDS_KWARG, ROWS_KWARG, Span

log = logging.getLogger("memserve.rows")


class MemserveModelState(DefaultModelState):
    """vLLM's default model state, plus each request's decoder memories and the step's memory rows for the forward."""

    active: "MemserveModelState | None" = None  # the instance of this worker process (its loads ask it which slots rows still use)

    def __init__(self, vllm_config, model, encoder_cache, device) -> None:
        super().__init__(vllm_config, model, encoder_cache, device)
        self.start_rows(pass_input_ids=bool(self.model_config.enable_prompt_embeds))

    def start_rows(self, pass_input_ids: bool = False) -> None:
        """memserve's part of the state: empty bookkeeping; ``pass_input_ids``: hand the forward the step's ids (prompt embeddings on)."""
        self.requests: dict[int, tuple[str, Request]] = {}  # req_index → (req_id, its memories): requests with decoder memories only
        self.indices: dict[str, int] = {}  # req_id → req_index
        self.pass_input_ids = pass_input_ids
        MemserveModelState.active = self

    # ---- requests ------------------------------------------------------------

    def add_request(self, req_index: int, new_req_data: NewRequestData) -> None:
        super().add_request(req_index, new_req_data)
        self._drop(req_index)  # an index is freed before reuse; a stale entry must not outlive it all the same
        params = new_req_data.sampling_params
        if params is None:
            return
        request = _request(new_req_data.req_id, params, new_req_data.prompt_token_ids, new_req_data.prompt_embeds is not None)
        if request is not None:
            self.requests[req_index] = (new_req_data.req_id, request)
            self.indices[new_req_data.req_id] = req_index

    def remove_request(self, req_id: str) -> None:
        super().remove_request(req_id)
        index = self.indices.pop(req_id, None)
        if index is not None and self.requests.get(index, ("",))[0] == req_id:
            del self.requests[index]

    def _drop(self, index: int) -> None:
        held = self.requests.pop(index, None)
        if held is not None and self.indices.get(held[0]) == index:
            del self.indices[held[0]]

    def holds(self, slot: Slot) -> bool:
        """Whether a request of the batch runs on ``slot`` (a retired slot is reused only once none does)."""
        return any(part.slot is slot for _, request in list(self.requests.values()) for part in request.decoders)

    # ---- the forward's inputs ------------------------------------------------

    def prepare_inputs(self, input_batch: InputBatch, req_states: RequestState) -> dict[str, Any]:
        inputs = {**super().prepare_inputs(input_batch, req_states), ROWS_KWARG: self.rows(input_batch)}
        if self.pass_input_ids:
            inputs[IDS_KWARG] = input_batch.input_ids
        return inputs

    def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int) -> dict[str, Any]:
        return {**super().prepare_dummy_inputs(num_reqs, num_tokens), ROWS_KWARG: []}

    def rows(self, input_batch: InputBatch) -> list[tuple[Request, Span]]:
        """``(request, span)`` of every batch row with decoder memories and tokens in this step, in batch-row order.

        Host arrays only: batch row i is request state ``idx_mapping_np[i]``,
        named ``req_ids[i]``, and its tokens are ``query_start_loc_np[i]`` to
        ``query_start_loc_np[i + 1]`` of the step. A row whose name is not the
        request this state holds at that index is not a memory row: the
        runner's dummy batches (profiling, warm-up, idle data-parallel ranks)
        number their rows 0, 1, ... under made-up names.
        """
        if not self.requests:
            return []
        index, starts, names = input_batch.idx_mapping_np, input_batch.query_start_loc_np, input_batch.req_ids
        out = []
        for i in range(input_batch.num_reqs):
            held = self.requests.get(int(index[i]))
            if held is None or held[0] != names[i]:
                continue
            start, stop = int(starts[i]), int(starts[i + 1])
            if stop > start:
                out.append((held[1], Span(start, stop)))
        return out


def _request(req_id: str, params, prompt: list[int] | None, embeds: bool) -> Request | None:
    """The request's decoder memories as this worker has them loaded; None for a request the base alone serves."""
    extra = params.extra_args or {}
    if extra.get(CALM_MEMORY) is not None:
        _warn_once("calm", "calm memories are not served under Model Runner V2 (VLLM_USE_V2_MODEL_RUNNER=1): requests naming one run without it")
    try:
        MemoryRows.validate_params(params)  # vLLM runs it at admission under V1 only
        specs = read_decoder_parts(extra) or []
    except ValueError as e:
        log.error("request %s: malformed memory selection (%s); the base alone serves it", req_id, e)
        return None
    if not specs:
        return None
    if prompt is None or embeds:
        log.error("a request with prompt embeddings selects a memory; the base alone serves it")
        return None
    request = Request(list(prompt), [], prompt_logprobs=params.prompt_logprobs is not None)  # under V2 no live output list: decoder memories read the step's token ids on the device
    request.decoders = decoder_parts(specs)
    return request if request.decoders else None


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.error(message)
