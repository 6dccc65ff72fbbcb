"""Catalog logic with a fake engine: limits, versioned keys, replace and unload bookkeeping."""

import asyncio

import pytest
from transformers import AutoTokenizer

from memories.artifact import ArtifactError
from server.serving.catalog import MemoryCatalog
from server.errors import BadRequest, Conflict, UnknownMemory


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

    async def load_lora(self, key, path):
        self.loaded.append(("lora", key))

    async def unload_lora(self, key):
        self.unloaded.append(("lora", key))


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


def test_reconcile_never_acts_on_a_stale_desired_set(tiny, tok, tmp_path):
    """An admin load that lands while reconcile is busy must survive it.

    Another replica removed z and q from the store; this replica's reconcile
    starts unloading them, z still serving a request. Meanwhile an admin
    loads q again. Reconcile used to go on from its old list and unload q.
    """
    import shutil

    from server.serving.store import MemoryStore

    for name in ("z", "q"):
        shutil.copytree(tiny["alpha"], tmp_path / name)

    async def go():
        store = MemoryStore(tmp_path)
        catalog = MemoryCatalog(FakeEngine(), tok, store=store)
        for name in ("z", "q"):
            await catalog.load(catalog.validate(name, str(tmp_path / name)), managed=True)
        catalog.get("z").acquire()  # a request still running on z
        store.remove("z"), store.remove("q")  # the other replica's change
        reconciling = asyncio.ensure_future(catalog.reconcile())
        await asyncio.sleep(0.05)
        await catalog.load(catalog.validate("q", str(tmp_path / "q")), replace=True, managed=True)
        catalog_z = catalog.get("z")
        if catalog_z is not None:
            catalog_z.release()
        await asyncio.sleep(0.05)
        await reconciling
        return catalog.names(), sorted(store.desired())

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
