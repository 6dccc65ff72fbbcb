"""The API process's view of loaded memories: what requests may select, and their counters.

A memory becomes visible here only after every engine worker has loaded it,
and each load gets a new versioned engine key (``name@generation``), so a
replacement never changes the weights under a request that is already running.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field

from memories.artifact import MemoryCard, check_compatible, read_card
from server.engine import EngineAdapter
from server.errors import Conflict, UnknownMemory


@dataclass
class LoadedMemory:
    card: MemoryCard
    key: str  # engine-side versioned key
    loaded_at: float = field(default_factory=time.time)
    load_seconds: float = 0.0
    device_bytes: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def name(self) -> str:
        return self.card.name

    def describe(self) -> dict:
        c = self.card
        return {
            "name": c.name,
            "path": c.path,
            "status": "loaded",
            "memory_weight": c.weight,
            "temperature": c.temperature,
            "domain": c.domain,
            "description": c.description,
            "architecture": c.architecture,
            "num_parameters": c.num_parameters,
            "device_bytes": self.device_bytes,
            "content_sha256": c.content_sha256,
            "loaded_at": self.loaded_at,
            "load_seconds": round(self.load_seconds, 3),
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


class MemoryCatalog:
    def __init__(self, engine: EngineAdapter | None, base_tokenizer, default_weight: float | None = None):
        self.engine = engine
        self.base_tokenizer = base_tokenizer
        self.default_weight = default_weight
        self._memories: dict[str, LoadedMemory] = {}
        self._generation = 0
        self._lock = asyncio.Lock()

    def validate(self, name: str, path: str, weight: float | None = None) -> MemoryCard:
        """All checks that need no engine: metadata, weights header, tokenizer, vocab."""
        card = read_card(path, name, self.default_weight)
        if weight is not None:
            card = dataclasses.replace(card, weight=weight)
        check_compatible(card, self.base_tokenizer)
        return card

    async def load(self, card: MemoryCard, replace: bool = False) -> LoadedMemory:
        async with self._lock:
            if card.name in self._memories and not replace:
                raise Conflict(f"memory {card.name!r} is already loaded; pass replace=true to swap it", "name")
            self._generation += 1
            key = f"{card.name}@{self._generation}"
            start = time.perf_counter()
            info = await self.engine.load_memory(key, card.path)
            loaded = LoadedMemory(card, key, load_seconds=time.perf_counter() - start, device_bytes=info.get("bytes", 0))
            previous = self._memories.get(card.name)
            self._memories[card.name] = loaded
        if previous is not None:
            await self.engine.unload_memory(previous.key)
        return loaded

    async def unload(self, name: str) -> LoadedMemory:
        async with self._lock:
            loaded = self._memories.pop(name, None)
            if loaded is None:
                raise UnknownMemory(f"memory {name!r} is not loaded", "name")
        await self.engine.unload_memory(loaded.key)
        return loaded

    def get(self, name: str) -> LoadedMemory | None:
        return self._memories.get(name)

    def names(self) -> list[str]:
        return sorted(self._memories)

    def all(self) -> list[LoadedMemory]:
        return [self._memories[n] for n in self.names()]
