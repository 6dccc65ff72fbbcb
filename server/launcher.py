"""``memserve serve`` in a child process: shared by the benchmark and the tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(workdir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("MEMSERVE_CACHE", str(workdir / "cache"))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    return env


class ServerProcess:
    """Start, wait for ``/health``, stop; the log is kept to explain failures."""

    def __init__(self, args: list[str], workdir: Path, env: dict[str, str] | None = None):
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"server-{self.port}.log"
        self._log = open(self.log_path, "w")
        self.started = time.perf_counter()
        cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(self.port), "--workdir", str(workdir / "run"), *args]
        # its own process group, so that a forced stop also reaches vLLM's engine processes
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env or server_env(workdir), stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> float:
        """Block until healthy; return the start-up time in seconds."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    @contextlib.contextmanager
    def running(self):
        """Ready on entry, stopped on exit however the block ends: the tests' server fixtures."""
        try:
            self.wait_ready()
            yield self
        finally:
            self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
