"""The calm demo's product code on tiny random models: the augmenting-model builder and the key-value task."""

from __future__ import annotations

import json

import pytest
import torch

from memories.calm.augment import IGNORE, AugmentConfig, build_augment, init_augment, read_report, window_examples
from memories.calm.keyvalue import FACT, VALUES, exact_match, fact_examples, make_facts, split_keys, task_records
from tests.tiny_models import build_llama, build_tokenizer, corpus


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("calm-demo")
    tok = build_tokenizer(root / "tokenizer")
    base = build_llama(root / "base", tok, layers=3, seed=1, tied=True)
    text = root / "corpus.txt"
    text.write_text("\n\n".join(corpus(400, seed=3)))  # 400 blank-line separated documents
    return {"root": root, "tok": tok, "base": base, "corpus": str(text)}


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_untrained_augment_is_the_bases_first_layers(tiny):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float32)
    cut = init_augment(tiny["base"], 2)
    assert cut.config.num_hidden_layers == 2
    b, c = _weights(base), _weights(cut)
    assert all(k.startswith(("model.layers.0.", "model.layers.1.", "model.embed_tokens", "model.norm", "lm_head")) or ".layers." not in k for k in c)
    for k, v in c.items():
        assert torch.equal(v, b[k]), k  # same names: layers 0..K-1, embedding, final norm, head
    assert not any(k.startswith("model.layers.2.") for k in c)
    # its forward is the base's stream after layer K-1, read out through the base's norm and head
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        hidden = base(input_ids=ids, output_hidden_states=True).hidden_states[2]
        want = base.lm_head(base.model.norm(hidden))
        assert torch.allclose(cut(input_ids=ids).logits, want, atol=1e-5)


def test_build_augment_writes_a_trained_hf_dir_with_the_bases_tokenizer(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memories.artifact import read_card, tokenizer_sha256

    out = tiny["root"] / "augment"
    cfg = AugmentConfig(base=str(tiny["base"]), corpus=tiny["corpus"], out=str(out), layers=2, max_tokens=600, eval_tokens=80, context=32, stride=32, lr=5e-3, threads=1, progress=False, checkpoint_every=5)
    assert build_augment(cfg) == out
    assert not (tiny["root"] / ".augment.work").exists() and not (tiny["root"] / ".augment.partial").exists()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tiny["base"] / name).read_bytes()
    assert tokenizer_sha256(AutoTokenizer.from_pretrained(out)) == tokenizer_sha256(AutoTokenizer.from_pretrained(tiny["base"]))
    card = read_card(out, "augment")  # the checks `memory compose` and the server run on an augmenting model
    assert card.architecture == "LlamaForCausalLM" and card.hidden_size == 128
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.num_hidden_layers == 2 and model.config.tie_word_embeddings
    cut = init_augment(tiny["base"], 2)
    trained, start = _weights(model), _weights(cut)
    assert any(not torch.equal(trained[k], start[k]) for k in start if ".layers." in k)  # training moved the layers
    report = read_report(out)
    ppl = report["perplexity"]
    assert ppl["augment"]["test"] < ppl["cut_untrained"]["test"]  # it learned the domain
    assert report["train"]["steps"] == len(window_examples(__import__("numpy").arange(601), 32))
    # the splits are the decoder build's: the same hash split and caps
    from memories.calm.augment import corpus_streams
    from memories.corpus import load_corpus, split_documents

    streams, summary = corpus_streams(tiny["corpus"], AutoTokenizer.from_pretrained(tiny["base"]), 600, 80, 0.05, 0.05)
    test_docs = split_documents(load_corpus(tiny["corpus"]), 0.05, 0.05)["test"]
    first = AutoTokenizer.from_pretrained(tiny["base"])(test_docs[0].text, add_special_tokens=False)["input_ids"]
    assert streams["test"][: len(first)].tolist() == first and summary == report["corpus"]
    # a second run with the same inputs finds it up to date and leaves it alone
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    build_augment(cfg)
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_training_resumes_from_its_checkpoint(tiny, tmp_path):
    from memories.calm.augment import train_lm

    ex = [(torch.arange(2, 12), torch.arange(3, 13)) for _ in range(6)]
    straight = init_augment(tiny["base"], 1)
    train_lm(straight, ex, tmp_path / "a", epochs=2, lr=1e-2, checkpoint_every=1000, progress=False)
    # a run killed after step 7 (checkpoint at 6) resumes there and ends where the straight run ends
    killed = init_augment(tiny["base"], 1)
    calls = {"n": 0}
    orig = killed.model.forward

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] > 7:
            raise KeyboardInterrupt
        return orig(*a, **k)

    killed.model.forward = dying
    with pytest.raises(KeyboardInterrupt):
        train_lm(killed, ex, tmp_path / "c", epochs=2, lr=1e-2, checkpoint_every=3, progress=False)
    assert (tmp_path / "c" / "last.pt").exists()
    resumed = init_augment(tiny["base"], 1)
    rec = train_lm(resumed, ex, tmp_path / "c", epochs=2, lr=1e-2, checkpoint_every=3, progress=False)
    assert len(rec["losses"]) == 12
    for k, v in _weights(straight).items():
        assert torch.allclose(v, _weights(resumed)[k], atol=1e-6), k


def test_keys_and_values_are_deterministic_and_unknowable():
    a, b = make_facts(300, seed=7), make_facts(300, seed=7)
    assert a == b and list(a) == list(b)
    assert make_facts(300, seed=8) != a
    assert len(a) == 300 and all(len(k) == 5 and k.isalpha() and k.islower() for k in a)
    assert set(a.values()) <= set(VALUES) and len(set(a.values())) > 30
    assert len(VALUES) == 64 == len(set(VALUES))


def test_key_split_is_disjoint_20_80_and_deterministic():
    keys = list(make_facts(500, seed=1))
    train, test = split_keys(keys, 0.2, seed=1)
    assert (train, test) == split_keys(list(reversed(keys)), 0.2, seed=1)  # order of the input does not matter
    assert len(train) == 100 and len(test) == 400
    assert not set(train) & set(test) and set(train) | set(test) == set(keys)
    assert split_keys(keys, 0.2, seed=2)[0] != train


def test_task_records_ask_in_a_format_the_facts_never_use():
    facts = make_facts(10, seed=0)
    recs = task_records(facts, list(facts)[:2])
    assert len(recs) == 6
    for r in recs:
        assert f" {r['key']}" in r["prompt"] and r["completion"] == f" {facts[r['key']]}"
        assert " =" not in r["prompt"]  # the memorised " KEY = VALUE." never appears
    assert FACT.format(key="abcde", value="cat") == " abcde = cat."


def test_fact_examples_score_the_value_token_only(tiny):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    facts = {"kaa": "cat", "kbb": "dog", "kcc": "red"}
    words = [" kaa", " kbb", " kcc", " =", " cat", " dog", " red", "."]
    wt = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *words])}, unk_token="<unk>"))
    wt.pre_tokenizer = pre_tokenizers.Split(pattern=__import__("tokenizers").Regex(r" ?[^ .]+|\."), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=wt, unk_token="<unk>")
    ex = fact_examples(tok, facts, packings=2, per_sequence=2, seed=0)
    assert len(ex) == 4  # 2 packings × ⌈3 / 2⌉ sequences
    seen = set()
    for ids, labels in ex:
        assert len(ids) == len(labels) and (ids != 0).all()  # no unknown tokens: every piece tokenized as meant
        scored = (labels != IGNORE).nonzero().flatten().tolist()
        assert len(scored) == len(ids) // 4  # one value per 4-token fact
        for t in scored:
            assert tok.convert_ids_to_tokens(int(ids[t])) == " =" and int(labels[t]) == int(ids[t + 1])
            key = tok.convert_ids_to_tokens(int(ids[t - 1])).strip()
            assert tok.convert_ids_to_tokens(int(labels[t])) == f" {facts[key]}"
            seen.add(key)
    assert seen == set(facts)


class _CharTok:
    """One token per character: ids are code points."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_exact_match_needs_every_completion_token():
    def copy_first(ids):  # greedy always repeats the prompt's first token
        logits = torch.zeros(ids.shape[0], ids.shape[1], 200)
        for i in range(ids.shape[0]):
            logits[i, :, ids[i, 0]] = 1.0
        return logits

    records = [
        {"prompt": "xyz", "completion": "xx"},  # right
        {"prompt": "xyz", "completion": "xy"},  # first token right, second wrong
        {"prompt": "abc", "completion": "b"},  # wrong
        {"prompt": "qrs", "completion": "q"},  # right
    ]
    r = exact_match(copy_first, _CharTok(), records, batch=3)  # two batches
    assert r["correct"] == 2 and r["total"] == 4 and r["accuracy"] == 0.5
    assert [row["ok"] for row in r["rows"]] == [True, False, False, True]
    assert r["rows"][1]["got"] == "xx"
    assert exact_match(copy_first, _CharTok(), records, batch=1)["rows"] == r["rows"]


def test_batched_greedy_equals_one_prompt_at_a_time(tiny):
    from transformers import AutoModelForCausalLM

    from memories.calm.keyvalue import greedy, model_forward

    model = AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float32).eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    together = greedy(model_forward(model), prompts, 3)
    assert together == [greedy(model_forward(model), [p], 3)[0] for p in prompts]
    assert all(len(g) == 3 for g in together)


def test_compose_records_trains_one_record_per_row_and_packages_a_calm_memory(tiny):
    from memories.calm.composition import COMPOSITION_FILE, Composition, CompositionSpec
    from memories.calm.keyvalue import compose_records, record_sequences

    augment = tiny["root"] / "cut"
    if not augment.exists():
        init_augment(tiny["base"], 2).save_pretrained(augment)
        from memories.calm.augment import copy_tokenizer

        copy_tokenizer(tiny["base"], augment)
    records = [{"prompt": "the cell", "completion": " gene"}, {"prompt": "the court law", "completion": " contract party"}]
    seqs, masks = record_sequences(tiny["tok"], records)
    assert [len(s) for s in seqs] == [len(m) for m in masks]
    for r, s, m in zip(records, seqs, masks):  # the completion's tokens are the only targets, EOS ends each row
        assert tiny["tok"].decode([t for t, k in zip(s, m) if k]) == r["completion"] and s[-1] == tiny["tok"].eos_token_id and m[-1] == 0
    out = compose_records(str(tiny["base"]), str(augment), records, tiny["root"] / "kv", "kv", connections=[(1, 2)], epochs=1, batch=2, threads=1, progress=False)
    card = json.loads((out / "memory.json").read_text())
    assert card["kind"] == "calm" and card["connections"] == [[1, 2]] and card["metrics"]["steps"] == 1 and card["metrics"]["rows"] == 2
    comp = Composition.load(out / COMPOSITION_FILE, CompositionSpec.from_card("kv", card), "kv")
    assert comp.connections[0].gate.abs().item() > 0  # one step moved the zero-initialised gate


def test_the_augmenting_model_gets_every_tokenizer_file_a_calm_memory_ships(tmp_path):
    """One list of tokenizer files: a sentencepiece base's tokenizer.model reaches the augmenting model as it reaches the package."""
    from memories.artifact import TOKENIZER_FILES
    from memories.calm.augment import copy_tokenizer

    base, out = tmp_path / "base", tmp_path / "out"
    base.mkdir(), out.mkdir()
    for name in TOKENIZER_FILES:
        (base / name).write_text(name)
    assert sorted(copy_tokenizer(base, out)) == sorted(TOKENIZER_FILES)
    assert (out / "tokenizer.model").read_text() == "tokenizer.model"
