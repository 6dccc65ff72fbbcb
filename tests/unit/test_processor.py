"""The V1 logits processor driven with hand-built batch updates (no engine)."""

import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from memories.runner import MemoryDecoder
from memories.fuse import fuse
from server.worker.decoder_processor import MemoryFusionProcessor
from server.worker.extension import REGISTRY

KEY = "alpha@test"


@pytest.fixture(scope="module")
def memory(tiny):
    from transformers import AutoModelForCausalLM

    REGISTRY.add(KEY, MemoryDecoder(tiny["alpha"], name=KEY))
    yield AutoModelForCausalLM.from_pretrained(tiny["alpha"]).eval()
    REGISTRY.pop(KEY)


def params(memory: bool, weight: float = 0.5) -> SamplingParams:
    extra = {"memserve_memory": KEY, "memserve_weight": weight, "memserve_temperature": 1.0} if memory else None
    return SamplingParams(extra_args=extra)


def update(size, removed=(), added=(), moved=()):
    return BatchUpdate(batch_size=size, removed=list(removed), added=list(added), moved=list(moved))


def expected_row(hf, base_row, context, weight=0.5):
    with torch.no_grad():
        mem = hf(torch.tensor([context])).logits[0, -1]
    return fuse(base_row, mem, weight)


def step(proc, batch):
    logits = torch.randn(batch, 320) * 3
    return logits.clone(), proc.apply(logits.clone())


def test_batch_lifecycle(memory):
    proc = MemoryFusionProcessor(None, torch.device("cpu"), False)
    decoder = REGISTRY.get(KEY)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    outs = [[], [], []]
    proc.update_state(update(3, added=[(0, params(True), prompts[0], outs[0]), (1, params(False), prompts[1], outs[1]), (2, params(True, 0.8), prompts[2], outs[2])]))
    base, fused = step(proc, 3)
    assert torch.equal(fused[1], base[1])  # no memory: untouched
    assert torch.allclose(fused[0], expected_row(memory, base[0], prompts[0]), atol=1e-4)
    assert torch.allclose(fused[2], expected_row(memory, base[2], prompts[2], 0.8), atol=1e-4)

    # a chunked-prefill row seen again with nothing new: the decoder does not advance
    length = decoder.length(proc.rows[0].parts[0].slot)
    base, fused = step(proc, 3)
    assert decoder.length(proc.rows[0].parts[0].slot) == length
    assert torch.allclose(fused[0], expected_row(memory, base[0], prompts[0]), atol=1e-4)

    # decode: vLLM appends to the live output lists
    for o, t in zip(outs, (20, 21, 22)):
        o.append(t)
    proc.update_state(None)
    base, fused = step(proc, 3)
    assert torch.allclose(fused[2], expected_row(memory, base[2], prompts[2] + outs[2], 0.8), atol=1e-4)

    # row 0 finishes; condense moves row 2 into slot 0
    proc.update_state(update(2, removed=[0], moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    outs[2].append(23)
    base, fused = step(proc, 2)
    assert torch.equal(fused[1], base[1])
    assert torch.allclose(fused[0], expected_row(memory, base[0], prompts[2] + outs[2], 0.8), atol=1e-4)

    # swap
    proc.update_state(update(2, moved=[(0, 1, MoveDirectionality.SWAP)]))
    base, fused = step(proc, 2)
    assert torch.equal(fused[0], base[0])
    assert torch.allclose(fused[1], expected_row(memory, base[1], prompts[2] + outs[2], 0.8), atol=1e-4)

    # slot 1 refilled by an add without a "removed" entry: the old row is replaced, its slot freed;
    # the new request is a preempted one coming back with outputs already generated
    resumed_out = [30, 31]
    proc.update_state(update(2, added=[(1, params(True), [1, 2, 3], resumed_out)]))
    base, fused = step(proc, 2)
    assert torch.allclose(fused[1], expected_row(memory, base[1], [1, 2, 3, 30, 31]), atol=1e-4)

    proc.update_state(update(0, removed=[1, 0]))
    assert proc.rows == {}
    assert decoder.running == 0  # nothing leaked: every slot is free or parked


def test_sampler_hook_fuses_before_logprobs(memory):
    """With the hook, Sampler.forward sees fused logits and apply() does not fuse twice."""
    proc = MemoryFusionProcessor(None, torch.device("cpu"), False)
    proc.update_state(update(1, added=[(0, params(True), [5, 6], [])]))
    base = torch.randn(1, 320)
    once = proc.fuse_batch(base.clone())
    again = proc.apply(once.clone())
    assert torch.equal(once, again)
    proc.update_state(update(0, removed=[0]))


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"memserve_memory": 3, "memserve_weight": 0.5}, "string"),
        ({"memserve_memory": "a", "memserve_weight": 2.0}, r"\[0, 1\]"),
        ({"memserve_memory": "a", "memserve_weight": 0.5, "memserve_temperature": 0}, "positive"),
    ],
)
def test_validate_params(extra, match):
    with pytest.raises(ValueError, match=match):
        MemoryFusionProcessor.validate_params(SamplingParams(extra_args=extra))
    MemoryFusionProcessor.validate_params(SamplingParams())


def test_kv_budget_evicts_idle_rows_and_recomputes_them(tiny, memory):
    """Under a two-sequence KV budget a third request evicts the least recently used idle row."""
    per_slot = 2 * 1 * 1 * 64 * 64 * 4  # k and v × 1 layer × 1 kv head × 64 tokens × head size 64 × fp32
    budgeted = MemoryDecoder(tiny["alpha"], name="alpha@budget", kv_budget_bytes=2 * per_slot, max_len=64)
    REGISTRY.add("alpha@budget", budgeted)
    try:
        proc = MemoryFusionProcessor(None, torch.device("cpu"), False)
        spec = {"memserve_memory": "alpha@budget", "memserve_weight": 0.5, "memserve_temperature": 1.0}
        prompts, outs = [[5, 6, 7], [8, 9], [10, 11, 12]], [[], [], []]
        proc.update_state(update(2, added=[(i, SamplingParams(extra_args=spec), prompts[i], outs[i]) for i in (0, 1)]))
        step(proc, 2)
        proc.update_state(update(3, added=[(2, SamplingParams(extra_args=spec), prompts[2], outs[2])]))
        base, fused = step(proc, 3)
        assert budgeted.evictions == 1
        assert torch.allclose(fused[2], expected_row(memory, base[2], prompts[2]), atol=1e-4)
        for o, t in zip(outs, (20, 21, 22)):
            o.append(t)
        base, fused = step(proc, 3)  # the evicted row recomputes its whole context
        for i in range(3):
            assert torch.allclose(fused[i], expected_row(memory, base[i], prompts[i] + outs[i]), atol=1e-4)
        proc.update_state(update(0, removed=[2, 1, 0]))
        assert budgeted.running == 0
    finally:
        REGISTRY.pop("alpha@budget")


def test_row_that_leaves_the_batch_and_returns_resumes_its_slot(memory):
    """vLLM drops preempted or unscheduled requests from the batch; coming back, they must not recompute."""
    proc = MemoryFusionProcessor(None, torch.device("cpu"), False)
    decoder = REGISTRY.get(KEY)
    prompt, out = [5, 6, 7, 8], []
    proc.update_state(update(1, added=[(0, params(True), prompt, out)]))
    step(proc, 1)
    out += [20, 21]  # decoded while it was still in the batch, then left
    step(proc, 1)
    slot = proc.rows[0].parts[0].slot
    proc.update_state(update(0, removed=[0]))
    proc.update_state(update(1, added=[(0, params(False), [1, 2], [])]))  # another request meanwhile
    step(proc, 1)
    proc.update_state(update(2, added=[(1, params(True), prompt, out)]))  # the same request object returns
    assert proc.rows[1].parts[0].slot == slot and decoder.length(slot) == len(prompt + out) - 1
    base, fused = step(proc, 2)
    assert decoder.length(slot) == len(prompt + out)  # one token fed, not the whole context
    assert torch.allclose(fused[1], expected_row(memory, base[1], prompt + out), atol=1e-4)
    proc.update_state(update(0, removed=[1, 0]))


def test_rows_beyond_the_kv_budget_run_uncached(tiny, memory):
    """Three rows in one step under a two-sequence budget: the pool does not grow, every row is right."""
    per_slot = 2 * 1 * 1 * 64 * 64 * 4
    budgeted = MemoryDecoder(tiny["alpha"], name="alpha@tight", kv_budget_bytes=2 * per_slot, max_len=64)
    REGISTRY.add("alpha@tight", budgeted)
    try:
        proc = MemoryFusionProcessor(None, torch.device("cpu"), False)
        spec = SamplingParams(extra_args={"memserve_memory": "alpha@tight", "memserve_weight": 0.5, "memserve_temperature": 1.0})
        prompts, outs = [[5, 6, 7], [8, 9], [10, 11, 12]], [[], [], []]
        proc.update_state(update(3, added=[(i, spec, prompts[i], outs[i]) for i in range(3)]))
        for t in (20, 21):
            base, fused = step(proc, 3)
            for i in range(3):
                assert torch.allclose(fused[i], expected_row(memory, base[i], prompts[i] + outs[i]), atol=1e-4)
            for o in outs:
                o.append(t)
        assert len(budgeted._lengths) == 2
        proc.update_state(update(0, removed=[2, 1, 0]))
    finally:
        REGISTRY.pop("alpha@tight")


def test_memory_row_without_prompt_token_ids_is_served_by_the_base(memory):
    """A prompt-embeds request has no token ids for the memory to read: the base alone, no crash."""
    proc = MemoryFusionProcessor(None, torch.device("cpu"), False)
    proc.update_state(update(2, added=[(0, params(True), None, []), (1, params(True), [5, 6], [])]))
    base, fused = step(proc, 2)
    assert torch.equal(fused[0], base[0])
    assert torch.allclose(fused[1], expected_row(memory, base[1], [5, 6]), atol=1e-4)
    proc.update_state(update(0, removed=[1, 0]))


def test_non_finite_memory_logits_leave_the_base_distribution(memory):
    proc = MemoryFusionProcessor(None, torch.device("cpu"), False)
    proc.update_state(update(2, added=[(0, params(True), [5, 6], []), (1, params(True), [7, 8], [])]))
    step(proc, 2)
    broken = proc.rows[0].parts[0].last_hidden.clone()
    broken[3] = float("inf")  # as an overflow in a low-precision dtype would leave it
    proc.rows[0].parts[0].last_hidden = broken
    base, fused = step(proc, 2)  # nothing new to read: the stored hidden state is reused
    assert torch.isfinite(fused).all()
    assert torch.allclose(fused[0], torch.log_softmax(base[0], -1), atol=1e-6)
    assert torch.allclose(fused[1], expected_row(memory, base[1], [7, 8]), atol=1e-4)
    proc.update_state(update(0, removed=[1, 0]))


def test_chunked_prefill_reads_the_prompt_chunk_by_chunk(memory, monkeypatch):
    """A 10-token prompt computed by the base in chunks of 4, 4, 2: the memory reads the same chunks."""
    proc = MemoryFusionProcessor(None, torch.device("cpu"), False)
    decoder = REGISTRY.get(KEY)
    reads = []
    advance = decoder.advance

    def spy(slots, tokens):
        reads.append([len(t) for t in tokens])
        return advance(slots, tokens)

    monkeypatch.setattr(decoder, "advance", spy)
    prompt, out = list(range(40, 50)), []
    short, short_out = [5, 6], []
    proc.update_state(update(2, added=[(0, params(True), prompt, out), (1, params(True), short, short_out)]))
    for computed, decoding in (([4, 2], None), ([8, 3], 20)):
        if decoding is not None:
            short_out.append(decoding)
        proc.computed = computed
        base, fused = step(proc, 2)
        assert torch.equal(fused[0], base[0])  # partial prefill: vLLM discards this sample, left untouched
        assert torch.allclose(fused[1], expected_row(memory, base[1], short + short_out), atol=1e-4)
    short_out.append(21)
    proc.computed = [10, 4]
    base, fused = step(proc, 2)
    assert reads == [[4, 2], [4, 1], [2, 1]]
    assert torch.allclose(fused[0], expected_row(memory, base[0], prompt), atol=1e-4)  # as one pass over the prompt
    out.append(22)
    proc.computed = [11, 4]  # decoding: the count covers the whole context, nothing is capped
    base, fused = step(proc, 2)
    assert torch.allclose(fused[0], expected_row(memory, base[0], prompt + out), atol=1e-4)
    proc.update_state(update(0, removed=[1, 0]))


def test_runner_hook_hands_the_step_counts_to_the_processor(memory):
    """The wrapped GPUModelRunner._sample gives the processor its batch rows' counts for that call only."""
    from types import SimpleNamespace

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    proc = MemoryFusionProcessor(None, torch.device("cpu"), False)  # installs the hook
    seen = []
    batch = SimpleNamespace(
        num_reqs=2,
        sampling_metadata=SimpleNamespace(logitsprocs=SimpleNamespace(non_argmax_invariant=[proc])),
        update_async_output_token_ids=lambda: None,
    )
    runner = SimpleNamespace(
        input_batch=batch,
        optimistic_seq_lens_cpu=torch.tensor([4, 7, 0, 0], dtype=torch.int32),
        sampler=lambda logits, sampling_metadata: seen.append(proc.computed),
    )
    GPUModelRunner._sample(runner, torch.zeros(2, 320), None)
    assert seen == [[4, 7]] and proc.computed is None


def test_thin_memories_share_one_head_call_per_step(tiny, tmp_path, monkeypatch):
    """Rows of two thin memories and a full one: the base's head runs once for both thin memories' rows."""
    from tests.tiny_models import base_embedding_pair, base_tensors_of

    shared = base_tensors_of(tiny["base"])
    full_a, thin_a = base_embedding_pair(tiny["alpha"], tiny["base"], tmp_path)
    full_b, thin_b = base_embedding_pair(tiny["beta"], tiny["base"], tmp_path)
    keys = {"thin-a@t": MemoryDecoder(thin_a, base_tensors=shared), "thin-b@t": MemoryDecoder(thin_b, base_tensors=shared), "beta@t": MemoryDecoder(tiny["beta"])}
    oracles = {"thin-a@t": MemoryDecoder(full_a), "thin-b@t": MemoryDecoder(full_b), "beta@t": MemoryDecoder(tiny["beta"])}
    for key, decoder in keys.items():
        REGISTRY.add(key, decoder)
    heads = []
    original = MemoryDecoder.head
    monkeypatch.setattr(MemoryDecoder, "head", lambda self, hidden: heads.append(len(hidden)) or original(self, hidden))
    try:
        proc = MemoryFusionProcessor(None, torch.device("cpu"), False)
        rows = [("thin-a@t", [5, 6, 7], 0.5), ("beta@t", [8, 9], 0.3), ("thin-b@t", [10, 11, 12], 0.7), (None, [4], 0.0), ("thin-a@t", [13], 0.2), ("thin-b@t", [1, 2], 0.9)]
        outs = [[] for _ in rows]
        added = []
        for i, (key, prompt, weight) in enumerate(rows):
            p = SamplingParams(extra_args={"memserve_memory": key, "memserve_weight": weight, "memserve_temperature": 1.0} if key else None)
            added.append((i, p, prompt, outs[i]))
        proc.update_state(update(len(rows), added=added))
        for step_no in range(3):
            heads.clear()
            base, fused = step(proc, len(rows))
            assert sorted(heads) == [1, 4]  # beta's row alone; all four thin rows in one call
            for i, (key, prompt, weight) in enumerate(rows):
                if key is None:
                    assert torch.equal(fused[i], base[i])
                    continue
                oracle = oracles[key]
                expected = fuse(base[i], original(oracle, oracle.compute(prompt + outs[i])), weight)
                assert torch.allclose(fused[i], expected, atol=1e-5), (step_no, key)
            for i, o in enumerate(outs):
                o.append(20 + i + step_no)
            proc.update_state(None)
        proc.update_state(update(0, removed=list(range(len(rows)))))
    finally:
        for key in keys:
            REGISTRY.pop(key)


def test_mixture_rows_beside_single_and_base_rows(tiny, memory, monkeypatch):
    """Rows of alpha, beta, a base row and two mixtures of both: each memory advances once per step for all its rows."""
    from transformers import AutoModelForCausalLM

    beta_key = "beta@mix"
    REGISTRY.add(beta_key, MemoryDecoder(tiny["beta"], name=beta_key))
    beta_hf = AutoModelForCausalLM.from_pretrained(tiny["beta"]).eval()
    hf = {KEY: memory, beta_key: beta_hf}
    calls = {KEY: [], beta_key: []}
    for key in calls:
        decoder = REGISTRY.get(key)
        original = decoder.advance
        monkeypatch.setattr(decoder, "advance", lambda slots, tokens, key=key, original=original: calls[key].append(len(slots)) or original(slots, tokens))
    try:
        mix = lambda keys, ws, ts: SamplingParams(extra_args={"memserve_memories": keys, "memserve_weights": ws, "memserve_temperatures": ts})  # noqa: E731
        rows = [
            (params(True, 0.5), [([KEY], [0.5], [1.0])]),
            (mix([KEY, beta_key], [0.3, 0.2], [1.0, 0.8]), [([KEY, beta_key], [0.3, 0.2], [1.0, 0.8])]),
            (params(False), None),
            (SamplingParams(extra_args={"memserve_memory": beta_key, "memserve_weight": 0.4, "memserve_temperature": 0.8}), [([beta_key], [0.4], [0.8])]),
            (mix([beta_key, KEY], [0.5, 0.5], [0.8, 1.0]), [([beta_key, KEY], [0.5, 0.5], [0.8, 1.0])]),
        ]
        prompts = [[5, 6, 7], [8, 9], [10, 11], [12, 13, 14], [15]]
        outs = [[] for _ in rows]
        proc = MemoryFusionProcessor(None, torch.device("cpu"), False)
        proc.update_state(update(len(rows), added=[(i, p, prompts[i], outs[i]) for i, (p, _) in enumerate(rows)]))
        for step_no in range(3):
            for c in calls.values():
                c.clear()
            base, fused = step(proc, len(rows))
            assert calls == {KEY: [3], beta_key: [3]}  # one call per memory, all its rows (single and mixture) together
            for i, (_, spec) in enumerate(rows):
                if spec is None:
                    assert torch.equal(fused[i], base[i])  # base rows untouched
                    continue
                (keys, ws, ts), = spec
                with torch.no_grad():
                    mems = [hf[k](torch.tensor([prompts[i] + outs[i]])).logits[0, -1] for k in keys]
                expected = fuse(base[i], mems[0], ws[0], ts[0]) if len(keys) == 1 else fuse(base[i], mems, ws, ts)
                assert torch.allclose(fused[i], expected, atol=1e-4), (step_no, i)
            # the mixture row with Σλ = 1 has no base share: the direct probability-space formula agrees
            with torch.no_grad():
                ctx = torch.tensor([prompts[4] + outs[4]])
                direct = 0.5 * torch.softmax(beta_hf(ctx).logits[0, -1] / 0.8, -1) + 0.5 * torch.softmax(memory(ctx).logits[0, -1], -1)
            assert torch.allclose(fused[4].exp(), direct, atol=1e-5)
            for i, o in enumerate(outs):
                o.append(20 + i + step_no)
            proc.update_state(None)
        assert len(proc.rows[1].parts) == 2 and proc.rows[1].parts[0].slot is not None and proc.rows[1].parts[1].slot is not None
        proc.update_state(update(0, removed=list(range(len(rows)))))
        assert REGISTRY.get(KEY).running == 0 and REGISTRY.get(beta_key).running == 0
    finally:
        REGISTRY.pop(beta_key)


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"memserve_memories": ["a", "b"], "memserve_weights": [0.7, 0.4], "memserve_temperatures": [1.0, 1.0]}, "sum to at most 1"),
        ({"memserve_memories": ["a", "b"], "memserve_weights": [0.5], "memserve_temperatures": [1.0, 1.0]}, "one length"),
        ({"memserve_memories": ["a", "a"], "memserve_weights": [0.1, 0.1], "memserve_temperatures": [1.0, 1.0]}, "twice"),
        ({"memserve_memories": ["a", "b"], "memserve_weights": [0.1, 0.1], "memserve_temperatures": [1.0, -1.0]}, "positive"),
    ],
)
def test_validate_mixture_params(extra, match):
    with pytest.raises(ValueError, match=match):
        MemoryFusionProcessor.validate_params(SamplingParams(extra_args=extra))
    MemoryFusionProcessor.validate_params(SamplingParams(extra_args={"memserve_memories": ["a", "b"], "memserve_weights": [0.6, 0.4], "memserve_temperatures": [1.0, 2.0]}))
