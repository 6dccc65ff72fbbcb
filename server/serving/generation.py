"""Run-time generation: an admin request's unlabeled prompts become a served ``lora`` memory.

The generator (``memories.lora.generate``) runs in the API process on a worker
thread, one generation at a time (it is a forward pass of the base's layers on
the CPU that also serves). Its output is written inside the memory root, under
``generated/``, so that the persisted set and every replica sharing the root can
load it like any admin-loaded memory; the folder's name is derived from the
memory name, the generator and the prompts, so a retried request reuses it
instead of generating twice. A generated folder that fails to load is removed:
nothing half-made stays behind; one whose memory is unloaded or replaced is
removed once its requests drained and no loaded version, in-flight generation
or persisted entry refers to it (``MemoryCatalog.collect``).

Generating takes seconds, so what can be decided before is: a name already
loaded without ``replace``, and --max-memories / --max-loras (409). An unload
of the name while it generates wins: the result is neither loaded nor
persisted (409), and its folder is collected.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from server.serving.catalog import MemoryCatalog
from server.errors import BadRequest, Conflict
from server.serving.store import GENERATED


class MemoryGeneration:
    def __init__(self, generator, catalog: MemoryCatalog):
        self.generator = generator
        self.catalog = catalog
        self._one_at_a_time = asyncio.Lock()

    def describe(self) -> dict:
        """What admins see in ``GET /admin/memories``: which generator, and what it accepts."""
        return {"generator": self.generator.sha256, "path": str(self.generator.path), "max_prompts": self.generator.max_prompts}

    async def create(self, name: str, prompts: list[str], replace: bool = False, description: str = "") -> dict:
        """Generate, check, load and persist; the loaded memory's card plus ``generation_seconds``."""
        from memories.lora.generate import PromptError, generate_memory, prompts_sha256, validate_prompts

        try:
            prompts = validate_prompts(prompts, max_count=self.generator.max_prompts)
        except PromptError as e:
            raise BadRequest(str(e), "prompts") from None
        if self.catalog.get(name) is not None and not replace:  # before spending seconds of CPU on it
            raise Conflict(f"memory {name!r} is already loaded; pass replace=true to swap it", "name")
        self.catalog.check_room(name, "lora")
        epoch = self.catalog.epoch(name)  # an unload from now on wins over this generation
        digest = hashlib.sha256(f"{self.generator.sha256}:{prompts_sha256(prompts)}".encode()).hexdigest()
        target = self.catalog.store.root / GENERATED / f"{name}-{digest[:16]}"
        seconds = 0.0
        try:
            with self.catalog.pinned(target):
                async with self._one_at_a_time:
                    if not target.is_dir():
                        start = time.perf_counter()
                        try:
                            await asyncio.to_thread(generate_memory, self.generator, prompts, name, target, None, description)
                        except PromptError as e:
                            raise BadRequest(str(e), "prompts") from None
                        seconds = time.perf_counter() - start  # generate_memory logs it
                loaded = await self.catalog.load_dir(name, str(target), None, replace=replace, epoch=epoch)
        except BaseException:
            await asyncio.shield(self.catalog.collect(target))  # unless another version or generation uses it
            raise
        return {**loaded.describe(), "generation_seconds": round(seconds, 3)}


def check_generator(generator, max_lora_rank: int, base_config: dict) -> None:
    """Start-up refusals for a generator whose adapters this server could never load."""
    rank = int(generator.config["lora"]["rank"])
    if rank > max_lora_rank:
        raise ValueError(f"generator {generator.path} writes rank-{rank} adapters; --max-lora-rank is {max_lora_rank}")
    layers = [int(i) for i in generator.config["lora"].get("layer_ids", [])]
    if layers and max(layers) >= int(base_config.get("num_hidden_layers", 0)):
        raise ValueError(f"generator {generator.path} targets layer {max(layers)}; the base has {base_config.get('num_hidden_layers')} layers")
