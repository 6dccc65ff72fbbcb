"""The worker RPCs and the engine adapter's load protocol, with a stand-in for vLLM's collective_rpc."""

import asyncio

import pytest
import torch

from memories.artifact import ArtifactError
from server.engine.client import EngineAdapter
from server.worker.extension import REGISTRY, MemoryWorkerExtension
from tests.tiny_models import poisoned_copy


class OneWorkerEngine:
    """collective_rpc as vLLM runs it: the named method on every worker (here one), results in a list.

    ``bank``: the worker's model has these decoder memory slots (memserve's model, as test_processor's stand-in).
    """

    def __init__(self, bank=None):
        self.worker = MemoryWorkerExtension()
        if bank is not None:
            from types import SimpleNamespace

            from tests.unit.test_processor import _Model

            model = _Model(bank)
            self.worker.model_runner = SimpleNamespace(device=torch.device("cpu"), model_config=SimpleNamespace(dtype=torch.float32, max_model_len=512), get_model=lambda: model)
        self.calls = []

    async def collective_rpc(self, method, args=()):
        self.calls.append(method)
        return [getattr(self.worker, method)(*args)]


def test_load_polls_until_the_memory_is_ready(tiny):
    from tests.unit.test_processor import make_bank

    engine = OneWorkerEngine(make_bank(tiny, slots=1))
    info = asyncio.run(EngineAdapter(engine).load_memory("alpha@w1", str(tiny["alpha"])))
    try:
        assert info["num_parameters"] > 0 and info["bytes"] > 0
        assert engine.calls[0] == "memserve_load" and engine.calls[-1] == "memserve_loaded"
        assert REGISTRY.get("alpha@w1") is not None
    finally:
        asyncio.run(EngineAdapter(engine).unload_memory("alpha@w1"))
    assert REGISTRY.get("alpha@w1") is None
    info = asyncio.run(EngineAdapter(engine).load_memory("beta@w1", str(tiny["beta"])))  # the one slot is free again
    asyncio.run(EngineAdapter(engine).unload_memory("beta@w1"))


def test_a_server_without_decoder_slots_refuses_decoder_memories(tiny):
    with pytest.raises(ArtifactError, match=r"decoder memories are off.*--decoder-slots 0"):
        asyncio.run(EngineAdapter(OneWorkerEngine()).load_memory("alpha@w0", str(tiny["alpha"])))


def test_nan_weights_arrive_as_artifact_error(tiny, tmp_path):
    """vLLM would turn a worker's exception into a bare Exception; the adapter raises the ArtifactError itself."""
    from tests.unit.test_processor import make_bank

    bad = poisoned_copy(tiny["alpha"], tmp_path / "nan")
    engine = OneWorkerEngine(make_bank(tiny, slots=1))
    with pytest.raises(ArtifactError, match=r"weights are not finite.*up_proj"):
        asyncio.run(EngineAdapter(engine).load_memory("nan@w1", str(bad)))
    assert engine.calls[-1] == "memserve_unload" and REGISTRY.get("nan@w1") is None


def test_weights_are_counted_in_the_engine_dtype():
    class Engine:
        class model_config:
            dtype = torch.bfloat16

    assert EngineAdapter(Engine()).bytes_per_parameter == 2


def test_base_tensors_are_views_of_the_engine_model_cut_to_its_vocabulary():
    """vLLM pads the vocabulary rows (here 320 → 384); a tied head is the embedding itself."""
    from types import SimpleNamespace

    from server.worker.extension import base_tensors

    embed = torch.nn.Parameter(torch.randn(384, 128), requires_grad=False)
    model = SimpleNamespace(model=SimpleNamespace(embed_tokens=SimpleNamespace(weight=embed)), lm_head=SimpleNamespace(weight=embed))
    runner = SimpleNamespace(get_model=lambda: model, model_config=SimpleNamespace(get_vocab_size=lambda: 320))
    got = base_tensors(runner)
    assert got["embed_tokens.weight"].shape == (320, 128) and got["lm_head.weight"].shape == (320, 128)
    assert got["lm_head.weight"].data_ptr() == embed.data_ptr()  # a view, not a copy
    model.model = SimpleNamespace()  # an architecture without ``model.embed_tokens``
    assert base_tensors(runner) is None
    assert base_tensors(None) is None


@pytest.fixture(scope="module")
def calm_dir(tiny, tmp_path_factory):
    from transformers import AutoTokenizer

    from tests.tiny_models import build_calm, build_llama

    root = tmp_path_factory.mktemp("calm-worker")
    augment = build_llama(root / "aug", AutoTokenizer.from_pretrained(tiny["tokenizer"]), layers=2, seed=5, hidden=192)
    return build_calm(root / "cal", tiny["base"], augment, [(1, 1)], heads=2, seed=3)


def test_a_calm_memorys_caches_are_budgeted_by_the_kv_budget_and_reported(calm_dir):
    """--memory-kv-budget reaches a calm memory: its load reports the budget and the rows it holds, and its caches are queryable."""
    engine = OneWorkerEngine()
    budget = 64 << 20
    adapter = EngineAdapter(engine, kv_budget_bytes=budget)
    info = asyncio.run(adapter.load_memory("cal@w1", str(calm_dir)))
    try:
        memory = REGISTRY.get("cal@w1")
        assert info["cache_budget_bytes"] == budget and info["max_rows"] == memory.max_rows >= 1
        assert 0 < info["cache_bytes"] <= budget
        row = memory.open()
        memory.read([row], [list(range(3, 40))], [0])
        sizes = asyncio.run(adapter.cache_bytes(["cal@w1", "gone@w9"]))
        assert sizes == {"cal@w1": memory.cache_bytes} and memory.cache_bytes > info["cache_bytes"]
        memory.close(row)
    finally:
        asyncio.run(adapter.unload_memory("cal@w1"))


def test_a_base_served_by_vllms_own_class_refuses_decoder_memories(tiny):
    """A base architecture memserve's model has no class for: its model cannot apply a decoder memory, so the load is refused, naming both."""
    from types import SimpleNamespace

    engine = OneWorkerEngine()
    hf_config = SimpleNamespace(architectures=["GemmaForCausalLM"], num_hidden_layers=2)
    engine.worker.model_runner = SimpleNamespace(
        device=torch.device("cpu"), model_config=SimpleNamespace(dtype=torch.float32, max_model_len=64, hf_config=hf_config), get_model=lambda: object()
    )
    with pytest.raises(ArtifactError, match=r"decoder memories need memserve's model.*GemmaForCausalLM.*LlamaForCausalLM"):
        asyncio.run(EngineAdapter(engine).load_memory("alpha@w9", str(tiny["alpha"])))
    assert REGISTRY.get("alpha@w9") is None
