"""Thin memories (``"embeddings": "base"``) through the real server: the same tokens as full copies, less weight.

The base here has tied embeddings, as SmolLM2 does, so the memories run on the
one tensor vLLM holds for both the base's input embedding and its head.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from transformers import AutoTokenizer

from server.launcher import ROOT, ServerProcess, server_env
from tests.conftest import FP32
from tests.tiny_models import base_embedding_pair, build_llama

TOKEN = "thin-admin-token"
MAX_TOKENS = 16
PROMPTS = ["the cell protein gene", "court law contract party shall", "market share price", "tumor dose trial"]


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory):
    """A tied base; two memories, each as a full copy and a thin version; a thin memory of half the width."""
    root = tmp_path_factory.mktemp("thin-root")
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    base = build_llama(root / "base", tok, layers=2, seed=11, tied=True)
    built = {"base": base, "tokenizer": tiny["tokenizer"], "root": root / "memories"}
    for name, layers, seed in (("m1", 1, 12), ("m2", 2, 13)):
        memory = build_llama(root / "src" / name, tok, layers=layers, seed=seed, ship_tokenizer=False, memory_json={"lambda": 0.6})
        built[f"{name}-full"], built[f"{name}-thin"] = base_embedding_pair(memory, base, built["root"])
    narrow = build_llama(root / "src" / "narrow", tok, layers=1, seed=14, hidden=64, ship_tokenizer=False)
    built["narrow-thin"] = base_embedding_pair(narrow, base, built["root"])[1]
    return built


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    args = ["--model", str(models["base"]), "--served-model-name", "tied-base", "--max-model-len", "512"]
    for name in ("m1-full", "m1-thin", "m2-full", "m2-thin"):
        args += ["--memory", f"{name}={models[name]}"]
    # --calm off: vLLM-CPU compiles the base (no --enforce-eager), and decoder memories run beside it
    args += ["--memory-root", str(models["root"]), "--admin-token", TOKEN, "--calm", "off", *FP32]
    with ServerProcess(args, tmp_path_factory.mktemp("thin-server")).running() as proc:
        yield proc


@pytest.fixture(scope="module")
def prompt_ids(models) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(models["tokenizer"])
    return [tok(p)["input_ids"] for p in PROMPTS]


def complete(server, prompt: list[int], domain: str) -> tuple[list[int], list[float]]:
    body = {"model": "tied-base", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 1, "ignore_eos": True, "return_token_ids": True, "domain": domain}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["token_ids"], choice["logprobs"]["token_logprobs"]


def test_thin_memory_serves_what_its_full_copy_serves(server, prompt_ids):
    full = {(m, i): complete(server, ids, f"{m}-full") for m in ("m1", "m2") for i, ids in enumerate(prompt_ids)}
    plain = [complete(server, ids, "none") for ids in prompt_ids]
    for m in ("m1", "m2"):  # the memory changes the distribution
        assert full[(m, 0)][0] != plain[0][0] or full[(m, 0)][1] != pytest.approx(plain[0][1], abs=1e-3)
    # thin rows of both memories in flight together: the shared head serves them in one call
    jobs = [(m, i) for m in ("m1", "m2") for i in range(len(prompt_ids))]
    with ThreadPoolExecutor(len(jobs)) as pool:
        thin = dict(zip(jobs, pool.map(lambda job: complete(server, prompt_ids[job[1]], f"{job[0]}-thin"), jobs)))
    for job in jobs:
        assert thin[job][0] == full[job][0], job
        assert thin[job][1] == pytest.approx(full[job][1], abs=1e-5), job


def test_a_compiled_base_with_memories_equals_the_oracle(server, models, prompt_ids):
    """With calm off, vLLM-CPU compiles the base's backbone (no --enforce-eager); decoder memories run beside it, still exact."""
    from memories.reference import ReferenceFusion

    log = server.log_path.read_text(errors="replace")
    assert "enforce_eager=False" in log and "Warming up model for the compilation" in log
    for name in ("m1-full", "m2-thin"):
        tokens, logprobs = complete(server, prompt_ids[1], name)
        expected = ReferenceFusion(str(models["base"]), str(models[name.replace("thin", "full")])).greedy(prompt_ids[1], MAX_TOKENS, 0.6)
        assert tokens == expected.tokens and logprobs == pytest.approx(expected.logprobs, abs=2e-5), name


def test_thin_memory_weighs_less(server):
    r = httpx.get(server.url + "/admin/memories", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    listed = {m["name"]: m for m in r.json()["data"]}
    shared = 320 * 128  # the tied base's one embedding, used as input embedding and head
    for m in ("m1", "m2"):
        full, thin = listed[f"{m}-full"], listed[f"{m}-thin"]
        assert full["num_parameters"] - thin["num_parameters"] == 2 * shared  # the full copy stores embedding and head
        assert full["device_bytes"] - thin["device_bytes"] == 2 * shared * 4  # fp32


def test_thin_memory_of_another_width_is_refused_by_admin(server):
    r = httpx.post(server.url + "/admin/memories", json={"name": "narrow", "path": "narrow-thin"}, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300)
    assert r.status_code == 400
    error = r.json()["error"]
    assert "memory 'narrow': hidden_size differs from the base's: memory hidden_size 64, base 128" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_thin_memory_of_another_width_is_refused_at_start(models, tmp_path):
    narrow = tmp_path / "narrow"
    shutil.copytree(models["narrow-thin"], narrow)
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", "1", "--model", str(models["base"]), "--memory", f"narrow={narrow}"]
    r = subprocess.run(cmd, cwd=ROOT, env=server_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "memory 'narrow': hidden_size differs from the base's: memory hidden_size 64, base 128" in r.stderr
    assert json.loads((narrow / "memory.json").read_text())["embeddings"] == "base"
