"""The persistent memory store: a folder of artifacts plus the desired loaded set.

``<memory-root>/memserve-state.json`` is the *desired* set (name, path
relative to the root, λ, content hash). Every admin change on any replica
edits it under an exclusive file lock (read, modify one entry, write
atomically), and every replica reconciles its loaded set against it: at
start, after its own admin calls, and on a timer. Replicas sharing the root
therefore converge on the same set without talking to each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from memories.artifact import ArtifactError, write_json_atomic
from server.errors import BadRequest

log = logging.getLogger("memserve.store")

STATE_FILE = "memserve-state.json"
GENERATED = "generated"  # <memory-root>/generated/<name>-<16 hex>: lora memories memserve generated (server/serving/generation.py)
_GENERATED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*-[0-9a-f]{16}")


@dataclass(frozen=True)
class DesiredMemory:
    name: str
    path: str  # relative to the memory root
    memory_weight: float | None
    content_sha256: str


class MemoryStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.state_path = self.root / STATE_FILE
        self._lock_path = self.root / f".{STATE_FILE}.lock"

    def resolve(self, path: str) -> Path:
        """An artifact path inside the root; ``..`` and symlinks that leave it are refused."""
        if "\x00" in path:
            raise BadRequest("path must not contain NUL characters", "path")
        candidate = Path(path)
        if not candidate.is_absolute():
            candidate = self.root / candidate
        real = Path(os.path.realpath(candidate))
        if not self.contains(real):
            raise BadRequest(f"path {path!r} resolves to {real}, outside the memory root {self.root}", "path")
        return real

    def contains(self, real: Path) -> bool:
        return real == self.root or self.root in real.parents

    def check_links(self, name: str, artifact: Path) -> None:
        """Refuse an artifact holding any symlink (file or folder, at any depth) that resolves outside the root.

        Called before any of its files is read: resolving the artifact's own path is
        not enough, since ``adapter_model.safetensors`` or ``augment/`` inside it could
        still lead to any file the server can read. Links inside the root are followed
        (each real folder once) so that what they lead to is checked too.
        """
        seen: set[str] = set()
        for folder, dirs, files in os.walk(artifact, followlinks=True):
            real = os.path.realpath(folder)
            if real in seen:  # a link loop, or two links to one folder
                dirs[:] = []
                continue
            seen.add(real)
            for entry in (Path(folder) / e for e in dirs + files):
                if not entry.is_symlink():
                    continue
                target = Path(os.path.realpath(entry))
                if not self.contains(target):
                    raise ArtifactError(name, "symlink leads outside the memory root", f"{entry.relative_to(artifact)} → {target}, memory root {self.root}")

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def generated(self, path: str | Path) -> Path | None:
        """``path`` as a folder memserve generated (directly under ``generated/``, named ``<name>-<16 hex>``), else None.

        Only such folders are ever deleted by memserve; anything else under the root is the operator's.
        """
        real = Path(os.path.realpath(path))
        if real.parent != self.root / GENERATED or not _GENERATED_NAME.fullmatch(real.name):
            return None
        return real

    def referenced(self) -> set[Path]:
        """Folders the persisted desired set points at (every replica's view); raises if the state cannot be read."""
        out = set()
        for entry in self.desired().values():
            try:
                out.add(self.resolve(entry.path))
            except BadRequest:  # an entry pointing outside the root references nothing in it
                continue
        return out

    def desired(self) -> dict[str, DesiredMemory]:
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, json.JSONDecodeError) as e:
            log.error("cannot read %s (%s); keeping the loaded set as it is", self.state_path, e)
            raise
        return {m["name"]: DesiredMemory(**m) for m in data.get("memories", [])}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def put(self, entry: DesiredMemory) -> None:
        with self._locked():
            state = self.desired()
            state[entry.name] = entry
            self._write(state)

    def remove(self, name: str) -> None:
        with self._locked():
            state = self.desired()
            if state.pop(name, None) is not None:
                self._write(state)

    def _write(self, state: dict[str, DesiredMemory]) -> None:
        write_json_atomic(self.state_path, {"format": 1, "memories": [asdict(state[n]) for n in sorted(state)]})
