"""``memserve memory route-eval``'s bookkeeping (server/route_eval.py) against a fake server: groups, pooled perplexities, ratios."""

from __future__ import annotations

import math

from server.route_eval import evaluate, markdown


class FakeClient:
    """Every token of a document scores ``log p`` by (document's true domain, option); routing by a fixed table."""

    routable = {"bio": True, "law": True}

    def __init__(self, lp, routes):
        self.lp, self.routes = lp, routes

    def score(self, prompt, domain):
        ids = list(prompt)
        truth = {1: "bio", 2: "law", 3: "none"}[ids[0]]
        return ids, [self.lp[truth][domain]] * (len(ids) - 1)

    def route(self, ids):
        return self.routes[ids[0]][len(ids)]


def test_groups_pool_tokens_and_report_auto_against_oracle_and_base():
    lp = {
        "bio": {"none": -3.0, "bio": -2.5, "law": -3.2},
        "law": {"none": -3.0, "bio": -3.1, "law": -2.0},
        "none": {"none": -3.0, "bio": -3.4, "law": -3.3},
    }
    # bio documents go to bio at every length; law to none at 16 tokens, law after; ood to law at 16, none after
    routes = {1: {16: "bio", 64: "bio"}, 2: {16: "none", 64: "law"}, 3: {16: "law", 64: "none"}}
    sources = [("bio", "bio"), ("law", "law"), ("ood:x.txt", None)]
    docs = {"bio": [[1] * 100] * 2, "law": [[2] * 100] * 2, "ood:x.txt": [[3] * 100] * 4}
    report = evaluate(FakeClient(lp, routes), sources, docs, doc_tokens=65, lengths=(16, 64))

    o, g = report["overall"], report["groups"]
    assert o["documents"] == 8 and set(g) == {"in-domain", "out-of-domain", "bio", "law", "ood:x.txt"}
    assert o["accuracy_vs_label"] == {16: 2 / 8, 64: 1.0} and o["oracle_vs_label"] == 1.0
    assert g["law"]["accuracy_vs_label"] == {16: 0.0, 64: 1.0} and g["ood:x.txt"]["accuracy_vs_label"][16] == 0.0
    ind, ood = g["in-domain"], g["out-of-domain"]
    assert math.isclose(ind["perplexity"]["oracle"], math.exp((2.5 + 2.0) / 2))  # equal tokens per document: mean of the log-probs
    assert math.isclose(ind["perplexity"]["auto@16"], math.exp((2.5 + 3.0) / 2))  # law documents scored by the base at 16 tokens
    assert math.isclose(ind["ratios"]["auto@64/oracle"], 1.0)
    assert math.isclose(ood["ratios"]["auto@16/base"], math.exp(0.3)) and math.isclose(ood["ratios"]["auto@64/base"], 1.0)
    assert math.isclose(o["perplexity"]["base"], math.exp(3.0)) and math.isclose(o["perplexity"]["law"], math.exp((3.2 * 2 + 2.0 * 2 + 3.3 * 4) / 8))
    assert o["routable"] == {"bio": True, "law": True}

    md = markdown(report)
    assert "| in-domain | 4 | 50.0% / 100.0% |" in md and "| out-of-domain | 4 | 0.0% / 100.0% |" in md


def test_an_artifact_directory_reads_its_test_split_from_either_work_folder(tmp_path):
    import numpy as np
    import pytest

    from server.route_eval import read_documents

    stream = np.arange(1000)
    build = tmp_path / "out" / "work" / "bio" / "corpus"  # memserve memory build --out OUT: OUT/work/NAME
    demo = tmp_path / "cache" / "work" / "law" / "corpus"  # the demo memories: <cache>/memories/NAME beside <cache>/work/NAME
    for folder in (build, demo):
        folder.mkdir(parents=True)
        np.save(folder / "test.npy", stream)
    (tmp_path / "out" / "bio").mkdir()
    (tmp_path / "cache" / "memories" / "law").mkdir(parents=True)
    docs = read_documents(str(tmp_path / "out" / "bio"), max_docs=2, doc_tokens=256)
    assert [len(d) for d in docs] == [256, 256] and docs[1][0] == 256
    assert len(read_documents(str(tmp_path / "cache" / "memories" / "law"), max_docs=50, doc_tokens=256)) == 3
    assert len(read_documents(str(tmp_path / "cache" / "work" / "law"), max_docs=50, doc_tokens=256)) == 3
    (tmp_path / "none").mkdir()
    with pytest.raises(SystemExit, match="no test split"):
        read_documents(str(tmp_path / "none"), max_docs=1, doc_tokens=256)
