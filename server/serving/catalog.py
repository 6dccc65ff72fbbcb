"""The API process's view of loaded memories: what requests may select, and their counters.

A memory becomes visible here only after every engine worker has loaded it,
and each load gets a new versioned engine key (``name@N``, N counting loads), so a
replacement never changes the weights under a request that is already
running: the old version is unloaded from the workers once its requests end.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from memories.artifact import ArtifactError, MemoryCard
from memories.kinds import check_any_compatible, read_any_card
from memories.routing import Profile, Router, RoutingError, profile_from_texts, read_profile, read_profile_file
from server import metrics
from server.engine.client import EngineAdapter
from server.errors import BadRequest, Conflict, Unavailable, UnknownMemory, no_weight
from server.serving.store import DesiredMemory, MemoryStore

log = logging.getLogger("memserve.catalog")

ROUTING_PROMPTS = "routing_prompts"  # source of a profile made at load time from an admin's routing_prompts: kept in the store, not the artifact


@dataclass(eq=False)
class LoadedMemory:
    card: MemoryCard
    key: str  # engine-side versioned key
    managed: bool = False  # part of the persistent store's desired set
    loaded_at: float = field(default_factory=time.time)
    load_seconds: float = 0.0
    device_bytes: int = 0
    cache_bytes: int = 0  # per-request caches as allocated (see MemoryCatalog.refresh_cache_bytes)
    cache_budget_bytes: int | None = None  # --memory-kv-budget, for calm memories
    max_rows: int | None = None  # calm: rows its cache budget holds; requests beyond get 503
    profile: Profile | None = None  # routing profile (routing.json or the admin's routing_prompts); None: not routable
    routing: str | None = None  # the store's file of a profile made from routing_prompts (DesiredMemory.routing), if any
    requests: int = 0
    rows: int = 0  # engine rows (choices × prompts) of the running requests
    prompt_tokens: int = 0
    completion_tokens: int = 0
    active: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    unloaded: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def name(self) -> str:
        return self.card.name

    def acquire(self, rows: int = 1) -> None:
        """Count a request of ``rows`` engine rows; 503 if a calm memory's cache budget holds no more rows.

        A calm row's caches cannot be evicted mid-request, so the budget bounds admission instead.
        """
        if self.max_rows is not None and self.rows + rows > self.max_rows:
            raise Unavailable(
                f"calm memory {self.name!r} runs {self.rows} rows; {rows} more would pass the {self.max_rows} rows its cache budget "
                f"holds (--memory-kv-budget {self.cache_budget_bytes:,} bytes): retry later",
                "domain",
                retry_after=1,
            )
        self.active += 1
        self.rows += rows
        self.requests += 1
        self.idle.clear()

    def release(self, rows: int = 1) -> None:
        self.active -= 1
        self.rows -= rows
        if self.active == 0:
            self.idle.set()

    def describe(self) -> dict:
        c = self.card
        mixed = c.kind == "decoder"  # only decoder memories are mixed in, with a weight and a temperature
        return {
            "name": c.name,
            "kind": c.kind,
            "path": c.path,
            "status": "loaded",
            "memory_weight": c.weight if mixed else None,
            "temperature": c.temperature if mixed else None,
            **({"rank": c.rank, "target_modules": list(c.target_modules), "generator": c.generator, "prompts": c.prompts} if c.kind == "lora" else {}),
            **({"connections": [list(x) for x in c.connections]} if c.kind == "calm" else {}),
            "domain": c.domain,
            "description": c.description,
            "architecture": c.architecture,
            "num_parameters": c.num_parameters,
            "device_bytes": self.device_bytes,
            **({"cache_bytes": self.cache_bytes, "cache_budget_bytes": self.cache_budget_bytes} if c.kind != "lora" else {}),
            **({"max_rows": self.max_rows, "active_rows": self.rows} if c.kind == "calm" else {}),
            "routable": self.profile is not None,
            "routing": {"source": self.profile.source, "tokens": self.profile.tokens, "threshold": self.profile.threshold} if self.profile else None,
            "content_sha256": c.content_sha256,
            "managed": self.managed,
            "loaded_at": self.loaded_at,
            "load_seconds": round(self.load_seconds, 3),
            "active_requests": self.active,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


class MemoryCatalog:
    def __init__(
        self,
        engine: EngineAdapter | None,
        base_tokenizer,
        default_weight: float | None = None,
        max_memories: int | None = None,
        budget_bytes: int | None = None,
        store: MemoryStore | None = None,
        base_config: dict | None = None,
        max_loras: int = 0,
        max_lora_rank: int | None = None,
        calm: bool = False,
    ):
        self.engine = engine
        self.calm = calm  # calm memories are accepted (server/startup.py's serves_calm)
        self.max_loras = max_loras  # live lora memories; 0: LoRA is off in the engine
        self.max_lora_rank = max_lora_rank
        self.base_tokenizer = base_tokenizer
        self.base_config = base_config  # the base's config.json, which thin memories are checked against
        self.default_weight = default_weight
        self.max_memories = max_memories
        self.budget_bytes = budget_bytes
        self.store = store
        self.reconcile_interval = 0.0  # set by the runtime when a timer runs
        self.problems: dict[str, str] = {}  # desired memories that failed to load, and why
        self._memories: dict[str, LoadedMemory] = {}
        self._loads = 0
        self.unload_timeout = 30.0  # set by the runtime from --unload-timeout
        self.mixture_size = 2  # decoder memories one request may fuse; set by the runtime from --mixture-size
        self.decoder_slots: int | None = None  # decoder memories the engine holds at once; set by the runtime from --decoder-slots
        self._ops = asyncio.Lock()  # one load, unload or reconcile at a time
        self._failed: dict[str, object] = {}  # name → (entry, file signature) that failed to load
        self._background: set[asyncio.Task] = set()
        self._epochs: collections.Counter[str] = collections.Counter()  # name → unloads so far (see :meth:`epoch`)
        self._pinned: collections.Counter[Path] = collections.Counter()  # generated folders an in-flight generation will load
        self.default_domain = "none"  # --default-domain: "auto" routes requests that name no memory
        self.router = Router({}, self.vocab_size)  # the routable loaded memories (domain "auto"), rebuilt on every load and unload

    @property
    def vocab_size(self) -> int | None:
        return len(self.base_tokenizer) if self.base_tokenizer is not None else None

    def routing_profile(self, card: MemoryCard, routing_prompts: list[str] | None = None) -> Profile | None:
        """The memory's routing profile: made from ``routing_prompts`` when given, else its ``routing.json``, else None (not routable)."""
        try:
            if routing_prompts:
                return profile_from_texts(routing_prompts, self.base_tokenizer, source=ROUTING_PROMPTS)
            return read_profile(card.path, self.vocab_size)
        except RoutingError as e:
            raise ArtifactError(card.name, "routing profile", str(e)) from None

    def stored_profile(self, card: MemoryCard, want: DesiredMemory) -> Profile | None:
        """A desired memory's profile: the one the store keeps from its admin load's routing_prompts, else its routing.json."""
        if want.routing is None:
            return self.routing_profile(card)
        try:
            return read_profile_file(self.store.resolve(want.routing), self.vocab_size)
        except (RoutingError, BadRequest) as e:
            raise ArtifactError(card.name, "routing profile kept in the memory root", str(e)) from None

    def _rebuild_router(self) -> None:
        self.router = Router({n: m.profile for n, m in self._memories.items() if m.profile is not None}, self.vocab_size)

    def validate(self, name: str, path: str, weight: float | None = None) -> MemoryCard:
        """All checks that need no engine, by kind: metadata, weight headers, tokenizer, shapes against the base."""
        card = read_any_card(path, name, self.default_weight)
        if weight is not None:
            if card.kind != "decoder":
                raise no_weight(name, card.kind)
            card = dataclasses.replace(card, weight=weight)
        if card.kind == "calm" and not self.calm:
            raise ArtifactError(name, "calm memories are disabled on this server", "start it with --calm on (it needs a Llama base)")
        check_any_compatible(card, self.base_tokenizer, self.base_config, self.max_lora_rank if self.max_loras > 0 else None)
        return card

    def validate_stored(self, name: str, path: str, weight: float | None = None) -> MemoryCard:
        """``validate`` for a directory inside the memory root: first, before any file is read, no symlink in it may lead out of the root."""
        if self.store is not None:
            self.store.check_links(name, Path(path))
        return self.validate(name, path, weight)

    def check_room(self, name: str, kind: str) -> None:
        """409 if one more memory of ``kind`` named ``name`` (a replacement is not one more) exceeds --max-memories, --max-loras or --decoder-slots.

        (A replacement needs a free decoder slot too while its predecessor drains: the worker refuses it if none is.)

        Public so that a generation can ask before it spends CPU on a lora that could never load.
        """
        others = [m for n, m in self._memories.items() if n != name]
        if self.max_memories is not None and len(others) + 1 > self.max_memories:
            raise Conflict(f"loading {name!r} would make {len(others) + 1} memories; --max-memories is {self.max_memories}", "name")
        loras = sum(m.card.kind == "lora" for m in others)
        if kind == "lora" and loras + 1 > self.max_loras:
            raise Conflict(f"loading {name!r} would make {loras + 1} lora memories; --max-loras is {self.max_loras}", "name")
        decoders = sum(m.card.kind == "decoder" for m in others)
        if kind == "decoder" and self.decoder_slots is not None and decoders + 1 > self.decoder_slots:
            raise Conflict(f"loading {name!r} would make {decoders + 1} decoder memories; --decoder-slots is {self.decoder_slots}", "name")

    def _check_limits(self, card: MemoryCard) -> None:
        self.check_room(card.name, card.kind)
        others = [m for n, m in self._memories.items() if n != card.name]
        if self.budget_bytes is not None:
            # what each memory may grow to: weights in the engine's dtype, plus a calm memory's cache budget
            # (a decoder memory's keys and values are in vLLM's KV cache; adapters keep no caches)
            def reserved(c: MemoryCard) -> int:
                kv = (self.engine.kv_budget_bytes or 0) if c.kind == "calm" else 0
                return c.num_parameters * self.engine.bytes_per_parameter + kv

            used, need = sum(reserved(m.card) for m in others), reserved(card)
            if used + need > self.budget_bytes:
                raise Conflict(
                    f"loading {card.name!r} needs {need:,} bytes; {used:,} of the {self.budget_bytes:,}-byte memory budget are in use",
                    "name",
                )

    async def load_dir(self, name: str, path: str, weight: float | None = None, replace: bool = False, epoch: int | None = None, routing_prompts: list[str] | None = None) -> LoadedMemory:
        """Check a memory directory of any kind, load it and add it to the persisted set: what an admin load does.

        The one entry point for code in the server that writes a memory and then serves it
        (e.g. a generated LoRA): ``path`` must already be inside the memory root.
        ``epoch``: :meth:`epoch` of the name when that work began; refused (409) if it was unloaded since.
        ``routing_prompts``: texts of the memory's domain its routing profile is made from (instead of its routing.json).
        """
        card = await asyncio.to_thread(self.validate_stored, name, path, weight)  # reads every weight file
        profile = await asyncio.to_thread(self.routing_profile, card, routing_prompts)
        return await self.load(card, replace=replace, managed=True, epoch=epoch, profile=profile)

    async def load(self, card: MemoryCard, replace: bool = False, managed: bool = False, persist: bool = True, epoch: int | None = None, profile: Profile | None = None) -> LoadedMemory:
        """``profile``: the routing profile (default: the artifact's routing.json, if any)."""
        if profile is None:
            profile = await asyncio.to_thread(self.routing_profile, card)
        async with self._ops:
            if epoch is not None and self._epochs[card.name] != epoch:
                raise Conflict(f"memory {card.name!r} was unloaded while it was being generated; the generated memory was not loaded", "name")
            return await self._load(card, replace, managed, persist, profile)

    def epoch(self, name: str) -> int:
        """How many times ``name`` was unloaded so far: work that takes a while (a generation) notes it first,
        and :meth:`load` refuses its result if an unload came in between, so that the unload wins.
        """
        return self._epochs[name]

    @contextlib.contextmanager
    def pinned(self, path: Path):
        """Keep a generated folder from being collected while an in-flight generation writes or loads it."""
        self._pinned[path] += 1
        try:
            yield
        finally:
            self._pinned[path] -= 1
            if not self._pinned[path]:
                del self._pinned[path]

    async def collect(self, path: str | Path) -> bool:
        """Delete a folder memserve generated once nothing refers to it any more; whether it was deleted.

        Referring: a loaded version here (a replacement may reuse the same folder), an in-flight
        generation, or the persisted desired set, which is every replica's. Anything but a
        generated folder (see :meth:`MemoryStore.generated`), or a state file that cannot be read, keeps it.
        """
        folder = self.store.generated(path) if self.store is not None else None
        if folder is None:
            return False
        async with self._ops:
            if folder in self._pinned or any(Path(m.card.path) == folder for m in self._memories.values()):
                return False
            try:
                if folder in await asyncio.to_thread(self.store.referenced):
                    return False
            except Exception as e:
                log.warning("keeping %s: the store's state cannot be read (%s)", folder, e)
                return False
            await asyncio.to_thread(shutil.rmtree, folder, True)
        log.info("generated folder %s deleted: no memory uses it any more", folder)
        return True

    async def _load(self, card: MemoryCard, replace: bool, managed: bool, persist: bool, profile: Profile | None = None) -> LoadedMemory:
        if card.name in self._memories and not replace:
            raise Conflict(f"memory {card.name!r} is already loaded; pass replace=true to swap it", "name")
        self._check_limits(card)
        self._loads += 1
        key = f"{card.name}@{self._loads}"
        start = time.perf_counter()
        if card.kind == "lora":
            await self.engine.load_lora(key, card.path)
            info = {"bytes": card.num_parameters * self.engine.bytes_per_parameter}
        else:
            info = await self.engine.load_memory(key, card.path)
        loaded = LoadedMemory(card, key, managed=managed, load_seconds=time.perf_counter() - start, device_bytes=info.get("bytes", 0))
        loaded.cache_bytes, loaded.cache_budget_bytes, loaded.max_rows = info.get("cache_bytes", 0), info.get("cache_budget_bytes"), info.get("max_rows")
        loaded.profile = profile
        previous = self._memories.get(card.name)
        self._memories[card.name] = loaded
        self._rebuild_router()
        self.problems.pop(card.name, None)
        self._failed.pop(card.name, None)
        metrics.LOADED.set(len(self._memories))
        metrics.DEVICE_BYTES.labels(card.name).set(loaded.device_bytes)
        _set_cache_gauges(loaded)
        if previous is not None and previous.card.kind != card.kind:
            metrics.MEMORY_INFO.remove(card.name, previous.card.kind)
        metrics.MEMORY_INFO.labels(card.name, card.kind).set(1)
        if previous is not None:
            self._spawn(self._retire(previous, timeout=None))
        if managed and persist and self.store is not None:
            entry = DesiredMemory(card.name, self.store.relative(Path(card.path)), card.weight if card.kind == "decoder" else None, card.content_sha256)
            made = profile.to_json() if profile is not None and profile.source == ROUTING_PROMPTS else None  # not in the artifact: kept in the store
            loaded.routing = (await asyncio.to_thread(self.store.put, entry, made)).routing
        return loaded

    async def unload(self, name: str, timeout: float | None = None, managed: bool = True) -> tuple[LoadedMemory, bool]:
        """Hide at once; wait for running requests (ended with an error after ``timeout``); free.

        Returns the memory and whether its requests drained without eviction.
        Only hiding holds the catalog's lock: the drain does not block other admin calls.
        """
        async with self._ops:
            loaded = self._hide(name)
            if managed and self.store is not None:
                await asyncio.to_thread(self.store.remove, name)
        drained = await self._retire(loaded, self.unload_timeout if timeout is None else timeout)
        return loaded, drained

    def _hide(self, name: str) -> LoadedMemory:
        loaded = self._memories.pop(name, None)
        if loaded is None:
            raise UnknownMemory(f"memory {name!r} is not loaded", "name")
        self._epochs[name] += 1
        self._rebuild_router()
        metrics.LOADED.set(len(self._memories))
        metrics.DEVICE_BYTES.remove(name)
        for gauge in (metrics.CACHE_BYTES, metrics.CACHE_BUDGET_BYTES):
            with contextlib.suppress(KeyError):
                gauge.remove(name)
        metrics.MEMORY_INFO.remove(name, loaded.card.kind)
        return loaded

    async def _retire(self, loaded: LoadedMemory, timeout: float | None) -> bool:
        drained = True
        try:
            await asyncio.wait_for(loaded.idle.wait(), timeout)
        except asyncio.TimeoutError:
            drained = False
            log.warning("memory %s: %d requests still running after %.1fs; ending them", loaded.name, loaded.active, timeout)
            loaded.unloaded.set()
            try:
                await asyncio.wait_for(loaded.idle.wait(), 30)
            except asyncio.TimeoutError:  # rows still decoding keep their own reference; unloading is safe
                log.warning("memory %s: %d requests did not end after eviction; unloading anyway", loaded.name, loaded.active)
        if loaded.card.kind == "lora":
            await self.engine.unload_lora(loaded.key)
        else:
            await self.engine.unload_memory(loaded.key)
        log.info("memory %s (%s) unloaded, %s bytes freed", loaded.name, loaded.key, f"{loaded.device_bytes:,}")
        if loaded.card.generator:  # written by the generator: its folder goes once nothing refers to it
            await self.collect(loaded.card.path)
        return drained

    async def refresh_cache_bytes(self) -> None:
        """Ask the workers what each memory's caches hold now (they grow and shrink with its rows) for the listing and the metrics."""
        cached = [m for m in self._memories.values() if m.card.kind != "lora"]
        sizes = await self.engine.cache_bytes([m.key for m in cached])
        for memory in cached:
            if memory.key in sizes:
                memory.cache_bytes = sizes[memory.key]
                _set_cache_gauges(memory)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def reconcile(self) -> None:
        """Converge on the store's desired set; failures are reported, never fatal.

        It holds the catalog's lock from reading the desired set to its last
        change, so it never acts on a set that an admin call has changed since.
        A desired memory that failed is retried only once its entry or its files change.
        """
        if self.store is None:
            return
        async with self._ops:
            try:
                desired = await asyncio.to_thread(self.store.desired)
            except Exception:
                return
            for name, want in desired.items():
                have = self._memories.get(name)
                same_weight = have is not None and (want.memory_weight is None or have.card.weight == want.memory_weight)
                if have is not None and have.card.content_sha256 == want.content_sha256 and same_weight:
                    have.managed = True
                    if have.routing != want.routing:  # another replica reloaded it with other routing_prompts, or none
                        await self._swap_profile(have, want)
                    continue
                try:
                    path = self.store.resolve(want.path)
                except Exception as e:
                    self._fail(name, str(e), None)
                    continue
                attempt = (want, await asyncio.to_thread(_files_signature, path))
                if self._failed.get(name) == attempt:
                    continue  # nothing changed since it failed: do not re-read its weights
                try:
                    card = await asyncio.to_thread(self.validate_stored, name, str(path), want.memory_weight)
                    if card.content_sha256 != want.content_sha256:
                        raise ArtifactError(name, "content changed on disk", f"store expects {want.content_sha256[:16]}…, found {card.content_sha256[:16]}…")
                    profile = await asyncio.to_thread(self.stored_profile, card, want)
                    loaded = await self._load(card, replace=True, managed=True, persist=False, profile=profile)
                    loaded.routing = want.routing
                    log.info("reconcile: memory %s loaded from the store", name)
                except Exception as e:  # reported in /admin/memories, the server keeps serving
                    self._fail(name, str(e), attempt)
            for name in [n for n, m in self._memories.items() if m.managed and n not in desired]:
                self._spawn(self._retire(self._hide(name), self.unload_timeout))
                log.info("reconcile: memory %s unloaded (no longer in the store)", name)
            for name in [n for n in self.problems if n not in desired]:
                del self.problems[name]
                self._failed.pop(name, None)

    async def _swap_profile(self, have: LoadedMemory, want: DesiredMemory) -> None:
        """Take the desired entry's routing profile for a memory already loaded (the weights are the same).

        A profile that cannot be read leaves the memory unroutable, with the reason logged once
        (tried again when the entry changes), rather than routing on a profile the store no longer names.
        """
        try:
            have.profile = await asyncio.to_thread(self.stored_profile, have.card, want)
            log.info("reconcile: memory %s routes on %s", have.name, want.routing or "its routing.json")
        except Exception as e:
            have.profile = None
            log.error("reconcile: memory %s is not routable: %s", have.name, e)
        have.routing = want.routing
        self._rebuild_router()

    def _fail(self, name: str, reason: str, attempt) -> None:
        self.problems[name] = reason
        self._failed[name] = attempt
        log.error("reconcile: memory %s not loaded: %s", name, reason)

    @property
    def retry_after(self) -> int:
        """Seconds until this replica's next reconcile, rounded up (what a 503 tells the client)."""
        return max(1, math.ceil(self.reconcile_interval or 1))

    def is_desired(self, name: str) -> bool:
        """In the store's desired set (so another replica loaded it) but not failed here.

        Read from the store itself, not from the last reconcile: a replica that
        reconciles only on admin calls must still answer 503 (retry), not 404.
        Only requests naming an unknown memory get here; the file is small.
        """
        if self.store is None or name in self.problems:
            return False
        try:
            return name in self.store.desired()
        except Exception:
            return False

    def get(self, name: str) -> LoadedMemory | None:
        return self._memories.get(name)

    def names(self) -> list[str]:
        return sorted(self._memories)

    def all(self) -> list[LoadedMemory]:
        return [self._memories[n] for n in self.names()]


def _set_cache_gauges(memory: LoadedMemory) -> None:
    if memory.card.kind == "lora":  # no caches (a replaced memory of another kind may have left its gauges)
        for gauge in (metrics.CACHE_BYTES, metrics.CACHE_BUDGET_BYTES):
            with contextlib.suppress(KeyError):
                gauge.remove(memory.name)
        return
    metrics.CACHE_BYTES.labels(memory.name).set(memory.cache_bytes)
    if memory.cache_budget_bytes is not None:
        metrics.CACHE_BUDGET_BYTES.labels(memory.name).set(memory.cache_budget_bytes)
    else:
        with contextlib.suppress(KeyError):
            metrics.CACHE_BUDGET_BYTES.remove(memory.name)


def _files_signature(path: Path) -> tuple:
    """Names, sizes and modification times of an artifact's files: cheap to read, changes with any edit."""
    try:
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()))
    except OSError:
        return ()
