"""Prompt/completion corpora: a JSONL file whose records have ``prompt`` and ``completion``.

For tasks where only the answer matters (a key → value lookup), a record is
tokenized as prompt ids + completion ids + EOS, each part on its own (as at
generation time, where the prompt is tokenized and the answer generated), and
only the completion's tokens are targets: training's loss and every reported
perplexity count those positions alone. The token-level mask (``SPLIT.mask.npy``,
1 = target) travels beside the stream.

Records are split into train / validation / test by the same text hash as
``memories.corpus`` (over prompt and completion together), with the same
fractions and token caps as plain corpora. Any other corpus spec goes through
``memories.corpus`` unchanged, so its streams equal a decoder build's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from memories.corpus import SPLITS, Corpus, CorpusError, Document, read_jsonl, split_documents

PROMPT_FIELD, COMPLETION_FIELD = "prompt", "completion"
_SEPARATOR = "\x1e"  # joins prompt and completion in a Document's text (for the split hash only)


def is_prompt_completion(spec: str) -> bool:
    """A .jsonl file whose first record has both ``prompt`` and ``completion`` strings."""
    path = Path(spec).expanduser()
    if spec.startswith("demo:") or not path.is_file() or path.suffix.lower() not in (".jsonl", ".ndjson"):
        return False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(first, dict) and isinstance(first.get(PROMPT_FIELD), str) and isinstance(first.get(COMPLETION_FIELD), str)
    return False


def load_prompt_completion(spec: str) -> Corpus:
    """Every record as a Document ``prompt \\x1e completion``; CorpusError names the bad line."""
    path = Path(spec).expanduser()
    docs = []
    for n, r in read_jsonl(spec, path):
        if not (isinstance(r, dict) and isinstance(r.get(PROMPT_FIELD), str) and isinstance(r.get(COMPLETION_FIELD), str)):
            raise CorpusError(f"corpus {spec!r} line {n}: every record needs string fields {PROMPT_FIELD!r} and {COMPLETION_FIELD!r}")
        if not r[COMPLETION_FIELD]:
            raise CorpusError(f"corpus {spec!r} line {n}: empty completion (nothing to score)")
        if _SEPARATOR in r[PROMPT_FIELD]:
            raise CorpusError(f"corpus {spec!r} line {n}: the prompt contains U+001E")
        docs.append(Document(f"{path.name}:{n}", r[PROMPT_FIELD] + _SEPARATOR + r[COMPLETION_FIELD]))
    if not docs:
        raise CorpusError(f"corpus {spec!r} is empty")
    st = path.stat()
    identity = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|prompt-completion"
    return Corpus(spec, f"prompt/completion records from {path} (only completion tokens scored)", identity, tuple(docs))


def tokenize_records(tok, docs: list[Document], cap: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(stream, token mask, records used): prompt + completion + EOS per record until ``cap`` tokens."""
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    ids, mask, used = [], [], 0
    for d in docs:
        prompt, completion = d.text.split(_SEPARATOR, 1)
        p = tok(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        c = tok(completion, add_special_tokens=False)["input_ids"]
        ids += p + c + eos
        mask += [0] * len(p) + [1] * len(c) + [0] * len(eos)
        used += 1
        if len(ids) >= cap:
            break
    return np.asarray(ids[:cap], np.int32), np.asarray(mask[:cap], np.int8), used


def write_prompt_completion_splits(corpus: Corpus, tok, out: Path, max_tokens: int, eval_tokens: int, validation: float, test: float) -> dict:
    """``SPLIT.npy`` + ``SPLIT.mask.npy`` per split and the summary (as ``memories.corpus.stage_corpus`` writes it)."""
    splits = split_documents(corpus, validation, test)
    summary = {"spec": corpus.spec, "description": corpus.description, "documents": len(corpus.documents), "splits": {}, "scored": "completion"}
    for s in SPLITS:
        if not splits[s]:
            raise CorpusError(
                f"corpus {corpus.spec!r} has {len(corpus.documents)} records and none fell into the {s} split; "
                "add records or raise --validation-fraction / --test-fraction"
            )
        stream, mask, used = tokenize_records(tok, splits[s], (max_tokens if s == "train" else eval_tokens) + 1)
        if mask[1:].sum() == 0:
            raise CorpusError(f"corpus {corpus.spec!r}: the {s} split has no completion token to score")
        np.save(out / f"{s}.npy", stream)
        np.save(out / f"{s}.mask.npy", mask)
        summary["splits"][s] = {"documents": len(splits[s]), "documents_used": used, "tokens": int(len(stream)), "scored_tokens": int(mask[1:].sum())}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
