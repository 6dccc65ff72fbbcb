"""Catalog logic with a fake engine: limits, versioned keys, replace and unload bookkeeping."""

import asyncio

import pytest
from transformers import AutoTokenizer

from server.catalog import MemoryCatalog
from server.errors import Conflict, UnknownMemory


class FakeEngine:
    kv_budget_bytes = 1000
    bytes_per_parameter = 2  # a bf16 engine

    def __init__(self):
        self.loaded, self.unloaded = [], []

    async def load_memory(self, key, path):
        self.loaded.append(key)
        return {"bytes": 123}

    async def unload_memory(self, key):
        self.unloaded.append(key)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def tok(tiny):
    return AutoTokenizer.from_pretrained(tiny["tokenizer"])


def test_budget_refusal_names_the_numbers(tiny, tok):
    async def go():
        engine = FakeEngine()
        probe = MemoryCatalog(engine, tok).validate("a", str(tiny["alpha"]))
        one = probe.num_parameters * engine.bytes_per_parameter + engine.kv_budget_bytes
        catalog = MemoryCatalog(engine, tok, budget_bytes=int(1.5 * one))
        await catalog.load(catalog.validate("a", str(tiny["alpha"])))
        with pytest.raises(Conflict) as e:
            await catalog.load(catalog.validate("b", str(tiny["alpha"])))
        assert f"needs {one:,} bytes; {one:,} of the {int(1.5 * one):,}-byte" in str(e.value)
        assert catalog.names() == ["a"]

    run(go())


def test_replace_gets_a_new_key_and_retires_the_old_one(tiny, tok):
    async def go():
        engine = FakeEngine()
        catalog = MemoryCatalog(engine, tok)
        first = await catalog.load(catalog.validate("m", str(tiny["alpha"])))
        first.acquire()  # a request still running on the old version
        second = await catalog.load(catalog.validate("m", str(tiny["beta"])), replace=True)
        assert (first.key, second.key) == ("m@1", "m@2") and catalog.get("m") is second
        await asyncio.sleep(0.05)
        assert engine.unloaded == []  # the old version waits for its request
        first.release()
        await asyncio.sleep(0.05)
        assert engine.unloaded == ["m@1"]
        with pytest.raises(Conflict):
            await catalog.load(catalog.validate("m", str(tiny["alpha"])))
        await catalog.unload("m")
        assert engine.unloaded == ["m@1", "m@2"]
        with pytest.raises(UnknownMemory):
            await catalog.unload("m")

    run(go())
