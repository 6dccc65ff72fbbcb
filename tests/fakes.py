"""Thin fakes shared by the unit and in-process app tests."""

from __future__ import annotations

import asyncio


class WatchedEvent(asyncio.Event):
    """An event that tells when someone starts waiting for it (``waited``): a race's step you can await instead of sleeping."""

    def __init__(self):
        super().__init__()
        self.waited = asyncio.Event()

    async def wait(self):
        self.waited.set()
        return await super().wait()


class FakeEngine:
    """What MemoryCatalog calls on ``server.engine.client.EngineAdapter``: records loads and unloads."""

    kv_budget_bytes = 1000
    bytes_per_parameter = 2  # a bf16 engine

    def __init__(self):
        self.loaded, self.unloaded = [], []
        self.loras: dict[str, str] = {}  # engine key → adapter path, as EngineAdapter.loras (which vLLM's model list reads)

    async def load_memory(self, key, path):
        self.loaded.append(key)
        return {"bytes": 123}

    async def unload_memory(self, key):
        self.unloaded.append(key)

    async def load_lora(self, key, path):
        self.loaded.append(("lora", key))
        self.loras[key] = path

    async def unload_lora(self, key):
        self.unloaded.append(("lora", key))
        self.loras.pop(key, None)

    async def cache_bytes(self, keys):
        return {}
