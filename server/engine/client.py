"""Engine adapter: starts vLLM's async engine with memserve's processor and worker RPCs.

Everything vLLM-version-specific on the engine side lives here: the engine is
configured through vLLM's own CLI parser (so any vLLM engine flag can be passed
through), and memories are loaded into every worker with ``collective_rpc``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
from argparse import Namespace
from collections.abc import AsyncIterator
from pathlib import Path

from memories.artifact import ArtifactError
from server.engine import keys
from server.engine.plugin import register

log = logging.getLogger("memserve.engine")

LOAD_POLL_SECONDS = 0.05


def prepare_environment(workdir: Path) -> None:
    """Environment vLLM must see before it is imported (docs/CONTRACT.md, "vLLM-CPU facts")."""
    workdir.mkdir(parents=True, exist_ok=True)
    for var, sub in (("TMPDIR", "tmp"), ("VLLM_CACHE_ROOT", "vllm"), ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
        if var not in os.environ:
            (workdir / sub).mkdir(exist_ok=True)
            os.environ[var] = str(workdir / sub)
    os.environ["TMPDIR"] = str(socket_dir(Path(os.environ["TMPDIR"])))
    # vLLM's V1 model runner by default: memserve's row bookkeeping there is a V1
    # logits processor (server/worker/rows.py), and it serves every memory kind.
    # Under Model Runner V2 (an operator's =1) a model state keeps the rows
    # (server/worker/v2_state.py): decoder memories only, and only where vLLM
    # can run V2 (Triton: a GPU); see unsupported().
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")
    # A warning every engine process prints at start that only vLLM's authors can
    # act on (its Triton dispatcher touches a deprecated torch alias); set through
    # PYTHONWARNINGS so vLLM's spawned processes inherit it. The user's own
    # entries come last, so they take precedence.
    quiet = "ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning"
    user = os.environ.get("PYTHONWARNINGS", "")
    os.environ["PYTHONWARNINGS"] = ",".join(([] if quiet in user else [quiet]) + ([user] if user else []))


# vLLM binds its ZMQ sockets at TMPDIR/<36-character uuid>; a Unix socket path holds at most 107 bytes
SOCKET_DIR_MAX = 107 - 37


def socket_dir(tmp: Path) -> Path:
    """``tmp``, or a short private folder in the system's temp dir when vLLM's socket paths under ``tmp`` would be too long.

    A deep --workdir (or TMPDIR) otherwise stops the engine at start with ZMQ's "ipc path ... is longer than 107 characters".
    """
    if len(str(tmp)) <= SOCKET_DIR_MAX:
        return tmp
    import tempfile

    short = Path(tempfile.mkdtemp(prefix="memserve-", dir="/tmp" if os.path.isdir("/tmp") else None))
    log.info("vLLM's sockets go to %s: under %s their paths would exceed the 107 bytes a Unix socket allows", short, tmp)
    return short


def engine_args(
    model: str,
    served_name: str,
    max_model_len: int | None,
    extra: list[str],
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    memory_budget_bytes: int | None = None,
    max_loras: int = 0,
    max_lora_rank: int = 16,
    architecture: str | None = None,
    decoder_slots: int = 0,
    decoder_layers: int = 0,
    mixture_size: int = 1,
    calm: bool = True,
) -> Namespace:
    """Build the Namespace vLLM's own OpenAI server would build from its CLI.

    ``max_loras`` > 0 turns vLLM's multi-LoRA on for lora memories. vLLM's CPU
    cache of adapters (``max_cpu_loras``) gets twice that, so that a replaced
    adapter can finish its requests beside its successor without either being
    re-read from disk. LoRA flags after ``--`` come later and win.

    ``architecture`` is the base's (its ``config.json``): where memserve's model
    (server/worker/model.py) has a class for it, the engine serves the base
    through that class, which applies calm and decoder memories to the rows
    that select one; it runs eagerly. A base of another architecture is served
    by vLLM's own class, and memories other than lora are refused at load.
    On a CPU the model is compiled by vLLM as usual unless ``calm`` memories are
    served (their hooks need eager execution); on a GPU it runs eagerly.

    Under Model Runner V2 (``VLLM_USE_V2_MODEL_RUNNER=1``) the row bookkeeping
    is memserve's model state (``server/worker/v2_state.py``), which the model
    names itself, so no ``--logits-processors`` is passed: V2 refuses V1 ones.
    """
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = [
        "--model", model,
        "--served-model-name", served_name,
        *([] if v2_runner() else ["--logits-processors", keys.ROWS_PROCESSOR]),  # V2 refuses V1 processors: its rows come from a model state
        "--worker-extension-cls", keys.WORKER_EXTENSION,
        "--no-async-scheduling",
        "--tensor-parallel-size", str(tensor_parallel_size),
        "--pipeline-parallel-size", str(pipeline_parallel_size),
    ]  # fmt: skip
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    if architecture in keys.MODEL_ARCHITECTURES:
        register()  # vLLM's plugin loader does too; this also serves a checkout without the entry point installed
        overrides = {"architectures": [keys.MODEL_ARCHITECTURES[architecture]], keys.MEMORY_SLOTS: decoder_slots, keys.MEMORY_LAYERS: decoder_layers, keys.MEMORY_LANES: mixture_size}
        argv += ["--hf-overrides", json.dumps(overrides)]
        if not on_cpu():
            argv += ["--enforce-eager"]  # the per-row work around the forward is Python: no graph capture
    else:
        log.warning("base architecture %s: memserve's model has no class for it; decoder and calm memories will be refused", architecture)
    if max_loras > 0:
        argv += ["--enable-lora", "--max-loras", str(max_loras), "--max-lora-rank", str(max_lora_rank), "--max-cpu-loras", str(2 * max_loras)]
    user_sized = any(a.split("=")[0] in ("--kv-cache-memory-bytes", "--gpu-memory-utilization") for a in extra)
    if on_cpu():
        # calm rows enter through forward hooks inside the base's layers, which vLLM-CPU's compiled
        # backbone (traced once) would not call; decoder memories run outside it and compile fine
        argv += [*(["--enforce-eager"] if calm else []), *apply_cpu_defaults(extra, tensor_parallel_size * pipeline_parallel_size)]
        # vLLM-CPU otherwise reserves a fraction of the NUMA node, which fails
        # beside anything else running; 1 GiB of KV cache serves many streams.
        if not user_sized and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            argv += ["--kv-cache-memory-bytes", str(1 << 30)]
    elif memory_budget_bytes and not user_sized:
        argv += ["--gpu-memory-utilization", f"{_utilization_leaving(memory_budget_bytes):.4f}"]
    parser = make_arg_parser(FlexibleArgumentParser(prog="memserve-engine"))
    return parser.parse_args(argv + extra)


# attention backends whose metadata gives each request's span of the step's tokens (query_start_loc), which memserve's model reads
SPAN_ATTENTION_BACKENDS = ("CPU_ATTN", "FLASH_ATTN", "TRITON_ATTN", "FLEX_ATTENTION")


def v2_runner() -> bool:
    """Whether vLLM runs Model Runner V2: ``VLLM_USE_V2_MODEL_RUNNER`` set and not 0 (memserve defaults it to 0: ``prepare_environment``)."""
    return os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0").strip().lower() not in ("0", "false", "")


def unsupported(args: Namespace, calm: bool = False) -> list[str]:
    """Why the engine ``args`` describe cannot serve memories as memserve serves them: one reason per flag, empty if none.

    ``calm``: whether the server accepts calm memories (``server/startup.py``'s
    ``serves_calm``). Each combination here would start and then serve memory
    rows wrongly (or fail at the first request), so the server refuses to
    start, naming it.
    """
    reasons = []
    v2 = v2_runner()
    if v2 and calm:
        reasons.append(
            "VLLM_USE_V2_MODEL_RUNNER=1 with calm memories: under Model Runner V2 memserve serves decoder memories only "
            "(calm's augmenting model needs each row's token lists, kept by the V1 runner's bookkeeping); pass --calm off, or unset VLLM_USE_V2_MODEL_RUNNER or set it to 0"
        )
    if v2 and on_cpu() and not _has_triton():
        reasons.append(
            "VLLM_USE_V2_MODEL_RUNNER=1 on this CPU: vLLM's Model Runner V2 prepares every step with Triton kernels, and this Triton has no CPU backend "
            "(vLLM disables it); unset VLLM_USE_V2_MODEL_RUNNER or set it to 0"
        )
    if v2 and (getattr(args, "enable_dbo", False) or int(getattr(args, "ubatch_size", 0) or 0) > 1):
        reasons.append("--enable-dbo / --ubatch-size under Model Runner V2: the step's memory rows reach the forward whole, not split per micro-batch; drop the flag or use the V1 runner")
    if getattr(args, "async_scheduling", False):
        reasons.append("--async-scheduling: memories read each request's sampled token ids, which async scheduling leaves as placeholders; drop the flag")
    overrides = getattr(args, "hf_overrides", None)
    slots = overrides.get(keys.MEMORY_SLOTS, 0) if isinstance(overrides, dict) else 0
    if slots and int(getattr(args, "pipeline_parallel_size", 1) or 1) > 1:
        reasons.append("decoder memory slots run after the base's last layer, on the last pipeline stage only (not yet placed per stage): with --pipeline-parallel-size above 1, pass --decoder-slots 0")
    if getattr(args, "speculative_config", None):
        reasons.append("--speculative-config: the drafter reads the model's hidden states, which memserve's model widens on steps with decoder memories; drop the flag")
    if not on_cpu() and not v2:  # under V2 the rows' spans come from the input batch (server/worker/v2_state.py), not the attention metadata
        backend = getattr(args, "attention_backend", None)
        name = getattr(backend, "name", backend) or os.environ.get("VLLM_ATTENTION_BACKEND")
        if name not in SPAN_ATTENTION_BACKENDS:
            reasons.append(
                f"memories on a GPU need an attention backend whose metadata has each request's token span (query_start_loc): "
                f"pass --attention-backend one of {', '.join(SPAN_ATTENTION_BACKENDS[1:])} after -- (the backend vLLM would pick, e.g. FlashInfer, has none)"
            )
    return reasons


def lora_limits(args: Namespace) -> tuple[int, int | None]:
    """(adapters that may be live, highest rank) as the engine will really run, pass-through flags included; (0, None): LoRA is off."""
    if not getattr(args, "enable_lora", False):
        return 0, None
    return int(args.max_loras), int(args.max_lora_rank)


def apply_cpu_defaults(extra: list[str], world_size: int) -> list[str]:
    """Set the chosen thread layout in the environment, log every choice, return the extra engine flags.

    Called before the engine starts: vLLM's worker processes read the layout
    from the environment they inherit.
    """
    from server.engine.cpu_defaults import choose, read_machine

    choice = choose(read_machine(), dict(os.environ), extra, world_size)
    os.environ.update(choice.env)
    for line in choice.log:
        log.info("%s", line)
    return choice.engine_args


def _utilization_leaving(reserved_bytes: int, default: float = 0.9) -> float:
    """vLLM's GPU share once the memories' budget is set aside, so loading them cannot starve its KV cache.

    Untested here (no GPU on these machines).
    """
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    share = default - reserved_bytes / total
    if share < 0.1:
        raise ValueError(f"--memory-budget-bytes {reserved_bytes:,} leaves vLLM {share:.0%} of the {total:,}-byte GPU")
    return share


def _has_triton() -> bool:
    """Whether vLLM can run Triton kernels here (on a CPU: only with Triton's CPU backend, ``vllm/triton_utils/importing.py``)."""
    from vllm.triton_utils import HAS_TRITON

    return bool(HAS_TRITON)


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


@contextlib.asynccontextmanager
async def start_engine(args: Namespace) -> AsyncIterator:
    """Yield a running vLLM ``EngineClient`` (AsyncLLM) built from ``args``."""
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client

    async with build_async_engine_client(args) as engine:
        yield engine


class EngineAdapter:
    """What the serving layer needs from the engine beyond vLLM's OpenAI layer."""

    def __init__(self, engine, kv_budget_bytes: int | None = None) -> None:
        self.engine = engine
        self.kv_budget_bytes = kv_budget_bytes
        # LoRA adapters in the engine by versioned key. The runtime hands this very
        # dict to vLLM's OpenAIServingModels as its ``lora_requests``, so its serving
        # classes attach the adapter to a request whose ``model`` is the key.
        self.loras: dict = {}
        self._lora_ids = itertools.count(1)  # vLLM identifies adapters by int: never reuse one

    @property
    def bytes_per_parameter(self) -> int:
        """Memories run in the engine's dtype (see ``MemoryWorkerExtension.memserve_load``), so their weights weigh that much."""
        return self.engine.model_config.dtype.itemsize

    async def load_memory(self, key: str, path: str) -> dict:
        """Load into every worker; if any worker fails, unload from all and raise.

        Workers load in the background and are polled, so the engine keeps
        stepping meanwhile. A bad artifact raises :class:`ArtifactError`.
        """
        try:
            await self.engine.collective_rpc("memserve_load", args=(key, path, self.kv_budget_bytes))
            while None in (results := await self.engine.collective_rpc("memserve_loaded", args=(key,))):
                await asyncio.sleep(LOAD_POLL_SECONDS)
            for result in results:
                if "error" in result:
                    raise _load_error(result["error"])
        except Exception:
            with contextlib.suppress(Exception):
                await self.engine.collective_rpc("memserve_unload", args=(key,))
            raise
        return results[0]

    async def cache_bytes(self, keys: list[str]) -> dict[str, int]:
        """Each memory's caches as allocated now, by key: the largest over the workers (each holds its own copy)."""
        if not keys:
            return {}
        out: dict[str, int] = {}
        for result in await self.engine.collective_rpc("memserve_cache_bytes", args=(keys,)):
            for key, n in result.items():
                out[key] = max(out.get(key, 0), n)
        return out

    async def unload_memory(self, key: str) -> None:
        await self.engine.collective_rpc("memserve_unload", args=(key,))

    async def load_lora(self, key: str, path: str) -> None:
        """Load the adapter into the engine now (not on its first request), so a bad one fails here, whole."""
        from vllm.lora.request import LoRARequest

        request = LoRARequest(lora_name=key, lora_int_id=next(self._lora_ids), lora_path=path)
        try:
            if not await self.engine.add_lora(request):
                raise RuntimeError(f"vLLM did not add LoRA adapter {key}")
        except Exception as e:
            with contextlib.suppress(Exception):
                await self.engine.remove_lora(request.lora_int_id)
            raise ArtifactError(key.split("@")[0], "vLLM refused the adapter", f"{type(e).__name__}: {e}") from None
        self.loras[key] = request

    async def unload_lora(self, key: str) -> None:
        request = self.loras.pop(key, None)
        if request is not None:
            await self.engine.remove_lora(request.lora_int_id)


def _load_error(error: dict) -> Exception:
    """The exception a worker's load failure stands for (see ``MemoryWorkerExtension.memserve_loaded``)."""
    if "check" in error:
        return ArtifactError(error["memory"].split("@")[0], error["check"], error["detail"])  # the name, not the engine key
    return RuntimeError(error["message"])
