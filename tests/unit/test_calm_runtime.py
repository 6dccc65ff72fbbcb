"""The serving-side calm runtime against the full-sequence composition, and the engine-side row bookkeeping."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from memories.artifact import ArtifactError
from memories.calm.composition import Composition, CompositionSpec, causal_mask, default_connections
from memories.calm.hf import decoder_layers, load_calm
from memories.calm.runtime import CalmMemory
from tests.tiny_models import build_calm, build_llama

BASE_WIDTH = 128


@pytest.fixture(scope="module")
def calm_dir(tiny, tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    root = tmp_path_factory.mktemp("calm-unit")
    augment = build_llama(root / "aug", tok, layers=3, seed=31, hidden=192)
    return build_calm(root / "cal", tiny["base"], augment, [(2, 1), (0, 0), (1, 1)], heads=2, seed=3)


def expected_deltas(calm_dir, ids: list[int], stream: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per base layer, what the full-sequence composition adds to ``stream`` ``[T, D]`` (the same stream at every layer)."""
    augment, comp = load_calm(calm_dir)
    states = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: states.__setitem__(i, o[0] if isinstance(o, tuple) else o)) for i, layer in enumerate(decoder_layers(augment))]
    with torch.no_grad():
        augment(input_ids=torch.tensor([ids]))
        for h in hooks:
            h.remove()
        mask = causal_mask(torch.arange(len(ids)), len(ids))
        out = {}
        for layer in (0, 1):
            x = stream.clone()
            for c in comp.at_base_layer(layer):
                k, v = comp.connections[c].keys_values(states[comp.spec.connections[c][0]][0])
                x = x + comp.connections[c].attend(x, k, v, mask)
            out[layer] = x - stream
    return out


def test_incremental_reads_equal_the_full_sequence(calm_dir):
    """Two rows: one reads its prompt in chunks then decodes, the other decodes beside it; batched or not, the same numbers."""
    memory = CalmMemory(calm_dir, "cal", base_layers=2)
    torch.manual_seed(0)
    seqs = [torch.randint(3, 300, (14,)).tolist(), torch.randint(3, 300, (9,)).tolist()]
    streams = [torch.randn(len(s), BASE_WIDTH) for s in seqs]
    want = [expected_deltas(calm_dir, s, x) for s, x in zip(seqs, streams)]
    rows = [memory.open(), memory.open()]
    # steps: (tokens of row 0, tokens of row 1) as (start, end) spans
    steps = [((0, 5), (0, 7)), ((5, 11), (7, 8)), ((11, 12), (8, 9)), ((12, 13), None), ((13, 14), None)]
    for spans in steps:
        active = [(i, span) for i, span in enumerate(spans) if span]
        memory.read([rows[i] for i, _ in active], [seqs[i][a:b] for i, (a, b) in active], [a for _, (a, _) in active])
        hidden = torch.cat([streams[i][a:b] for i, (a, b) in active])
        counts = [b - a for _, (a, b) in active]
        for layer in (0, 1):
            got = memory.attend(layer, hidden, [rows[i] for i, _ in active], counts)
            expected = torch.cat([want[i][layer][a:b] for i, (a, b) in active])
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert memory.attend(5, hidden, [rows[0]], [1]) is None  # no connection ends after layer 5


def test_a_step_that_starts_earlier_cuts_the_caches_back(calm_dir):
    """vLLM recomputes after a preemption: reading from an earlier position replaces what followed."""
    memory = CalmMemory(calm_dir, "cal", base_layers=2)
    torch.manual_seed(1)
    seq = torch.randint(3, 300, (10,)).tolist()
    stream = torch.randn(len(seq), BASE_WIDTH)
    want = expected_deltas(calm_dir, seq, stream)
    row = memory.open()
    memory.read([row], [seq[:6] + [7, 7, 7]], [0])  # tokens later taken back
    memory.read([row], [seq[6:]], [6])
    assert row.length == len(seq)
    got = memory.attend(1, stream[6:], [row], [4])
    torch.testing.assert_close(got, want[1][6:], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="pass the tokens in between"):
        memory.read([row], [[5]], [12])


def test_an_untrained_composition_adds_exactly_nothing():
    spec = CompositionSpec(((0, 0),), 64, BASE_WIDTH, 2)
    comp = Composition(spec)
    hidden = torch.randn(5, BASE_WIDTH)
    k, v = comp.connections[0].keys_values(torch.randn(5, 64))
    assert torch.equal(comp.connections[0].attend(hidden, k, v, causal_mask(torch.arange(5), 5)), torch.zeros(5, BASE_WIDTH))


def test_default_connections_spread_over_both_models():
    assert default_connections(4, 8, 30) == [(1, 5), (3, 11), (5, 17), (7, 23)]
    assert default_connections(1, 6, 30) == [(5, 14)]
    with pytest.raises(ValueError, match=r"connections must be in \[1, 6\]"):
        default_connections(7, 6, 30)


def test_a_connection_beyond_the_base_is_refused_at_load(calm_dir):
    with pytest.raises(ArtifactError, match="connection outside the models"):
        CalmMemory(calm_dir, "cal", base_layers=1)


# ---- engine side: which batch rows are calm rows, and where their tokens are ----


class _Params:
    def __init__(self, extra):
        self.extra_args = extra
        self.prompt_logprobs = None


class _Update:
    def __init__(self, added=(), removed=(), moved=()):
        self.added, self.removed, self.moved = list(added), list(removed), list(moved)


def test_rows_processor_maps_batch_rows_to_their_tokens(calm_dir, monkeypatch):
    from server.worker import spans
    from server.worker.calm_step import CalmStep
    from server.worker.extension import REGISTRY
    from server.worker.rows import MemoryRows
    from vllm.v1.sample.logits_processor import MoveDirectionality

    memory = CalmMemory(calm_dir, "cal", base_layers=2)
    REGISTRY.add("cal@1", memory)
    try:
        proc = MemoryRows(None, torch.device("cpu"), False)
        prompt_a, prompt_b = [5, 6, 7, 8], [9, 10, 11]
        proc.update_state(
            _Update(added=[(0, _Params({"memserve_calm": "cal@1"}), prompt_a, []), (1, _Params(None), [4, 4], []), (2, _Params({"memserve_calm": "cal@1"}), prompt_b, [])])
        )
        assert set(proc.requests) == {0, 2}
        # batch: row 0 brings 4 tokens, row 1 (base) 2, row 2 3
        monkeypatch.setattr(spans, "query_start_loc", lambda: [0, 4, 6, 9])
        ids = torch.tensor(prompt_a + [4, 4] + prompt_b)
        step = CalmStep.read(spans.spans(proc.requests, ids, torch.tensor([0, 1, 2, 3, 0, 1, 0, 1, 2])))
        (group,) = step.groups
        assert group.index == [0, 1, 2, 3, 6, 7, 8] and group.counts == [4, 3]
        assert [r.length for r in group.rows] == [4, 3]
        hidden, residual = torch.randn(9, BASE_WIDTH), torch.randn(9, BASE_WIDTH)
        out = step.after_layer(1, hidden, residual)
        assert torch.equal(out[4:6], residual[4:6])  # the base row: untouched, bit for bit
        assert not torch.allclose(out[:4], residual[:4])
        # row 2 moves to slot 1; row 0 finishes
        proc.update_state(_Update(removed=[0], moved=[(2, 1, MoveDirectionality.UNIDIRECTIONAL)]))
        assert set(proc.requests) == {1} and proc.requests[1].calm_row.length == 3
        assert memory.augment.running == 1  # the finished row gave its slot back
    finally:
        REGISTRY.pop("cal@1")


def test_a_prefix_from_the_cache_is_read_from_the_known_tokens(calm_dir, monkeypatch):
    from server.worker import spans
    from server.worker.calm_step import CalmStep
    from server.worker.extension import REGISTRY
    from server.worker.rows import MemoryRows

    memory = CalmMemory(calm_dir, "cal", base_layers=2)
    REGISTRY.add("cal@2", memory)
    try:
        proc = MemoryRows(None, torch.device("cpu"), False)
        prompt = list(range(3, 23))
        proc.update_state(_Update(added=[(0, _Params({"memserve_calm": "cal@2"}), prompt, [])]))
        monkeypatch.setattr(spans, "query_start_loc", lambda: [0, 4])
        step = CalmStep.read(spans.spans(proc.requests, torch.tensor(prompt[16:]), torch.arange(16, 20)))  # vLLM computes only the last 4
        (group,) = step.groups
        assert group.tokens == [prompt] and group.starts == [0] and group.counts == [4]
        assert group.rows[0].length == 20
    finally:
        REGISTRY.pop("cal@2")


def test_a_cache_budget_bounds_the_rows_caches_and_idle_rows_give_them_back(calm_dir, caplog):
    """--memory-kv-budget covers a calm memory's caches: the augmenting model's pool and the connections' keys and values."""
    max_len, tokens = 512, 300
    probe = CalmMemory(calm_dir, "cal", base_layers=2, max_len=max_len)
    row_bytes = probe.augment._slot_bytes(max_len) + len(probe.spec.connections) * 2 * probe.spec.base_width * max_len * 4
    budget = 3 * row_bytes + row_bytes // 2
    memory = CalmMemory(calm_dir, "cal", base_layers=2, max_len=max_len, kv_budget_bytes=budget)
    assert (memory.max_rows, memory.cache_budget_bytes, probe.max_rows) == (3, budget, None)
    idle = memory.cache_bytes
    assert 0 < idle <= budget
    torch.manual_seed(2)
    rows = [memory.open() for _ in range(3)]
    for row in rows:  # prompts, then decoding steps
        memory.read([row], [torch.randint(3, 300, (tokens,)).tolist()], [0])
    for _ in range(3):
        memory.read(rows, [[5]] * 3, [r.length for r in rows])
    assert idle < memory.cache_bytes <= budget
    grown = memory.cache_bytes
    extra = memory.open()  # more rows than the budget holds (the server admits none): served, and said so
    assert "beyond its cache budget (--memory-kv-budget)" in caplog.text and extra.slot not in {r.slot for r in rows}
    for row in rows + [extra]:
        memory.close(row)
    assert memory.cache_bytes == idle < grown  # idle: the pool shrinks back, rows' caches are gone
