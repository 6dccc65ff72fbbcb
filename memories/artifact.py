"""A memory on disk: a Hugging Face causal-LM directory plus an optional ``memory.json``.

Reading and checking an artifact happens in the API process before any engine
worker sees it, so that every refusal is a clear message naming the memory,
the check and both sides' values, and nothing is half-loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MEMORY_JSON = "memory.json"
FORMAT_VERSION = 1
# Architectures the memory runtime (memories/runner.py) can run incrementally.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
# What a thin memory (``"embeddings": "base"``) leaves out and takes from the base at serving time.
BASE_TENSORS = ("embed_tokens.weight", "lm_head.weight")
# the files a Hugging Face tokenizer may be saved as; an artifact that ships a tokenizer ships these
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")


class ArtifactError(ValueError):
    """A memory directory that cannot be served; the message says why."""

    def __init__(self, memory: str, check: str, detail: str):
        self.memory, self.check, self.detail = memory, check, detail
        super().__init__(f"memory {memory!r}: {check}: {detail}")


@dataclass(frozen=True)
class MemoryCard:
    """What we know about a memory without loading its weights."""

    name: str
    path: str
    weight: float = 0.5  # λ
    temperature: float = 1.0
    domain: str | None = None
    description: str = ""
    base_model: str | None = None
    tokenizer_sha256: str | None = None
    architecture: str = ""
    vocab_size: int = 0
    num_parameters: int = 0
    hidden_size: int = 0
    embeddings: str | None = None  # "base": token embedding and output head are the base's (not stored)
    content_sha256: str = ""
    corpus: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    kind: str = "decoder"  # memory.json "kind" (memories/kinds.py)
    rank: int = 0  # lora: the adapter's r
    target_modules: tuple[str, ...] = ()  # lora: the base modules it adapts
    lora_scale: float = 0.0  # lora: the factor vLLM multiplies B·A by (lora_alpha / r, or / sqrt(r) with rsLoRA)
    layers_to_transform: tuple[int, ...] = ()  # lora: the only layers it adapts (empty: any)
    generator: str | None = None  # lora written by the prompt-to-LoRA generator: its sha256
    prompts: dict[str, Any] = field(default_factory=dict)  # ... and the prompts it read (count, sha256)
    connections: tuple[tuple[int, int], ...] = ()  # calm: (augment layer, base layer) pairs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tokenizer_sha256(tokenizer) -> str:
    """Hash of the token→id map plus special tokens, independent of file layout.

    Two tokenizers with the same hash map every string to the same ids, which
    is what fusing two distributions over token ids requires.
    """
    specials = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    canonical = json.dumps(
        {"vocab": tokenizer.get_vocab(), "special_tokens": specials},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def read_json_object(name: str, path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(name, f"{what} missing", f"no {path.name} in {path.parent}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(name, f"{what} is not valid JSON", f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ArtifactError(name, f"{what} is not a JSON object", str(path))
    return data


def is_int(value: Any) -> bool:
    """A JSON integer: ``True`` and ``2.0`` are not (``int()`` would accept both and silently change what the artifact says)."""
    return isinstance(value, int) and not isinstance(value, bool)


def finite_number(name: str, what: str, value: Any) -> float:
    """A finite JSON number; strings, booleans, null, NaN and ±Infinity (Python's JSON reader accepts them) are refused.

    Every scalar an artifact hands to a kernel goes through here first: a NaN or a
    string reaching the engine fails inside it with a vague message, or worse, poisons outputs.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ArtifactError(name, f"{what} is not a finite number", repr(value))
    return float(value)


def _check_fraction(name: str, key: str, value: Any, lo: float, hi: float, lo_open=False) -> float:
    value = finite_number(name, f"memory.json {key}", value)
    if value < lo or value > hi or (lo_open and value == lo):
        raise ArtifactError(name, f"memory.json {key} out of range", f"{value} not in {'(' if lo_open else '['}{lo}, {hi}]")
    return float(value)


# the files that make a memory version: a decoder's config, a LoRA's adapter config, either's weights
CONTENT_FILES = ("config.json", "adapter_config.json")


def content_sha256(path: Path) -> str:
    """Hash of config and weight files: identifies a memory version across replicas."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.name in CONTENT_FILES or f.suffix == ".safetensors":
            h.update(f.name.encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def read_card(path: str | os.PathLike, name: str, default_weight: float | None = None) -> MemoryCard:
    """Read and check a memory directory's metadata (no weights are loaded)."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(name, "not a directory", str(root))
    config = read_json_object(name, root / "config.json", "config.json")
    archs = config.get("architectures") or []
    arch = archs[0] if archs else ""
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ArtifactError(
            name, "unsupported architecture", f"memory has {arch or 'none'}, supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    weights = sorted(root.glob("*.safetensors"))
    if not weights:
        raise ArtifactError(name, "no weights", f"no *.safetensors file in {root}")
    meta = read_memory_json(root, name)
    weight = meta.get("lambda", default_weight if default_weight is not None else 0.5)
    temperature = meta.get("temperature", 1.0)
    embeddings = meta.get("embeddings")
    if embeddings not in (None, "base"):
        raise ArtifactError(name, "unknown memory.json embeddings", f"memory has {embeddings!r}, server reads 'base' or no field")
    shapes = tensor_shapes(name, weights)
    stored = sorted(k for k in shapes if k.removeprefix("model.") in BASE_TENSORS)
    if embeddings == "base" and stored:
        raise ArtifactError(name, "memory.json says embeddings 'base' but the weights hold them", ", ".join(stored))
    return MemoryCard(
        name=name,
        path=str(root.resolve()),
        weight=_check_fraction(name, "lambda", weight, 0.0, 1.0),
        temperature=_check_fraction(name, "temperature", temperature, 0.0, 100.0, lo_open=True),
        domain=meta.get("domain"),
        description=str(meta.get("description", "")),
        base_model=meta.get("base_model"),
        tokenizer_sha256=meta.get("tokenizer_sha256"),
        architecture=arch,
        vocab_size=int(config.get("vocab_size", 0)),
        num_parameters=sum(math.prod(shape) for shape in shapes.values()),
        hidden_size=int(config.get("hidden_size", 0)),
        embeddings=embeddings,
        content_sha256=content_sha256(root),
        corpus=meta.get("corpus") or {},
        metrics=meta.get("metrics") or {},
    )


def read_memory_json(root: Path, name: str) -> dict[str, Any]:
    """``memory.json`` if the directory has one (``{}`` otherwise), its format checked."""
    if not (root / MEMORY_JSON).exists():
        return {}
    meta = read_json_object(name, root / MEMORY_JSON, MEMORY_JSON)
    if meta.get("format", FORMAT_VERSION) != FORMAT_VERSION:
        raise ArtifactError(name, "unknown memory.json format", f"memory has {meta.get('format')!r}, server reads {FORMAT_VERSION}")
    return meta


def tensor_headers(name: str, weights: list[Path]) -> dict[str, tuple[list[int], str]]:
    """Shape and dtype (safetensors' name, e.g. ``F32``, ``I8``) of every tensor, from the headers only; a corrupt header is refused here."""
    from safetensors import safe_open

    headers = {}
    for f in weights:
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    piece = st.get_slice(key)
                    headers[key] = (piece.get_shape(), piece.get_dtype())
        except Exception as e:  # safetensors raises several types for bad files
            raise ArtifactError(name, "unreadable safetensors", f"{f.name}: {e}") from None
    return headers


def tensor_shapes(name: str, weights: list[Path]) -> dict[str, list[int]]:
    """Reads only the safetensors headers; a corrupt header is refused here."""
    return {key: shape for key, (shape, _) in tensor_headers(name, weights).items()}


def check_floating(name: str, key: str, dtype: Any) -> None:
    """Weights must be floating point, for every kind of memory.

    An integer tensor (int8, int32: quantized weights without their scales) would
    be cast to the engine's dtype and silently mean something else. ``dtype`` is a
    ``torch.dtype`` or a safetensors header name (``F32``, ``BF16``, ``I8``).
    """
    floating = dtype.is_floating_point if hasattr(dtype, "is_floating_point") else str(dtype).startswith(("F", "BF"))
    if not floating:
        raise ArtifactError(name, "unsupported dtype", f"{key} is {dtype}; weights must be floating point (fp32, fp16 or bf16), not integers")


def uses_base_embeddings(path: str | os.PathLike) -> bool:
    """Whether the artifact's ``memory.json`` says ``"embeddings": "base"`` (read_card has checked it)."""
    meta = Path(path) / MEMORY_JSON
    return meta.exists() and json.loads(meta.read_text()).get("embeddings") == "base"


def check_compatible(card: MemoryCard, base_tokenizer, base_config: dict | None = None) -> None:
    """Refuse a memory whose token ids would not mean the base's token ids.

    A thin memory also needs ``base_config`` (the base's ``config.json``): it runs on
    the base's embedding and head, so its width and vocabulary must be the base's.
    """
    check_tokenizer(card, base_tokenizer)
    needed = len(base_tokenizer)
    if card.vocab_size < needed:
        raise ArtifactError(card.name, "vocabulary too small", f"memory vocab_size {card.vocab_size} < base tokenizer's {needed} tokens")
    if card.embeddings == "base":
        if base_config is None:
            raise ArtifactError(card.name, "embeddings 'base' need the base's config", "no base config.json was given to check it against")
        for key, mine in (("hidden_size", card.hidden_size), ("vocab_size", card.vocab_size)):
            if mine != base_config.get(key):
                raise ArtifactError(card.name, f"{key} differs from the base's", f"memory {key} {mine}, base {base_config.get(key)}; a memory with embeddings 'base' runs on the base's embedding and head")


def check_tokenizer(card: MemoryCard, base_tokenizer) -> None:
    """A shipped tokenizer, else memory.json's ``tokenizer_sha256``, must hash like the base's; neither: nothing to check."""
    base_sha = tokenizer_sha256(base_tokenizer)
    root = Path(card.path)
    if any((root / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        from transformers import AutoTokenizer

        try:
            mem_sha = tokenizer_sha256(AutoTokenizer.from_pretrained(root))
        except Exception as e:
            raise ArtifactError(card.name, "unreadable tokenizer", str(e)) from None
        if mem_sha != base_sha:
            raise ArtifactError(card.name, "tokenizer differs from the base's", f"memory sha256 {mem_sha[:16]}…, base sha256 {base_sha[:16]}…")
    elif card.tokenizer_sha256 and card.tokenizer_sha256 != base_sha:
        raise ArtifactError(
            card.name, "memory.json tokenizer_sha256 differs from the base's", f"memory {card.tokenizer_sha256[:16]}…, base {base_sha[:16]}…"
        )


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write-then-rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
