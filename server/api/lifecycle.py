"""The server's life around its requests: drain on SIGTERM, exit when the engine dies.

A supervisor (systemd, Kubernetes) restarts a process, not a half-dead one:
if vLLM's engine core dies, the API process exits non-zero within seconds
instead of answering errors forever. On SIGTERM, requests already running
finish (up to the grace period) while new ones get 503, so a rolling update
loses no work; a second SIGTERM or SIGINT stops at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal

import uvicorn

from server.errors import error_body

log = logging.getLogger("memserve")

ENGINE_DEAD_EXIT = 3
GUARDED_PREFIXES = ("/v1/", "/admin/")  # requests that count as work in flight


class Lifecycle:
    def __init__(self, grace_seconds: float, allowed_hosts: frozenset[str] | None = None):
        self.grace_seconds = grace_seconds
        self.allowed_hosts = allowed_hosts  # None: any Host header
        self.draining = False
        self.exit_code = 0
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.server: uvicorn.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    # ---- the ASGI gate every request passes ----------------------------

    def middleware(self, app):
        async def gate(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            if self.allowed_hosts is not None and _host(scope) not in self.allowed_hosts:
                # a page on another site resolving its own name to 127.0.0.1 (DNS rebinding)
                return await _refuse(send, 400, f"Host {_host(scope)!r} is not served here; a loopback server answers only to loopback names")
            if not scope["path"].startswith(GUARDED_PREFIXES):
                return await app(scope, receive, send)
            if self.draining:
                return await _refuse(send, 503, "the server is shutting down; retry on another replica", {"Retry-After": "1"})
            self.in_flight += 1
            self._idle.clear()
            try:
                await app(scope, receive, send)
            finally:
                self.in_flight -= 1
                if self.in_flight == 0:
                    self._idle.set()

        return gate

    # ---- uvicorn, signals and the engine watchdog ----------------------

    def make_server(self, config: uvicorn.Config) -> uvicorn.Server:
        lifecycle = self

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if sig == signal.SIGTERM and not lifecycle.draining and lifecycle.grace_seconds > 0:
                    lifecycle._spawn(lifecycle.drain())
                else:
                    super().handle_exit(sig, frame)

        self.server = Server(config)
        return self.server

    async def drain(self) -> None:
        self.draining = True
        log.info("SIGTERM: refusing new requests, waiting up to %.0fs for %d running", self.grace_seconds, self.in_flight)
        try:
            await asyncio.wait_for(self._idle.wait(), self.grace_seconds)
            log.info("drained; stopping")
        except asyncio.TimeoutError:
            log.warning("grace period over with %d requests still running; stopping", self.in_flight)
        self.server.should_exit = True

    def engine_dead(self) -> None:
        if self.exit_code == 0:
            log.error("the inference engine has died; exiting with status %d so that a supervisor restarts the server", ENGINE_DEAD_EXIT)
        self.exit_code = ENGINE_DEAD_EXIT
        self.draining = True
        if self.server is not None:
            self.server.should_exit = True

    def watch_engine(self, engine, interval: float = 1.0) -> None:
        async def watch():
            while not engine.errored:
                await asyncio.sleep(interval)
            self.engine_dead()

        self._spawn(watch())

    def _spawn(self, coro) -> None:
        task = asyncio.get_event_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def loopback_hosts(host: str, port: int) -> frozenset[str]:
    names = {"localhost", "127.0.0.1", "[::1]", host}
    return frozenset(names | {f"{n}:{port}" for n in names})


def _host(scope) -> str:
    for key, value in scope.get("headers", ()):
        if key == b"host":
            return value.decode("latin-1").lower()
    return ""


async def _refuse(send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(status, message)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
