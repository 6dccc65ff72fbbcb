"""``memserve memory route-eval``: how well ``domain: "auto"`` routes, measured against a running server.

For every document (test-split text per memory, plus out-of-domain text):

- the router's choice: ``/v1/completions`` with ``domain: "auto"`` on the document's first 16,
  64 and 256 tokens (``X-Memserve-Memory`` names it);
- the oracle's choice: the memory, or none, under which the document's perplexity is lowest,
  each scored by the server itself (``echo`` + ``logprobs``, ``domain`` set to each memory and to
  none), perplexity by ``memories.perplexity.perplexity`` (the one formula);
- routing accuracy against the oracle and against the document's label (its memory, or none for
  out-of-domain text), per prompt length;
- perplexity over all documents under auto (each document scored under the memory its first N
  tokens routed to), the oracle, the base alone and each single memory.

Writes ``report.json``, ``report.md`` and ``confusion.png`` (oracle × router at the longest length).

    memserve memory route-eval --url URL --memory bio=bio-test.txt --memory law=ARTIFACT_DIR --ood football.txt --out DIR

A text file holds one document per non-empty line (``.jsonl``: a ``text`` field per line); an
artifact directory's build work folder (``<out>/work/<name>/corpus/test.npy``, as the decoder build
and calm compose leave it; ``<cache>/work/<name>`` for the demo memories in ``<cache>/memories``) is
cut into documents of ``--doc-tokens`` tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import httpx
import numpy as np

LENGTHS = (16, 64, 256)


def add_route_eval_command(memory_commands) -> None:
    p = memory_commands.add_parser(
        "route-eval", help="measure domain 'auto' routing on a running server",
        description=__doc__.split("\n\n")[0] + " Reports per document and overall; writes report.json, report.md and confusion.png.",
    )  # fmt: skip
    p.add_argument("--url", default=os.environ.get("MEMSERVE_URL", "http://127.0.0.1:8000"), help="server URL (default: $MEMSERVE_URL or %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("MEMSERVE_API_KEY"), help="the server's --api-key, if any (default: $MEMSERVE_API_KEY)")
    p.add_argument("--memory", action="append", default=[], metavar="NAME=FILE|DIR", help="a loaded memory and its test text: a text/JSONL file or its artifact directory (repeatable)")
    p.add_argument("--ood", action="append", default=[], metavar="FILE", help="out-of-domain text file: documents no memory should get (repeatable)")
    p.add_argument("--out", required=True, help="folder for report.json, report.md, confusion.png")
    p.add_argument("--max-docs", type=int, default=50, help="documents per source at most (default: %(default)s)")
    p.add_argument("--doc-tokens", type=int, default=256, help="tokens per document cut from a token stream, and the most scored per document (default: %(default)s)")
    p.set_defaults(func=run)


def read_documents(spec: str, max_docs: int, doc_tokens: int) -> list[str | list[int]]:
    """Texts from a file, or token-id documents from an artifact's build work folder."""
    path = Path(spec)
    if path.is_dir():
        stream = None
        candidates = (
            path.parent / "work" / path.name / "corpus" / "test.npy",  # a build's default work folder, <out>/work/<name>
            path.parent.parent / "work" / path.name / "corpus" / "test.npy",  # the demo memories': <cache>/work/<name> beside <cache>/memories
            path / "corpus" / "test.npy",  # the work folder itself
        )
        for candidate in candidates:
            if candidate.exists():
                stream = np.load(candidate)
                break
        if stream is None:
            raise SystemExit(f"{spec}: no test split found (looked for {', '.join(map(str, candidates))})")
        return [stream[i : i + doc_tokens].tolist() for i in range(0, len(stream) - doc_tokens + 1, doc_tokens)][:max_docs]
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        lines = [json.loads(line)["text"] for line in lines]
    return lines[:max_docs]


class Client:
    def __init__(self, url: str, api_key: str | None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=600)
        models = self.http.get("/v1/models").raise_for_status().json()["data"]
        self.base = next(m["id"] for m in models if not m.get("parent"))
        self.routable = {m["id"]: m.get("routable", False) for m in models if m.get("parent")}

    def score(self, prompt, domain: str) -> tuple[list[int], list[float]]:
        """The prompt's token ids and the log-probabilities of every token after the first, under ``domain``."""
        body = {"model": self.base, "prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 0, "return_token_ids": True, "temperature": 0, "domain": domain}
        r = self.http.post("/v1/completions", json=body)
        if r.status_code != 200:
            raise SystemExit(f"scoring under {domain!r} failed: {r.status_code} {r.text[:500]}")
        choice = r.json()["choices"][0]
        ids = choice.get("prompt_token_ids") or []
        lps = choice["logprobs"]["token_logprobs"][1 : len(ids)]
        return ids, [float(x) for x in lps]

    def route(self, ids: list[int]) -> str:
        body = {"model": self.base, "prompt": ids, "max_tokens": 1, "temperature": 0, "domain": "auto"}
        r = self.http.post("/v1/completions", json=body)
        if r.status_code != 200:
            raise SystemExit(f"routing failed: {r.status_code} {r.text[:500]}")
        return r.headers["x-memserve-memory"]


def evaluate(client: Client, sources: list[tuple[str, str | None]], docs: dict[str, list], doc_tokens: int, lengths=LENGTHS) -> dict:
    from memories.perplexity import perplexity

    memories = [name for name, label in sources if label is not None]
    options = ["none", *memories]
    rows, scored = [], []  # scored[i]: row i's log-probabilities under every option (kept out of the report)
    for source, label in sources:
        for i, doc in enumerate(docs[source]):
            ids, base_lps = client.score(doc if isinstance(doc, list) else doc, "none")
            ids = ids[: doc_tokens]
            if len(ids) < 2:
                continue
            per = {"none": base_lps[: len(ids) - 1]}
            for m in memories:
                per[m] = client.score(ids, m)[1]
            ppl = {o: perplexity(per[o]) for o in options}
            oracle = min(options, key=lambda o: ppl[o])
            routed = {n: client.route(ids[:n]) for n in lengths}
            rows.append({"source": source, "document": i, "label": label or "none", "tokens": len(ids), "routed": routed, "oracle": oracle, "perplexity": ppl})
            scored.append(per)
    overall = {**summarize(rows, scored, memories, lengths), "routable": client.routable}
    pairs = list(zip(rows, scored))
    groups = {
        "in-domain": [(r, s) for r, s in pairs if r["label"] != "none"],
        "out-of-domain": [(r, s) for r, s in pairs if r["label"] == "none"],
        **{source: [(r, s) for r, s in pairs if r["source"] == source] for source, _ in sources},
    }
    by_group = {g: summarize([r for r, _ in ps], [s for _, s in ps], memories, lengths) for g, ps in groups.items() if ps}
    return {"options": options, "lengths": list(lengths), "overall": overall, "groups": by_group, "documents": rows}


def summarize(rows: list[dict], scored: list[dict], memories: list[str], lengths) -> dict:
    """Accuracy and pooled perplexities (every scored token weighted equally) over ``rows``.

    ``ratios``: perplexity under auto at each length ÷ the oracle's and ÷ the base's, the issue's
    targets (in-domain: auto ≤ 1.02 × oracle; out-of-domain: auto ≤ 1.01 × base).
    """
    from memories.perplexity import perplexity

    def pooled(pick) -> float | None:
        lps = [x for r, s in zip(rows, scored) for x in s[pick(r)]]
        return perplexity(lps) if lps else None

    ppl = {
        **{f"auto@{n}": pooled(lambda r, n=n: r["routed"][n]) for n in lengths},
        "oracle": pooled(lambda r: r["oracle"]),
        "base": pooled(lambda r: "none"),
        **{m: pooled(lambda r, m=m: m) for m in memories},
    }
    ratios = {}
    for n in lengths:
        auto = ppl[f"auto@{n}"]
        if auto is not None:
            ratios[f"auto@{n}/oracle"] = auto / ppl["oracle"]
            ratios[f"auto@{n}/base"] = auto / ppl["base"]
    return {
        "documents": len(rows),
        "accuracy_vs_oracle": {n: _share(rows, lambda r, n=n: r["routed"][n] == r["oracle"]) for n in lengths},
        "accuracy_vs_label": {n: _share(rows, lambda r, n=n: r["routed"][n] == r["label"]) for n in lengths},
        "oracle_vs_label": _share(rows, lambda r: r["oracle"] == r["label"]),
        "perplexity": ppl,
        "ratios": ratios,
    }


def _share(rows, ok) -> float | None:
    return sum(bool(ok(r)) for r in rows) / len(rows) if rows else None


def markdown(report: dict) -> str:
    o, lengths = report["overall"], report["lengths"]
    out = ["# domain auto: routing evaluation", "", f"{o['documents']} documents; options: {', '.join(report['options'])}", ""]
    out += ["| prompt tokens | accuracy vs oracle | accuracy vs label |", "|---|---|---|"]
    out += [f"| {n} | {_pct(o['accuracy_vs_oracle'][n])} | {_pct(o['accuracy_vs_label'][n])} |" for n in lengths]
    out += ["", f"oracle = label on {_pct(o['oracle_vs_label'])} of documents", "", "| scored under | perplexity |", "|---|---|"]
    out += [f"| {k} | {v:.3f} |" for k, v in o["perplexity"].items() if v is not None]
    groups = report.get("groups") or {}
    if groups:
        keys = [f"auto@{n}" for n in lengths] + ["oracle", "base"] + report["options"][1:]
        out += ["", "By group (accuracy vs label at " + "/".join(map(str, lengths)) + " tokens; pooled perplexity; auto@64 ÷ oracle and ÷ base):", ""]
        out += ["| group | docs | accuracy vs label | accuracy vs oracle | " + " | ".join(f"ppl {k}" for k in keys) + " | auto@64 ÷ oracle | auto@64 ÷ base |"]
        out += ["|" + "---|" * (6 + len(keys))]
        for g, s in groups.items():
            acc = " / ".join(_pct(s["accuracy_vs_label"][n]) for n in lengths)
            acc_o = " / ".join(_pct(s["accuracy_vs_oracle"][n]) for n in lengths)
            ppl = " | ".join(_num(s["perplexity"].get(k)) for k in keys)
            out.append(f"| {g} | {s['documents']} | {acc} | {acc_o} | {ppl} | {_num(s['ratios'].get('auto@64/oracle'), 4)} | {_num(s['ratios'].get('auto@64/base'), 4)} |")
    out += ["", "| source | doc | label | oracle | " + " | ".join(f"routed@{n}" for n in lengths) + " | " + " | ".join(f"ppl {x}" for x in report["options"]) + " |"]
    out += ["|" + "---|" * (4 + len(lengths) + len(report["options"]))]
    for r in report["documents"]:
        out.append(f"| {r['source']} | {r['document']} | {r['label']} | {r['oracle']} | " + " | ".join(r["routed"][n] for n in lengths) + " | " + " | ".join(f"{r['perplexity'][x]:.2f}" for x in report["options"]) + " |")
    return "\n".join(out) + "\n"


def _num(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def confusion_png(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    options, n = report["options"], max(report["lengths"])
    index = {o: i for i, o in enumerate(options)}
    m = np.zeros((len(options), len(options)), dtype=int)
    for r in report["documents"]:
        if r["routed"][n] in index:
            m[index[r["oracle"]], index[r["routed"][n]]] += 1
    fig, ax = plt.subplots(figsize=(1.2 * len(options) + 2, 1.2 * len(options) + 1.5))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(options)), options, rotation=45)
    ax.set_yticks(range(len(options)), options)
    ax.set_xlabel(f"router (first {n} tokens)")
    ax.set_ylabel("oracle (lowest perplexity)")
    for i in range(len(options)):
        for j in range(len(options)):
            ax.text(j, i, str(m[i, j]), ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(opts: argparse.Namespace) -> int:
    sources: list[tuple[str, str | None]] = []
    docs: dict[str, list] = {}
    for spec in opts.memory:
        name, sep, where = spec.partition("=")
        if not sep:
            print(f"--memory {spec!r}: expected NAME=FILE|DIR", file=sys.stderr)
            return 2
        sources.append((name, name))
        docs[name] = read_documents(where, opts.max_docs, opts.doc_tokens)
    for spec in opts.ood:
        key = f"ood:{Path(spec).name}"
        sources.append((key, None))
        docs[key] = read_documents(spec, opts.max_docs, opts.doc_tokens)
    client = Client(opts.url, opts.api_key)
    missing = [n for n, label in sources if label is not None and n not in client.routable]
    if missing:
        print(f"not loaded on {opts.url}: {', '.join(missing)}", file=sys.stderr)
        return 2
    report = evaluate(client, sources, docs, opts.doc_tokens)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    confusion_png(report, out / "confusion.png")
    print(markdown(report).split("\n| source")[0])
    return 0
