"""``domain: "auto"`` in request selection (server/serving/routing.py called from selection.py), without an engine."""

from __future__ import annotations

import pytest

from memories.artifact import MemoryCard
from memories.routing import Router, profile_from_texts
from server import metrics
from server.serving import routing
from server.serving.catalog import LoadedMemory
from server.serving.selection import select_memory

BIO = ["the cell protein of the gene", "a tumor dose and the trial", "the gene of a cell", "protein dose of the tumor", "cell trial of a gene"] * 3
LAW = ["the court and the contract", "a party shall sign the clause", "the license of the agreement", "notice of the term and clause", "court party contract"] * 3


class Tok:
    """A whitespace tokenizer over a fixed word list, in a vocabulary of 1000 ids."""

    words = "the a of and cell protein gene tumor dose trial court contract party shall sign clause license agreement notice term goal match league striker".split()
    vocab = {w: i for i, w in enumerate(words)}
    special_tokens_map: dict = {}

    def __len__(self):
        return 1000

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab[w] for w in text.split() if w in self.vocab]}

    def get_vocab(self):
        return self.vocab


class Catalog:
    retry_after = 3

    def __init__(self, default_domain="none"):
        tok = Tok()
        self.base_tokenizer = tok
        self.default_domain = default_domain
        self._m = {n: LoadedMemory(MemoryCard(name=n, path="/x", weight=0.25), key=f"{n}@1") for n in ("bio", "law", "plain")}
        self._m["bio"].profile = profile_from_texts(BIO, tok)
        self._m["law"].profile = profile_from_texts(LAW, tok)
        self.router = Router({n: m.profile for n, m in self._m.items() if m.profile is not None}, len(tok))

    def is_desired(self, name):
        return False

    def get(self, name):
        return self._m.get(name)

    def names(self):
        return sorted(self._m)


def routed_count(memory: str) -> float:
    return metrics.ROUTED.labels(memory)._value.get()


def test_auto_picks_the_memory_of_the_prompt_or_none():
    cat = Catalog()
    for prompt, want in (("the protein of a tumor cell", "bio"), ("a party shall sign the contract clause", "law"), ("goal match league striker", None)):
        before = routed_count(want or "none")
        body = {"model": "base", "prompt": prompt, "domain": "auto"}
        s = select_memory(body, {}, cat, "base")
        assert (s.memory.name if s else None) == want, prompt
        assert "domain" not in body
        r = routing.take()
        assert r.memory == want and r.tokens > 0 and set(r.route.scores) == {"bio", "law"}
        assert routed_count(want or "none") == before + 1
        assert routing.take() is None  # taken once


def test_header_auto_and_prompt_forms():
    cat = Catalog()
    ids = Tok()("the court and the contract clause")["input_ids"]
    assert select_memory({"prompt": ids}, {"x-domain": "AUTO"}, cat, "base").memory.name == "law"
    assert select_memory({"prompt": ["the gene", "of a tumor cell"], "domain": "auto"}, {}, cat, "base").memory.name == "bio"


def test_chat_routes_on_the_user_messages_only():
    cat = Catalog()
    messages = [
        {"role": "system", "content": "the court contract party shall sign clause license agreement"},
        {"role": "user", "content": [{"type": "text", "text": "the protein of a tumor"}]},
        {"role": "assistant", "content": "court clause"},
        {"role": "user", "content": "and the gene of a cell"},
    ]
    assert select_memory({"messages": messages, "domain": "auto"}, {}, cat, "base").memory.name == "bio"


def test_an_explicit_memory_wins_over_auto():
    cat = Catalog()
    assert select_memory({"prompt": "the protein of a tumor cell", "domain": "auto", "model": "law"}, {}, cat, "base").memory.name == "law"
    assert select_memory({"prompt": "the protein of a tumor cell", "domain": "plain"}, {"x-domain": "auto"}, cat, "base").memory.name == "plain"
    assert routing.take() is None  # not routed


def test_default_domain_auto_routes_requests_that_name_nothing():
    prompt = "the protein of a tumor cell"
    assert select_memory({"model": "base", "prompt": prompt}, {}, Catalog(), "base") is None  # default none
    cat = Catalog(default_domain="auto")
    assert select_memory({"model": "base", "prompt": prompt}, {}, cat, "base").memory.name == "bio"
    assert select_memory({"model": "base", "prompt": prompt, "domain": "none"}, {}, cat, "base") is None  # "none" stays none
    assert routing.take() is None


def test_memory_weight_applies_only_to_a_chosen_decoder_memory():
    cat = Catalog()
    assert select_memory({"prompt": "goal match league", "domain": "auto", "memory_weight": 0.9}, {}, cat, "base") is None
    assert select_memory({"prompt": "the protein of a tumor cell", "domain": "auto", "memory_weight": 0.9}, {}, cat, "base").weight == 0.9


def test_auto_with_nothing_routable_is_none():
    cat = Catalog()
    cat.router = Router({}, 1000)
    assert select_memory({"prompt": "the protein of a tumor cell", "domain": "auto"}, {}, cat, "base") is None
    assert routing.take().memory is None


@pytest.mark.parametrize("content", [None, 3, [{"type": "image_url", "image_url": {"url": "x"}}]])
def test_odd_chat_contents_route_to_none(content):
    assert select_memory({"messages": [{"role": "user", "content": content}], "domain": "auto"}, {}, Catalog(), "base") is None
