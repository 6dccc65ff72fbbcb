"""``domain: "auto"`` through the real server and the official ``openai`` client.

Two tiny decoder memories whose artifacts carry ``routing.json`` made (with
``memories.routing``) from clearly separated tiny corpora, and one without a
profile: ``auto`` picks the memory of the prompt's domain, none for text of no
memory's domain, says so in ``X-Memserve-Memory`` and ``/metrics``, and
``/v1/models`` says which memories are routable.
"""

from __future__ import annotations

import json
import random
import shutil

import httpx
import pytest
from openai import OpenAI
from transformers import AutoTokenizer

from memories.routing import build_profile, windows, write_profile
from server.launcher import ServerProcess
from tests.conftest import FP32

BIO = "cell protein gene patient study tumor dose trial growth".split()
LAW = "court law contract party shall agreement license clause term notice".split()
FOOTBALL = "football striker scored a goal in the league match and the referee gave a penalty to the keeper".split()


def text(words, n, seed):
    rng = random.Random(seed)
    return " ".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 12))) + "." for _ in range(n))


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("routing")
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    ids = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    for name, src, words in (("bio", "alpha", BIO), ("law", "beta", LAW)):
        shutil.copytree(tiny[src], root / name)
        write_profile(root / name, build_profile(ids(text(words, 200, 1)), len(tok), windows(ids(text(words, 40, 2)))))
    shutil.copytree(tiny["alpha"], root / "plain")  # no routing.json: loads, not routable
    args = ["--model", str(tiny["base"]), "--served-model-name", "tiny-base", "--max-model-len", "512"]
    args += ["--memory", f"bio={root / 'bio'}", "--memory", f"law={root / 'law'}", "--memory", f"plain={root / 'plain'}", *FP32]
    with ServerProcess(args, tmp_path_factory.mktemp("routing-server")).running() as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="none")


def routed_total(server, memory: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(f'memserve_routed_total{{memory="{memory}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize("words, want", [(BIO, "bio"), (LAW, "law"), (FOOTBALL, "none")])
def test_auto_picks_the_memory_of_the_prompt_or_none(server, client, words, want):
    before = routed_total(server, want)
    raw = client.completions.with_raw_response.create(model="tiny-base", prompt=text(words, 3, 7), max_tokens=2, temperature=0, extra_body={"domain": "auto"})
    assert raw.headers["x-memserve-memory"] == want
    assert raw.parse().model == "tiny-base"
    assert routed_total(server, want) == before + 1
    assert f"(routed: auto → {want})" in server.log_tail(200)


def test_chat_routes_on_the_user_message_with_the_header(client):
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-base", max_tokens=2, temperature=0, extra_headers={"X-Domain": "auto"},
        messages=[{"role": "system", "content": text(BIO, 2, 3)}, {"role": "user", "content": text(LAW, 3, 8)}],
    )  # fmt: skip
    assert raw.headers["x-memserve-memory"] == "law"


def test_models_say_which_memories_are_routable(client):
    cards = {m.id: m for m in client.models.list().data}
    assert cards["bio"].model_extra["routable"] is True and cards["law"].model_extra["routable"] is True
    assert cards["plain"].model_extra["routable"] is False
    assert "routable" not in cards["tiny-base"].model_extra


def test_route_eval_reports_routing_and_perplexities(server, tmp_path):
    import argparse

    from server.route_eval import run

    files = {}
    for name, words, seed in (("bio", BIO, 20), ("law", LAW, 30), ("football", FOOTBALL, 40)):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text("\n".join(text(words, 3, seed + i) for i in range(3)))
    opts = argparse.Namespace(url=server.url, api_key=None, memory=[f"bio={files['bio']}", f"law={files['law']}"], ood=[str(files["football"])], out=str(tmp_path / "out"), max_docs=3, doc_tokens=256)
    assert run(opts) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    o = report["overall"]
    assert o["documents"] == 9 and report["options"] == ["none", "bio", "law"]
    assert o["accuracy_vs_label"]["256"] == 1.0  # every document routed to its memory, football to none
    assert set(o["perplexity"]) >= {"auto@16", "auto@64", "auto@256", "oracle", "base", "bio", "law"}
    assert o["perplexity"]["oracle"] <= min(o["perplexity"][k] for k in ("base", "bio", "law"))  # the oracle picks per document
    assert (tmp_path / "out" / "confusion.png").stat().st_size > 1000 and "accuracy vs oracle" in (tmp_path / "out" / "report.md").read_text()
