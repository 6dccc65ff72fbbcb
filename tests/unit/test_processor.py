"""Decoder fusion inside memserve's model, driven with hand-built batches (no engine).

The row bookkeeping (``MemoryRows``) gets vLLM's batch updates; the model's
``forward`` gets a step's tokens laid out row after row with their
``query_start_loc``; ``compute_logits`` gets rows of the widened output picked
as vLLM's V1 runner picks them (each row's last token for sampling, a slice of
a request's tokens for prompt logprobs). Memory rows must equal
``memories.fuse`` of the base's logits and the memory's at the same context;
base rows must be the base's logits, bit for bit.
"""

import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from memories.fuse import fuse
from memories.runner import MemoryDecoder
from server.worker import spans as spans_module
from server.worker.extension import REGISTRY
from server.worker.model import MemserveModel, split_token_index, with_token_index
from server.worker.rows import MemoryRows

KEY = "alpha@test"
WIDTH, VOCAB = 16, 320


class _Base(torch.nn.Module):
    """Stands in for vLLM's model: a hidden state per token from its id and position, and a linear head."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(VOCAB, WIDTH, generator=g)
        self.head = torch.randn(VOCAB, WIDTH, generator=g)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return (self.table[input_ids] if input_ids is not None else inputs_embeds) + 0.01 * positions[:, None].float()

    def compute_logits(self, hidden):
        return 3 * hidden @ self.head.T


class _Model(MemserveModel, _Base):
    def __init__(self):
        _Base.__init__(self)  # MemserveModel.__init__ builds vLLM's model; here only its state is needed
        self._width, self._dtype, self._calm, self._decoders = WIDTH, torch.float32, None, None


class Batch:
    """vLLM's V1 runner, as far as memserve's model sees it."""

    def __init__(self, monkeypatch):
        self.rows = MemoryRows(None, torch.device("cpu"), False)
        self.model = _Model()
        self.monkeypatch = monkeypatch

    def update(self, removed=(), added=(), moved=()):
        self.rows.update_state(BatchUpdate(batch_size=0, removed=list(removed), added=list(added), moved=list(moved)))

    def forward(self, spans: list[tuple[int, list[int]]], embeds: bool = False) -> None:
        """One step: per batch row, (position of its first token, its tokens); ``embeds``: as inputs_embeds alone (``--enable-prompt-embeds``)."""
        ids, positions, starts = [], [], [0]
        for position, tokens in spans:
            ids += tokens
            positions += range(position, position + len(tokens))
            starts.append(len(ids))
        self.monkeypatch.setattr(spans_module, "query_start_loc", lambda: starts)
        ids, positions = torch.tensor(ids), torch.tensor(positions)
        self.base_hidden = _Base.forward(self.model, ids, positions)
        self.out = self.model.forward(None, positions, inputs_embeds=self.model.table[ids]) if embeds else self.model.forward(ids, positions)
        self.starts = starts

    def logits(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the base's logits, compute_logits' output) at the step's tokens ``index``."""
        return _Base.compute_logits(self.model, self.base_hidden[index]), self.model.compute_logits(self.out[index])

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logits(torch.tensor(self.starts[1:]) - 1)


def params(memory: bool, weight: float = 0.5, key: str = KEY, temperature: float = 1.0) -> SamplingParams:
    extra = {"memserve_memory": key, "memserve_weight": weight, "memserve_temperature": temperature} if memory else None
    return SamplingParams(extra_args=extra)


@pytest.fixture(scope="module")
def memory(tiny):
    from transformers import AutoModelForCausalLM

    REGISTRY.add(KEY, MemoryDecoder(tiny["alpha"], name=KEY))
    yield AutoModelForCausalLM.from_pretrained(tiny["alpha"]).eval()
    REGISTRY.pop(KEY)


@pytest.fixture
def batch(monkeypatch):
    batch = Batch(monkeypatch)
    yield batch
    batch.update(removed=sorted(batch.rows.requests))  # rows a test leaves give their slots back


def oracle(hf, base_row, context, weight=0.5, temperature=1.0):
    with torch.no_grad():
        mem = hf(torch.tensor([context])).logits[0, -1]
    return fuse(base_row, mem, weight, temperature)


def decode(*contexts: list[int]) -> list[tuple[int, list[int]]]:
    """A decode step's spans: each row's last token at its position."""
    return [(len(c) - 1, c[-1:]) for c in contexts]


def test_the_token_index_column_is_lossless():
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        hidden = (torch.randn(7, WIDTH) * 100).to(dtype)
        back, index = split_token_index(with_token_index(hidden)[[5, 2, 6]], dtype)
        assert torch.equal(back, hidden[[5, 2, 6]]) and back.dtype == dtype and back.is_contiguous()
        assert index == [5, 2, 6]


def test_a_step_without_decoder_rows_is_vllms_own(memory, batch):
    batch.update(added=[(0, params(False), [5, 6], [])])
    batch.forward([(0, [5, 6])])
    assert batch.out.shape == (2, WIDTH)  # not widened
    base, got = batch.sample()
    assert torch.equal(got, base)


def test_batch_lifecycle(memory, batch):
    decoder = REGISTRY.get(KEY)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    outs = [[], [], []]
    batch.update(added=[(0, params(True), prompts[0], outs[0]), (1, params(False), prompts[1], outs[1]), (2, params(True, 0.8), prompts[2], outs[2])])
    batch.forward([(0, p) for p in prompts])
    assert batch.out.shape == (9, WIDTH + 1)
    base, fused = batch.sample()
    assert torch.equal(fused[1], base[1])  # no memory: untouched, bit for bit
    assert torch.allclose(fused[0], oracle(memory, base[0], prompts[0]), atol=1e-4)
    assert torch.allclose(fused[2], oracle(memory, base[2], prompts[2], 0.8), atol=1e-4)

    # decode: vLLM appends to the live output lists, then computes each row's new token
    for o, t in zip(outs, (20, 21, 22)):
        o.append(t)
    batch.forward(decode(*(p + o for p, o in zip(prompts, outs))))
    base, fused = batch.sample()
    assert torch.equal(fused[1], base[1])
    assert torch.allclose(fused[2], oracle(memory, base[2], prompts[2] + outs[2], 0.8), atol=1e-4)
    assert decoder.length(batch.rows.requests[2].decoders[0].slot) == len(prompts[2] + outs[2])

    # row 0 finishes; condense moves row 2 into slot 0
    batch.update(removed=[0], moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)])
    outs[2].append(23)
    batch.forward(decode(prompts[2] + outs[2], prompts[1] + outs[1]))
    base, fused = batch.sample()
    assert torch.equal(fused[1], base[1])
    assert torch.allclose(fused[0], oracle(memory, base[0], prompts[2] + outs[2], 0.8), atol=1e-4)

    # swap
    batch.update(moved=[(0, 1, MoveDirectionality.SWAP)])
    outs[2].append(24)
    batch.forward(decode(prompts[1] + outs[1], prompts[2] + outs[2]))
    base, fused = batch.sample()
    assert torch.equal(fused[0], base[0])
    assert torch.allclose(fused[1], oracle(memory, base[1], prompts[2] + outs[2], 0.8), atol=1e-4)

    # slot 1 refilled by an add without a "removed" entry: a preempted request coming back with outputs
    resumed = [30, 31]
    batch.update(added=[(1, params(True), [1, 2, 3], resumed)])
    batch.forward(decode(prompts[1] + outs[1]) + [(0, [1, 2, 3, 30, 31])])  # vLLM recomputes its whole context
    base, fused = batch.sample()
    assert torch.allclose(fused[1], oracle(memory, base[1], [1, 2, 3, 30, 31]), atol=1e-4)

    batch.update(removed=[1, 0])
    assert batch.rows.requests == {}
    assert decoder.running == 0  # nothing leaked: every slot is free or parked


def test_steps_without_input_ids_read_the_requests_own_tokens(memory, batch):
    """With --enable-prompt-embeds vLLM's runner passes inputs_embeds and no input_ids, also for token prompts."""
    prompt, out = [5, 6, 7], []
    batch.update(added=[(0, params(True), prompt, out), (1, params(False), [8], [])])
    batch.forward([(0, prompt), (0, [8])], embeds=True)
    out.append(20)
    batch.forward(decode(prompt + out, [8, 9]), embeds=True)
    base, fused = batch.sample()
    assert torch.equal(fused[1], base[1])
    assert torch.allclose(fused[0], oracle(memory, base[0], prompt + out), atol=1e-4)


def test_prompt_logprobs_are_fused_at_every_position(memory, batch):
    """vLLM slices a request's prompt positions out of the forward's output and calls compute_logits on them."""
    prompt = [5, 9, 11, 40, 7, 8]
    batch.update(added=[(0, params(False), [3, 4], []), (1, params(True, 0.3), prompt, [])])
    batch.forward([(0, [3, 4]), (0, prompt)])
    base, fused = batch.logits(torch.arange(2, 2 + len(prompt) - 1))
    for i in range(len(prompt) - 1):
        assert torch.allclose(fused[i], oracle(memory, base[i], prompt[: i + 1], 0.3), atol=1e-4)
    base, plain = batch.logits(torch.arange(0, 2))
    assert torch.equal(plain, base)  # the base request's prompt positions: untouched


def test_chunked_prefill_reads_the_prompt_chunk_by_chunk(memory, batch, monkeypatch):
    """A 10-token prompt computed by the base in chunks of 4, 4, 2 beside a decoding row: the memory reads the same chunks."""
    decoder = REGISTRY.get(KEY)
    reads = []
    read = decoder.read
    monkeypatch.setattr(decoder, "read", lambda slots, tokens: reads.append([len(t) for t in tokens]) or read(slots, tokens))
    prompt, out, short, short_out = list(range(40, 50)), [], [5, 6], []
    batch.update(added=[(0, params(True), prompt, out), (1, params(True), short, short_out)])
    batch.forward([(0, prompt[:4]), (0, short)])
    base, fused = batch.sample()
    assert torch.allclose(fused[0], oracle(memory, base[0], prompt[:4]), atol=1e-4)  # vLLM discards this sample; it is fused all the same
    for start, stop, token in ((4, 8, 20), (8, 10, 21)):
        short_out.append(token)
        batch.forward([(start, prompt[start:stop]), decode(short + short_out)[0]])
        base, fused = batch.sample()
        assert torch.allclose(fused[1], oracle(memory, base[1], short + short_out), atol=1e-4)
    assert reads == [[4, 2], [4, 1], [2, 1]]
    assert torch.allclose(fused[0], oracle(memory, base[0], prompt), atol=1e-4)  # as one pass over the prompt
    out.append(22)
    short_out.append(23)
    batch.forward(decode(prompt + out, short + short_out))
    base, fused = batch.sample()
    assert torch.allclose(fused[0], oracle(memory, base[0], prompt + out), atol=1e-4)
    batch.update(removed=[1, 0])


def test_a_prefix_cache_hit_reads_the_skipped_prompt_first(memory, batch, monkeypatch):
    """vLLM computes only the prompt's last tokens (the rest came from its prefix cache): the memory reads them all."""
    decoder = REGISTRY.get(KEY)
    reads = []
    read = decoder.read
    monkeypatch.setattr(decoder, "read", lambda slots, tokens: reads.append([len(t) for t in tokens]) or read(slots, tokens))
    prompt = list(range(3, 23))
    batch.update(added=[(0, params(True), prompt, [])])
    batch.forward([(16, prompt[16:])])
    base, fused = batch.sample()
    assert reads == [[20]]
    assert torch.allclose(fused[0], oracle(memory, base[0], prompt), atol=1e-4)
    batch.update(removed=[0])


def test_a_recompute_cuts_the_memory_back_to_the_step_position(memory, batch):
    """A request vLLM recomputes from an earlier position (preemption) brings a span that starts before the memory's end."""
    decoder = REGISTRY.get(KEY)
    prompt, out = [5, 6, 7, 8, 9, 10], []
    batch.update(added=[(0, params(True), prompt, out)])
    batch.forward([(0, prompt)])
    out += [20, 21]
    batch.forward(decode(prompt + out[:1]))
    slot = batch.rows.requests[0].decoders[0].slot
    assert decoder.length(slot) == 7
    batch.forward([(4, (prompt + out)[4:])])  # from position 4 again, through the newest token
    base, fused = batch.sample()
    assert decoder.length(slot) == 8
    assert torch.allclose(fused[0], oracle(memory, base[0], prompt + out), atol=1e-4)
    batch.update(removed=[0])


def test_row_that_leaves_the_batch_and_returns_resumes_its_slot(memory, batch):
    """vLLM drops preempted or unscheduled requests from the batch; coming back, they must not recompute."""
    decoder = REGISTRY.get(KEY)
    prompt, out = [5, 6, 7, 8], []
    batch.update(added=[(0, params(True), prompt, out)])
    batch.forward([(0, prompt)])
    out += [20, 21]
    batch.forward(decode(prompt + out[:1]))
    batch.forward(decode(prompt + out))
    slot = batch.rows.requests[0].decoders[0].slot
    batch.update(removed=[0])
    batch.update(added=[(0, params(False), [1, 2], [])])  # another request meanwhile
    batch.forward([(0, [1, 2])])
    batch.update(added=[(1, params(True), prompt, out)])  # the same request object returns
    assert batch.rows.requests[1].decoders[0].slot == slot and decoder.length(slot) == len(prompt + out) - 1
    out.append(22)
    batch.forward(decode([1, 2, 3]) + decode(prompt + out))
    base, fused = batch.sample()
    assert decoder.length(slot) == len(prompt + out)
    assert torch.allclose(fused[1], oracle(memory, base[1], prompt + out), atol=1e-4)
    batch.update(removed=[1, 0])


def test_kv_budget_evicts_idle_rows_and_recomputes_them(tiny, memory, batch):
    """Under a two-sequence KV budget a third request evicts the least recently used row, which later reads its context again."""
    per_slot = 2 * 1 * 1 * 64 * 64 * 4  # k and v × 1 layer × 1 kv head × 64 tokens × head size 64 × fp32
    budgeted = MemoryDecoder(tiny["alpha"], name="alpha@budget", kv_budget_bytes=2 * per_slot, max_len=64)
    REGISTRY.add("alpha@budget", budgeted)
    try:
        p = params(True, key="alpha@budget")
        prompts, outs = [[5, 6, 7], [8, 9], [10, 11, 12]], [[], [], []]
        batch.update(added=[(i, p, prompts[i], outs[i]) for i in (0, 1)])
        batch.forward([(0, prompts[0]), (0, prompts[1])])
        batch.update(added=[(2, p, prompts[2], outs[2])])
        batch.forward([(3, []), (2, []), (0, prompts[2])])  # a step that computes only the new request
        base, fused = batch.logits(torch.tensor([2]))
        assert budgeted.evictions == 1
        assert torch.allclose(fused[0], oracle(memory, base[0], prompts[2]), atol=1e-4)
        for o, t in zip(outs, (30, 31, 32)):
            o.append(t)
        batch.forward(decode(*(p + o for p, o in zip(prompts, outs))))
        base, fused = batch.sample()
        for i in range(3):
            assert torch.allclose(fused[i], oracle(memory, base[i], prompts[i] + outs[i]), atol=1e-4)
        batch.update(removed=[2, 1, 0])
        assert budgeted.running == 0
    finally:
        REGISTRY.pop("alpha@budget")


def test_rows_beyond_the_kv_budget_run_uncached(tiny, memory, batch):
    """Three rows in one step under a two-sequence budget: the pool does not grow, every row is right."""
    per_slot = 2 * 1 * 1 * 64 * 64 * 4
    budgeted = MemoryDecoder(tiny["alpha"], name="alpha@tight", kv_budget_bytes=2 * per_slot, max_len=64)
    REGISTRY.add("alpha@tight", budgeted)
    try:
        p = params(True, key="alpha@tight")
        prompts, outs = [[5, 6, 7], [8, 9], [10, 11, 12]], [[], [], []]
        batch.update(added=[(i, p, prompts[i], outs[i]) for i in range(3)])
        batch.forward([(0, q) for q in prompts])
        for t in (20, 21):
            base, fused = batch.sample()
            for i in range(3):
                assert torch.allclose(fused[i], oracle(memory, base[i], prompts[i] + outs[i]), atol=1e-4)
            for o in outs:
                o.append(t)
            batch.forward(decode(*(q + o for q, o in zip(prompts, outs))))
        assert len(budgeted._lengths) == 2
        batch.update(removed=[2, 1, 0])
    finally:
        REGISTRY.pop("alpha@tight")


def test_memory_row_without_prompt_token_ids_is_served_by_the_base(memory, batch):
    """A prompt-embeds request has no token ids for the memory to read: the base alone, no crash."""
    batch.update(added=[(0, params(True), None, []), (1, params(True), [5, 6], [])])
    batch.forward([(0, [7, 7]), (0, [5, 6])])
    base, fused = batch.sample()
    assert torch.equal(fused[0], base[0])
    assert torch.allclose(fused[1], oracle(memory, base[1], [5, 6]), atol=1e-4)
    batch.update(removed=[1, 0])


def test_non_finite_memory_logits_leave_the_base_distribution(memory, batch):
    batch.update(added=[(0, params(True), [5, 6], []), (1, params(True), [7, 8], [])])
    batch.forward([(0, [5, 6]), (0, [7, 8])])
    step = batch.model._decoders
    part = batch.rows.requests[0].decoders[0]
    step.hidden[id(part)] = step.hidden[id(part)].clone()
    step.hidden[id(part)][-1, 3] = float("inf")  # as an overflow in a low-precision dtype would leave it
    base, fused = batch.sample()
    assert torch.isfinite(fused).all()
    assert torch.allclose(fused[0], torch.log_softmax(base[0], -1), atol=1e-6)
    assert torch.allclose(fused[1], oracle(memory, base[1], [7, 8]), atol=1e-4)
    batch.update(removed=[1, 0])


def test_thin_memories_share_one_head_call(tiny, tmp_path, batch, monkeypatch):
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
        rows = [("thin-a@t", [5, 6, 7], 0.5), ("beta@t", [8, 9], 0.3), ("thin-b@t", [10, 11, 12], 0.7), (None, [4], 0.0), ("thin-a@t", [13], 0.2), ("thin-b@t", [1, 2], 0.9)]
        outs = [[] for _ in rows]
        batch.update(added=[(i, params(key is not None, weight, key=key), prompt, outs[i]) for i, (key, prompt, weight) in enumerate(rows)])
        batch.forward([(0, prompt) for _, prompt, _ in rows])
        for step_no in range(3):
            heads.clear()
            base, fused = batch.sample()
            assert sorted(heads) == [1, 4]  # beta's row alone; all four thin rows in one call
            for i, (key, prompt, weight) in enumerate(rows):
                if key is None:
                    assert torch.equal(fused[i], base[i])
                    continue
                o = oracles[key]
                expected = fuse(base[i], original(o, o.compute(prompt + outs[i])[-1]), weight)
                assert torch.allclose(fused[i], expected, atol=1e-5), (step_no, key)
            for i, o in enumerate(outs):
                o.append(20 + i + step_no)
            batch.forward(decode(*(prompt + outs[i] for i, (_, prompt, _) in enumerate(rows))))
        batch.update(removed=list(range(len(rows))))
    finally:
        for key in keys:
            REGISTRY.pop(key)


def test_mixture_rows_beside_single_and_base_rows(tiny, memory, batch, monkeypatch):
    """Rows of alpha, beta, a base row and two mixtures of both: each memory reads once per step for all its rows."""
    from transformers import AutoModelForCausalLM

    beta_key = "beta@mix"
    REGISTRY.add(beta_key, MemoryDecoder(tiny["beta"], name=beta_key))
    beta_hf = AutoModelForCausalLM.from_pretrained(tiny["beta"]).eval()
    hf = {KEY: memory, beta_key: beta_hf}
    calls = {KEY: [], beta_key: []}
    for key in calls:
        decoder = REGISTRY.get(key)
        monkeypatch.setattr(decoder, "read", lambda slots, tokens, key=key, original=decoder.read: calls[key].append(len(slots)) or original(slots, tokens))
    try:
        mix = lambda keys, ws, ts: SamplingParams(extra_args={"memserve_memories": keys, "memserve_weights": ws, "memserve_temperatures": ts})  # noqa: E731
        rows = [
            (params(True, 0.5), ([KEY], [0.5], [1.0])),
            (mix([KEY, beta_key], [0.3, 0.2], [1.0, 0.8]), ([KEY, beta_key], [0.3, 0.2], [1.0, 0.8])),
            (params(False), None),
            (params(True, 0.4, key=beta_key, temperature=0.8), ([beta_key], [0.4], [0.8])),
            (mix([beta_key, KEY], [0.5, 0.5], [0.8, 1.0]), ([beta_key, KEY], [0.5, 0.5], [0.8, 1.0])),
        ]
        prompts = [[5, 6, 7], [8, 9], [10, 11], [12, 13, 14], [15]]
        outs = [[] for _ in rows]
        batch.update(added=[(i, p, prompts[i], outs[i]) for i, (p, _) in enumerate(rows)])
        spans = [(0, p) for p in prompts]
        for step_no in range(3):
            for c in calls.values():
                c.clear()
            batch.forward(spans)
            base, fused = batch.sample()
            assert calls == {KEY: [3], beta_key: [3]}  # one call per memory, all its rows (single and mixture) together
            for i, (_, spec) in enumerate(rows):
                if spec is None:
                    assert torch.equal(fused[i], base[i])  # base rows untouched
                    continue
                keys, ws, ts = spec
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
            spans = decode(*(p + o for p, o in zip(prompts, outs)))
        parts = batch.rows.requests[1].decoders
        assert len(parts) == 2 and None not in (parts[0].slot, parts[1].slot)
        batch.update(removed=list(range(len(rows))))
        assert REGISTRY.get(KEY).running == 0 and REGISTRY.get(beta_key).running == 0
    finally:
        REGISTRY.pop(beta_key)


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"memserve_memory": 3, "memserve_weight": 0.5}, "string"),
        ({"memserve_memory": "a", "memserve_weight": 2.0}, r"\[0, 1\]"),
        ({"memserve_memory": "a", "memserve_weight": 0.5, "memserve_temperature": 0}, "positive"),
        ({"memserve_calm": 3}, "string"),
        ({"memserve_memories": ["a", "b"], "memserve_weights": [0.7, 0.4], "memserve_temperatures": [1.0, 1.0]}, "sum to at most 1"),
        ({"memserve_memories": ["a", "b"], "memserve_weights": [0.5], "memserve_temperatures": [1.0, 1.0]}, "one length"),
        ({"memserve_memories": ["a", "a"], "memserve_weights": [0.1, 0.1], "memserve_temperatures": [1.0, 1.0]}, "twice"),
        ({"memserve_memories": ["a", "b"], "memserve_weights": [0.1, 0.1], "memserve_temperatures": [1.0, -1.0]}, "positive"),
    ],
)
def test_validate_params(extra, match):
    with pytest.raises(ValueError, match=match):
        MemoryRows.validate_params(SamplingParams(extra_args=extra))
    MemoryRows.validate_params(SamplingParams())
    MemoryRows.validate_params(SamplingParams(extra_args={"memserve_memories": ["a", "b"], "memserve_weights": [0.6, 0.4], "memserve_temperatures": [1.0, 2.0]}))
