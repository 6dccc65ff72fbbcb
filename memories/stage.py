"""Resumable stages: a completed output carries the fingerprint of what made it.

Every pipeline stage writes into a hidden temporary sibling directory and, only
once everything (including ``stage.json`` with the fingerprint) is on disk,
renames it into place. A directory with a matching fingerprint is therefore
always complete, and a killed run simply leaves a temporary directory that
the next run throws away. The fingerprint hashes the stage's options and the
fingerprints of the stages it reads, so changing anything upstream redoes
exactly the stages downstream of the change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from memories.artifact import write_json_atomic

log = logging.getLogger("memserve.memory")
STAGE_FILE = "stage.json"


class StageError(RuntimeError):
    """A stage cannot run: typically an upstream stage has not been run yet."""


def fingerprint(**parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def stage_info(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(path) / STAGE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_complete(path: Path, fp: str) -> bool:
    info = stage_info(path)
    return info is not None and info.get("fingerprint") == fp


def require(path: Path, what: str, hint: str) -> dict[str, Any]:
    """Read a finished upstream stage's record, or say which command makes it."""
    info = stage_info(path)
    if info is None:
        raise StageError(f"{what} not found at {path}: run {hint} first")
    return info


def run_stage(name: str, path: Path, fp: str, produce: Callable[[Path], dict[str, Any] | None]) -> dict[str, Any]:
    """Run ``produce(tmp_dir)`` unless ``path`` already holds this fingerprint's output.

    ``produce`` returns extra fields for stage.json (sizes, timings). Returns
    the stage record; ``record["skipped"]`` says whether work was done.
    """
    path = Path(path)
    if is_complete(path, fp):
        log.info("%s: up to date (fingerprint %s), skipped", name, fp[:12])
        info = stage_info(path) or {}
        return {**info, "skipped": True}
    tmp = path.parent / f".{path.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started, cpu = time.time(), time.process_time()
    extra = produce(tmp) or {}
    # CPU seconds of this process: on a shared machine, the wall time an idle one would take at --threads 1.
    record = {"stage": name, "fingerprint": fp, "seconds": round(time.time() - started, 2), "cpu_seconds": round(time.process_time() - cpu, 2), **extra}
    write_json_atomic(tmp / STAGE_FILE, record)
    publish_dir(tmp, path)
    return {**record, "skipped": False}


class StopAfter(Exception):
    """Raised by :class:`Stages` once the stage a build was asked to stop after has run."""


class Stages:
    """A build's stages run in order: each timed, logged, and the build stopped after ``stop_after``.

    ``describe(name, record, seconds)`` may replace the log line's tail (the decoder build adds
    tokens/s); returning None keeps the stage silent (another rank logs it).
    """

    def __init__(self, stop_after: str | None, describe: Callable[[str, Any, float], str | None] | None = None):
        self.stop_after = stop_after
        self.describe = describe
        self.timings: dict[str, float] = {}
        self.started = time.time()

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        t = time.time()
        record = fn()
        self.timings[name] = round(time.time() - t, 1)
        line = self.describe(name, record, self.timings[name]) if self.describe else f"{'reused' if skipped(record) else 'done'} in {self.timings[name]:.1f}s"
        if line is not None:
            log.info("%s: %s", name, line)
        if self.stop_after == name:
            if line is not None:
                log.info("stopped after %s as asked", name)
            raise StopAfter
        return record

    def total(self) -> float:
        return round(time.time() - self.started, 1)


def skipped(record: Any) -> bool:
    """Whether a stage's record (or every record of a sharded stage) says it reused earlier work."""
    records = record if isinstance(record, list) else [record]
    return bool(records) and all(isinstance(r, dict) and r.get("skipped") for r in records)


def publish_dir(tmp: Path, final: Path) -> None:
    """Move a finished directory into place; an existing one is swapped out, never half-overwritten."""
    if final.exists():
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def set_threads(n: int) -> int:
    """Torch and faiss thread counts; 0 = all cores (this machine class has 2)."""
    import torch

    n = n or max(1, os.cpu_count() or 1)
    torch.set_num_threads(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:
        pass
    return n


def base_identity(base: str) -> dict:
    """Cheap identity of a base checkpoint: config content + weight file sizes and times."""
    root = Path(base)
    if not (root / "config.json").exists():
        raise StageError(f"base {base!r} is not a Hugging Face model directory (no config.json)")
    files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(root.glob("*.safetensors"))}
    return {"path": str(root.resolve()), "config": hashlib.sha256((root / "config.json").read_bytes()).hexdigest(), "weights": files}
