"""Decoder fusion inside memserve's model, driven with hand-built batches (no engine).

The row bookkeeping (``MemoryRows``) gets vLLM's batch updates; the model's
``forward`` gets a step's tokens laid out row after row with their
``query_start_loc``; ``compute_logits`` gets rows of the widened output picked
as vLLM's V1 runner picks them (each row's last token for sampling, a slice of
a request's tokens for prompt logprobs). Memory rows must equal
``memories.fuse`` of the base's logits and the memory's at the same context;
base rows must be the base's logits, bit for bit.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from memories.fuse import fuse
from memories.runner import DecoderConfig
from server.worker import spans as spans_module
from server.worker.bank import MemoryBank
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
    def __init__(self, bank):
        _Base.__init__(self)  # MemserveModel.__init__ builds vLLM's model; here only its state is needed
        self._width, self._dtype, self._calm, self._decoders, self.memory_bank = WIDTH, torch.float32, None, None, bank


class Layout:
    """The step's rows as vLLM's attention metadata describes them: each row's request, first token and positions."""

    rows: list[tuple[object, int, int, torch.Tensor]] = []


class PagedAttention(torch.nn.Module):
    """Stands in for vLLM's ``Attention``: keys and values kept per request and position (as its paged cache
    keeps them per block), written for the step's tokens, then causal attention over the request's positions."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg, self.cache = cfg, {}

    def forward(self, q, k, v):
        c, out = self.cfg, torch.zeros_like(q)
        for request, start, stop, positions in Layout.rows:
            if request is None:  # a base row: its memory attention output is never read
                continue
            held = self.cache.setdefault(request, {})
            for i, p in zip(range(start, stop), positions):
                held[p] = (k[i], v[i])
            for i, p in zip(range(start, stop), positions):
                keys = torch.stack([held[j][0] for j in range(p + 1)]).view(p + 1, c.kv_heads, c.head_dim)
                values = torch.stack([held[j][1] for j in range(p + 1)]).view(p + 1, c.kv_heads, c.head_dim)
                query = q[i].view(c.heads, 1, c.head_dim)
                att = F.scaled_dot_product_attention(query, keys.transpose(0, 1), values.transpose(0, 1), enable_gqa=c.heads != c.kv_heads)
                out[i] = att.reshape(-1)
        return out


class NeoxRope:
    def __init__(self, cfg: DecoderConfig):
        self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
        self.cfg = cfg

    def __call__(self, positions, q, k):
        angles = positions.float()[:, None] * self.inv_freq
        cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]

        def rotate(x):
            x = x.view(x.shape[0], -1, self.cfg.head_dim)
            half = x.shape[-1] // 2
            return (x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin).flatten(1)

        return rotate(q), rotate(k)


def make_bank(tiny, slots: int = 4, lanes: int = 2) -> MemoryBank:
    cfg = DecoderConfig.from_hf("base", json.loads((tiny["base"] / "config.json").read_text()))
    return MemoryBank(cfg, torch.float32, NeoxRope(cfg), slots, lanes, cfg.layers, False, lambda *_: PagedAttention(cfg))


def load(bank: MemoryBank, path, key: str, base_tensors=None):
    slot = bank.load(str(path), key, lambda s: False, base_tensors)
    REGISTRY.add(key, slot)
    return slot


class Batch:
    """vLLM's V1 runner, as far as memserve's model sees it."""

    def __init__(self, monkeypatch, bank):
        self.rows = MemoryRows(None, torch.device("cpu"), False)
        self.model = _Model(bank)
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
        Layout.rows = [(id(self.rows.requests[i].output) if i in self.rows.requests else None, starts[i], starts[i + 1], positions[starts[i] : starts[i + 1]]) for i in range(len(spans))]
        ids, positions = torch.tensor(ids), torch.tensor(positions)
        self.base_hidden = _Base.forward(self.model, ids, positions)
        self.out = self.model.forward(None, positions, inputs_embeds=self.model.table[ids]) if embeds else self.model.forward(ids, positions)
        self.starts = starts

    def logits(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the base's logits, compute_logits' output) at the step's tokens ``index``."""
        return _Base.compute_logits(self.model, self.base_hidden[index]), self.model.compute_logits(self.out[index])

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logits(torch.tensor(self.starts[1:]) - 1)


def params(memory: bool, weight: float = 0.5, key: str = KEY, temperature: float = 1.0, prompt_logprobs: bool = False) -> SamplingParams:
    extra = {"memserve_memory": key, "memserve_weight": weight, "memserve_temperature": temperature} if memory else None
    return SamplingParams(extra_args=extra, prompt_logprobs=1 if prompt_logprobs else None)


@pytest.fixture(scope="module")
def bank(tiny):
    return make_bank(tiny)


@pytest.fixture(scope="module")
def memory(tiny, bank):
    from transformers import AutoModelForCausalLM

    load(bank, tiny["alpha"], KEY)
    yield AutoModelForCausalLM.from_pretrained(tiny["alpha"]).eval()
    REGISTRY.pop(KEY).retired = True


@pytest.fixture
def batch(monkeypatch, bank):
    batch = Batch(monkeypatch, bank)
    yield batch
    batch.update(removed=sorted(batch.rows.requests))


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
        assert index.tolist() == [5, 2, 6]


def test_a_step_without_decoder_rows_is_vllms_own(memory, batch):
    batch.update(added=[(0, params(False), [5, 6], [])])
    batch.forward([(0, [5, 6])])
    assert batch.out.shape == (2, WIDTH)  # not widened
    base, got = batch.sample()
    assert torch.equal(got, base)


def test_batch_lifecycle(memory, batch):
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
    batch.update(added=[(0, params(False), [3, 4], []), (1, params(True, 0.3, prompt_logprobs=True), prompt, [])])
    batch.forward([(0, [3, 4]), (0, prompt)])
    base, fused = batch.logits(torch.arange(2, 2 + len(prompt) - 1))
    for i in range(len(prompt) - 1):
        assert torch.allclose(fused[i], oracle(memory, base[i], prompt[: i + 1], 0.3), atol=1e-4)
    base, plain = batch.logits(torch.arange(0, 2))
    assert torch.equal(plain, base)  # the base request's prompt positions: untouched


def test_chunked_prefill_reads_the_prompt_chunk_by_chunk(memory, batch, monkeypatch):
    """A 10-token prompt computed by the base in chunks of 4, 4, 2 beside a decoding row: the memory reads the same chunks."""
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
    assert torch.allclose(fused[0], oracle(memory, base[0], prompt), atol=1e-4)  # as one pass over the prompt
    out.append(22)
    short_out.append(23)
    batch.forward(decode(prompt + out, short + short_out))
    base, fused = batch.sample()
    assert torch.allclose(fused[0], oracle(memory, base[0], prompt + out), atol=1e-4)
    batch.update(removed=[1, 0])


def test_a_recompute_from_an_earlier_position_equals_the_oracle(memory, batch):
    """A request vLLM recomputes from an earlier position (preemption) writes those positions' keys and values again."""
    prompt, out = [5, 6, 7, 8, 9, 10], []
    batch.update(added=[(0, params(True), prompt, out)])
    batch.forward([(0, prompt)])
    out += [20, 21]
    batch.forward(decode(prompt + out[:1]))
    batch.forward([(4, (prompt + out)[4:])])  # from position 4 again, through the newest token
    base, fused = batch.sample()
    assert torch.allclose(fused[0], oracle(memory, base[0], prompt + out), atol=1e-4)
    batch.update(removed=[0])


def test_row_that_leaves_the_batch_and_returns_goes_on(memory, batch):
    """vLLM drops unscheduled requests from the batch; coming back (into another row), they decode on."""
    prompt, out = [5, 6, 7, 8], []
    batch.update(added=[(0, params(True), prompt, out)])
    batch.forward([(0, prompt)])
    out += [20, 21]
    batch.forward(decode(prompt + out[:1]))
    batch.forward(decode(prompt + out))
    batch.update(removed=[0])
    batch.update(added=[(0, params(False), [1, 2], [])])  # another request meanwhile
    batch.forward([(0, [1, 2])])
    batch.update(added=[(1, params(True), prompt, out)])  # the same request object returns
    out.append(22)
    batch.forward(decode([1, 2, 3]) + decode(prompt + out))
    base, fused = batch.sample()
    assert torch.allclose(fused[1], oracle(memory, base[1], prompt + out), atol=1e-4)
    batch.update(removed=[1, 0])


def test_memory_row_without_prompt_token_ids_is_served_by_the_base(memory, batch):
    """A prompt-embeds request has no token ids for the memory to read: the base alone, no crash."""
    batch.update(added=[(0, params(True), None, []), (1, params(True), [5, 6], [])])
    batch.forward([(0, [7, 7]), (0, [5, 6])])
    base, fused = batch.sample()
    assert torch.equal(fused[0], base[0])
    assert torch.allclose(fused[1], oracle(memory, base[1], [5, 6]), atol=1e-4)
    batch.update(removed=[1, 0])


def test_non_finite_memory_logits_leave_the_base_distribution(memory, batch, bank, monkeypatch):
    original = type(bank).forward

    def overflowing(self, *args):
        hidden = original(self, *args).clone()
        hidden[0, 1, 3] = float("inf")  # row 0's last token, as an overflow in a low-precision dtype would leave it
        return hidden

    batch.update(added=[(0, params(True), [5, 6], []), (1, params(True), [7, 8], [])])
    monkeypatch.setattr(type(bank), "forward", overflowing)
    batch.forward([(0, [5, 6]), (0, [7, 8])])
    base, fused = batch.sample()
    assert torch.isfinite(fused).all()
    assert torch.allclose(fused[0], torch.log_softmax(base[0], -1), atol=1e-6)
    assert torch.allclose(fused[1], oracle(memory, base[1], [7, 8]), atol=1e-4)
    batch.update(removed=[1, 0])


def test_thin_memories_share_one_head_call(tiny, tmp_path, bank, batch, monkeypatch):
    """Rows of two thin memories and a full one: the base's head runs once for both thin memories' rows."""
    from transformers import AutoModelForCausalLM

    from server.worker import decoder_step
    from tests.tiny_models import base_embedding_pair, base_tensors_of

    shared = base_tensors_of(tiny["base"])
    full_a, thin_a = base_embedding_pair(tiny["alpha"], tiny["base"], tmp_path)
    full_b, thin_b = base_embedding_pair(tiny["beta"], tiny["base"], tmp_path)
    for key, path in (("thin-a@t", thin_a), ("thin-b@t", thin_b), ("beta@t", tiny["beta"])):
        load(bank, path, key, shared)
    oracles = {key: AutoModelForCausalLM.from_pretrained(path).eval() for key, path in (("thin-a@t", full_a), ("thin-b@t", full_b), ("beta@t", tiny["beta"]))}
    heads = []
    by_head = decoder_step._by_head
    monkeypatch.setattr(decoder_step, "_by_head", lambda entries: [heads.append(len(g)) or g for g in by_head(entries)])
    try:
        rows = [("thin-a@t", [5, 6, 7], 0.5), ("beta@t", [8, 9], 0.3), ("thin-b@t", [10, 11, 12], 0.7), (None, [4], 0.0), ("thin-a@t", [13], 0.2), ("thin-b@t", [1, 2], 0.9)]
        outs = [[] for _ in rows]
        batch.update(added=[(i, params(key is not None, weight, key=key), prompt, outs[i]) for i, (key, prompt, weight) in enumerate(rows)])
        batch.forward([(0, prompt) for _, prompt, _ in rows])
        for step_no in range(3):
            assert sorted(heads) == [1, 4]  # beta's row alone; all four thin rows in one call
            heads.clear()
            base, fused = batch.sample()
            for i, (key, prompt, weight) in enumerate(rows):
                if key is None:
                    assert torch.equal(fused[i], base[i])
                    continue
                expected = oracle(oracles[key], base[i], prompt + outs[i], weight)
                assert torch.allclose(fused[i], expected, atol=1e-4), (step_no, key)
            for i, o in enumerate(outs):
                o.append(20 + i + step_no)
            batch.forward(decode(*(prompt + outs[i] for i, (_, prompt, _) in enumerate(rows))))
        batch.update(removed=list(range(len(rows))))
    finally:
        for key in ("thin-a@t", "thin-b@t", "beta@t"):
            REGISTRY.pop(key).retired = True


def test_mixture_rows_beside_single_and_base_rows(tiny, memory, bank, batch):
    """Rows of alpha, beta, a base row and two mixtures of both (a row's k-th memory in lane k)."""
    from transformers import AutoModelForCausalLM

    beta_key = "beta@mix"
    load(bank, tiny["beta"], beta_key)
    beta_hf = AutoModelForCausalLM.from_pretrained(tiny["beta"]).eval()
    hf = {KEY: memory, beta_key: beta_hf}
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
            batch.forward(spans)
            base, fused = batch.sample()
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
        assert [p.slot.name for p in parts] == [KEY, beta_key]
        batch.update(removed=list(range(len(rows))))
    finally:
        REGISTRY.pop(beta_key).retired = True


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
