"""Tiny random models and a tokenizer trained on the spot: the whole suite needs no hub."""

from __future__ import annotations

import json
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = (
    "the cell protein gene patient study result market share price court law contract party "
    "shall agreement license tumor dose trial growth bank rate profit loss clause term notice"
).split()


def corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) + "." for _ in range(n_lines)]


def build_tokenizer(out: Path, vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_llama(out: Path, tokenizer, layers: int, seed: int, hidden: int = 128, vocab_size: int | None = None, memory_json: dict | None = None, ship_tokenizer: bool = True, tied: bool = False) -> Path:
    """A random Llama with head size 64 (vLLM's CPU attention needs it) and peaked outputs; ``tied``: one embedding for input and output, as SmolLM2."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=tied,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a larger output layer makes greedy choices robust to float noise
        model.lm_head.weight.mul_(1.0 if tied else 8.0)  # (tied, it would scale the input embedding too)
    model.save_pretrained(out, safe_serialization=True)
    if ship_tokenizer:
        tokenizer.save_pretrained(out)
    if memory_json is not None:
        (out / "memory.json").write_text(json.dumps({"format": 1, **memory_json}))
    return out


def build_all(root: Path) -> dict[str, Path]:
    """base + two memories (different depths and seeds) sharing one tokenizer."""
    tok_dir = root / "tokenizer"
    tok = build_tokenizer(tok_dir)
    return {
        "base": build_llama(root / "base", tok, layers=2, seed=1),
        "alpha": build_llama(root / "alpha", tok, layers=1, seed=2, memory_json={"name": "alpha", "lambda": 0.5, "temperature": 1.0}),
        "beta": build_llama(root / "beta", tok, layers=2, seed=3, memory_json={"name": "beta", "lambda": 0.3, "temperature": 0.8}),
        "tokenizer": tok_dir,
    }


def poisoned_copy(src: Path, out: Path, tensor: str = "model.layers.0.mlp.up_proj.weight", value: float = float("nan")) -> Path:
    """A copy of a memory with one weight set to ``value`` (NaN by default): an artifact that must be refused."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    (weights,) = out.glob("*.safetensors")
    tensors = load_file(str(weights))
    tensors[tensor][0, 0] = value
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return out


def base_embedding_pair(memory: Path, base: Path, root: Path) -> tuple[Path, Path]:
    """Two versions of ``memory`` that run on ``base``'s token embedding and head: one storing copies, one thin.

    The thin one leaves both tensors out and says ``"embeddings": "base"``; served on that
    base, the two must give the same distributions.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    base_weights = load_file(str(base / "model.safetensors"))
    base_weights.setdefault("lm_head.weight", base_weights["model.embed_tokens.weight"])  # a tied base stores one
    full, thin = root / f"{memory.name}-full", root / f"{memory.name}-thin"
    for out in (full, thin):
        shutil.copytree(memory, out)
        (weights,) = out.glob("*.safetensors")
        tensors = load_file(str(weights))
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors.pop(key, None)
            if out is full:
                tensors[key] = base_weights[key].clone()
        save_file(tensors, str(weights), metadata={"format": "pt"})
    card = json.loads((memory / "memory.json").read_text()) if (memory / "memory.json").exists() else {"format": 1}
    (thin / "memory.json").write_text(json.dumps({**card, "embeddings": "base"}))
    return full, thin


def base_tensors_of(base: Path) -> dict:
    """The base's embedding and head as the worker hands them to a thin memory (unit tests have no engine)."""
    from safetensors.torch import load_file

    weights = load_file(str(base / "model.safetensors"))
    embed = weights["model.embed_tokens.weight"]
    return {"embed_tokens.weight": embed, "lm_head.weight": weights.get("lm_head.weight", embed)}


LORA_TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")


def build_lora(out: Path, base: Path, rank: int = 8, seed: int = 0, targets=LORA_TARGETS, scale: float = 0.5, memory_json: dict | None = None) -> Path:
    """A PEFT LoRA for ``base``, saved by PEFT itself; lora_B is random (PEFT starts it at zero), so the adapter changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), lora_dropout=0.0))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * scale)
    peft_model.save_pretrained(out)
    if memory_json is not None:
        (out / "memory.json").write_text(json.dumps({"format": 1, "kind": "lora", **memory_json}))
    return out


def edit_lora(src: Path, out: Path, edit) -> Path:
    """A copy of an adapter whose tensors ``edit(dict)`` changed in place: artifacts that must be refused."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    weights = out / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    edit(tensors)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return out


def build_calm(out: Path, base: Path, augment: Path, connections: list[tuple[int, int]], heads: int = 2, seed: int = 0, gate: float = 0.5, name: str | None = None) -> Path:
    """A calm memory with a random composition whose gates are open, so that it changes the base's outputs."""
    import shutil

    import torch

    from memories.calm.composition import AUGMENT_DIR, COMPOSITION_FILE, Composition, CompositionSpec

    base_cfg = json.loads((base / "config.json").read_text())
    aug_cfg = json.loads((augment / "config.json").read_text())
    spec = CompositionSpec(tuple(connections), aug_cfg["hidden_size"], base_cfg["hidden_size"], heads)
    torch.manual_seed(seed)
    comp = Composition(spec)
    with torch.no_grad():
        for c in comp.connections:
            c.gate.fill_(gate)
            for lin in (c.q, c.k, c.v, c.o, c.proj):
                lin.weight.mul_(4.0)  # default init is too timid to move a random base's greedy tokens
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(augment, out / AUGMENT_DIR, dirs_exist_ok=True)
    (out / AUGMENT_DIR / "memory.json").unlink(missing_ok=True)
    comp.save(out / COMPOSITION_FILE)
    card = {"format": 1, "kind": "calm", "name": name or out.name, "base_model": "tiny", **spec.card_fields()}
    (out / "memory.json").write_text(json.dumps(card))
    return out
