"""The persistent memory store: a folder of artifacts plus the desired loaded set.

``<memory-root>/memserve-state.json`` is the *desired* set (name, path
relative to the root, λ, content hash, and the routing profile an admin load
made from ``routing_prompts``, kept in ``<memory-root>/routing/``). Every admin change on any replica
edits it under an exclusive file lock (read, modify one entry, write
atomically), and every replica reconciles its loaded set against it: at
start, after its own admin calls, and on a timer. Replicas sharing the root
therefore converge on the same set without talking to each other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from memories.artifact import ArtifactError, write_json_atomic
from server.errors import BadRequest

log = logging.getLogger("memserve.store")

STATE_FILE = "memserve-state.json"
GENERATED = "generated"  # <memory-root>/generated/<name>-<16 hex>: lora memories memserve generated (server/serving/generation.py)
_GENERATED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*-[0-9a-f]{16}")
ROUTING = "routing"  # <memory-root>/routing/<name>-<16 hex>.json: routing profiles made from an admin load's routing_prompts
_ROUTING_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*-[0-9a-f]{16}\.json")


@dataclass(frozen=True)
class DesiredMemory:
    name: str
    path: str  # relative to the memory root
    memory_weight: float | None
    content_sha256: str
    routing: str | None = None  # relative to the root: the profile made from the admin load's routing_prompts (instead of the artifact's routing.json)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        if out["routing"] is None:  # written only when set, so that a state without it stays readable by older servers
            del out["routing"]
        return out


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
        known = {f.name for f in dataclasses.fields(DesiredMemory)}
        return {m["name"]: DesiredMemory(**{k: v for k, v in m.items() if k in known}) for m in data.get("memories", [])}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def put(self, entry: DesiredMemory, routing: dict | None = None) -> DesiredMemory:
        """Add or replace ``entry``; ``routing``: a routing profile (``routing.json``'s form) to keep with it.

        The profile is written under the lock, so no other replica's write prunes it before its entry lands.
        Returns the entry as stored (``routing`` set to the profile's file, or None).
        """
        with self._locked():
            entry = dataclasses.replace(entry, routing=self._write_routing(entry.name, routing) if routing is not None else None)
            state = self.desired()
            state[entry.name] = entry
            self._write(state)
        return entry

    def remove(self, name: str) -> None:
        with self._locked():
            state = self.desired()
            if state.pop(name, None) is not None:
                self._write(state)

    def _write(self, state: dict[str, DesiredMemory]) -> None:
        write_json_atomic(self.state_path, {"format": 1, "memories": [state[n].to_json() for n in sorted(state)]})
        self._prune_routing(state)

    def _write_routing(self, name: str, profile: dict) -> str:
        """Write a routing profile as ``routing/<name>-<16 hex of its content>.json``; its path relative to the root."""
        text = json.dumps(profile, sort_keys=True)
        relative = f"{ROUTING}/{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
        path = self.root / relative
        path.parent.mkdir(exist_ok=True)
        if not path.exists():
            write_json_atomic(path, profile)
        return relative

    def _prune_routing(self, state: dict[str, DesiredMemory]) -> None:
        """Delete the profiles memserve wrote that no entry refers to any more (only files named as it names them)."""
        folder = self.root / ROUTING
        if not folder.is_dir():
            return
        keep = {e.routing for e in state.values() if e.routing}
        for path in folder.iterdir():
            if _ROUTING_FILE.fullmatch(path.name) and f"{ROUTING}/{path.name}" not in keep:
                path.unlink(missing_ok=True)
