"""The benchmark's statistics and its record of what it measured on."""

from __future__ import annotations

import pytest
import torch

from bench.reference_loop import reference_throughput
from bench.run import describe_setup, markdown
from bench.workload import percentile
from tests.tiny_models import build_all


def test_p99_is_the_99th_percentile_not_the_mean():
    gaps = sorted([0.01] * 990 + [1.0] * 10)
    assert percentile(gaps, 99) == 0.01
    assert percentile(sorted([0.01] * 980 + [1.0] * 20), 99) == 1.0
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile(list(range(1, 101)), 50) == 50


def test_reference_loop_reports_per_step_latencies_and_restores_threads(tmp_path):
    models = build_all(tmp_path)
    before = torch.get_num_threads()
    r = reference_throughput(str(models["base"]), str(models["alpha"]), [[5, 6, 7, 8]] * 2, 6, "bfloat16", 1)
    assert torch.get_num_threads() == before
    assert r["output_tokens_per_s"] > 0
    assert 0 < r["itl_p50_s"] <= r["itl_p99_s"]


def test_setup_records_machine_engine_and_versions():
    setup = describe_setup(["--dtype", "float32"], {"VLLM_CPU_OMP_THREADS_BIND": "0"})
    assert setup["engine"]["dtype"] == "float32" and setup["engine"]["worker_threads"] == 1
    assert setup["machine"]["cpu"] and setup["machine"]["cpus"] >= 1
    assert set(setup["versions"]) == {"torch", "vllm", "transformers", "memserve"}


def test_table_has_a_row_per_stream_count_and_scenario():
    setup = describe_setup([], {})
    stats = {"output_tokens_per_s": 10.0, "ttft_p50_s": 0.1, "itl_p50_s": 0.01, "itl_p99_s": 0.02, "ratio_to_base": 1.0}
    runs = [{"streams": n, "scenarios": {"base": stats, "memory": stats}} for n in (1, 8)]
    text = markdown({**setup, "compute_bound": 0.7, "prompt_len": 32, "output_len": 32, "runs": runs})
    assert "| 1 | base |" in text and "| 8 | memory |" in text
    assert setup["engine"]["dtype"] in text and "flags:" in text


def test_thin_default_memory_is_a_valid_thin_artifact(tmp_path, monkeypatch, tiny):
    import json

    from safetensors import safe_open
    from transformers import AutoTokenizer

    from bench.run import default_memory
    from memories.artifact import check_compatible, read_card

    monkeypatch.setenv("MEMSERVE_CACHE", str(tmp_path))
    memory = default_memory(tiny["base"], 1, thin=True)
    card = read_card(memory, "m")
    check_compatible(card, AutoTokenizer.from_pretrained(tiny["tokenizer"]), json.loads((tiny["base"] / "config.json").read_text()))
    with safe_open(str(next(memory.glob("*.safetensors"))), "pt") as f:
        assert not any(k.endswith(("embed_tokens.weight", "lm_head.weight")) for k in f.keys())


def test_a_calm_memory_costs_its_augmenting_layers_and_composition_not_its_head(tiny, tmp_path):
    from transformers import AutoTokenizer

    from bench.flops import compute_bound, flops_per_token, memory_flops_per_token
    from tests.tiny_models import build_calm, build_llama

    augment = build_llama(tmp_path / "aug", AutoTokenizer.from_pretrained(tiny["tokenizer"]), layers=2, seed=3)
    calm = build_calm(tmp_path / "cal", tiny["base"], augment, [(0, 0), (1, 1)])
    head = 2.0 * 128 * 320
    composition = 2.0 * 2 * (128 * 128 + 4 * 128 * 128)
    assert memory_flops_per_token(calm) == flops_per_token(augment) - head + composition
    assert memory_flops_per_token(tiny["alpha"]) == flops_per_token(tiny["alpha"])  # a decoder memory: its whole forward
    base = flops_per_token(tiny["base"])
    assert compute_bound(tiny["base"], calm) == base / (base + memory_flops_per_token(calm))


def test_a_lora_memory_costs_its_adapter_once_per_token(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from memories.flops import memory_flops_per_token
    from tests.tiny_models import build_lora

    lora = build_lora(tmp_path / "lora", tiny["base"], rank=4)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["base"]), str(lora))
    adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert adapter > 0 and memory_flops_per_token(lora) == 2.0 * adapter


def test_mixture_compute_bound_counts_both_memories(tiny):
    """A request fusing two memories runs the base and both: base ÷ (base + 2 × memory) FLOPs."""
    from bench.flops import compute_bound, flops_per_token, mixture_bound

    base, alpha, beta = flops_per_token(tiny["base"]), flops_per_token(tiny["alpha"]), flops_per_token(tiny["beta"])
    assert mixture_bound(tiny["base"], [tiny["alpha"], tiny["beta"]]) == pytest.approx(base / (base + alpha + beta))
    assert mixture_bound(tiny["base"], [tiny["alpha"]]) == compute_bound(tiny["base"], tiny["alpha"])
    two = mixture_bound(tiny["base"], [tiny["alpha"]] * 2)
    assert two == pytest.approx(base / (base + 2 * alpha)) and two < compute_bound(tiny["base"], tiny["alpha"])


def test_mixture_scenario_sends_two_memories_and_reports_against_its_bound():
    from bench.run import MEMORY_NAMES, MIXTURE, SCENARIOS, build_parser

    assert "mixture" in SCENARIOS and list(MIXTURE) == list(MEMORY_NAMES[:2]) and sum(MIXTURE.values()) <= 1
    assert build_parser().parse_args(["--scenarios", "memory,mixture"]).scenarios == ["memory", "mixture"]
    setup = describe_setup([], {})
    stats = lambda tps: {"output_tokens_per_s": tps, "ttft_p50_s": 0.1, "itl_p50_s": 0.01, "itl_p99_s": 0.02, "ratio_to_base": 1.0}  # noqa: E731
    runs = [{"streams": 8, "scenarios": {"memory": stats(100.0), "mixture": stats(60.0)}}]
    text = markdown({**setup, "compute_bound": 0.75, "mixture_bound": 0.6, "prompt_len": 32, "output_len": 32, "runs": runs})
    assert "| 8 | mixture |" in text
    assert "mixture of two ÷ single-memory = 0.600" in text and "= 0.800, so 0.75 × the bound" in text


def test_rounds_give_medians_and_within_round_ratios_with_their_spread():
    from bench.run import summarize_rounds

    def stats(tps):
        return {"output_tokens_per_s": tps, "ttft_p50_s": 0.1, "itl_p50_s": 0.01, "itl_p99_s": 0.02}

    # the machine slows down in round 2: both scenarios move, their ratio does not
    rounds = [{"base": stats(100.0), "memory": stats(50.0)}, {"memory": stats(20.0), "base": stats(40.0)}, {"base": stats(90.0), "memory": stats(54.0)}]
    out = summarize_rounds(rounds)
    assert out["base"]["output_tokens_per_s"] == 90.0 and out["memory"]["output_tokens_per_s"] == 50.0
    assert out["memory"]["ratio_to_base"] == 0.5 and out["memory"]["ratio_spread"] == [0.5, 0.6]
    assert out["memory"]["rounds"] == 3
    text = markdown({**describe_setup([], {}), "compute_bound": 0.5, "prompt_len": 32, "output_len": 32, "runs": [{"streams": 1, "scenarios": out}]})
    assert "| 1 | memory | 50.0 |" in text and "0.500 (0.500–0.600, 3 rounds)" in text


def test_plain_scenario_reports_base_rows_against_a_server_without_memories():
    from bench.run import SCENARIOS, targets

    assert "plain" in SCENARIOS
    stats = lambda tps: {"output_tokens_per_s": tps, "ratio_to_base": 1.0}  # noqa: E731
    lines = targets(8, {"base": stats(97.0), "plain": stats(100.0)}, 0.5)
    assert lines == ["- 8 streams: base rows with memories loaded ÷ a server without memories = 0.970 (target ≥ 0.97)"]
