import pytest

from memories.artifact import MemoryCard
from server.serving.catalog import LoadedMemory
from server.errors import BadRequest, Unavailable, UnknownMemory
from server.serving.selection import select_memory


class Catalog:
    retry_after = 3

    def __init__(self, *names, desired=()):
        self._m = {n: LoadedMemory(MemoryCard(name=n, path="/x", weight=0.25, temperature=2.0), key=f"{n}@1") for n in names}
        self._desired = set(desired)

    def is_desired(self, name):
        return name in self._desired

    def get(self, name):
        return self._m.get(name)

    def names(self):
        return sorted(self._m)


CAT = Catalog("bio", "law")


def sel(body, headers=None):
    return select_memory(body, headers or {}, CAT, "base")


def test_no_memory():
    body = {"model": "base", "prompt": "x"}
    assert sel(body) is None and body == {"model": "base", "prompt": "x"}
    assert sel({"domain": "none"}) is None
    assert sel({"domain": ""}, {"x-domain": "None"}) is None


def test_three_spellings_and_defaults():
    for body, headers in (({"domain": "bio"}, None), ({}, {"x-domain": "bio"}), ({"model": "bio"}, None)):
        s = sel(body, headers)
        assert s.memory.name == "bio" and s.weight == 0.25
        assert "domain" not in body and body.get("model") in (None, "base")
    s = sel({"domain": "law", "memory_weight": 1})
    assert s.weight == 1.0
    assert s.engine_args() == {"memserve_memory": "law@1", "memserve_weight": 1.0, "memserve_temperature": 2.0}


def test_agreeing_spellings_are_fine():
    assert sel({"domain": "bio", "model": "bio"}, {"x-domain": "bio"}).memory.name == "bio"


@pytest.mark.parametrize(
    "body,headers,exc",
    [
        ({"domain": "bio"}, {"x-domain": "law"}, BadRequest),
        ({"model": "law", "domain": "bio"}, None, BadRequest),
        ({"domain": "chem"}, None, UnknownMemory),
        ({}, {"x-domain": "chem"}, UnknownMemory),
        ({"domain": ["bio"]}, None, BadRequest),
        ({"domain": "bio", "memory_weight": 1.01}, None, BadRequest),
        ({"domain": "bio", "memory_weight": float("nan")}, None, BadRequest),
        ({"domain": "bio", "memory_weight": "0.5"}, None, BadRequest),
        ({"memory_weight": 0.5}, None, BadRequest),
    ],
)
def test_refusals(body, headers, exc):
    with pytest.raises(exc):
        sel(body, headers)


def test_client_cannot_inject_engine_keys():
    body = {"vllm_xargs": {"memserve_memory": "bio@1", "memserve_weight": 1.0, "other": 1}}
    assert sel(body) is None
    assert body["vllm_xargs"] == {"other": 1}


def test_memory_loaded_elsewhere_is_retryable():
    with pytest.raises(Unavailable) as e:
        select_memory({"domain": "chem"}, {}, Catalog("bio", desired=["chem"]), "base")
    assert e.value.retry_after == 3 and e.value.param == "domain"


def test_a_lora_memory_reaches_vllm_as_the_model_and_has_no_weight():
    cat = Catalog("bio")
    cat._m["ada"] = LoadedMemory(MemoryCard(name="ada", path="/x", kind="lora", rank=8), key="ada@2")
    for body, headers, asked in (({"model": "ada"}, {}, "ada"), ({"model": "base", "domain": "ada"}, {}, "base"), ({"model": "base"}, {"x-domain": "ada"}, "base")):
        s = select_memory(body, headers, cat, "base")
        assert body["model"] == "ada@2" and s.engine_args() == {}
        assert s.model_id == asked  # what the response reports
    with pytest.raises(BadRequest) as e:
        select_memory({"model": "ada", "memory_weight": 0.5}, {}, cat, "base")
    assert e.value.param == "memory_weight" and "only to decoder memories" in str(e.value)
    decoder = {"model": "bio"}
    assert select_memory(decoder, {}, cat, "base").engine_args()["memserve_memory"] == "bio@1" and decoder["model"] == "base"
