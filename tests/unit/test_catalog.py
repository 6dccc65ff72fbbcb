"""Catalog logic with a fake engine: limits, versioned keys, replace and unload bookkeeping."""

import asyncio
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from memories.artifact import ArtifactError
from server.serving.catalog import MemoryCatalog
from server.errors import BadRequest, Conflict, UnknownMemory
from tests.fakes import FakeEngine, WatchedEvent


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def tok(tiny):
    return AutoTokenizer.from_pretrained(tiny["tokenizer"])


def test_budget_refusal_names_the_numbers(tiny, tok):
    async def go():
        engine = FakeEngine()
        probe = MemoryCatalog(engine, tok).validate("a", str(tiny["alpha"]))
        one = probe.num_parameters * engine.bytes_per_parameter  # a decoder memory's keys and values are in vLLM's KV cache
        catalog = MemoryCatalog(engine, tok, budget_bytes=int(1.5 * one))
        await catalog.load(catalog.validate("a", str(tiny["alpha"])))
        with pytest.raises(Conflict) as e:
            await catalog.load(catalog.validate("b", str(tiny["alpha"])))
        assert f"needs {one:,} bytes; {one:,} of the {int(1.5 * one):,}-byte" in str(e.value)
        assert catalog.names() == ["a"]

    run(go())


def test_decoder_memories_beyond_the_slots_are_refused_before_loading(tiny, tok):
    async def go():
        engine = FakeEngine()
        catalog = MemoryCatalog(engine, tok)
        catalog.decoder_slots = 1
        await catalog.load(catalog.validate("a", str(tiny["alpha"])))
        with pytest.raises(Conflict, match="would make 2 decoder memories; --decoder-slots is 1"):
            await catalog.load(catalog.validate("b", str(tiny["beta"])))
        assert catalog.names() == ["a"] and len(engine.loaded) == 1
        await catalog.load(catalog.validate("a", str(tiny["beta"])), replace=True)  # a replacement is not one more
        assert catalog.names() == ["a"]

    run(go())


def test_replace_gets_a_new_key_and_retires_the_old_one(tiny, tok):
    async def go():
        engine = FakeEngine()
        catalog = MemoryCatalog(engine, tok)
        first = await catalog.load(catalog.validate("m", str(tiny["alpha"])))
        first.acquire()  # a request still running on the old version
        first.idle = WatchedEvent()  # (acquired: not set)
        second = await catalog.load(catalog.validate("m", str(tiny["beta"])), replace=True)
        assert (first.key, second.key) == ("m@1", "m@2") and catalog.get("m") is second
        await first.idle.waited.wait()  # the retirement is waiting for the request
        assert engine.unloaded == []  # the old version waits for its request
        first.release()
        await drained(catalog)
        assert engine.unloaded == ["m@1"]
        with pytest.raises(Conflict):
            await catalog.load(catalog.validate("m", str(tiny["alpha"])))
        await catalog.unload("m")
        assert engine.unloaded == ["m@1", "m@2"]
        with pytest.raises(UnknownMemory):
            await catalog.unload("m")

    run(go())


def test_reconcile_never_acts_on_a_stale_desired_set(tiny, tok, tmp_path):
    """An admin load that lands while reconcile is busy must survive it.

    Another replica removed z and q from the store; this replica's reconcile
    starts unloading them, z still serving a request. Meanwhile an admin
    loads q again. Reconcile used to go on from its old list and unload q.
    """
    import shutil
    import threading

    from server.serving.store import MemoryStore

    for name in ("z", "q"):
        shutil.copytree(tiny["alpha"], tmp_path / name)

    async def go():
        store = MemoryStore(tmp_path)
        catalog = MemoryCatalog(FakeEngine(), tok, store=store)
        for name in ("z", "q"):
            await catalog.load(catalog.validate(name, str(tmp_path / name)), managed=True)
        z = catalog.get("z")
        z.acquire()  # a request still running on z
        store.remove("z"), store.remove("q")  # the other replica's change
        card = catalog.validate("q", str(tmp_path / "q"))
        reading, proceed, desired = threading.Event(), threading.Event(), store.desired

        def held_read():  # reconcile reads the desired set under the catalog's lock; it waits here for the admin load
            reading.set()
            proceed.wait()
            return desired()

        store.desired = held_read
        reconciling = asyncio.ensure_future(catalog.reconcile())
        await asyncio.to_thread(reading.wait)
        loading = asyncio.ensure_future(catalog.load(card, replace=True, managed=True))
        await asyncio.sleep(0)  # one turn of the loop: the load is queued behind reconcile
        assert not loading.done()
        proceed.set()
        await reconciling
        await loading
        z.release()
        await drained(catalog)
        return catalog.names(), sorted(desired())

    names, desired = run(go())
    assert names == ["q"] and desired == ["q"]


def test_a_failed_memory_is_not_re_read_until_it_changes(tiny, tok, tmp_path, monkeypatch):
    import shutil

    from server.serving.store import DesiredMemory, MemoryStore

    shutil.copytree(tiny["alpha"], tmp_path / "m")
    store = MemoryStore(tmp_path)
    catalog = MemoryCatalog(FakeEngine(), tok, store=store)
    store.put(DesiredMemory("m", "m", None, "0" * 64))  # a hash the files do not have
    reads = []
    validate = catalog.validate
    monkeypatch.setattr(catalog, "validate", lambda *a: reads.append(a) or validate(*a))

    async def go():
        await catalog.reconcile()
        await catalog.reconcile()
        (tmp_path / "m" / "memory.json").write_text("{}")  # the artifact changed: try again
        await catalog.reconcile()

    run(go())
    assert len(reads) == 2 and "content changed on disk" in catalog.problems["m"]


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory):
    from tests.tiny_models import build_lora

    return str(build_lora(tmp_path_factory.mktemp("lora") / "ad", tiny["base"], rank=8))


def lora_catalog(tok, tiny, **kw):
    import json

    base_config = json.loads((tiny["base"] / "config.json").read_text())
    return MemoryCatalog(FakeEngine(), tok, base_config=base_config, **kw)


def test_lora_memories_go_to_the_engines_lora_calls_and_count_against_max_loras(tiny, tok, adapter):
    async def go():
        catalog = lora_catalog(tok, tiny, max_loras=1, max_lora_rank=16)
        first = await catalog.load(catalog.validate("a", adapter))
        assert first.device_bytes == first.card.num_parameters * 2 and first.describe()["kind"] == "lora"
        await catalog.load(catalog.validate("d", str(tiny["alpha"])))  # decoder memories do not count
        with pytest.raises(Conflict) as e:
            await catalog.load(catalog.validate("b", adapter))
        assert "would make 2 lora memories; --max-loras is 1" in str(e.value)
        await catalog.load(catalog.validate("a", adapter), replace=True)  # a replacement is not one more
        await catalog.unload("a")
        assert catalog.engine.loaded == [("lora", "a@1"), "d@2", ("lora", "a@3")]
        assert catalog.engine.unloaded == [("lora", "a@1"), ("lora", "a@3")]

    run(go())


def test_a_lora_memory_has_no_weight(tiny, tok, adapter):
    catalog = lora_catalog(tok, tiny, max_loras=1, max_lora_rank=16)
    with pytest.raises(BadRequest) as e:
        catalog.validate("a", adapter, weight=0.5)
    assert e.value.param == "memory_weight" and "only to decoder memories" in str(e.value)
    assert catalog.validate("a", adapter).weight == 0.0


def test_memory_budget_counts_an_adapters_weights_without_a_kv_pool(tiny, tok, adapter):
    async def go():
        probe = lora_catalog(tok, tiny, max_loras=2, max_lora_rank=16).validate("a", adapter)
        one = probe.num_parameters * FakeEngine.bytes_per_parameter  # an adapter has no KV pool of its own
        catalog = lora_catalog(tok, tiny, max_loras=2, max_lora_rank=16, budget_bytes=int(1.5 * one))
        await catalog.load(catalog.validate("a", adapter))
        with pytest.raises(Conflict) as e:
            await catalog.load(catalog.validate("b", adapter))
        assert f"needs {one:,} bytes; {one:,} of the {int(1.5 * one):,}-byte" in str(e.value)

    run(go())


def linked_root(tmp_path, adapter, outside_entry: str, nested: bool = False):
    """A memory root holding a copy of ``adapter`` whose ``outside_entry`` is a symlink to a copy outside the root.

    ``nested``: the link sits one hop further, in a folder inside the root that the artifact links to.
    """
    import shutil

    from server.serving.store import MemoryStore

    outside = shutil.copytree(adapter, tmp_path / "outside")
    root = tmp_path / "root"
    art = shutil.copytree(adapter, root / "ad")
    where = art
    if nested:
        where = root / "shared"
        where.mkdir()
        (art / "parts").symlink_to(where)  # inside the root: allowed, and followed
    (where / outside_entry).unlink(missing_ok=True)
    (where / outside_entry).symlink_to(outside / outside_entry)
    return MemoryStore(root), art


@pytest.mark.parametrize("entry,nested", [("adapter_model.safetensors", False), ("adapter_config.json", False), ("adapter_model.safetensors", True)])
def test_a_symlink_out_of_the_memory_root_is_refused_before_any_file_is_read(tiny, tok, adapter, tmp_path, monkeypatch, entry, nested):
    import server.serving.catalog

    store, art = linked_root(tmp_path, adapter, entry, nested)
    catalog = lora_catalog(tok, tiny, max_loras=1, max_lora_rank=16, store=store)
    monkeypatch.setattr(server.serving.catalog, "read_any_card", lambda *a: pytest.fail("an artifact file was read"))
    with pytest.raises(ArtifactError) as e:
        run(catalog.load_dir("ad", str(art)))
    shown = f"parts/{entry}" if nested else entry
    assert e.value.check == "symlink leads outside the memory root"
    assert e.value.detail == f"{shown} → {tmp_path / 'outside' / entry}, memory root {store.root}"
    assert catalog.names() == [] and catalog.engine.loaded == [] and store.desired() == {}


def test_a_symlinked_augment_folder_out_of_the_root_is_refused(tiny, tok, tmp_path):
    import shutil

    from server.serving.store import MemoryStore
    from tests.tiny_models import build_calm, build_llama

    augment = build_llama(tmp_path / "aug", tok, layers=1, seed=7)
    art = build_calm(tmp_path / "root" / "cal", tiny["base"], augment, [(0, 0)])
    shutil.rmtree(art / "augment")
    (art / "augment").symlink_to(augment)
    catalog = lora_catalog(tok, tiny, store=MemoryStore(tmp_path / "root"), calm=True)
    with pytest.raises(ArtifactError, match=r"symlink leads outside the memory root: augment → "):
        run(catalog.load_dir("cal", str(art)))


def test_symlinks_inside_the_root_load_and_reconcile_reports_one_leading_out(tiny, tok, adapter, tmp_path):
    from server.serving.store import DesiredMemory

    store, art = linked_root(tmp_path, adapter, "adapter_model.safetensors")
    inside = store.root / "inside"
    inside.mkdir()
    (tmp_path / "outside" / "adapter_model.safetensors").rename(inside / "weights.safetensors")
    (art / "adapter_model.safetensors").unlink()
    (art / "adapter_model.safetensors").symlink_to(inside / "weights.safetensors")
    catalog = lora_catalog(tok, tiny, max_loras=2, max_lora_rank=16, store=store)
    loaded = run(catalog.load_dir("ad", str(art)))  # a link that stays inside the root is fine
    (art / "adapter_model.safetensors").unlink()
    (art / "adapter_model.safetensors").symlink_to(tmp_path / "outside" / "adapter_config.json")
    store.put(DesiredMemory("other", "ad", None, loaded.card.content_sha256))
    run(catalog.reconcile())
    assert "symlink leads outside the memory root" in catalog.problems["other"] and "other" not in catalog.names()


# ---- generated lora memories: --max-loras first, unload wins, folders collected ----

GENERATOR_SHA = "f" * 64


class FakeGenerator:
    sha256, max_prompts, path = GENERATOR_SHA, 8, "fake-generator"


@pytest.fixture
def generation(tiny, tok, adapter, tmp_path, monkeypatch):
    """A MemoryGeneration over a store in tmp_path whose generator copies ``adapter``; ``gate`` holds one generation."""
    import json
    import shutil
    import threading
    from types import SimpleNamespace

    import memories.lora.generate as generate
    from server.serving.generation import MemoryGeneration
    from server.serving.store import MemoryStore

    gate = SimpleNamespace(hold=False, started=threading.Event(), proceed=threading.Event(), calls=[])

    def fake_generate(generator, prompts, name, target, domain, description):
        gate.calls.append((name, prompts))
        shutil.copytree(adapter, target)
        (target / "memory.json").write_text(json.dumps({"format": 1, "kind": "lora", "name": name, "generator": GENERATOR_SHA, "prompts": {"count": len(prompts)}}))
        if gate.hold:
            gate.started.set()
            gate.proceed.wait()

    monkeypatch.setattr(generate, "generate_memory", fake_generate)
    catalog = lora_catalog(tok, tiny, max_loras=2, max_lora_rank=16, store=MemoryStore(tmp_path))
    gate.catalog = catalog
    gate.generation = MemoryGeneration(FakeGenerator(), catalog)
    gate.folders = lambda: sorted(p.name for p in (tmp_path / "generated").iterdir())
    return gate


async def drained(catalog):
    """Wait for the retirements the catalog started in the background (replaced versions)."""
    while catalog._background:
        await asyncio.gather(*list(catalog._background))


def test_an_unload_during_a_generation_wins(generation):
    """DELETE r1 while a replace of r1 generates: the generation must not load or persist r1 afterwards."""
    g = generation

    async def go():
        first = await g.generation.create("r1", ["court law"])
        g.hold = True
        regenerating = asyncio.ensure_future(g.generation.create("r1", ["cell protein"], replace=True))
        await asyncio.to_thread(g.started.wait)  # the new version is written, not yet loaded
        await g.catalog.unload("r1")
        g.proceed.set()
        with pytest.raises(Conflict) as e:
            await regenerating
        return first, e.value

    first, error = run(go())
    assert "unloaded while it was being generated" in str(error)
    assert g.catalog.get("r1") is None and "r1" not in g.catalog.store.desired()
    assert g.folders() == []  # the unloaded version's folder and the refused one's
    assert len(g.calls) == 2 and first["path"]


def test_replaced_and_unloaded_generated_folders_are_deleted_once_unreferenced(generation, tiny, tmp_path):
    import shutil

    from server.serving.store import DesiredMemory

    g = generation
    user = tmp_path / "mine"
    shutil.copytree(tiny["alpha"], user)

    async def go():
        a = await g.generation.create("r1", ["court law"])
        b = await g.generation.create("r1", ["cell protein"], replace=True)
        await drained(g.catalog)
        after_replace = g.folders()
        again = await g.generation.create("r1", ["cell protein"], replace=True)  # same prompts: the same folder
        await drained(g.catalog)
        after_same = g.folders()
        # another replica's persisted entry still points at b's folder: it stays
        other = DesiredMemory("elsewhere", g.catalog.store.relative(Path(b["path"])), None, b["content_sha256"])
        g.catalog.store.put(other)
        await g.catalog.unload("r1")
        after_unload = g.folders()
        g.catalog.store.remove("elsewhere")
        await g.catalog.load_dir("user", str(user))
        await g.catalog.unload("user")
        return a, b, again, after_replace, after_same, after_unload

    a, b, again, after_replace, after_same, after_unload = run(go())
    b_folder = Path(b["path"]).name
    assert after_replace == [b_folder] and Path(a["path"]).name != b_folder
    assert again["path"] == b["path"] and after_same == [b_folder]
    assert after_unload == [b_folder]
    assert user.is_dir()  # an operator's folder is never deleted


def test_unload_deletes_an_unreferenced_generated_folder(generation):
    g = generation

    async def go():
        await g.generation.create("r1", ["court law"])
        await g.catalog.unload("r1")

    run(go())
    assert g.folders() == []


def test_max_loras_is_checked_before_generating(generation, adapter):
    g = generation

    async def go():
        await g.catalog.load(g.catalog.validate("a", adapter))
        await g.catalog.load(g.catalog.validate("b", adapter))
        with pytest.raises(Conflict) as e:
            await g.generation.create("c", ["court law"])
        replaced = await g.generation.create("a", ["court law"], replace=True)  # a replacement is not one more
        return e.value, replaced

    error, replaced = run(go())
    assert "would make 3 lora memories; --max-loras is 2" in str(error)
    assert [name for name, _ in g.calls] == ["a"] and replaced["name"] == "a"


# ---- calm memories' caches: budgeted, admitted within it, listed ----


@pytest.fixture(scope="module")
def calm_memory(tiny, tok, tmp_path_factory):
    from tests.tiny_models import build_calm, build_llama

    root = tmp_path_factory.mktemp("calm-catalog")
    augment = build_llama(root / "aug", tok, layers=2, seed=5, hidden=192)
    return str(build_calm(root / "cal", tiny["base"], augment, [(1, 1)], heads=2, seed=3))


class CalmEngine(FakeEngine):
    """Loads as the worker reports a calm memory under --memory-kv-budget (server/worker/extension.py cache_sizes)."""

    async def load_memory(self, key, path):
        self.loaded.append(key)
        return {"bytes": 123, "cache_bytes": 40, "cache_budget_bytes": self.kv_budget_bytes, "max_rows": 2}

    async def cache_bytes(self, keys):
        return {k: 77 for k in keys}


def calm_catalog(tok, tiny, **kw):
    import json

    return MemoryCatalog(CalmEngine(), tok, base_config=json.loads((tiny["base"] / "config.json").read_text()), calm=True, **kw)


def test_the_memory_budget_counts_a_calm_memorys_cache_budget(tiny, tok, calm_memory):
    async def go():
        probe = calm_catalog(tok, tiny).validate("c", calm_memory)
        one = probe.num_parameters * FakeEngine.bytes_per_parameter + FakeEngine.kv_budget_bytes
        catalog = calm_catalog(tok, tiny, budget_bytes=int(1.5 * one))
        await catalog.load(catalog.validate("c", calm_memory))
        with pytest.raises(Conflict) as e:
            await catalog.load(catalog.validate("d", calm_memory))
        return one, e.value

    one, error = run(go())
    assert f"needs {one:,} bytes; {one:,} of the" in str(error)


def test_calm_requests_beyond_the_rows_its_cache_budget_holds_get_503_naming_the_flag(tiny, tok, calm_memory):
    from server import metrics
    from server.errors import Unavailable

    async def go():
        catalog = calm_catalog(tok, tiny)
        memory = await catalog.load(catalog.validate("c", calm_memory))
        listed = memory.describe()
        memory.acquire(2)  # a request of two choices fills both rows
        with pytest.raises(Unavailable) as e:
            memory.acquire(1)
        memory.release(2)
        memory.acquire(1)  # room again once it ended
        await catalog.refresh_cache_bytes()
        return listed, memory.describe(), e.value

    listed, refreshed, error = run(go())
    assert "--memory-kv-budget 1,000 bytes" in str(error) and error.retry_after == 1
    assert (listed["cache_bytes"], listed["cache_budget_bytes"], listed["max_rows"]) == (40, 1000, 2)
    assert refreshed["cache_bytes"] == 77 and refreshed["active_rows"] == 1
    assert metrics.CACHE_BYTES.labels("c")._value.get() == 77 and metrics.CACHE_BUDGET_BYTES.labels("c")._value.get() == 1000


def test_a_profile_made_from_routing_prompts_is_kept_in_the_store_for_other_replicas(tiny, tok, tmp_path):
    """An admin load's routing_prompts profile survives a restart and reaches every replica; a reload without prompts drops it."""
    import json
    import shutil

    from server.serving.store import ROUTING, MemoryStore

    shutil.copytree(tiny["alpha"], tmp_path / "m")  # no routing.json: routable only through routing_prompts
    prompts = ["the court held that the contract was void", "the licensee may not sublicense the software", "the tenant shall pay rent monthly"]
    ids = tok("the court held the licence void", add_special_tokens=False)["input_ids"]

    async def go():
        a = MemoryCatalog(FakeEngine(), tok, store=MemoryStore(tmp_path))
        loaded = await a.load_dir("m", str(tmp_path / "m"), routing_prompts=prompts)
        assert loaded.routing.startswith(f"{ROUTING}/m-") and (tmp_path / loaded.routing).is_file()
        assert json.loads((tmp_path / "memserve-state.json").read_text())["memories"][0]["routing"] == loaded.routing

        b = MemoryCatalog(FakeEngine(), tok, store=MemoryStore(tmp_path))  # another replica, or this one restarted
        await b.reconcile()
        kept = b.get("m").profile
        assert kept is not None and kept.threshold == loaded.profile.threshold and kept.counts.tolist() == loaded.profile.counts.tolist()
        assert b.router.route(ids).memory == a.router.route(ids).memory == "m"

        await a.load_dir("m", str(tmp_path / "m"), replace=True)  # reloaded without routing_prompts: its routing.json (none) again
        assert a.get("m").profile is None and list((tmp_path / ROUTING).iterdir()) == []
        assert "routing" not in json.loads((tmp_path / "memserve-state.json").read_text())["memories"][0]  # readable by older servers
        await b.reconcile()  # same weights: only the profile changes
        assert b.get("m").profile is None and b.router.route(ids).memory is None and b.engine.loaded == ["m@1"]
        await drained(a)
        await drained(b)

    run(go())
    state = json.loads((tmp_path / "memserve-state.json").read_text())
    state["memories"][0]["from_a_newer_server"] = 1  # unknown fields are ignored
    (tmp_path / "memserve-state.json").write_text(json.dumps(state))
    assert list(MemoryStore(tmp_path).desired()) == ["m"]
