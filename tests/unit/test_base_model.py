"""The converted default base is stored in bf16, with no quantization marker left behind."""

from __future__ import annotations

import json

import torch
import transformers
from safetensors.torch import load_file

from memories.base_model import convert_gguf


def test_conversion_writes_bf16_weights_equal_to_the_rounded_dequantized_ones(tiny, tmp_path, monkeypatch):
    # Stand-in for transformers' GGUF reader: the tiny fp32 base, marked as quantized the way a GGUF load is.
    load_model, load_tokenizer = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def dequantized(path, gguf_file, dtype):
        assert dtype == torch.float32
        model = load_model(tiny["base"], dtype=dtype)
        model.config.quantization_config = {"quant_method": "gguf"}
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", dequantized)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda path, gguf_file: load_tokenizer(tiny["tokenizer"]))
    out = tmp_path / "hf"
    convert_gguf(tmp_path / "model.gguf", out)

    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    stored = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    reference = load_file(tiny["base"] / "model.safetensors")
    assert stored and {t.dtype for t in stored.values()} == {torch.bfloat16}
    for name, tensor in stored.items():
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name
    assert (out / "tokenizer.json").exists()
