"""``memserve serve``'s settings, each written once: name, type, default and help.

Every field of :class:`ServeOptions` (and of :class:`RequestLimits`, which it
holds) is a ``--flag`` of the same name, dashed, unless its metadata names
another; :func:`add_serve_arguments` adds them to a parser and
:meth:`ServeOptions.from_cli` reads them back. The help text of a flag with a
default must state it (tests/unit/test_cli_help.py): ``%(default)s`` shows the
field's own default.

Standard library only (and memories.flags, which is too): the CLI imports this before anything heavy.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from memories.flags import count, fraction, positive

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's max_lora_rank accepts

ADMIN = "memory store and admin API"  # argument groups of `memserve serve --help`
LIMITS = "request limits and shutdown"


def _memory_spec(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, path


def option(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, flag: str | None = None, group: str | None = None, **argparse_kwargs: Any) -> Any:
    """A setting: a dataclass field whose metadata says how the CLI spells it.

    ``flag``: the option string when it is not the field's name dashed; ``group``: the
    ``--help`` section; ``argparse_kwargs``: passed to ``add_argument`` (``type`` defaults
    to the field's annotation, ``dest`` to the field's name).
    """
    metadata = {"help": help, "flag": flag, "group": group, "argparse": argparse_kwargs}
    return field(default=default, default_factory=default_factory, metadata=metadata)


@dataclass(frozen=True)
class RequestLimits:
    """Per-request bounds; each refusal names the limit and the flag that sets it."""

    max_request_bytes: int = option(4 << 20, "largest request body accepted, in bytes; larger ones get 413 (default: %(default)s)", group=LIMITS)
    max_n: int = option(16, "most choices (n, best_of) one request may ask for (default: %(default)s)", group=LIMITS)


@dataclass
class ServeOptions:
    """Everything ``memserve serve`` is told; server/startup.py's ``run`` takes it."""

    model: str | None = option(None, "Hugging Face causal-LM directory of the base (default: the embedded SmolLM2-135M-Instruct)")
    served_model_name: str | None = option(None, "model id clients use for the base (default: the directory's name)")
    memories: list[tuple[str, str]] = option(
        default_factory=list, flag="--memory", action="append", type=_memory_spec, metavar="NAME=DIR",
        help="load a memory at start-up (repeatable; default: none, or without --model every demo memory in <cache>/memories)",
    )  # fmt: skip
    host: str = option("127.0.0.1", "interface to listen on (default: %(default)s)")
    port: int = option(8000, "port (default: %(default)s)")
    default_memory_weight: float | None = option(None, "λ for memories whose memory.json sets none (default 0.5)", type=fraction, metavar="λ")
    default_domain: str = option(
        "none", "memory for requests that name none (no domain, X-Domain or memory model): none, the base alone; or auto, the memory "
        "the router picks for the prompt, or none when no memory fits, as with domain 'auto' (default: %(default)s)",
        choices=("none", "auto"),
    )  # fmt: skip
    max_model_len: int | None = option(None, "context length (default: the model's)")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1 routes (default: none, /v1 is open)")
    tensor_parallel_size: int = option(1, "devices every layer of the base and of the decoder memory slots is split across (vLLM tensor parallelism; default: %(default)s)")
    pipeline_parallel_size: int = option(1, "devices the base's layers are divided between in stages (vLLM pipeline parallelism; default: %(default)s)")

    memory_root: str | None = option(
        None, "folder of memory artifacts; admin loads must resolve inside it, and the loaded set persists there (default: none, admin loads are refused)", group=ADMIN,
    )  # fmt: skip
    admin_token: str | None = option(None, "bearer token for /admin routes (default: $MEMSERVE_ADMIN_TOKEN; without either the routes are off)", group=ADMIN)
    admin_insecure_local: bool = option(False, "enable /admin without a token when listening on loopback only", group=ADMIN, action="store_true")
    max_memories: int | None = option(None, "refuse loads beyond this many memories (default: no limit)", group=ADMIN)
    max_loras: int | None = option(
        None, group=ADMIN, type=count, metavar="N",
        help="lora memories (PEFT LoRA adapters) that may be loaded at once; N > 0 starts vLLM with multi-LoRA on "
        "(enable_lora, max_loras N, max_cpu_loras 2N), which slows every batch, adapter or not (measured in README); "
        "0: LoRA off, lora memories are refused (default: 4 if a start-up memory, from --memory, the demo memories "
        "or the memory root's persisted set, is a lora memory, else 0)",
    )  # fmt: skip  (server/startup.py's AUTO_MAX_LORAS is the 4)
    max_lora_rank: int = option(
        16, group=ADMIN, choices=LORA_RANKS, metavar="R",
        help=f"highest LoRA rank (r) a lora memory may have; vLLM sizes its adapter slots by it. One of {', '.join(map(str, LORA_RANKS))} (default: %(default)s)",
    )  # fmt: skip
    calm: str = option(
        "auto", group=ADMIN, choices=("auto", "on", "off"),
        help="accept calm memories, which memserve's model composes into a Llama base (the model runs eagerly). "
        "auto: on for a Llama base on CPU, and elsewhere only when a "
        "start-up memory is a calm memory; off: calm memories are refused (default: %(default)s)",
    )  # fmt: skip
    decoder_slots: int = option(
        4, group=ADMIN, type=count, metavar="N",
        help="decoder memories that may be loaded at once: memserve's model preallocates N slots of the base's shape "
        "(weights) and their attention layers, whose keys and values share vLLM's KV cache; a replaced memory holds its "
        "slot until its requests finish. 0: decoder memories are refused (default: %(default)s)",
    )  # fmt: skip
    decoder_layers: int = option(
        0, group=ADMIN, type=count, metavar="L",
        help="layers per decoder memory slot: memories of at most L layers of the base's shape load (0: the base's depth; "
        "fewer layers cost less weight memory and KV cache) (default: %(default)s)",
    )  # fmt: skip
    mixture_size: int = option(
        2, group=ADMIN, type=positive, metavar="K",
        help="decoder memories one request may fuse (a mixture): each of the K has attention layers of its own, so every "
        "request's KV cache grows by K × --decoder-layers layers (default: %(default)s)",
    )  # fmt: skip
    generator: str | None = option(
        None, group=ADMIN, metavar="DIR",
        help="prompt-to-LoRA generator (built by `memserve generator build|demo`): admin loads may then carry 'prompts' instead of "
        "'path', and the server generates, checks and loads a lora memory from them, written under <memory-root>/generated/. "
        "Needs --memory-root and the admin API; turns LoRA on (default: <cache>/generator when serving the embedded base "
        "with both, else none)",
    )  # fmt: skip
    memory_budget_bytes: int | None = option(
        None, group=ADMIN,
        help="device bytes for all memories (weights + --memory-kv-budget per calm memory): loads beyond it are refused, and on GPUs vLLM's share is lowered by it (default: no limit)",
    )  # fmt: skip
    memory_kv_budget_bytes: int | None = option(
        None, group=ADMIN, flag="--memory-kv-budget", metavar="BYTES",
        help="cache bytes per calm memory (a decoder memory's keys and values are in vLLM's KV cache). A calm memory's caches (its augmenting model's KV pool and its cross-attention keys and values): they hold "
        "BYTES / (one row of --max-model-len tokens) rows, and requests beyond them get 503 until rows end; freed when rows end "
        "(default: grow as needed)",
    )  # fmt: skip
    reconcile_interval: float = option(10.0, "seconds between re-reads of the store's desired set; 0: only at start and on admin calls (default: %(default)s)", group=ADMIN)
    unload_timeout: float = option(30.0, "seconds an unload waits for running requests before ending them with an error (default: %(default)s)", group=ADMIN)

    limits: RequestLimits = field(default_factory=RequestLimits)  # its fields are flags of their own
    shutdown_grace: float = option(
        30.0, "on SIGTERM, seconds running requests may take to finish while new ones get 503; 0 stops at once (default: %(default)s)", group=LIMITS,
    )  # fmt: skip

    workdir: Path | None = option(None, "folder for vLLM's caches and sockets (default: <cache>/run)")
    engine_args: list[str] = option(
        default_factory=list, flag="engine_args", nargs=argparse.REMAINDER,
        help="-- then vLLM engine flags, passed unchanged (e.g. -- --dtype float32 --kv-cache-memory-bytes 4294967296)",
    )  # fmt: skip

    @classmethod
    def from_cli(cls, opts: argparse.Namespace) -> "ServeOptions":
        """The options :func:`add_serve_arguments` parsed; the admin token falls back to $MEMSERVE_ADMIN_TOKEN."""
        values = _values(cls, opts)
        values["admin_token"] = values["admin_token"] or os.environ.get("MEMSERVE_ADMIN_TOKEN") or None
        extra = values["engine_args"]
        values["engine_args"] = extra[1:] if extra[:1] == ["--"] else list(extra)
        return cls(**values)


def add_serve_arguments(parser: argparse.ArgumentParser, settings: type = ServeOptions, groups: dict[str, Any] | None = None) -> None:
    """One argument per field of ``settings`` (nested settings classes add theirs in place), in field order."""
    groups = {} if groups is None else groups
    hints = typing.get_type_hints(settings)
    for f in fields(settings):
        if is_dataclass(hints[f.name]):
            add_serve_arguments(parser, hints[f.name], groups)
            continue
        meta = f.metadata
        group = meta["group"]
        if group is not None and group not in groups:
            groups[group] = parser.add_argument_group(group)
        target = parser if group is None else groups[group]
        kwargs = {"help": meta["help"], **meta["argparse"]}
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        if not flag.startswith("-"):  # a positional argument
            target.add_argument(flag, **kwargs)
            continue
        kwargs["dest"] = f.name
        kwargs["default"] = f.default_factory() if f.default_factory is not MISSING else f.default
        if kwargs.get("action") is None and "type" not in kwargs:
            kwargs["type"] = _scalar(hints[f.name])
        target.add_argument(flag, **kwargs)


def _scalar(hint: Any) -> Any:
    """``int`` for ``int | None``, and so on: what argparse converts the flag's text with."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return hint


def _values(settings: type, opts: argparse.Namespace) -> dict[str, Any]:
    hints = typing.get_type_hints(settings)
    return {f.name: hints[f.name](**_values(hints[f.name], opts)) if is_dataclass(hints[f.name]) else getattr(opts, f.name) for f in fields(settings)}
