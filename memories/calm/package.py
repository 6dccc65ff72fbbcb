"""Packaging a trained composition as a calm memory (docs/CONTRACT.md, "calm memory artifact").

``OUT/NAME/`` gets ``memory.json`` (kind ``calm``, the composition's shape,
corpus summary, metrics), ``augment/`` (the augmenting model's config,
weights and tokenizer; the base's tokenizer when the augmenting model ships
none, which the input checks proved equivalent) and ``composition.safetensors``.
It is assembled in a temporary sibling, checked with the server's own
``read_calm_card`` / ``check_calm_compatible``, and only then renamed into place:
a refused artifact never appears under its name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from memories.artifact import FORMAT_VERSION, MEMORY_JSON, TOKENIZER_FILES, write_json_atomic
from memories.calm.composition import AUGMENT_DIR, COMPOSITION_FILE, CompositionSpec
from memories.stage import publish_dir

def copy_augment(src: Path, dst: Path, base_tokenizer) -> None:
    """What of an augmenting model's directory a calm memory needs (its memory.json, if any, stays behind)."""
    dst.mkdir(parents=True)
    for f in sorted(Path(src).iterdir()):
        if f.is_file() and (f.suffix == ".safetensors" or f.name in ("config.json", "generation_config.json", "model.safetensors.index.json") or f.name in TOKENIZER_FILES):
            shutil.copy2(f, dst / f.name)
    if not any((dst / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        base_tokenizer.save_pretrained(dst)


def package_calm(final: Path, *, name: str, domain: str, description: str, base: str, augment: str, base_tokenizer, spec: CompositionSpec, composition_file: Path, corpus_summary: dict, metrics: dict, routing=None) -> Path:
    """``routing``: a ``memories.routing.Profile`` written as ``routing.json`` (None: the memory is not routable)."""
    from memories.artifact import tokenizer_sha256
    from memories.calm.artifact import check_calm_compatible, read_calm_card

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    copy_augment(Path(augment), tmp / AUGMENT_DIR, base_tokenizer)
    shutil.copy2(composition_file, tmp / COMPOSITION_FILE)
    card = {
        "format": FORMAT_VERSION,
        "kind": "calm",
        "name": name,
        "domain": domain,
        "base_model": Path(base).name,
        "augment_model": Path(augment).name,
        "description": description,
        "tokenizer_sha256": tokenizer_sha256(base_tokenizer),
        "corpus": corpus_summary,
        "metrics": metrics,
        **spec.card_fields(),
    }
    write_json_atomic(tmp / MEMORY_JSON, card)
    if routing is not None:
        from memories.routing import write_profile

        write_profile(tmp, routing)
    for f in tmp.rglob("*"):  # temp-file writers create 0600 files; a memory is meant to be shared
        f.chmod(0o755 if f.is_dir() else 0o644)
    base_config = json.loads((Path(base) / "config.json").read_text())
    check_calm_compatible(read_calm_card(tmp, name), base_tokenizer, base_config)  # the server's own checks, before publishing
    publish_dir(tmp, final)
    return final
