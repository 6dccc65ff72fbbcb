"""The router for ``domain: "auto"`` (memories/routing.py) on synthetic token streams with clearly separated vocabularies."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memories.routing import (
    ROUTING_JSON,
    Router,
    RoutingError,
    build_profile,
    count_profile,
    profile_from_texts,
    read_profile,
    windows,
    write_profile,
)

V = 1000
FUNCTION = np.arange(0, 30)  # shared by every domain, Zipf-distributed
DOMAINS = {"bio": np.arange(100, 200), "law": np.arange(200, 300), "fin": np.arange(400, 500)}
FOOTBALL = np.arange(300, 400)  # no memory's domain


def text(rng, words, n):
    zipf = 1 / np.arange(1, len(FUNCTION) + 1)
    f = rng.choice(FUNCTION, size=n, p=zipf / zipf.sum())
    return np.where(rng.random(n) < 0.5, f, rng.choice(words, size=n))


@pytest.fixture(scope="module")
def profiles():
    rng = np.random.default_rng(0)
    ood = [text(rng, FOOTBALL, 64) for _ in range(8)]
    return {name: build_profile(text(rng, words, 5000), V, windows(text(rng, words, 640)), ood, source="train split") for name, words in DOMAINS.items()}


def test_in_domain_prompts_route_to_their_memory_and_football_to_none(profiles):
    router = Router(profiles)
    rng = np.random.default_rng(1)
    for length in (16, 64, 256):
        for name, words in DOMAINS.items():
            chosen = [router.route(text(rng, words, length)).memory for _ in range(50)]
            assert chosen.count(name) >= 48, (length, name, chosen)
        chosen = [router.route(text(rng, FOOTBALL, length)).memory for _ in range(50)]
        assert chosen.count(None) >= (45 if length == 16 else 50), (length, chosen)


def test_a_prompt_of_unknown_or_no_ids_goes_to_none(profiles):
    router = Router(profiles)
    assert router.route([]).memory is None
    assert router.route([V + 5, -1]).memory is None  # ids outside the vocabulary are ignored
    assert Router({}).route([1, 2, 3]).memory is None  # nothing routable


def test_route_reports_every_score_and_threshold(profiles):
    route = Router(profiles).route(list(DOMAINS["law"][:20]))
    assert route.memory == "law"
    assert set(route.scores) == set(route.thresholds) == set(DOMAINS)
    assert route.scores["law"] == max(route.scores.values())
    assert route.scores["law"] >= route.thresholds["law"]


def test_threshold_without_out_of_domain_text_errs_towards_none():
    rng = np.random.default_rng(2)
    p = build_profile(text(rng, DOMAINS["bio"], 5000), V, windows(text(rng, DOMAINS["bio"], 640)))
    assert p.calibration["method"] == "in-domain-quantile"
    router = Router({"bio": p})
    assert [router.route(text(rng, FOOTBALL, 64)).memory for _ in range(50)].count(None) == 50
    assert [router.route(text(rng, DOMAINS["bio"], 64)).memory for _ in range(50)].count("bio") >= 40


def test_threshold_with_out_of_domain_text_separates(profiles):
    for p in profiles.values():
        assert p.calibration["method"] == "ood"
        assert p.calibration["balanced_accuracy"] == 1.0
        assert p.calibration["ood_median"] < p.threshold < p.calibration["in_domain_median"]


def test_smoothing_follows_the_amount_of_text():
    rng = np.random.default_rng(3)
    small = count_profile(text(rng, DOMAINS["bio"], 200), V)
    large = count_profile(text(rng, DOMAINS["bio"], 20000), V)
    assert 0 < large.smoothing < small.smoothing <= 0.5


def test_routing_json_round_trip_and_old_artifacts(tmp_path, profiles):
    assert read_profile(tmp_path) is None  # an artifact without routing.json: not routable, still loads
    write_profile(tmp_path, profiles["bio"])
    data = json.loads((tmp_path / ROUTING_JSON).read_text())
    for key in ("format", "model", "background", "vocab_size", "tokenizer_sha256", "source", "tokens", "smoothing", "threshold", "calibration", "ids", "counts"):
        assert key in data
    back = read_profile(tmp_path, vocab_size=V)
    assert back.threshold == pytest.approx(profiles["bio"].threshold)
    np.testing.assert_array_equal(back.log_ratios(), profiles["bio"].log_ratios())
    with pytest.raises(RoutingError, match="outside the base's vocabulary"):
        read_profile(tmp_path, vocab_size=150)
    (tmp_path / ROUTING_JSON).write_text(json.dumps({**data, "counts": data["counts"][:-1]}))
    with pytest.raises(RoutingError):
        read_profile(tmp_path)


def test_cost_is_one_gather_whatever_the_number_of_memories():
    """The router holds one [vocab × memories] matrix and reads only the prompt's rows: work ∝ prompt × memories, one vectorised op."""
    rng = np.random.default_rng(4)
    many = {f"m{i}": build_profile(rng.integers(0, V, 2000), V, windows(rng.integers(0, V, 256))) for i in range(50)}
    router = Router(many)
    assert router.matrix.shape == (V, 50) and router.matrix.dtype == np.float32

    class Counting(np.ndarray):
        reads = 0

        def __getitem__(self, index):
            Counting.reads += isinstance(index, np.ndarray)  # a gather of rows
            return super().__getitem__(index)

    router.matrix = router.matrix.view(Counting)
    router.route(rng.integers(0, V, 64))
    assert Counting.reads == 1  # one gather for all 50 memories, not one per memory


def test_profile_from_texts_holds_out_every_other_prompt():
    class Tok:  # whitespace "tokenizer" over a fixed vocabulary
        vocab = {w: i for i, w in enumerate("the a of and cell protein gene tumor dose trial goal match league striker".split())}

        def __len__(self):  # a base's vocabulary is far larger than the words used here
            return 1000

        def __call__(self, t, add_special_tokens=False):
            return {"input_ids": [self.vocab[w] for w in t.split()]}

        def get_vocab(self):
            return self.vocab

        special_tokens_map: dict = {}

    prompts = ["the cell protein of the gene", "a tumor dose and the trial", "the gene of a cell", "protein dose of the tumor"] * 4
    p = profile_from_texts(prompts, Tok())
    assert p.source == "prompts" and p.calibration["held_out"] == "every other text"
    router = Router({"bio": p})
    assert router.route([Tok.vocab[w] for w in "the protein of a tumor cell".split()]).memory == "bio"
    assert router.route([Tok.vocab[w] for w in "the goal match league striker".split()]).memory is None
    # known limit of the uniform background: common words count for every memory, so with a profile this small
    # a prompt made mostly of them routes (docs/CONTRACT.md, "Routing profile")
