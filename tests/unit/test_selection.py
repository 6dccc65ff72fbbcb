import pytest

from memories.artifact import MemoryCard
from server.serving.catalog import LoadedMemory
from server.errors import BadRequest, Unavailable, UnknownMemory
from server.serving.selection import select_memory


class Catalog:
    retry_after = 3
    mixture_size = 3

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
        ({"domain": 3}, None, BadRequest),
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


# ---- mixtures ------------------------------------------------------------------------------


def mixed_catalog():
    cat = Catalog("bio", "law")
    cat._m["ada"] = LoadedMemory(MemoryCard(name="ada", path="/x", kind="lora", rank=8), key="ada@2")
    cat._m["cal"] = LoadedMemory(MemoryCard(name="cal", path="/x", kind="calm"), key="cal@3")
    return cat


def test_mixture_object_and_list():
    body = {"model": "base", "domain": {"bio": 0.3, "law": 0.2}}
    s = sel(body)
    assert [(m.name, w) for m, w in s.parts] == [("bio", 0.3), ("law", 0.2)]
    assert s.label == "bio=0.3, law=0.2" and s.model_id == "base" and body.pop("cache_salt").startswith("memserve-") and body == {"model": "base"}
    assert s.engine_args() == {"memserve_memories": ["bio@1", "law@1"], "memserve_weights": [0.3, 0.2], "memserve_temperatures": [2.0, 2.0]}
    s = sel({"domain": ["law", "bio"]})  # each memory's own λ (0.25)
    assert [(m.name, w) for m, w in s.parts] == [("law", 0.25), ("bio", 0.25)] and s.label == "law=0.25, bio=0.25"
    s = sel({"domain": {"bio": None, "law": 0.75}})  # null: the memory's own λ; Σλ = 1 is allowed
    assert [w for _, w in s.parts] == [0.25, 0.75]


def test_mixture_of_one_is_just_that_memory():
    for domain, weight in (({"bio": 0.4}, 0.4), (["bio"], 0.25), ({"bio": None}, 0.25)):
        s = sel({"domain": domain})
        assert s.memory.name == "bio" and s.weight == weight and not s.others and s.label == "bio"
        assert s.engine_args() == {"memserve_memory": "bio@1", "memserve_weight": weight, "memserve_temperature": 2.0}
    assert sel({"domain": ["law"], "memory_weight": 0.9}).weight == 0.9  # a list of one name is the plain name
    cat = mixed_catalog()
    body = {"model": "base", "domain": ["ada"]}
    assert select_memory(body, {}, cat, "base").memory.name == "ada" and body["model"] == "ada@2"


def test_base_changing_memory_with_decoders():
    cat = mixed_catalog()
    body = {"model": "base", "domain": {"ada": None, "bio": 0.3, "law": 0.1}}
    s = select_memory(body, {}, cat, "base")
    assert body["model"] == "ada@2" and s.model_id == "base"  # vLLM attaches the adapter; the response says what was asked
    assert s.label == "ada, bio=0.3, law=0.1"
    assert s.engine_args() == {"memserve_memories": ["bio@1", "law@1"], "memserve_weights": [0.3, 0.1], "memserve_temperatures": [2.0, 2.0]}
    body = {"model": "base", "domain": ["bio", "cal"]}
    s = select_memory(body, {}, cat, "base")
    assert body["model"] == "base" and body["cache_salt"].startswith("memserve-")
    assert s.engine_args() == {"memserve_calm": "cal@3", "memserve_memory": "bio@1", "memserve_weight": 0.25, "memserve_temperature": 2.0}
    assert s.label == "bio=0.25, cal"


@pytest.mark.parametrize(
    "body,headers,exc,param,says",
    [
        ({"domain": ["ada", "cal"]}, None, BadRequest, "domain", "change the base model itself"),
        ({"domain": {"ada": None, "cal": None, "bio": 0.1}}, None, BadRequest, "domain", "at most one lora or calm memory"),
        ({"domain": {"bio": 0.7, "law": 0.4}}, None, BadRequest, "domain", "sum to at most 1"),
        ({"domain": {"bio": 1.2, "law": 0.0}}, None, BadRequest, "domain", r"[0, 1]"),
        ({"domain": {"bio": -0.1, "law": 0.1}}, None, BadRequest, "domain", r"[0, 1]"),
        ({"domain": {"bio": "0.3", "law": 0.1}}, None, BadRequest, "domain", r"[0, 1]"),
        ({"domain": {"bio": True, "law": 0.1}}, None, BadRequest, "domain", r"[0, 1]"),
        ({"domain": {"bio": 0.3, "law": 0.2}, "memory_weight": 0.5}, None, BadRequest, "memory_weight", "weight in the domain object"),
        ({"domain": {"bio": 0.3}, "memory_weight": 0.5}, None, BadRequest, "memory_weight", "weight in the domain object"),
        ({"domain": ["bio", "law"], "memory_weight": 0.5}, None, BadRequest, "memory_weight", "mixture"),
        ({"domain": ["bio", "chem"]}, None, UnknownMemory, "domain", "'chem' is not loaded"),
        ({"domain": {"chem": 0.1, "bio": 0.1}}, None, UnknownMemory, "domain", "'chem' is not loaded"),
        ({"domain": ["bio", "bio"]}, None, BadRequest, "domain", "more than once"),
        ({"domain": []}, None, BadRequest, "domain", "empty"),
        ({"domain": {}}, None, BadRequest, "domain", "empty"),
        ({"domain": ["bio", "none"]}, None, BadRequest, "domain", "not one"),
        ({"domain": ["bio", 3]}, None, BadRequest, "domain", "strings"),
        ({"domain": {"ada": 0.5, "bio": 0.1}}, None, BadRequest, "domain", "no weight"),
        ({"domain": ["bio", "law"]}, {"x-domain": "bio"}, BadRequest, "domain", "X-Domain"),
        ({"domain": ["bio", "law"], "model": "law"}, None, BadRequest, "domain", "model"),
        ({"domain": ["bio", "law"], "model": "nope"}, None, UnknownMemory, "model", "does not exist"),
    ],
)
def test_mixture_refusals(body, headers, exc, param, says):
    with pytest.raises(exc) as e:
        select_memory(body, headers or {}, mixed_catalog(), "base")
    assert e.value.param == param and says in str(e.value), str(e.value)


def test_mixture_member_loaded_elsewhere_is_retryable():
    cat = Catalog("bio", desired=["chem"])
    with pytest.raises(Unavailable):
        select_memory({"domain": ["bio", "chem"]}, {}, cat, "base")


def test_mixture_weights_summing_to_one_by_rounding_are_accepted():
    cat = Catalog("a", "b", "c")
    s = select_memory({"domain": {"a": 0.1, "b": 0.2, "c": 0.7}}, {}, cat, "base")  # 1.0000000000000002 in floats
    assert [w for _, w in s.parts] == [0.1, 0.2, 0.7]


def test_memory_rows_get_a_prefix_cache_salt_of_their_memories():
    """Decoder and calm rows keep memory keys and values in their KV blocks: only rows of the same memories, in the same order, share them."""

    def salt(domain, **extra):
        body = {"model": "base", "domain": domain, **extra}
        sel(body) if not isinstance(domain, str) or domain else None
        return body.get("cache_salt")

    assert salt("bio") == salt("bio") and salt("bio") != salt("law")
    assert salt({"bio": 0.3, "law": 0.2}) == salt({"bio": 0.1, "law": 0.1})  # weights do not change the keys and values
    assert salt({"bio": 0.3, "law": 0.2}) != salt({"law": 0.2, "bio": 0.3})  # a request's k-th memory runs in lane k
    assert salt("bio", cache_salt="mine") != salt("bio")
    body = {"model": "base"}
    assert sel(body) is None and "cache_salt" not in body


def test_a_mixture_beyond_the_mixture_size_is_refused():
    cat = Catalog("bio", "law", "fin")
    cat.mixture_size = 2
    with pytest.raises(BadRequest) as e:
        select_memory({"domain": ["bio", "law", "fin"]}, {}, cat, "base")
    assert e.value.param == "domain" and "--mixture-size" in str(e.value) and "at most 2" in str(e.value)
