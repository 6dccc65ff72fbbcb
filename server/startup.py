"""Start-up order: check every memory, start the engine, load memories into it, then listen.

Memories are checked before the engine starts (seconds, not a minute, to learn
that a path is wrong), and the server listens only once all of them are
loaded, so it never serves half-configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import signal
import time
from pathlib import Path

from memories.artifact import ArtifactError
from server.config import ServeOptions
from server.errors import MemserveError

log = logging.getLogger("memserve")

AUTO_MAX_LORAS = 4  # --max-loras when not given and a start-up memory is a lora memory


def _defaults(opts: ServeOptions) -> tuple[str, list[tuple[str, str]]]:
    """The embedded base, and with it every demo memory found in the cache."""
    if opts.model:
        return opts.model, opts.memories
    from memories.base_model import cache_dir, default_base

    model = str(default_base())
    memories = opts.memories
    if not memories:
        demo_root = cache_dir() / "memories"
        found = sorted(p for p in demo_root.glob("*") if (p / "config.json").exists() or (p / "memory.json").exists()) if demo_root.is_dir() else []
        memories = [(p.name, str(p)) for p in found]
        if memories:
            log.info("loading the demo memories found in %s: %s", demo_root, ", ".join(n for n, _ in memories))
        else:
            log.info("no demo memories in %s (build them with `memserve memory demo`)", demo_root)
    return model, memories


async def run(opts: ServeOptions) -> int:
    from transformers import AutoTokenizer

    from server.serving.store import MemoryStore
    from server.serving.catalog import MemoryCatalog
    from server.engine.client import engine_args, lora_limits, unsupported

    t0 = time.perf_counter()
    # SIGTERM during start-up cancels it, so the engine's context manager shuts
    # vLLM's processes down (the default action would orphan them). While
    # serving, the lifecycle's uvicorn server drains on SIGTERM instead.
    # (The handler stays installed, a no-op, so that uvicorn re-raising SIGTERM
    # after its stop does not kill the process before vLLM is shut down.)
    main, serving = asyncio.current_task(), False
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: serving or main.cancel())
    model, memory_specs = _defaults(opts)
    if not (Path(model) / "config.json").is_file():
        log.error("--model %s is not a Hugging Face model directory (no config.json)", model)
        return 2
    base_name = opts.served_model_name or Path(model).name
    if opts.admin_insecure_local and opts.admin_token is None and not _is_loopback(opts.host):
        log.error("--admin-insecure-local needs a loopback --host (got %s); set --admin-token instead", opts.host)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(model)
    store = MemoryStore(opts.memory_root) if opts.memory_root else None
    base_config = json.loads((Path(model) / "config.json").read_text())
    generator_dir = _generator_dir(opts, store)
    if generator_dir is False:
        return 2
    try:
        calm = serves_calm(opts.calm, base_config, memory_specs, store)
    except ValueError as e:
        log.error("refusing to start: %s", e)
        return 2
    args = engine_args(
        model, base_name, opts.max_model_len, opts.engine_args, opts.tensor_parallel_size, opts.pipeline_parallel_size,
        opts.memory_budget_bytes, choose_max_loras(opts.max_loras, memory_specs, store, generator_dir), opts.max_lora_rank,
        (base_config.get("architectures") or [None])[0], opts.decoder_slots, opts.decoder_layers, opts.mixture_size, calm,
    )  # fmt: skip
    refused = unsupported(args, calm)
    if refused:
        for reason in refused:
            log.error("refusing to start: %s", reason)
        return 2
    max_loras, max_lora_rank = lora_limits(args)
    generator = None
    if generator_dir:
        try:
            generator = _load_generator(generator_dir, model, max_loras, max_lora_rank, base_config)
        except ValueError as e:
            log.error("refusing to start: %s", e)
            return 2
    catalog = MemoryCatalog(None, tokenizer, opts.default_memory_weight, opts.max_memories, opts.memory_budget_bytes, store, base_config, max_loras, max_lora_rank, calm)
    catalog.unload_timeout = opts.unload_timeout
    catalog.mixture_size = opts.mixture_size
    catalog.decoder_slots = opts.decoder_slots
    catalog.default_domain = opts.default_domain
    names = [name for name, _ in memory_specs]
    duplicates = {n for n in names if names.count(n) > 1} | ({base_name} & set(names))
    if duplicates:
        log.error("memory names must be unique and differ from the base's id %r: %s", base_name, ", ".join(sorted(duplicates)))
        return 2
    try:
        cards = [catalog.validate(name, path) for name, path in memory_specs]
    except (ArtifactError, MemserveError) as e:
        log.error("refusing to start: %s", e)
        return 2
    loras = [card.name for card in cards if card.kind == "lora"]
    if len(loras) > max_loras:
        log.error("refusing to start: %d lora memories (%s) but --max-loras is %d", len(loras), ", ".join(loras), max_loras)
        return 2
    # vLLM's OpenAI layer takes seconds to import: only once every check above has passed
    import uvicorn

    from server.api.admin import install_admin
    from server.api.app import create_app
    from server.api.lifecycle import Lifecycle, loopback_hosts
    from server.engine.client import EngineAdapter, start_engine
    from server.metrics import log_throughput

    async with start_engine(args) as engine:
        catalog.engine = EngineAdapter(engine, opts.memory_kv_budget_bytes)
        for card in cards:
            loaded = await catalog.load(card)
            log.info("memory %s ready (%s parameters, λ=%.2f, %.2fs)", card.name, f"{card.num_parameters:,}", card.weight, loaded.load_seconds)
        await catalog.reconcile()  # restore the persisted set; problems are reported, not fatal
        lifecycle = Lifecycle(opts.shutdown_grace, loopback_hosts(opts.host, opts.port) if _is_loopback(opts.host) else None)
        app = create_app(engine, catalog, base_name, lifecycle, api_key=opts.api_key, limits=opts.limits)
        generation = None
        if generator is not None:
            from server.serving.generation import MemoryGeneration

            await asyncio.to_thread(generator.base)  # the encoder's weights load now, not in the first admin request
            generation = MemoryGeneration(generator, catalog)
        install_admin(app, catalog, base_name, opts.admin_token, opts.admin_insecure_local, generation)
        from server.engine.vllm_openai import init_app_state

        await init_app_state(engine, app.state, args, await engine.get_supported_tasks())
        app.state.openai_serving_models.lora_requests = catalog.engine.loras  # one dict: see EngineAdapter.loras
        log.info("serving %s with memories [%s] on http://%s:%d (start-up %.1fs)", base_name, ", ".join(catalog.names()), opts.host, opts.port, time.perf_counter() - t0)
        config = uvicorn.Config(lifecycle.middleware(app), host=opts.host, port=opts.port, log_level="info", timeout_keep_alive=30, timeout_graceful_shutdown=1)
        server = lifecycle.make_server(config)
        lifecycle.watch_engine(engine)
        catalog.reconcile_interval = opts.reconcile_interval
        background = [asyncio.ensure_future(log_throughput()), asyncio.ensure_future(_refresh_cache_bytes_forever(catalog))]
        if store and opts.reconcile_interval > 0:
            background.append(asyncio.ensure_future(_reconcile_forever(catalog, opts.reconcile_interval)))
        serving = True
        try:
            await server.serve()
        finally:
            for task in background:
                task.cancel()
    return lifecycle.exit_code


def _generator_dir(opts: ServeOptions, store) -> Path | None | bool:
    """The generator to serve admin generations with; False: a refusal was logged.

    An explicit --generator needs somewhere to write (--memory-root) and someone to
    ask (the admin API); the demo generator found in the cache is used only when both are there.
    """
    from memories.lora.pipeline import default_generator_dir

    admin_on = opts.admin_token is not None or opts.admin_insecure_local
    if opts.generator:
        if store is None or not admin_on:
            log.error("--generator needs --memory-root (where generated memories are written) and the admin API (--admin-token or --admin-insecure-local)")
            return False
        return Path(opts.generator)
    found = default_generator_dir() if not opts.model and opts.max_loras != 0 else None
    found = found if found and found.is_dir() else None
    if found and store is not None and admin_on:
        log.info("using the generator found in %s (admin loads may carry prompts)", found)
        return found
    return None


def _load_generator(path: Path, model: str, max_loras: int, max_lora_rank: int, base_config: dict):
    from memories.lora.generate import load_generator
    from server.serving.generation import check_generator

    if max_loras == 0:
        raise ValueError(f"--generator {path} writes lora memories, but --max-loras is 0")
    generator = load_generator(path, base=model)  # GeneratorError (a ValueError) names what is wrong
    check_generator(generator, max_lora_rank, base_config)
    log.info("generator %s (%s) ready: up to %s prompts per memory", path, generator.sha256[:12], generator.max_prompts)
    return generator


def _startup_kinds(memory_specs: list[tuple[str, str]], store) -> list[tuple[str, str]]:
    """(name, kind) of every memory the server will load at start: --memory, demo memories, the store's persisted set."""
    from memories.kinds import kind_of

    candidates = list(memory_specs)
    if store is not None:
        with contextlib.suppress(Exception):  # an unreadable store is reported by reconcile
            stored = [(name, store.resolve(want.path)) for name, want in store.desired().items()]
            candidates += [(name, str(path)) for name, path in stored if _links_inside(store, name, path)]
    kinds = []
    for name, path in candidates:
        with contextlib.suppress(Exception):  # a bad memory is refused, with its reason, by validation
            kinds.append((name, kind_of(Path(path), name)))
    return kinds


def _links_inside(store, name: str, path: Path) -> bool:
    """Whether a stored memory may be read at all (reconcile reports why not)."""
    try:
        store.check_links(name, path)
    except Exception:
        return False
    return True


def serves_calm(asked: str, base_config: dict, memory_specs: list[tuple[str, str]], store) -> bool:
    """Whether the server accepts calm memories (memserve's model composes them: server/worker/calm_step.py).

    ``auto``: on for a Llama base on CPU; elsewhere (a GPU) only when a start-up
    memory is a calm memory, as calm memories there are untested.
    """
    from memories.calm.artifact import SUPPORTED_BASES
    from server.engine.client import on_cpu

    llama = (base_config.get("architectures") or [""])[0] in SUPPORTED_BASES
    if asked == "off":
        return False
    if not llama:
        if asked == "on":
            raise ValueError(f"--calm on needs a base of architecture {', '.join(SUPPORTED_BASES)}; this base is {(base_config.get('architectures') or ['none'])[0]}")
        return False
    if asked == "on" or on_cpu():
        return True
    calm = [name for name, kind in _startup_kinds(memory_specs, store) if kind == "calm"]
    if calm:
        log.info("calm model on: start-up memory %s is a calm memory", calm[0])
    return bool(calm)


def choose_max_loras(asked: int | None, memory_specs: list[tuple[str, str]], store, generator: Path | None = None) -> int:
    """The operator's --max-loras, else LoRA on only if a memory the server starts with, or the generator, needs it.

    vLLM's LoRA path slows every batch (README), so a server that serves only
    decoder memories should not pay for it; LoRA cannot be turned on later.
    """
    if asked is not None:
        return asked
    if generator:
        log.info("LoRA on (--max-loras %d): the generator %s writes lora memories", AUTO_MAX_LORAS, generator)
        return AUTO_MAX_LORAS
    for name, kind in _startup_kinds(memory_specs, store):
        if kind == "lora":
            log.info("LoRA on (--max-loras %d): start-up memory %s is a lora memory", AUTO_MAX_LORAS, name)
            return AUTO_MAX_LORAS
    return 0


async def _refresh_cache_bytes_forever(catalog, interval: float = 10.0) -> None:
    """Keep memserve_memory_cache_bytes current: memories' caches grow and shrink with their rows."""
    while True:
        await asyncio.sleep(interval)
        with contextlib.suppress(Exception):
            await catalog.refresh_cache_bytes()


async def _reconcile_forever(catalog, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        with contextlib.suppress(Exception):
            await catalog.reconcile()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return False
