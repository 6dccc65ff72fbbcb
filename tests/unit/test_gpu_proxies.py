"""CPU proxies for how decoder memories would run on a GPU (no GPU with vLLM is available to this project).

- A decode step's number of tensor operations must not grow with its number of
  memory rows (on a GPU each is a kernel launch): batches of 2, 8 and 32 rows of
  one memory dispatch the same operations. (A batch of one row dispatches
  slightly different ones, not more: PyTorch skips copies that one row does not
  need, and indexes one element through a view.)
- The tensor stages (the memory slots' forward and the fusion) read nothing
  back to the host: no ``aten._local_scalar_dense`` (``.item()``, ``bool()``,
  ``if tensor``), which on a GPU waits for the step to finish.
- The same stages trace into one graph with ``torch.compile(fullgraph=True)``,
  so a GPU can compile them and capture them in a CUDA graph.

The attention layers are stand-ins here (vLLM's need its engine): one that
returns its query for counting, a causal one over the step for compiling.
"""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from vllm import SamplingParams

from server.worker.bank import LaneGroup, MemoryBank
from server.worker.decoder_step import fuse_rows, memory_logits
from server.worker.extension import REGISTRY
from tests.unit.test_processor import Batch, NeoxRope, load, make_bank

KEY = "alpha@proxy"
# operations that only describe a tensor anew (no kernel on a GPU)
METADATA_ONLY = {"aten.view", "aten._unsafe_view", "aten.slice", "aten.select", "aten.t", "aten.transpose", "aten.expand", "aten.unsqueeze", "aten.squeeze", "aten.detach", "aten.alias", "aten.lift_fresh"}


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class QueryAttention(torch.nn.Module):
    """Returns its query: one operation whatever the batch, so only memserve's own operations are counted."""

    def forward(self, q, k, v):
        return q


class StepAttention(torch.nn.Module):
    """Causal attention over the whole step as one sequence: traceable, for the compile check."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def forward(self, q, k, v):
        c, n = self.cfg, q.shape[0]
        q, k, v = (t.view(n, -1, c.head_dim).transpose(0, 1) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=c.heads != c.kv_heads).transpose(0, 1).reshape(n, -1)


@pytest.fixture
def bank(tiny):
    bank = make_bank(tiny, slots=2, lanes=2)
    bank.attn = torch.nn.ModuleList(QueryAttention() for _ in bank.attn)
    load(bank, tiny["alpha"], KEY)
    yield bank
    REGISTRY.pop(KEY)


def decode_step(bank, monkeypatch, rows: int) -> tuple[Counter, torch.Tensor]:
    """The operations of one decode step with ``rows`` rows of one memory (forward and compute_logits)."""
    batch = Batch(monkeypatch, bank)
    params = SamplingParams(extra_args={"memserve_memory": KEY, "memserve_weight": 0.5, "memserve_temperature": 1.0})
    batch.update(added=[(i, params, [5 + i, 6, 7], [20]) for i in range(rows)])
    with Ops() as mode:
        batch.forward([(3, [20])] * rows)
        _, fused = batch.sample()
    batch.update(removed=list(range(rows)))
    return mode.ops, fused


def test_a_decode_step_dispatches_the_same_operations_for_2_8_and_32_rows(bank, monkeypatch):
    two, _ = decode_step(bank, monkeypatch, 2)
    assert sum(two.values()) > 50  # the memory and the fusion did run
    for rows in (8, 32):
        many, fused = decode_step(bank, monkeypatch, rows)
        assert many == two, (rows, (many - two) + (two - many))
        assert fused.shape[0] == rows
    one, _ = decode_step(bank, monkeypatch, 1)
    launches = lambda ops: sum(n for op, n in ops.items() if op not in METADATA_ONLY)  # noqa: E731
    assert launches(one) <= launches(two)


class HostReads:
    """Counts reads of tensor values into Python (``.tolist()``, ``.item()``, ``.numpy()``, ``.cpu()``, ``bool()``), which a dispatch mode does not see on a CPU tensor."""

    NAMES = ("tolist", "item", "numpy", "cpu", "__bool__")

    def __init__(self, monkeypatch):
        self.calls = Counter()
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, original))

    def _counting(self, name, original):
        def counted(tensor, *args, **kwargs):
            self.calls[name] += 1
            return original(tensor, *args, **kwargs)

        return counted


def test_a_decode_step_reads_nothing_back_to_the_host(bank, monkeypatch):
    """Forward (the memory slots, the output heads at the planned tokens) and compute_logits (the fusion, gathered by the device's token index)."""
    from server.worker import decoder_step

    batch = Batch(monkeypatch, bank)
    params = SamplingParams(extra_args={"memserve_memory": KEY, "memserve_weight": 0.5, "memserve_temperature": 1.0})
    batch.update(added=[(i, params, [5 + i, 6, 7], [20]) for i in range(4)])
    batch.forward([(0, [5 + i, 6, 7]) for i in range(4)])  # the prefill, outside the count
    monkeypatch.setattr(decoder_step, "_report_non_finite", lambda broken, entries: None)  # CPU only: a GPU skips it
    reads = HostReads(monkeypatch)
    with Ops() as mode:
        batch.forward([(3, [20])] * 4)
        fused = batch.model.compute_logits(batch.out[torch.arange(4)])
    monkeypatch.undo()
    base, again = batch.sample()  # the decode step's rows, outside the count
    assert torch.equal(fused, again) and not torch.allclose(fused, torch.log_softmax(base.float(), -1))  # the memory was fused
    assert mode.ops["aten._local_scalar_dense"] == 0 and mode.ops["aten.is_nonzero"] == 0, mode.ops
    assert not reads.calls, reads.calls
    batch.update(removed=list(range(4)))


def test_the_memory_slots_and_the_fusion_compile_as_one_graph(tiny, monkeypatch):
    import torch._dynamo

    bank = make_bank(tiny, slots=2, lanes=1)
    bank.attn = torch.nn.ModuleList(StepAttention(bank.shape) for _ in bank.attn)
    slot = load(bank, tiny["alpha"], "alpha@compile")
    try:
        ids, positions = torch.tensor([5, 6, 7, 8]), torch.arange(4)
        lanes = [[LaneGroup(slot, torch.tensor([1, 2, 3]))]]
        base = torch.randn(2, bank.shape.vocab_size)

        def step(ids, positions, base, index):
            hidden = bank(ids, positions, lanes)
            head = (bank.head_weight(slot), torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([2, 3]))
            mem, broken = memory_logits(hidden, [head], 2, 1)
            weight, temperature = torch.full((2, 1), 0.5).masked_fill(broken, 0.0), torch.ones(2, 1)
            token_row = torch.tensor([-1, -1, 0, 1])
            return fuse_rows(base, index, token_row, mem, weight, temperature)

        torch._dynamo.reset()
        index = torch.tensor([1, 3])  # a base token and a memory token
        eager = step(ids, positions, base, index)
        compiled = torch.compile(step, fullgraph=True, backend="eager")(ids, positions, base, index)  # a graph break raises
        assert torch.allclose(compiled, eager) and torch.equal(eager[0], base[0])
    finally:
        REGISTRY.pop("alpha@compile")


def test_the_step_planning_queues_its_uploads_instead_of_waiting():
    """A tensor made from a host list straight on a GPU (``torch.tensor(..., device=...)``) waits for the device; the worker's step code stages through ``upload``."""
    import ast
    from pathlib import Path

    from server.worker.upload import upload

    assert torch.equal(upload([[1, 2], [3, 4]], torch.device("cpu")), torch.tensor([[1, 2], [3, 4]]))
    assert upload([0.5], "cpu", torch.float64).dtype == torch.float64
    root = Path(__file__).resolve().parents[2] / "server" / "worker"
    direct = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("tensor", "as_tensor"):
                if any(k.arg == "device" for k in node.keywords):
                    direct.append(f"{path.name}:{node.lineno}")
    assert not direct, direct
