"""calm memories through a real server and the official openai client: oracle, causality, mixed batches, admin, refusals.

One server for the module: base + decoder memory ``alpha`` + lora memory ``ada`` + calm memory
``cal`` at start-up; a second calm memory ``cob`` (other augmenting model, other connections) is
hot-loaded by the tests. The oracle composes the same memory into transformers models through
hooks on both (``memories.calm.hf``).
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from openai import OpenAI
from safetensors.torch import load_file, save_file

from server.launcher import ServerProcess
from memories.reference import ReferenceFusion
from tests.api.test_admin import TOKEN, Stream, admin
from tests.api.test_lora import admin_load, complete
from tests.conftest import FP32, MAX_TOKENS
from tests.tiny_models import build_calm, build_llama, build_lora, build_tokenizer

LONG = "the patient study result shows the tumor dose trial growth and the bank rate profit loss clause term notice " * 3


@pytest.fixture(scope="module")
def root(tiny, tmp_path_factory):
    """The memory root: two good calm memories, one lora, and one artifact per refusal."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("calm-root")
    base, tok = tiny["base"], AutoTokenizer.from_pretrained(tiny["tokenizer"])
    scratch = tmp_path_factory.mktemp("calm-models")
    build_calm(root / "cal", base, build_llama(scratch / "aug1", tok, layers=2, seed=21), [(0, 0), (1, 1)], seed=1)
    build_calm(root / "cob", base, build_llama(scratch / "aug2", tok, layers=3, seed=22, hidden=192), [(2, 1), (0, 1)], heads=4, seed=2)
    build_lora(root / "ada", base, rank=8, seed=11)
    # refusals
    shutil.copytree(root / "cal", root / "nan")
    weights = load_file(str(root / "nan" / "composition.safetensors"))
    weights["connections.1.k.weight"][0, 0] = float("nan")
    save_file(weights, str(root / "nan" / "composition.safetensors"))
    shutil.copytree(root / "cal", root / "deep")
    card = json.loads((root / "deep" / "memory.json").read_text())
    (root / "deep" / "memory.json").write_text(json.dumps({**card, "connections": [[0, 0], [1, 7]]}))
    other = build_llama(scratch / "other-base", tok, layers=2, seed=5, hidden=192)
    build_calm(root / "foreign", other, scratch / "aug1", [(0, 0)])
    other_tok = build_tokenizer(scratch / "other-tok", vocab_size=300)
    build_calm(root / "babel", base, build_llama(scratch / "aug3", other_tok, layers=1, seed=23, vocab_size=len(tok)), [(0, 0)])
    return root


KV_BUDGET = 256 << 20  # per memory: ~100 calm rows of 512 tokens here, more than any test runs at once


@pytest.fixture(scope="module")
def calm_server(tiny, root, tmp_path_factory):
    args = ["--model", str(tiny["base"]), "--served-model-name", "tiny-base", "--max-model-len", "512"]
    args += ["--memory", f"alpha={tiny['alpha']}", "--memory", f"ada={root / 'ada'}", "--memory", f"cal={root / 'cal'}"]
    args += ["--memory-root", str(root), "--admin-token", TOKEN, "--reconcile-interval", "0", "--max-loras", "1", "--memory-kv-budget", str(KV_BUDGET), *FP32]
    with ServerProcess(args, tmp_path_factory.mktemp("calm-server")).running() as proc:
        yield proc


@pytest.fixture(scope="module")
def client(calm_server) -> OpenAI:
    return OpenAI(base_url=calm_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tok(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny["tokenizer"])


@pytest.fixture(scope="module")
def oracle(tiny, root):
    return {name: ReferenceFusion(str(tiny["base"]), None, calm_dir=str(root / name)) for name in ("cal", "cob")}


def echo_logprobs(client: OpenAI, prompt: list[int], model: str) -> list[float]:
    r = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0, logprobs=0, echo=True)
    return list(r.choices[0].logprobs.token_logprobs[1 : len(prompt)])


def test_calm_memory_matches_the_transformers_composition(client, oracle, prompt_ids):
    base = complete(client, prompt_ids[0])
    for ids in prompt_ids:
        tokens, logprobs = complete(client, ids, model="cal")
        expected = oracle["cal"].greedy(ids, MAX_TOKENS, 0.0)
        assert tokens == expected.tokens
        assert logprobs == pytest.approx(expected.logprobs, abs=1e-3)
    assert complete(client, prompt_ids[0], model="cal")[0] != base[0]  # the composition really changes the output


def test_prompt_logprobs_through_echo_are_the_composition(client, oracle, tok):
    ids = tok(LONG)["input_ids"]
    assert echo_logprobs(client, ids, "cal") == pytest.approx(oracle["cal"].prompt_logprobs(ids), abs=1e-3)
    assert echo_logprobs(client, ids, "tiny-base") != pytest.approx(oracle["cal"].prompt_logprobs(ids), abs=1e-3)


def test_a_later_token_never_changes_an_earlier_position(client, tok):
    """Causality: two prompts that differ only from position 9 on agree before it."""
    ids = tok(LONG)["input_ids"][:24]
    changed = ids[:9] + [(t + 7) % 300 + 3 for t in ids[9:]]
    a, b = echo_logprobs(client, ids, "cal"), echo_logprobs(client, changed, "cal")
    assert a[:8] == pytest.approx(b[:8], abs=1e-6)
    assert a[8:] != pytest.approx(b[8:], abs=1e-3)


def test_a_cached_prompt_prefix_is_read_again_by_the_augmenting_model(client, oracle, tok):
    """The second request finds the prompt's first blocks in vLLM's prefix cache (salted per memory)."""
    ids = tok(LONG)["input_ids"]
    expected = oracle["cal"].greedy(ids, 6, 0.0)
    for _ in range(2):
        tokens, logprobs = complete(client, ids, model="cal", max_tokens=6)
        assert tokens == expected.tokens and logprobs == pytest.approx(expected.logprobs, abs=1e-3)


def test_three_ways_to_select_and_chat_name_the_memory(client, calm_server, prompt_ids):
    ids = prompt_ids[2]
    raw = client.completions.with_raw_response.create(model="cal", prompt=ids, max_tokens=4, temperature=0)
    assert raw.headers["X-Memserve-Memory"] == "cal" and raw.parse().model == "cal"
    header_client = OpenAI(base_url=calm_server.url + "/v1", api_key="unused", max_retries=0, default_headers={"X-Domain": "cal"})
    assert complete(client, ids, model="cal") == complete(client, ids, domain="cal") == complete(header_client, ids)
    assert "memory=cal" in calm_server.log_path.read_text()
    messages = [{"role": "user", "content": "the gene"}]
    chat = client.chat.completions.create(model="cal", messages=messages, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    base = client.chat.completions.create(model="tiny-base", messages=messages, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert chat.model == "cal" and chat.choices[0].message.content != base.choices[0].message.content
    models = {m.id: m for m in client.models.list().data}
    assert models["cal"].parent == "tiny-base"


def test_memory_weight_on_a_calm_memory_is_refused(client, calm_server, prompt_ids):
    r = httpx.post(calm_server.url + "/v1/completions", json={"model": "cal", "prompt": "the cell", "max_tokens": 2, "memory_weight": 0.5}, timeout=60)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "memory_weight" and "'cal' is a calm memory" in err["message"]
    assert admin_load(calm_server, "cob2", "cob", memory_weight=0.3).status_code == 400
    assert complete(client, prompt_ids[0], model="cal")[0]  # still serving


def test_mixed_batch_of_every_kind_equals_solo_runs_and_base_rows_are_plain_vllm(client, calm_server, oracle, prompt_ids, plain_vllm):
    if "cob" not in {m.id for m in client.models.list().data}:
        assert admin_load(calm_server, "cob", "cob").status_code == 201
    jobs = [(ids, model) for ids in prompt_ids for model in ("tiny-base", "alpha", "ada", "cal", "cob")]
    solo = [complete(client, ids, model=model) for ids, model in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: complete(client, job[0], model=job[1]), jobs))
    for (ids, model), alone, mixed in zip(jobs, solo, together):
        assert mixed[0] == alone[0], model
        if model == "tiny-base":
            assert mixed[1] == alone[1]  # bit-identical
        else:  # batched rows sum in another order (calm: keys padded to the longest row)
            assert mixed[1] == pytest.approx(alone[1], abs=1e-4), model
    for (ids, model), (tokens, logprobs) in zip(jobs, solo):
        if model == "cob":
            expected = oracle["cob"].greedy(ids, MAX_TOKENS, 0.0)
            assert tokens == expected.tokens and logprobs == pytest.approx(expected.logprobs, abs=1e-3)
    assert len({tuple(t) for (_, m), (t, _) in zip(jobs, solo) if m in ("tiny-base", "cal", "cob")}) == 3 * 3
    base_rows = [s for (_, m), s in zip(jobs, solo) if m == "tiny-base"]
    for plain, (tokens, logprobs) in zip(plain_vllm["lora"], base_rows, strict=True):
        assert tokens == plain["tokens"] and logprobs == plain["logprobs"]


def test_the_listing_and_metrics_show_a_calm_memorys_cache_budget(client, calm_server, prompt_ids):
    complete(client, prompt_ids[0], model="cal")
    card = next(m for m in admin(calm_server, "GET").json()["data"] if m["name"] == "cal")
    assert card["cache_budget_bytes"] == KV_BUDGET and card["max_rows"] >= 1 and card["active_rows"] == 0
    assert 0 < card["cache_bytes"] <= KV_BUDGET
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in httpx.get(calm_server.url + "/metrics", timeout=30).text.splitlines() if line.startswith("memserve_memory_cache")}
    assert samples['memserve_memory_cache_budget_bytes{memory="cal"}'] == KV_BUDGET  # Prometheus writes it as 2.68435456e+08
    assert 0 < samples['memserve_memory_cache_bytes{memory="cal"}'] <= KV_BUDGET


def test_hot_load_unload_with_drain_replace_and_persistence(client, calm_server, root, prompt_ids):
    if "cob" not in {m.id for m in client.models.list().data}:
        assert admin_load(calm_server, "cob", "cob").status_code == 201
    card = next(m for m in admin(calm_server, "GET").json()["data"] if m["name"] == "cob")
    assert (card["kind"], card["connections"], card["memory_weight"]) == ("calm", [[2, 1], [0, 1]], None)
    assert {"name": "cob", "path": "cob", "memory_weight": None, "content_sha256": card["content_sha256"]} in json.loads((root / "memserve-state.json").read_text())["memories"]

    expected = complete(client, prompt_ids[0], model="cob")[0]
    stream = Stream(calm_server, "cob", max_tokens=80, prompt="the cell protein gene")
    stream.start()
    assert stream.started.wait(120)
    r = admin(calm_server, "DELETE", "/admin/memories/cob")
    assert r.status_code == 200 and r.json()["drained"] is True
    stream.join(120)
    assert stream.error is None and len(stream.tokens) == 80
    assert stream.tokens[:MAX_TOKENS] == expected  # finished on the memory it started with
    gone = httpx.post(calm_server.url + "/v1/completions", json={"model": "cob", "prompt": "the", "max_tokens": 2}, timeout=60)
    assert gone.status_code == 404

    assert admin_load(calm_server, "cob", "cob").status_code == 201
    assert complete(client, prompt_ids[0], model="cob")[0] == expected
    assert admin_load(calm_server, "cob", "cal", replace=True).status_code == 201
    assert complete(client, prompt_ids[0], model="cob")[0] == complete(client, prompt_ids[0], model="cal")[0]


@pytest.mark.parametrize(
    "path,check,numbers",
    [
        ("nan", "composition weights are not finite", ["connections.1.k.weight"]),
        ("deep", "connection outside the models", ["[1, 7]", "base has 2"]),
        ("foreign", "base width differs from memory.json", ["192", "128"]),
        ("babel", "tokenizer differs from the base's", []),
    ],
)
def test_bad_calm_memories_are_refused_and_serving_goes_on(client, calm_server, prompt_ids, path, check, numbers):
    r = admin_load(calm_server, "bad", path)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "BadRequestError" and "memory 'bad'" in err["message"] and check in err["message"]
    for n in numbers:
        assert n in err["message"]
    assert "bad" not in {m.id for m in client.models.list().data}
    assert complete(client, prompt_ids[0], model="cal")[0]


def test_calm_off_refuses_calm_memories(tiny, root, tmp_path_factory):
    args = ["--model", str(tiny["base"]), "--max-model-len", "256", "--memory", f"cal={root / 'cal'}", "--calm", "off", *FP32]
    proc = ServerProcess(args, tmp_path_factory.mktemp("calm-off"))
    assert proc.proc.wait(300) == 2
    assert "calm memories are disabled on this server" in proc.log_path.read_text()


def test_the_composition_is_causal_in_the_oracle_too(tiny, root):
    """The formula itself: logits at positions before a change are bit-equal (memories.calm.hf)."""
    ref = ReferenceFusion(str(tiny["base"]), None, calm_dir=str(root / "cal"))
    ids = torch.randint(3, 300, (1, 20))
    changed = ids.clone()
    changed[0, 12:] = (changed[0, 12:] + 5) % 300 + 3
    with torch.no_grad():
        a, b = ref.base_logits(ids), ref.base_logits(changed)
    assert torch.equal(a[0, :12], b[0, :12]) and not torch.allclose(a[0, 12:], b[0, 12:])
