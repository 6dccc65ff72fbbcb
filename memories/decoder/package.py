"""Packaging: the trained memory as a servable artifact (docs/CONTRACT.md, "Memory artifact").

The directory gets the HF weights and config from the train stage, the base's
tokenizer (so the server can prove the ids mean the same tokens), and
``memory.json`` with the λ chosen on validation and the evaluation numbers,
and ``routing.json``, the routing profile of the train split (``memories.routing``).
A thin memory (``embeddings="base"``) leaves the token embedding and head out
of its weights: the server uses the base's own.
It is assembled in a temporary sibling, checked with the same
``read_card`` / ``check_compatible`` the server runs, then renamed into place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from memories.artifact import BASE_TENSORS, FORMAT_VERSION, MEMORY_JSON, check_compatible, read_card, tokenizer_sha256, write_json_atomic
from memories.routing import profile_from_corpus_stage, write_profile
from memories.stage import publish_dir


def package_memory(cfg, corpus_summary: dict, evaluation: dict, index: dict, timings: dict) -> Path:
    from transformers import AutoTokenizer

    final = cfg.artifact
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    train_dir = cfg.work / "train"
    for f in sorted(train_dir.iterdir()):
        if f.suffix == ".safetensors" and cfg.embeddings == "base":
            without_base_tensors(f, tmp / f.name)
        elif f.name == "config.json" or f.name == "generation_config.json" or f.suffix == ".safetensors":
            shutil.copy2(f, tmp / f.name)
    tok = AutoTokenizer.from_pretrained(cfg.base)
    tok.save_pretrained(tmp)
    test, val = evaluation["test"], evaluation["validation"]
    card = {
        "format": FORMAT_VERSION,
        "name": cfg.name,
        "domain": cfg.domain or cfg.name,
        "lambda": evaluation["memory_lambda"],
        "temperature": evaluation["memory_temperature"],
        "tokenizer_sha256": tokenizer_sha256(tok),
        "base_model": Path(cfg.base).name,
        **({"embeddings": "base"} if cfg.embeddings == "base" else {}),
        "description": cfg.description or f"memory for {Path(cfg.base).name} trained on {cfg.corpus}",
        "corpus": {
            "spec": corpus_summary["spec"],
            "description": corpus_summary["description"],
            "documents": corpus_summary["documents"],
            "splits": corpus_summary["splits"],
            "datastore_tokens": index["rows"],
        },
        "metrics": {
            "test_ppl_base": test["base"],
            "test_ppl_knnlm": test["knnlm"],
            "test_ppl_memory": test["memory"],
            "test_ppl_memory_alone": test["memory_alone"],
            "validation_ppl_base": val["base"],
            "validation_ppl_knnlm": val["knnlm"],
            "validation_ppl_memory": val["memory"],
            "knnlm_lambda": evaluation["knnlm_lambda"],
            "knnlm_temperature": evaluation["knnlm_temperature"],
            "memory_layers": cfg.layers,
            "epochs": cfg.epochs,
            "build_seconds": timings.get("total_before_package"),
        },
    }
    write_json_atomic(tmp / MEMORY_JSON, card)
    write_profile(tmp, profile_from_corpus_stage(cfg.work / "corpus", tok))  # routing.json: what domain "auto" reads
    for f in tmp.iterdir():  # temp-file writers create 0600 files; a memory is meant to be shared
        f.chmod(0o644)
    base_config = json.loads((Path(cfg.base) / "config.json").read_text())
    check_compatible(read_card(tmp, cfg.name), tok, base_config)  # the server's own checks, before publishing
    publish_dir(tmp, final)
    return final


def without_base_tensors(src: Path, dst: Path) -> None:
    """Copy a safetensors file less the embedding and head a thin memory takes from the base."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    save_file({k: v for k, v in tensors.items() if k.removeprefix("model.") not in BASE_TENSORS}, str(dst), metadata={"format": "pt"})
