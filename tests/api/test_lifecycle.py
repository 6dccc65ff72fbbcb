"""The server process around its requests: SIGTERM drains, a dead engine makes it exit non-zero."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from pathlib import Path

import httpx

from server.launcher import ServerProcess
from tests.conftest import FP32


def start(tiny, workdir: Path, *extra: str) -> ServerProcess:
    args = ["--model", str(tiny["base"]), "--served-model-name", "tiny-base", "--max-model-len", "1024", "--memory", f"alpha={tiny['alpha']}", *extra, *FP32]
    proc = ServerProcess(args, workdir)
    proc.wait_ready()
    return proc


class LongStream(threading.Thread):
    """A streamed memory request of 8 choices × 500 tokens."""

    def __init__(self, server: ServerProcess):
        super().__init__(daemon=True)
        self.server = server
        self.started = threading.Event()
        self.tokens = 0
        self.done = False
        self.error: str | None = None

    def run(self):
        body = {"model": "alpha", "prompt": "the cell", "max_tokens": 500, "n": 8, "ignore_eos": True, "stream": True, "temperature": 1.0, "seed": 0}
        body["stream_options"] = {"include_usage": True}
        try:
            with httpx.stream("POST", self.server.url + "/v1/completions", json=body, timeout=600) as r:
                if r.status_code != 200:
                    self.error = f"{r.status_code}: {r.read()!r}"
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: {"):
                        data = json.loads(line[6:])
                        if "error" in data:
                            self.error = data["error"]["message"]
                        if data.get("usage"):
                            self.tokens = data["usage"]["completion_tokens"]
                        self.started.set()
        except httpx.HTTPError as e:
            self.error = repr(e)
        finally:
            self.started.set()


def test_sigterm_finishes_running_requests_and_refuses_new_ones(tiny, tmp_path):
    server = start(tiny, tmp_path, "--shutdown-grace", "300")
    engine = None
    try:
        stream = LongStream(server)
        stream.start()
        assert stream.started.wait(300) and stream.error is None
        # the engine is held still while the test acts, so the running request cannot finish first, however fast it decodes
        engine = next(pid for pid in _children(server.proc.pid) if b"EngineCore" in Path(f"/proc/{pid}/cmdline").read_bytes())
        os.kill(engine, signal.SIGSTOP)
        os.kill(server.proc.pid, signal.SIGTERM)
        refused = httpx.post(server.url + "/v1/completions", json={"model": "tiny-base", "prompt": "x", "max_tokens": 2}, timeout=60)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == 503
        assert httpx.get(server.url + "/health", timeout=60).status_code == 503
        assert not stream.done
        os.kill(engine, signal.SIGCONT)
        stream.join(600)
        assert stream.error is None and stream.done and stream.tokens == 8 * 500
        assert server.proc.wait(120) == 0
        assert "drained; stopping" in server.log_path.read_text()
    finally:
        if engine is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(engine, signal.SIGCONT)
        server.stop()


def test_dead_engine_makes_the_server_exit_non_zero(tiny, tmp_path):
    server = start(tiny, tmp_path)
    try:
        engines = [pid for pid in _children(server.proc.pid) if b"EngineCore" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert engines, "no engine core process found"
        os.kill(engines[0], signal.SIGKILL)
        assert server.proc.wait(120) == 3
        assert "the inference engine has died" in server.log_path.read_text()
    finally:
        server.stop()


def _children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children

