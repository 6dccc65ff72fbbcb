"""memserve's model state for vLLM's Model Runner V2, driven with vLLM's own request and input-batch objects (no engine).

V2 cannot run on these CPUs (its runner prepares every step with Triton
kernels, and this Triton has no CPU backend), so the state is checked the way
V2's runner uses it: ``add_request`` / ``remove_request`` with vLLM's
``NewRequestData``, ``prepare_inputs`` with vLLM's ``InputBatch`` (built from
``InputBatch.make_dummy`` with the batch's own rows put in), and the model's
``forward`` given what ``prepare_inputs`` returned, against the V1 path of the
same batch (``tests/unit/test_processor.py``'s harness). The state is built
by its real ``__init__`` on a minimal ``VllmConfig`` of the tiny base.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.v1.core.sched.output import NewRequestData
from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers

from server.worker.extension import REGISTRY, rows_hold
from server.worker.model import MemserveModel
from server.worker.spans import IDS_KWARG, ROWS_KWARG, Span
from server.worker.v2_state import MemserveModelState
from tests.unit.test_gpu_proxies import Ops
from tests.unit.test_processor import Batch, Layout, _Model, load, make_bank

ALPHA, BETA = "alpha@v2", "beta@v2"


def single(key: str, weight: float = 0.5, temperature: float = 1.0) -> SamplingParams:
    return SamplingParams(extra_args={"memserve_memory": key, "memserve_weight": weight, "memserve_temperature": temperature})


def mixture(keys: list[str], weights: list[float], temperatures: list[float]) -> SamplingParams:
    return SamplingParams(extra_args={"memserve_memories": keys, "memserve_weights": weights, "memserve_temperatures": temperatures})


def new_request(req_id: str, params: SamplingParams | None, prompt: list[int] | None = (5, 6, 7), embeds: torch.Tensor | None = None) -> NewRequestData:
    """What V2's scheduler hands the runner for a newly scheduled request (``NewRequestData.from_request``'s fields)."""
    prompt = list(prompt) if prompt is not None else None
    return NewRequestData(
        req_id=req_id, prompt_token_ids=prompt, mm_features=[], sampling_params=params, pooling_params=None, block_ids=([],),
        num_computed_tokens=0, lora_request=None, prompt_embeds=embeds, prefill_token_ids=prompt if prompt is not None else [0] * len(embeds),
    )  # fmt: skip


def input_batch(rows: list[tuple[str, int, int]], padded_reqs: int = 0, device: str = "cpu") -> InputBatch:
    """vLLM's input batch of a step whose batch rows are ``(req_id, request-state index, tokens this step)``, in order.

    ``padded_reqs``: extra padding rows past ``num_reqs``, as a CUDA-graph batch
    has them (their ``query_start_loc`` entries repeat the token count).
    ``device="meta"``: every tensor of the batch on the meta device, so reading
    one on the host (``.tolist()``, ``.item()``) raises.
    """
    counts = np.array([n for *_, n in rows], dtype=np.int32)
    tokens = int(counts.sum())
    dummy = InputBatch.make_dummy(len(rows), tokens, InputBuffers(len(rows) + padded_reqs, tokens, torch.device("cpu")))
    starts = np.full(len(rows) + padded_reqs + 1, tokens, dtype=np.int32)
    starts[0] = 0
    np.cumsum(counts, out=starts[1 : len(rows) + 1])
    index = np.array([i for _, i, _ in rows], dtype=np.intp)
    batch = dataclasses.replace(
        dummy, req_ids=[r for r, *_ in rows], num_reqs_after_padding=len(rows) + padded_reqs, idx_mapping_np=index,
        idx_mapping=torch.from_numpy(index).long(), num_scheduled_tokens=counts, query_start_loc_np=starts,
        query_start_loc=torch.from_numpy(starts), logits_indices=torch.from_numpy(starts[1 : len(rows) + 1] - 1).long(),
    )  # fmt: skip
    if device == "meta":
        for f in dataclasses.fields(batch):
            value = getattr(batch, f.name)
            if isinstance(value, torch.Tensor):
                setattr(batch, f.name, torch.empty(value.shape, dtype=value.dtype, device="meta"))
    return batch


@pytest.fixture(scope="module")
def bank(tiny):
    bank = make_bank(tiny)
    load(bank, tiny["alpha"], ALPHA)
    load(bank, tiny["beta"], BETA)
    yield bank
    for key in (ALPHA, BETA):
        REGISTRY.pop(key).retired = True


@pytest.fixture(scope="module")
def vllm_config(tiny):
    from vllm.config import ModelConfig, VllmConfig

    return VllmConfig(model_config=ModelConfig(model=str(tiny["base"]), dtype="float32", max_model_len=256))


@pytest.fixture
def state(vllm_config, bank):
    """memserve's model state as V2's runner builds it (``init_model_state`` asks the model for its class)."""
    from vllm.v1.worker.gpu.model_states import init_model_state

    state = init_model_state(vllm_config, _Model(bank), None, torch.device("cpu"))
    assert type(state) is MemserveModelState and MemserveModelState.active is state
    yield state
    MemserveModelState.active = None


def test_the_model_names_its_v2_state_class():
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    assert MemserveModel.get_model_state_cls() is MemserveModelState
    assert issubclass(MemserveModelState, DefaultModelState)


def test_prepare_inputs_hands_the_forward_each_memory_rows_span_in_batch_row_order(state, bank):
    adds = {
        "base": (0, None, SamplingParams()),  # no memory
        "beta": (1, None, single(BETA, 0.4, 0.8)),
        "calm": (2, None, SamplingParams(extra_args={"memserve_calm": "calm@1"})),  # calm: not served under V2
        "alpha": (3, None, single(ALPHA, 0.3)),
        "gone": (4, None, single("never-loaded@1")),  # a memory this worker has not loaded: the base alone
        "mix": (5, None, mixture([ALPHA, BETA], [0.3, 0.2], [1.0, 0.8])),
    }
    for req_id, (index, _, params) in adds.items():
        state.add_request(index, new_request(req_id, params))
    assert sorted(state.requests) == [1, 3, 5]
    # V2 orders the batch its own way: rows are request states idx_mapping[i], tokens query_start_loc[i]:[i + 1]
    batch = input_batch([("mix", 5, 3), ("base", 0, 2), ("alpha", 3, 1), ("calm", 2, 2), ("gone", 4, 1), ("beta", 1, 4)], padded_reqs=2)
    inputs = state.prepare_inputs(batch, None)
    assert set(inputs) == {ROWS_KWARG}
    rows = inputs[ROWS_KWARG]
    assert [span for _, span in rows] == [Span(0, 3), Span(5, 6), Span(9, 13)]
    assert [[(p.slot.name, p.weight, p.temperature) for p in r.decoders] for r, _ in rows] == [
        [(ALPHA, 0.3, 1.0), (BETA, 0.2, 0.8)],
        [(ALPHA, 0.3, 1.0)],
        [(BETA, 0.4, 0.8)],
    ]
    assert rows[1][0] is state.requests[3][1]
    assert state.holds(bank.held[0]) and rows_hold(bank.held[0])

    # a request leaves (finished or preempted), the rest reorder; its index is reused by the next add
    state.remove_request("alpha")
    rows = state.prepare_inputs(input_batch([("beta", 1, 1), ("mix", 5, 1)]), None)[ROWS_KWARG]
    assert [(r.decoders[0].slot.name, span) for r, span in rows] == [(BETA, Span(0, 1)), (ALPHA, Span(1, 2))]
    state.add_request(3, new_request("next", single(BETA)))
    rows = state.prepare_inputs(input_batch([("next", 3, 2), ("mix", 5, 1), ("beta", 1, 1)]), None)[ROWS_KWARG]
    assert [span for _, span in rows] == [Span(0, 2), Span(2, 3), Span(3, 4)]

    # dummy batches (profiling, warm-up, idle DP ranks) number their rows 0, 1, ... under made-up names: no memory rows
    dummy = InputBatch.make_dummy(6, 12, InputBuffers(8, 16, torch.device("cpu")))
    assert state.prepare_inputs(dummy, None) == {ROWS_KWARG: []}
    assert state.prepare_dummy_inputs(6, 12) == {ROWS_KWARG: []}

    for req_id in ("base", "beta", "calm", "gone", "mix", "next", "never-added"):
        state.remove_request(req_id)
    assert state.requests == {} and state.indices == {}
    assert not state.holds(bank.held[0]) and not rows_hold(bank.held[0])
    assert state.prepare_inputs(batch, None) == {ROWS_KWARG: []}


def test_prepare_inputs_reads_no_device_tensor(state):
    """Host arrays only: the batch's tensors on the meta device (a host read raises), and not one tensor operation dispatched."""
    for i, params in enumerate((single(ALPHA), SamplingParams(), mixture([BETA, ALPHA], [0.5, 0.5], [0.8, 1.0]))):
        state.add_request(i, new_request(f"r{i}", params))
    batch = input_batch([("r2", 2, 3), ("r0", 0, 1), ("r1", 1, 2)], device="meta")
    state.pass_input_ids = True  # as with --enable-prompt-embeds: the step's ids are handed over, not read
    with Ops() as mode:
        inputs = state.prepare_inputs(batch, None)
        dummy = state.prepare_dummy_inputs(3, 6)
    assert not mode.ops, mode.ops  # no aten._local_scalar_dense, no copy, nothing
    assert [span for _, span in inputs[ROWS_KWARG]] == [Span(0, 3), Span(3, 4)]
    assert inputs[IDS_KWARG] is batch.input_ids and dummy == {ROWS_KWARG: []}


def test_calm_and_malformed_selections_are_served_by_the_base_and_logged(state, caplog):
    with caplog.at_level(logging.ERROR, logger="memserve.rows"):
        state.add_request(0, new_request("c1", SamplingParams(extra_args={"memserve_calm": "calm@1", "memserve_memory": ALPHA, "memserve_weight": 0.5})))
        state.add_request(1, new_request("c2", SamplingParams(extra_args={"memserve_calm": "calm@1"})))
        state.add_request(2, new_request("bad", SamplingParams(extra_args={"memserve_memory": ALPHA, "memserve_weight": 2.0})))
        state.add_request(3, new_request("embeds", single(ALPHA), prompt=None, embeds=torch.zeros(3, 16)))
    calm = [r for r in caplog.records if "calm memories are not served under Model Runner V2" in r.getMessage()]
    assert len(calm) <= 1  # once per worker process (an earlier test may have logged it already)
    assert any("malformed memory selection" in r.getMessage() for r in caplog.records)
    assert any("prompt embeddings" in r.getMessage() for r in caplog.records)
    # the calm request keeps its decoder memory; the others run the base
    assert [(i, [p.slot.name for p in r.decoders]) for i, (_, r) in state.requests.items()] == [(0, [ALPHA])]
    for req_id in ("c1", "c2", "bad", "embeds"):
        state.remove_request(req_id)


def test_the_v2_forward_fuses_exactly_as_the_v1_forward(state, bank, monkeypatch):
    """One mixed batch (base rows, one memory, a mixture) stepped through both runners' paths: the same widened hidden states and fused logits, bit for bit."""
    v1 = Batch(monkeypatch, bank)
    v2 = _Model(bank)
    specs = [
        ("base", SamplingParams(), [3, 4]),
        ("alpha", single(ALPHA, 0.5), [5, 6, 7]),
        ("mix", mixture([ALPHA, BETA], [0.3, 0.2], [1.0, 0.8]), [8, 9]),
        ("beta", single(BETA, 0.4, 0.8), [10, 11, 12, 13]),
        ("plain", SamplingParams(), [14]),
    ]
    state_index = [7, 2, 5, 0, 3]  # V2's request-state indices are not batch rows
    outs = [[] for _ in specs]
    v1.update(added=[(i, params, prompt, outs[i]) for i, (_, params, prompt) in enumerate(specs)])
    for (req_id, params, prompt), index in zip(specs, state_index):
        state.add_request(index, new_request(req_id, params, prompt))
    spans = [(0, prompt) for _, _, prompt in specs]
    try:
        for step_no in range(3):
            v1.forward(spans)
            base, fused_v1 = v1.sample()
            batch = input_batch([(req_id, index, len(tokens)) for (req_id, _, _), index, (_, tokens) in zip(specs, state_index, spans)])
            rows = state.prepare_inputs(batch, None)[ROWS_KWARG]
            assert [r.decoders[0].slot.name for r, _ in rows] == [ALPHA, ALPHA, BETA]
            ids = torch.tensor([t for _, tokens in spans for t in tokens])
            positions = torch.tensor([p for position, tokens in spans for p in range(position, position + len(tokens))])
            starts = batch.query_start_loc_np
            # the stand-in paged attention keeps keys and values per request: V2's requests are other objects, so a cache of their own
            requests = {i: r for i in range(len(specs)) for r, span in rows if span.start == starts[i]}
            Layout.rows = [(id(requests[i].output) if i in requests else None, int(starts[i]), int(starts[i + 1]), positions[starts[i] : starts[i + 1]].tolist()) for i in range(len(specs))]
            out = v2.forward(ids, positions, **{ROWS_KWARG: rows})
            assert torch.equal(out, v1.out)  # widened by the same token index column
            fused_v2 = v2.compute_logits(out[batch.logits_indices])
            assert torch.equal(fused_v2, fused_v1), step_no
            assert torch.equal(fused_v2[0], base[0]) and torch.equal(fused_v2[4], base[4])  # base rows: vLLM's own
            assert all(not torch.allclose(fused_v2[i], torch.log_softmax(base[i], -1), atol=1e-3) for i in (1, 2, 3))  # memory rows: fused
            # prompt logprobs: vLLM slices a request's prompt positions out of the forward's output
            if step_no == 0:
                assert torch.equal(v2.compute_logits(out[3:5]), v1.model.compute_logits(v1.out[3:5]))
            # with --enable-prompt-embeds V2 passes inputs_embeds alone, and the state hands over the step's ids
            embedded = v2.forward(None, positions, inputs_embeds=v2.table[ids], **{ROWS_KWARG: rows, IDS_KWARG: ids})
            assert torch.equal(v2.compute_logits(embedded[batch.logits_indices]), fused_v1)
            for i, o in enumerate(outs):
                o.append(20 + i + step_no)
            spans = [(len(prompt) + len(o) - 1, o[-1:]) for (_, _, prompt), o in zip(specs, outs)]
        # a step without decoder rows returns vLLM's hidden states untouched
        assert v2.forward(ids[:1], positions[:1], **{ROWS_KWARG: []}).shape == (1, v2._width)
    finally:
        v1.update(removed=list(range(len(specs))))
        for req_id, *_ in specs:
            state.remove_request(req_id)
