"""Engine set-ups that would serve memory rows wrongly are refused at start, each naming its flag."""

from __future__ import annotations

from argparse import Namespace

import pytest
import torch

from server.engine.client import unsupported


@pytest.fixture(autouse=True)
def _v1_runner(monkeypatch):
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    monkeypatch.delenv("VLLM_ATTENTION_BACKEND", raising=False)


def plain(**kw) -> Namespace:
    return Namespace(**{"async_scheduling": False, "speculative_config": None, "attention_backend": None, **kw})


def test_a_plain_engine_is_served():
    assert unsupported(plain()) == []  # these machines run the CPU platform


@pytest.mark.parametrize(
    "args, flag",
    [(plain(async_scheduling=True), "--async-scheduling"), (plain(speculative_config={"method": "ngram"}), "--speculative-config")],
)
def test_each_unsupported_flag_is_named(args, flag):
    (reason,) = unsupported(args)
    assert reason.startswith(flag)


def test_model_runner_v2_serves_decoder_memories_and_refuses_calm(monkeypatch):
    """Under V2 memserve's model state keeps the rows (server/worker/v2_state.py): decoder memories only, and no attention-metadata spans needed."""
    import server.engine.client as client

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    monkeypatch.setattr(client, "on_cpu", lambda: False)  # V2 runs where Triton does: a GPU
    assert unsupported(plain()) == []  # whatever attention backend vLLM picks
    (reason,) = unsupported(plain(), calm=True)
    assert reason.startswith("VLLM_USE_V2_MODEL_RUNNER=1 with calm memories") and "--calm off" in reason
    (reason,) = unsupported(plain(enable_dbo=True))
    assert reason.startswith("--enable-dbo")
    assert len(unsupported(plain(ubatch_size=2))) == 1
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    assert unsupported(plain(attention_backend="FLASH_ATTN", enable_dbo=True), calm=True) == []  # V1: calm served, spans from the metadata


def test_model_runner_v2_on_a_cpu_without_triton_is_named(monkeypatch):
    """vLLM-CPU's V2 runner is V2's GPU runner (vllm/v1/worker/cpu/model_runner.py), whose step preparation is Triton kernels."""
    import server.engine.client as client

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    monkeypatch.setattr(client, "_has_triton", lambda: False)
    (reason,) = unsupported(plain())
    assert "VLLM_USE_V2_MODEL_RUNNER=1 on this CPU" in reason and "Triton" in reason
    assert len(unsupported(plain(), calm=True)) == 2


def test_this_machines_triton_cannot_run_model_runner_v2():
    """Why V2 cannot be exercised here: vLLM disables Triton without its CPU backend, and V2's kernels are then plain functions."""
    import server.engine.client as client
    from vllm.v1.worker.gpu.input_batch import prepare_pos_seq_lens

    if client._has_triton():
        pytest.skip("this machine's Triton has a CPU backend")
    with pytest.raises(TypeError, match="not subscriptable"):
        prepare_pos_seq_lens(torch.tensor([0]), torch.tensor([0, 3], dtype=torch.int32), torch.zeros(1, dtype=torch.int32), torch.zeros(8, dtype=torch.int64), torch.zeros(1, dtype=torch.int32))


def test_a_gpu_needs_an_attention_backend_with_token_spans(monkeypatch):
    """memserve's model finds each row's tokens in the attention metadata (query_start_loc), for calm and decoder memories alike."""
    import server.engine.client as client

    monkeypatch.setattr(client, "on_cpu", lambda: False)
    (reason,) = unsupported(plain())
    assert "query_start_loc" in reason and "--attention-backend" in reason
    assert unsupported(plain(attention_backend="FLASH_ATTN")) == []


def test_decoder_slots_run_tensor_parallel_but_not_in_pipeline_stages():
    from server.engine.keys import MEMORY_SLOTS

    slots = {"hf_overrides": {MEMORY_SLOTS: 4}}
    assert unsupported(plain(tensor_parallel_size=2, **slots)) == []  # each rank holds its share (server/worker/bank.py Shard)
    (reason,) = unsupported(plain(pipeline_parallel_size=2, **slots))
    assert "--pipeline-parallel-size" in reason and "--decoder-slots 0" in reason
    assert unsupported(plain(pipeline_parallel_size=2, hf_overrides={MEMORY_SLOTS: 0})) == []
