"""The tree's import rules (README, "Layout"), checked on every module's imports, function-level ones included.

- ``memories/`` is plain torch/transformers code: it imports neither ``server`` nor vLLM.
- In ``server/``, only ``server/engine/`` (the engine client, the one door into vLLM for the API
  process) and ``server/worker/`` (code that runs inside vLLM's processes) import vLLM.
- The API process never imports ``server/worker/``: the two sides share only ``server/engine/keys.py``.
- Layers call downwards only: ``server/api`` → ``server/serving`` → ``server/engine``; neither
  ``serving/`` nor ``engine/`` imports ``api/``, and ``engine/`` does not import ``serving/``.
- Nothing but ``bench/`` and ``tests/`` imports ``bench``.
- No module imports another package's private (``_``-prefixed) name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("server", "memories", "bench")


def modules() -> list[Path]:
    return sorted(p for pkg in (*PACKAGES, "tests") for p in (ROOT / pkg).rglob("*.py"))


def imports(source: str) -> list[tuple[str, list[str]]]:
    """(module, names imported from it) for every import statement in the source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def top(module: str) -> str:
    return module.split(".")[0]


def package_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).parent.parts)


def module_package(module: str) -> str:
    """The package a dotted module lives in (a package's own ``__init__`` counts as inside it)."""
    return module if (ROOT / module.replace(".", "/")).is_dir() else module.rpartition(".")[0]


def violations(path: Path, source: str | None = None) -> list[str]:
    rel = path.relative_to(ROOT).as_posix()
    side = rel.split("/")[1] if rel.startswith("server/") and rel.count("/") > 1 else None
    out = []
    for module, names in imports(path.read_text() if source is None else source):
        if rel.startswith("memories/") and top(module) in ("server", "vllm"):
            out.append(f"{rel} imports {module}: memories/ imports neither server nor vLLM")
        if rel.startswith("server/") and side not in ("engine", "worker") and top(module) == "vllm":
            out.append(f"{rel} imports {module}: the API process reaches vLLM through server/engine/")
        if rel.startswith("server/") and side != "worker" and module.startswith("server.worker"):
            out.append(f"{rel} imports {module}: the API process never imports worker code")
        if side in ("serving", "engine") and module.startswith("server.api") or side == "engine" and module.startswith("server.serving"):
            out.append(f"{rel} imports {module}: a layer never imports the one above it (api → serving → engine)")
        if top(module) == "bench" and not rel.startswith(("bench/", "tests/")):
            out.append(f"{rel} imports {module}: only bench/ and tests/ import bench")
        if top(module) in PACKAGES and module_package(module) != package_of(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                out.append(f"{rel} imports {module}.{', '.join(private)}: another package's private name")
    return out


def test_every_module_keeps_the_import_rules():
    found = [v for path in modules() for v in violations(path)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "rel, source, rule",
    [
        ("memories/knn.py", "from server.engine import keys", "imports neither server"),
        ("memories/knn.py", "def f():\n    import vllm", "imports neither server"),
        ("server/serving/catalog.py", "from vllm import SamplingParams", "through server/engine/"),
        ("server/api/app.py", "from server.worker.extension import REGISTRY", "never imports worker code"),
        ("server/cli.py", "from bench.run import main", "only bench/ and tests/"),
        ("server/serving/catalog.py", "from server.api.app import create_app", "never imports the one above"),
        ("server/engine/client.py", "from server.serving.catalog import MemoryCatalog", "never imports the one above"),
        ("memories/calm/augment.py", "from memories.decoder.pipeline import _tokenize", "private name"),
    ],
)
def test_each_rule_catches_its_breach(rel, source, rule):
    """A check that cannot fail checks nothing: each rule, fed a breach, names it."""
    assert any(rule in v for v in violations(ROOT / rel, source))
