"""The HTTP layer in-process: ``create_app`` + ``install_admin`` over fakes of vLLM's serving objects and a MemoryCatalog over a fake engine.

No vLLM engine starts. Requests go through httpx's ASGI transport into the same
stack uvicorn serves (the lifecycle gate around the app), so routes, refusals,
headers, auth and selection are memserve's own code; only what the serving layer
calls on ``app.state`` (vLLM's OpenAIServingCompletion / Chat / Models, filled by
vLLM's ``init_app_state`` in server/startup.py) and the engine are fakes.

An exception that escapes the app fails the test (the transport re-raises it):
on a real server it is the plain-text 500 that closes the client's connection,
so every refusal here is also shown to be answered in place.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from server.api.admin import install_admin
from server.api.app import create_app
from server.api.lifecycle import Lifecycle, loopback_hosts
from server.serving.catalog import MemoryCatalog
from server.serving.completions import RequestLimits
from server.serving.store import MemoryStore
from tests.fakes import FakeEngine

BASE = "tiny-base"
BASE_PATH = "/models/tiny-base"  # what vLLM reports as the base's root: a server path clients must not see
URL = "http://127.0.0.1:8000"  # the Host a loopback server on port 8000 answers to
ADMIN_TOKEN = "s3cret-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
COMPLETION = {"model": BASE, "prompt": "the gene", "max_tokens": 2}
CHAT = {"model": BASE, "messages": [{"role": "user", "content": "the gene"}], "max_tokens": 2}


@pytest.fixture(scope="session")
def anyio_backend():
    return "asyncio"


async def served_count(http: httpx.AsyncClient, memory: str) -> float:
    """memserve_memory_requests_total for ``memory`` as /metrics shows it."""
    import re

    m = re.search(rf'^memserve_memory_requests_total{{memory="{memory}"}} (\S+)$', (await http.get("/metrics")).text, re.M)
    return float(m.group(1)) if m else 0.0


class FakeServing:
    """vLLM's OpenAIServingCompletion and OpenAIServingChat as CompletionsServing calls them.

    Records every request it is handed and answers with vLLM's response models;
    streamed, it yields vLLM's SSE lines (a usage chunk only when the request asks
    for one, then ``[DONE]``). ``answer``: an ``ErrorResponse`` to return or an
    exception to raise instead. ``hold``: an event the first request to arrive
    waits for before answering (a request still running; later ones answer at once,
    so a test whose refusal fails sees a 200 instead of hanging); ``running`` is set
    once it waits, and ``cancelled`` once it is cancelled (its client went away, its
    memory was unloaded).
    """

    def __init__(self):
        self.requests: list = []
        self.answer = None
        self.hold: asyncio.Event | None = None
        self.running = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def create_completion(self, request, raw_request):
        return await self._serve(request, chat=False)

    async def create_chat_completion(self, request, raw_request):
        return await self._serve(request, chat=True)

    async def _serve(self, request, chat: bool):
        from vllm.entrypoints.serve.engine.protocol import UsageInfo

        self.requests.append(request)
        held = self.hold is not None and not self.running.is_set()
        if held:
            self.running.set()
            if not request.stream:
                await self._wait()
        if isinstance(self.answer, BaseException):
            raise self.answer
        if self.answer is not None:
            return self.answer
        completion_tokens = getattr(request, "max_completion_tokens", None) or request.max_tokens or 1
        usage = UsageInfo(prompt_tokens=3, completion_tokens=completion_tokens, total_tokens=3 + completion_tokens)
        if request.stream:
            return self._stream(request, chat, usage, held)
        if chat:
            from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionResponse, ChatCompletionResponseChoice, ChatMessage

            return ChatCompletionResponse(model=request.model, choices=[ChatCompletionResponseChoice(index=0, message=ChatMessage(role="assistant", content="ok"))], usage=usage)
        from vllm.entrypoints.openai.completion.protocol import CompletionResponse, CompletionResponseChoice

        return CompletionResponse(model=request.model, choices=[CompletionResponseChoice(index=0, text="ok")], usage=usage)

    async def _wait(self):
        try:
            await self.hold.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def _stream(self, request, chat: bool, usage, held: bool):
        choice = {"index": 0, "delta": {"content": "ok"}} if chat else {"index": 0, "text": "ok"}
        yield f"data: {json.dumps({'id': 'x', 'model': request.model, 'choices': [choice]})}\n\n"
        if held:
            await self._wait()
        if request.stream_options and request.stream_options.include_usage:
            yield f"data: {json.dumps({'id': 'x', 'model': request.model, 'choices': [], 'usage': usage.model_dump()})}\n\n"
        yield "data: [DONE]\n\n"


class FakeModels:
    """vLLM's OpenAIServingModels: the base under its served name with its directory as root, and each adapter under its engine key."""

    def __init__(self, loras: dict[str, str]):
        self.lora_requests = loras  # one dict with the engine's, as server/startup.py wires it

    async def show_available_models(self):
        from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelList

        cards = [ModelCard(id=BASE, root=BASE_PATH, max_model_len=512)]
        cards += [ModelCard(id=key, root=path, parent=BASE) for key, path in self.lora_requests.items()]
        return ModelList(data=cards)


class FakeEngineClient:
    """The vLLM engine client as the routes use it: /health asks it."""

    healthy = True

    async def check_health(self):
        if not self.healthy:
            raise RuntimeError("engine core gone")


@dataclass
class Served:
    asgi: object  # the lifecycle gate around the app: what uvicorn serves
    app: object
    catalog: MemoryCatalog
    engine: FakeEngine
    completions: FakeServing
    chat: FakeServing
    health: FakeEngineClient
    lifecycle: Lifecycle

    def client(self, **kw) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.asgi), base_url=URL, **kw)


@pytest.fixture(scope="session")
def tok(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny["tokenizer"])


@pytest.fixture(scope="session")
def base_config(tiny) -> dict:
    return json.loads((tiny["base"] / "config.json").read_text())


@pytest.fixture(scope="session")
def lora_dir(tiny, tmp_path_factory) -> Path:
    from tests.tiny_models import build_lora

    return build_lora(tmp_path_factory.mktemp("app-lora") / "ada", tiny["base"], rank=8)


@pytest.fixture(scope="session")
def cards(tiny, tok, base_config, lora_dir) -> dict:
    """Checked once: decoder memories ``alpha`` (λ 0.5) and ``beta``, lora memory ``ada``."""
    catalog = MemoryCatalog(FakeEngine(), tok, base_config=base_config, max_loras=2, max_lora_rank=16)
    return {"alpha": catalog.validate("alpha", str(tiny["alpha"])), "beta": catalog.validate("beta", str(tiny["beta"])), "ada": catalog.validate("ada", str(lora_dir))}


@pytest.fixture(scope="session")
def memory_root(tiny, tmp_path_factory) -> Path:
    """A --memory-root holding copies of alpha and beta (admin loads name them by path)."""
    root = tmp_path_factory.mktemp("app-memory-root")
    for name in ("alpha", "beta"):
        shutil.copytree(tiny[name], root / name)
    return root


async def build_app(
    tok,
    base_config: dict,
    cards: dict,
    memories=("alpha", "beta"),
    api_key: str | None = None,
    admin_token: str | None = None,
    admin_insecure_local: bool = False,
    limits: RequestLimits = RequestLimits(),
    store: MemoryStore | None = None,
    max_memories: int | None = None,
    max_loras: int = 2,
    allowed_hosts=loopback_hosts("127.0.0.1", 8000),
    shutdown_grace: float = 30.0,
) -> Served:
    """An app as ``memserve serve`` builds it (server/startup.py), the flags as keywords; run it on the loop that will serve it."""
    engine = FakeEngine()
    catalog = MemoryCatalog(engine, tok, max_memories=max_memories, store=store, base_config=base_config, max_loras=max_loras, max_lora_rank=16)
    for name in memories:
        await catalog.load(cards[name])
    health = FakeEngineClient()
    lifecycle = Lifecycle(shutdown_grace, allowed_hosts)
    app = create_app(health, catalog, BASE, lifecycle, api_key=api_key, limits=limits)
    install_admin(app, catalog, BASE, admin_token, admin_insecure_local)
    completions, chat = FakeServing(), FakeServing()
    app.state.openai_serving_completion = completions
    app.state.openai_serving_chat = chat
    app.state.openai_serving_models = FakeModels(engine.loras)
    return Served(lifecycle.middleware(app), app, catalog, engine, completions, chat, health, lifecycle)


@pytest.fixture
def serve(tok, base_config, cards):
    """``await serve(...)``: :func:`build_app` with the session's memories."""

    async def build(**flags) -> Served:
        return await build_app(tok, base_config, cards, **flags)

    return build
