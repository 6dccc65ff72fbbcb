"""Run-time generation: admin prompts → a lora memory, served beside base and decoder-memory rows.

A tiny generator is built here (the real pipeline on the tiny base and three tiny domains); the
server runs it for an admin load that carries prompts of a fourth domain it never saw. The
generated adapter is checked against transformers + PEFT on the files the server wrote.
"""

from __future__ import annotations

import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from openai import OpenAI

from server.launcher import ROOT, ServerProcess
from memories.reference import ReferenceFusion
from tests.api.test_admin import TOKEN, admin
from tests.conftest import FP32
from tests.tiny_models import WORDS

MAX_TOKENS = 10
DOMAINS = {"bio": WORDS[:8], "fin": WORDS[8:16], "law": WORDS[16:24], "held": WORDS[24:]}


def _texts(domain: str, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(f"{domain}-{seed}")
    words = DOMAINS[domain]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(12, 30))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def generator(tiny, tmp_path_factory) -> Path:
    from memories.lora.pipeline import GeneratorBuildConfig, build

    root = tmp_path_factory.mktemp("generator")
    corpora = {}
    for domain in DOMAINS:
        folder = root / "corpora" / domain
        folder.mkdir(parents=True)
        for i, text in enumerate(_texts(domain, 40)):
            (folder / f"{i:03d}.txt").write_text(text)
        corpora[domain] = str(folder)
    cfg = GeneratorBuildConfig(
        base=str(tiny["base"]), out=str(root / "out"), work=str(root / "work"),
        train_domains=(corpora["bio"], corpora["fin"], corpora["law"]), heldout_domains=(corpora["held"],),
        validation_fraction=0.1, test_fraction=0.15, eval_tokens=200, eval_window=32,
        rank=4, alpha=8.0, layers=2, lora_steps=5, lora_batch=2, lora_window=32, lora_windows=8, lora_lr=1e-2, lora_warmup=1,
        checkpoint_from=2, bf16=False, prompts=4, prompt_tokens=16, generator_steps=20, generator_batch=4, max_prompts=64, eval_prompts=8,
        threads=1, progress=False,
    )  # fmt: skip
    return Path(build(cfg))


@pytest.fixture(scope="module")
def gen_server(tiny, generator, tmp_path_factory):
    root = tmp_path_factory.mktemp("gen-root")
    args = ["--model", str(tiny["base"]), "--served-model-name", "tiny-base", "--max-model-len", "512", "--memory", f"alpha={tiny['alpha']}"]
    args += ["--memory-root", str(root), "--admin-token", TOKEN, "--reconcile-interval", "0", "--generator", str(generator), "--max-lora-rank", "8", *FP32]
    with ServerProcess(args, tmp_path_factory.mktemp("gen-server")).running() as proc:
        proc.memory_root = root
        yield proc


@pytest.fixture(scope="module")
def client(gen_server) -> OpenAI:
    return OpenAI(base_url=gen_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def generated(gen_server) -> dict:
    r = admin(gen_server, "POST", "/admin/memories", {"name": "held", "prompts": _texts("held", 32, seed=1), "description": "held-out words"})
    assert r.status_code == 201, r.text
    return r.json()


def complete(client: OpenAI, prompt: str, model: str) -> tuple[list[int], list[float]]:
    r = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=1, extra_body={"return_token_ids": True, "ignore_eos": True})
    return list(r.choices[0].token_ids), list(r.choices[0].logprobs.token_logprobs)


def test_prompts_become_a_served_lora_memory(generated, gen_server, generator, tiny, client):
    card = generated
    assert card["kind"] == "lora" and card["name"] == "held" and card["description"] == "held-out words"
    assert card["generator"] == (generator / "generator.sha256").read_text().strip()
    assert card["prompts"]["count"] == 32 and card["generation_seconds"] > 0
    path = Path(card["path"])
    assert path.parent == gen_server.memory_root.resolve() / "generated"
    ids = client.completions.create(model="held", prompt="court law", max_tokens=1).model
    assert ids == "held"
    # what the server serves is what transformers + PEFT make of the files it wrote
    ref = ReferenceFusion(str(tiny["base"]), None, lora_dir=str(path))
    prompt = "the cell protein"
    tokens, logprobs = complete(client, prompt, "held")
    from transformers import AutoTokenizer

    expected = ref.greedy(AutoTokenizer.from_pretrained(tiny["tokenizer"])(prompt)["input_ids"], MAX_TOKENS, 0.0)
    assert tokens == expected.tokens
    assert logprobs == pytest.approx(expected.logprobs, abs=1e-3)
    listing = admin(gen_server, "GET", "/admin/memories").json()
    assert listing["generator"]["generator"] == card["generator"] and "held" in {m["name"] for m in listing["data"]}


def test_one_batch_holds_base_decoder_and_generated_rows(generated, client):
    jobs = [("tiny-base", "market share"), ("alpha", "the cell"), ("held", "court law contract"), ("tiny-base", "the gene"), ("held", "price bank")] * 2
    solo = {job: complete(client, job[1], job[0]) for job in set(jobs)}
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: complete(client, job[1], job[0]), jobs))
    for job, result in zip(jobs, together):
        assert result[0] == solo[job][0], job
        assert result[1] == pytest.approx(solo[job][1], abs=1e-4), job
    assert solo[("held", "court law contract")][0] != complete(client, "court law contract", "tiny-base")[0]


def test_same_prompts_again_reuse_the_generated_folder(generated, gen_server):
    r = admin(gen_server, "POST", "/admin/memories", {"name": "held", "prompts": _texts("held", 32, seed=1), "description": "held-out words", "replace": True})
    assert r.status_code == 201, r.text
    assert r.json()["path"] == generated["path"] and r.json()["generation_seconds"] == 0


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"name": "x", "prompts": []}, 400, "prompts"),
        ({"name": "x", "prompts": ["court law"] * 65}, 400, "prompts"),  # the generator takes at most 64
        ({"name": "x", "prompts": ["   "]}, 400, "prompts"),
        ({"name": "x", "prompts": [3, 4]}, 400, None),
        ({"name": "x", "prompts": ["a b"], "path": "somewhere"}, 400, None),
        ({"name": "x", "prompts": ["court law"], "memory_weight": 0.3}, 400, "memory_weight"),
        ({"name": "alpha", "prompts": ["court law"]}, 409, "name"),  # refused before any generation
    ],
)
def test_bad_generation_requests(gen_server, client, body, status, param):
    r = admin(gen_server, "POST", "/admin/memories", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"]
    if param:
        assert error["param"] == param
    assert not (gen_server.memory_root / "generated" / "x").exists()
    assert "x" not in {m.id for m in client.models.list().data}
    assert client.completions.create(model="tiny-base", prompt="the", max_tokens=2).choices[0].text is not None


def test_unload_a_generated_memory(generated, gen_server, client):
    r = admin(gen_server, "DELETE", "/admin/memories/held")
    assert r.status_code == 200 and r.json()["status"] == "unloaded"
    assert not Path(generated["path"]).exists()  # nothing refers to the generated folder any more
    with pytest.raises(Exception) as e:
        client.completions.create(model="held", prompt="court", max_tokens=2)
    assert getattr(e.value, "status_code", None) == 404
    assert complete(client, "the cell", "alpha")[0]


def test_generator_needs_a_memory_root_and_admin(tiny, generator, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(tiny["base"]), "--generator", str(generator), "--workdir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert "--generator needs --memory-root" in out.stderr


def test_a_broken_generator_stops_start_up(tiny, generator, tmp_path):
    import shutil

    broken = tmp_path / "gen"
    shutil.copytree(generator, broken)
    with open(broken / "generator.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\0" * 8)
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(tiny["base"]), "--generator", str(broken), "--memory-root", str(tmp_path),
         "--admin-insecure-local", "--workdir", str(tmp_path / "run")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert "generator.sha256" in out.stderr
