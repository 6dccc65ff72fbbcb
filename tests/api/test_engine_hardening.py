"""Engine-side refusals and robustness through a real server (issue 9: items 3, 7, 11)."""

from __future__ import annotations

import base64
import io
import shutil

import httpx
import pytest

from server.launcher import ServerProcess
from tests.conftest import FP32
from tests.tiny_models import poisoned_copy

TOKEN = "engine-hardening-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening-root")
    shutil.copytree(tiny["alpha"], root / "alpha")
    poisoned_copy(tiny["alpha"], root / "nan")
    args = ["--model", str(tiny["base"]), "--served-model-name", "tiny-base", "--max-model-len", "512"]
    args += ["--memory-root", str(root), "--admin-token", TOKEN, "--reconcile-interval", "0", "--memory", f"alpha={root / 'alpha'}"]
    with ServerProcess(args + FP32 + ["--enable-prompt-embeds"], tmp_path_factory.mktemp("hardening-server")).running() as proc:
        yield proc


def complete(server, **body):
    return httpx.post(server.url + "/v1/completions", json={"model": "tiny-base", "max_tokens": 2, "temperature": 0, **body}, timeout=300)


@pytest.mark.parametrize("prompt", [[5], "H"])
def test_echo_logprobs_of_a_one_token_prompt_on_a_memory(server, prompt):
    base = complete(server, prompt=prompt, max_tokens=1, echo=True, logprobs=1)
    fused = complete(server, prompt=prompt, max_tokens=1, echo=True, logprobs=1, model="alpha")
    assert base.status_code == 200, base.text
    assert fused.status_code == 200, fused.text
    assert fused.json()["choices"][0]["logprobs"]["token_logprobs"][0] is None


def test_memory_with_nan_weights_is_refused_at_load(server):
    r = httpx.post(server.url + "/admin/memories", json={"name": "nan", "path": "nan"}, headers=AUTH, timeout=300)
    assert r.status_code == 400, r.text
    assert "not finite" in r.json()["error"]["message"] and "up_proj" in r.json()["error"]["message"]
    models = httpx.get(server.url + "/v1/models", timeout=30).json()["data"]
    assert "nan" not in {m["id"] for m in models}
    assert complete(server, prompt="the gene", model="alpha", logprobs=2).status_code == 200


def test_prompt_embeds_selecting_a_memory_never_crash_the_engine(server, tiny):
    """The engine must survive; the API may refuse the combination (400) or serve it with the base."""
    import torch
    from transformers import AutoModelForCausalLM

    embeddings = AutoModelForCausalLM.from_pretrained(tiny["base"]).get_input_embeddings().weight[[5, 9, 11]].detach()
    buffer = io.BytesIO()
    torch.save(embeddings, buffer)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    r = complete(server, prompt_embeds=encoded, model="alpha")
    assert r.status_code in (200, 400), r.text
    assert complete(server, prompt="the gene", model="alpha").status_code == 200
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200


def test_memory_rows_are_fused_with_prompt_embeds_enabled(server, tiny):
    """With --enable-prompt-embeds vLLM's runner hands the model inputs_embeds and no input_ids: the memory reads the request's own tokens."""
    from memories.reference import ReferenceFusion

    ids = [11, 12, 13, 14, 15]
    r = complete(server, prompt=ids, domain="alpha", memory_weight=0.5, max_tokens=6, logprobs=1, ignore_eos=True, return_token_ids=True)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    expected = ReferenceFusion(str(tiny["base"]), str(tiny["alpha"])).greedy(ids, 6, 0.5)
    assert choice["token_ids"] == expected.tokens
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(expected.logprobs, abs=1e-3)
