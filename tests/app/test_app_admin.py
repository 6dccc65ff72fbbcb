"""Admin routes in-process: every refusal is made in the API process before anything reaches the engine; load, list, select, unload."""

from __future__ import annotations

import os
import shutil

import pytest

from server.serving.store import STATE_FILE, MemoryStore
from tests.app.conftest import ADMIN, ADMIN_TOKEN, BASE, COMPLETION
from tests.openai_errors import assert_error
from tests.tiny_models import build_llama, build_lora, build_tokenizer

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def root(tiny, tmp_path_factory):
    """A memory root with good memories and each kind of broken artifact, plus a link out of it."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("admin-root")
    for name in ("alpha", "beta"):
        shutil.copytree(tiny[name], root / name)
    base_tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    shutil.copytree(tiny["alpha"], root / "corrupt")
    (root / "corrupt" / "model.safetensors").write_bytes(b"not safetensors at all")
    shutil.copytree(tiny["alpha"], root / "truncated")
    data = (root / "truncated" / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(data[: len(data) // 3])
    shutil.copytree(tiny["alpha"], root / "badjson")
    (root / "badjson" / "memory.json").write_text("{lambda: oops")
    other = build_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=300)
    build_llama(root / "wrongtok", other, layers=1, seed=7, vocab_size=len(base_tok))
    build_llama(root / "smallvocab", base_tok, layers=1, seed=7, vocab_size=64, ship_tokenizer=False)
    build_lora(root / "lora", tiny["base"])
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(tiny["alpha"], outside / "m")
    os.symlink(outside / "m", root / "escape")
    return root


async def admin_app(serve, root, **kw):
    """As tests/api/test_admin.py's server: --memory-root, --admin-token, --max-memories 3, LoRA off, nothing loaded at start."""
    (root / STATE_FILE).unlink(missing_ok=True)  # each test starts from an empty persisted set
    return await serve(memories=(), admin_token=ADMIN_TOKEN, store=MemoryStore(root), max_memories=3, max_loras=0, **kw)


@pytest.mark.parametrize(
    "body,needle",
    [
        ({"name": "x", "path": "does-not-exist"}, "not a directory"),
        ({"name": "x", "path": "../outside"}, "outside the memory root"),
        ({"name": "x", "path": "escape"}, "outside the memory root"),
        ({"name": "x", "path": "corrupt"}, "unreadable safetensors"),
        ({"name": "x", "path": "truncated"}, "unreadable safetensors"),
        ({"name": "x", "path": "badjson"}, "memory.json is not valid JSON"),
        ({"name": "x", "path": "wrongtok"}, "tokenizer differs"),
        ({"name": "x", "path": "smallvocab"}, "vocabulary too small"),
        ({"name": "x", "path": "lora"}, "LoRA memories are disabled on this server: start it with --max-loras N"),
        ({"name": "bad name!", "path": "alpha"}, "name"),
        ({"name": "none", "path": "alpha"}, "name"),
        ({"name": BASE, "path": "alpha"}, "base model"),
        ({"name": "x", "path": "alpha", "memory_weight": 2}, "memory_weight"),
        ({"name": "x", "path": "alpha", "memory_weight": "NaN"}, "memory_weight"),
        ({"name": "x"}, "path"),
        ({"name": "x", "path": "alpha", "prompts": ["a"]}, "exactly one"),
        ({"name": "x", "prompts": ["a"]}, "no generator"),
        ({"name": "x", "path": "alpha", "extra": 1}, "extra"),
        ({"name": "x", "path": "alpha\u0000"}, "NUL"),
    ],
)
async def test_bad_loads(serve, root, body, needle):
    served = await admin_app(serve, root)
    async with served.client(headers=ADMIN) as http:
        err = assert_error(await http.post("/admin/memories", json=body), 400)
        assert needle in err["message"]
        listing = (await http.get("/admin/memories")).json()
        assert (await http.post("/v1/completions", json=COMPLETION)).status_code == 200
    assert listing["data"] == [] and served.engine.loaded == []  # nothing half-loaded; the engine never saw it
    assert served.catalog.store.desired() == {}


@pytest.mark.parametrize("bad", ["-1", "nan", "1e9", "soon"])
async def test_unload_timeout_must_be_a_sane_number(serve, root, bad):
    served = await admin_app(serve, root)
    async with served.client(headers=ADMIN) as http:
        assert (await http.post("/admin/memories", json={"name": "alpha", "path": "alpha"})).status_code == 201
        assert_error(await http.delete(f"/admin/memories/alpha?timeout={bad}"), 400, "timeout")
    assert served.catalog.names() == ["alpha"] and served.engine.unloaded == []


async def test_load_list_select_unload(serve, root, cards):
    served = await admin_app(serve, root)
    async with served.client(headers=ADMIN) as http:
        r = await http.post("/admin/memories", json={"name": "gamma", "path": "alpha", "memory_weight": 0.6})
        assert r.status_code == 201, r.text
        card = r.json()
        assert (card["name"], card["kind"], card["memory_weight"], card["managed"]) == ("gamma", "decoder", 0.6, True)
        assert card["num_parameters"] == cards["alpha"].num_parameters and card["device_bytes"] > 0
        assert any(m["id"] == "gamma" and m["parent"] == BASE for m in (await http.get("/v1/models")).json()["data"])
        listing = (await http.get("/admin/memories")).json()
        assert [m["name"] for m in listing["data"]] == ["gamma"] and listing["limits"]["max_memories"] == 3 and listing["generator"] is None
        assert (await http.post("/v1/completions", json={**COMPLETION, "domain": "gamma"})).status_code == 200
        assert served.completions.requests[-1].vllm_xargs["memserve_weight"] == 0.6
        assert_error(await http.post("/admin/memories", json={"name": "gamma", "path": "beta"}), 409, "name")
        r = await http.delete("/admin/memories/gamma")
        assert r.status_code == 200 and r.json()["drained"] is True and r.json()["freed_bytes"] == card["device_bytes"]
        assert_error(await http.post("/v1/completions", json={**COMPLETION, "domain": "gamma"}), 404, "domain")
        assert_error(await http.delete("/admin/memories/gamma"), 404, "name")
    assert served.engine.loaded == ["gamma@1"] and served.engine.unloaded == ["gamma@1"]
    assert served.catalog.store.desired() == {}


async def test_limits_name_the_numbers(serve, root):
    served = await admin_app(serve, root)
    async with served.client(headers=ADMIN) as http:
        for name in ("l1", "l2", "l3"):
            assert (await http.post("/admin/memories", json={"name": name, "path": "alpha"})).status_code == 201
        err = assert_error(await http.post("/admin/memories", json={"name": "l4", "path": "alpha"}), 409)
    assert "--max-memories is 3" in err["message"]
    assert served.engine.loaded == ["l1@1", "l2@2", "l3@3"]
