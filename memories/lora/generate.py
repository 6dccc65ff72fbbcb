"""Prompts → a ``lora`` memory, in one forward pass of the generator.

This is the run-time half of the generator: the server keeps a
``Generator`` loaded (``load_generator``) and calls ``generate_memory`` for
each admin request; ``memserve memory generate`` does the same from the
command line. Generation runs the base's frozen lower layers on the prompt
windows (the encoder), the hyper-convolutional decoder on their states, and
undoes the collection standardisation; the adapter is written as a PEFT
directory plus ``memory.json`` into a temporary sibling and renamed into
place, so a reader never sees half a memory.

Prompts become windows exactly as training prompts did: each prompt is
tokenised and followed by EOS, the prompts are concatenated into one stream
and cut into ``prompt_tokens``-token windows; the generator takes a fixed
number P of windows, so fewer are repeated in turn and more are thinned to
P evenly spaced ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from memories.lora.artifact import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from memories.lora.hyperconv import HyperConvConfig, HyperConvDecoder
from memories.lora.topstack import cut_windows
from memories.lora.train_generator import InputNorm
from memories.lora.weights import Layout, Standardiser, lora_deltas, untokenise

log = logging.getLogger("memserve.generator")

GENERATOR_JSON = "generator.json"
GENERATOR_WEIGHTS = "generator.safetensors"
GENERATOR_SHA = "generator.sha256"

# Bounds on what one generation accepts (the server's admin API applies the same ones).
MIN_PROMPTS = 1
MAX_PROMPTS = 128
MAX_PROMPT_CHARS = 20_000
MAX_TOTAL_CHARS = 1_000_000


class PromptError(ValueError):
    """Prompts a generator cannot use; the message says which one and why (a 400 at the server)."""


class GeneratorError(ValueError):
    """A generator directory that cannot be used; the message says why."""


def validate_prompts(prompts, min_count: int = MIN_PROMPTS, max_count: int = MAX_PROMPTS, max_chars: int = MAX_PROMPT_CHARS, max_total: int = MAX_TOTAL_CHARS) -> list[str]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
        raise PromptError("prompts must be a list of strings")
    if len(prompts) < min_count:
        raise PromptError(f"got {len(prompts)} prompts; at least {min_count} needed (32-128 unlabeled texts of the domain work best)")
    if len(prompts) > max_count:
        raise PromptError(f"got {len(prompts)} prompts; at most {max_count} are accepted")
    out, total = [], 0
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise PromptError(f"prompt {i} is a {type(p).__name__}, not a string")
        if not p.strip():
            raise PromptError(f"prompt {i} is empty")
        try:  # JSON's \ud800 escapes decode to lone surrogates, which no UTF-8 text (nor the tokenizer, nor the hash) holds
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PromptError(f"prompt {i} is not valid Unicode text: {e.reason} at character {e.start}") from None
        if len(p) > max_chars:
            raise PromptError(f"prompt {i} has {len(p)} characters; at most {max_chars} per prompt")
        total += len(p)
        if total > max_total:
            raise PromptError(f"the prompts hold more than {max_total} characters in all")
        out.append(p.strip())
    return out


def read_prompts(path: str | os.PathLike) -> list[str]:
    """A file (one prompt per line, or JSONL objects with "text"), or a folder of .txt files (one prompt each)."""
    path = Path(path)

    def text_of(p: Path) -> str:
        try:
            return p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise PromptError(f"{p} is not UTF-8 text (byte {e.start}): convert it first") from None

    if path.is_dir():
        files = sorted(q for q in path.rglob("*.txt") if q.is_file())
        if not files:
            raise PromptError(f"prompt folder {path} holds no .txt files")
        return [text_of(q) for q in files]
    if not path.is_file():
        raise PromptError(f"prompts {path} not found: give a text file (one prompt per line), a .jsonl file or a folder of .txt files")
    lines = [ln for ln in text_of(path).splitlines() if ln.strip()]
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        out = []
        for n, ln in enumerate(lines, 1):
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError as e:
                raise PromptError(f"{path} line {n} is not valid JSON: {e}") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise PromptError(f"{path} line {n} has no string field 'text'")
            out.append(rec["text"])
        return out
    return lines


def prompts_sha256(prompts: list[str]) -> str:
    """Identity of a prompt set (memory.json ``prompts.sha256``): the prompts joined by U+001E."""
    return hashlib.sha256("\x1e".join(prompts).encode("utf-8")).hexdigest()


def file_sha256(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(hashlib.sha256(Path(p).read_bytes()).hexdigest().encode())
    return h.hexdigest()


@dataclass
class Generator:
    """A loaded generator; keep one per process (generation is serialised by ``lock``)."""

    path: Path
    config: dict
    sha256: str
    layout: Layout
    decoder: HyperConvDecoder
    standardiser: Standardiser
    input_norm: InputNorm
    base_path: Path
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _base: object = field(default=None, repr=False)
    _tokenizer: object = field(default=None, repr=False)

    @property
    def first_layer(self) -> int:
        return int(self.config["encoder"]["layer"])

    @property
    def max_prompts(self) -> int:
        """Most prompts one generation accepts (fixed when the generator was built)."""
        return int(self.config["limits"]["max_prompts"])

    @property
    def scaling(self) -> float:
        return float(self.config["lora"]["alpha"]) / float(self.config["lora"]["rank"])

    def base(self):
        if self._base is None:
            from memories.base_model import load_base

            self._base = load_base(self.base_path)
        return self._base

    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.base_path))
        return self._tokenizer

    def windows(self, prompts: list[str]) -> np.ndarray:
        """The P prompt windows [P, T] the decoder reads."""
        tok = self.tokenizer()
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        stream = [t for ids in tok(prompts, add_special_tokens=False)["input_ids"] for t in ids + eos]
        T, P = int(self.config["encoder"]["prompt_tokens"]), int(self.config["encoder"]["prompts"])
        if not stream:
            raise PromptError("the prompts tokenise to nothing")
        while len(stream) < T:  # a very short prompt set: repeat it to fill one window
            stream = stream + stream
        windows = cut_windows(np.asarray(stream), T)
        n = len(windows)
        pick = np.arange(P) % n if n <= P else np.linspace(0, n - 1, P).round().astype(int)
        return windows[pick]

    @torch.no_grad()
    def adapter(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """PEFT tensors (``lora_A`` [r, in], ``lora_B`` [out, r]) for the prompts."""
        from memories.lora.topstack import states_entering

        prompts = validate_prompts(prompts, max_count=self.max_prompts)
        with self.lock:
            # the same precision as the training prompts were encoded in
            states = states_entering(self.base(), self.windows(prompts), self.first_layer, bf16=bool(self.config["encoder"].get("bf16", False)))
            z = self.decoder(self.input_norm(states).unsqueeze(0))[0]
        grid = self.standardiser.invert(z) * self.layout.mask()
        return untokenise(self.layout, grid)

    def deltas(self, adapter: dict[str, torch.Tensor]) -> dict[tuple[int, str], torch.Tensor]:
        return lora_deltas(adapter, self.scaling)


def save_generator(out: Path, config: dict, decoder: HyperConvDecoder, standardiser: Standardiser, input_norm: InputNorm) -> str:
    """Write generator.json + generator.safetensors + generator.sha256 into ``out``; return the sha256."""
    from safetensors.torch import save_file

    from memories.artifact import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"decoder.{k}": v.detach().contiguous() for k, v in decoder.state_dict().items()}
    tensors.update(standardiser.tensors())
    tensors.update(input_norm.tensors())
    save_file(tensors, str(out / GENERATOR_WEIGHTS), metadata={"format": "pt"})
    write_json_atomic(out / GENERATOR_JSON, config)
    sha = file_sha256(out / GENERATOR_JSON, out / GENERATOR_WEIGHTS)
    (out / GENERATOR_SHA).write_text(sha + "\n")
    return sha


def load_generator(path: str | os.PathLike, base: str | os.PathLike | None = None) -> Generator:
    """Load a generator directory (checks its sha256); ``base`` overrides the base directory it records.

    The base itself is loaded lazily, on the first generation.
    """
    from safetensors.torch import load_file

    path = Path(path)
    for name in (GENERATOR_JSON, GENERATOR_WEIGHTS, GENERATOR_SHA):
        if not (path / name).is_file():
            raise GeneratorError(f"{path} is not a generator directory: {name} missing (build one with `memserve generator build` or `demo`)")
    sha = file_sha256(path / GENERATOR_JSON, path / GENERATOR_WEIGHTS)
    recorded = (path / GENERATOR_SHA).read_text().strip()
    if sha != recorded:
        raise GeneratorError(f"generator {path}: files do not match {GENERATOR_SHA} (recorded {recorded[:12]}, found {sha[:12]}); the directory was changed or half-copied")
    config = json.loads((path / GENERATOR_JSON).read_text())
    tensors = load_file(str(path / GENERATOR_WEIGHTS))
    decoder = HyperConvDecoder(HyperConvConfig.from_dict(config["hyperconv"]))
    decoder.load_state_dict({k.removeprefix("decoder."): v for k, v in tensors.items() if k.startswith("decoder.")})
    decoder.eval()
    base_path = Path(base) if base else Path(config["base_path"])
    if not (base_path / "config.json").is_file():
        raise GeneratorError(f"generator {path}: base {base_path} not found; pass the base directory (--base)")
    gen = Generator(path, config, sha, Layout.from_dict(config["layout"]), decoder, Standardiser.from_tensors(tensors), InputNorm.from_tensors(tensors), base_path)
    if base:
        from memories.artifact import tokenizer_sha256

        if tokenizer_sha256(gen.tokenizer()) != config["tokenizer_sha256"]:
            raise GeneratorError(f"generator {path} was trained for a base with another tokenizer than {base_path}")
    return gen


def adapter_config(gen: Generator) -> dict:
    lora = gen.config["lora"]
    return {
        "base_model_name_or_path": str(gen.base_path),
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(lora["rank"]),
        "lora_alpha": float(lora["alpha"]),
        "lora_dropout": 0.0,
        "target_modules": list(lora["modules"]),
        "layers_to_transform": list(lora["layer_ids"]),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }


def write_adapter(gen: Generator, adapter: dict[str, torch.Tensor], target: Path, card: dict, overwrite: bool = False, routing=None) -> None:
    """PEFT dir + memory.json (+ routing.json from ``routing``, a ``memories.routing.Profile``), written into a temporary sibling and renamed into place."""
    from safetensors.torch import save_file

    from memories.artifact import write_json_atomic
    from memories.stage import publish_dir

    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists (choose another --out/--name, or overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file({k: v.contiguous() for k, v in adapter.items()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        write_json_atomic(tmp / ADAPTER_CONFIG, adapter_config(gen))
        write_json_atomic(tmp / "memory.json", card)
        if routing is not None:
            from memories.routing import write_profile

            write_profile(tmp, routing)
        publish_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def generate_memory(generator: Generator | str | os.PathLike, prompts: list[str], name: str, path: str | os.PathLike, domain: str | None = None, description: str = "", overwrite: bool = False) -> dict:
    """Generate a LoRA from ``prompts`` and write the ``lora`` memory to ``path`` (the memory's own folder).

    Returns the memory.json card plus ``"seconds"`` (generation + writing).
    """
    started = time.time()
    gen = generator if isinstance(generator, Generator) else load_generator(generator)
    if not isinstance(name, str) or not name.strip() or "/" in name or name.startswith("."):
        raise PromptError(f"memory name {name!r}: give a non-empty name without '/' that does not start with '.'")
    prompts = validate_prompts(prompts, max_count=gen.max_prompts)
    adapter = gen.adapter(prompts)
    card = {
        "format": 1,
        "kind": "lora",
        "name": name,
        "domain": domain or name,
        "base_model": gen.config["base_model"],
        "description": description or f"LoRA generated from {len(prompts)} prompts by the generator {gen.sha256[:12]}",
        "tokenizer_sha256": gen.config["tokenizer_sha256"],
        "rank": int(gen.config["lora"]["rank"]),
        "lora_alpha": float(gen.config["lora"]["alpha"]),
        "target_modules": list(gen.config["lora"]["modules"]),
        "generator": gen.sha256,
        "prompts": {"count": len(prompts), "sha256": prompts_sha256(prompts)},
    }
    from memories.routing import profile_from_texts

    routing = profile_from_texts(prompts, gen.tokenizer(), source="prompts")  # the base's tokenizer: domain "auto" routes on it
    write_adapter(gen, adapter, Path(path), card, overwrite=overwrite, routing=routing)
    seconds = round(time.time() - started, 3)
    log.info("generated lora memory %r from %d prompts in %.2fs → %s", name, len(prompts), seconds, path)
    return {**card, "seconds": seconds}
