"""The repository stands on its own: every document it points readers to is in it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = "docs/CONTRACT.md"


def _tracked() -> dict[str, str]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    texts = {}
    for name in names:
        try:
            texts[name] = (ROOT / name).read_text()
        except (UnicodeDecodeError, FileNotFoundError):
            continue
    return texts


def test_no_file_points_outside_the_repository_for_its_contract():
    texts = _tracked()
    outside = re.compile(r"\.\./shared|/work/shared|\bDESIGN\b")
    this = str(Path(__file__).resolve().relative_to(ROOT))
    hits = [
        f"{name}:{n}: {line.strip()}"
        for name, text in texts.items()
        if name != this
        for n, line in enumerate(text.splitlines(), 1)
        if outside.search(line)
    ]
    assert not hits, "references to a design document that is not in the repository:\n" + "\n".join(hits)


def test_every_document_reference_resolves():
    texts = _tracked()
    assert CONTRACT in texts
    missing = []
    for name, text in texts.items():
        links = re.findall(r"\]\(([^)#\s]+)", text) if name.endswith(".md") else []
        for target in links:
            if "://" not in target and not (ROOT / name).parent.joinpath(target).resolve().is_relative_to(ROOT):
                missing.append(f"{name}: {target} (outside the repository)")
            elif "://" not in target and not (ROOT / name).parent.joinpath(target).exists():
                missing.append(f"{name}: {target}")
        for target in re.findall(r"\bdocs/[\w.-]+\.md\b", text):  # docstrings and prose name docs/ from the root
            if target not in texts:
                missing.append(f"{name}: {target}")
    assert not missing, "\n".join(missing)


def test_contract_covers_what_the_code_relies_on():
    text = (ROOT / CONTRACT).read_text()
    for section in ("## Fusion", "## Request contract", "## Memory artifact", "## vLLM-CPU facts"):
        assert section in text
    for term in ("domain", "X-Domain", "memory_weight", "tokenizer_sha256", "memory.json", "decoder", "lora", "calm", "planned"):
        assert term in text
