"""The engine's dtype and thread layout follow the CPU, and the user's own flags and variables always win."""

from __future__ import annotations

import pytest

from server.engine.cpu_defaults import Machine, choose, cpu_list, parse_cpu_list, read_machine

AVX2 = frozenset("fpu sse2 avx avx2 fma".split())
AVX512_BF16 = AVX2 | {"avx512f", "avx512_bf16"}
AMX = AVX2 | {"avx512f", "amx_tile", "amx_bf16"}


def machine(flags=AVX2, cpus=2, cores=None, arch="x86_64") -> Machine:
    return Machine(arch, "Test CPU", frozenset(flags), tuple(range(cpus)), cores or cpus)


def test_avx2_only_runs_fp32():
    choice = choose(machine(AVX2), {}, [])
    assert choice.engine_args == ["--dtype", "float32"]
    assert choice.dtype == "float32"
    assert "no native bf16" in choice.log[0] and "--dtype bfloat16" in choice.log[0]


@pytest.mark.parametrize("flags, flag", [(AVX512_BF16, "avx512_bf16"), (AMX, "amx_bf16")])
def test_native_bf16_runs_bf16(flags, flag):
    choice = choose(machine(flags), {}, [])
    assert choice.engine_args == ["--dtype", "bfloat16"]
    assert choice.dtype == "bfloat16"
    assert flag in choice.log[0] and "--dtype float32" in choice.log[0]


@pytest.mark.parametrize("args", [["--dtype", "bfloat16"], ["--dtype=bfloat16"]])
def test_users_dtype_wins(args):
    choice = choose(machine(AVX2), {}, ["--max-num-seqs", "4", *args])
    assert choice.engine_args == []
    assert choice.dtype == "bfloat16"
    assert "your --dtype" in choice.log[0]


def test_users_dtype_alias_is_reported_as_the_dtype_it_names():
    assert choose(machine(AVX512_BF16), {}, ["--dtype", "float"]).dtype == "float32"


def test_dtype_is_left_to_vllm_off_x86():
    choice = choose(machine(frozenset({"fp", "asimd", "bf16"}), arch="aarch64"), {}, [])
    assert choice.engine_args == [] and choice.dtype == "auto"


def test_small_machine_gives_the_worker_every_cpu():
    choice = choose(machine(cpus=2), {}, [])
    assert choice.env == {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert choice.worker_threads == 2
    assert "VLLM_CPU_OMP_THREADS_BIND" in choice.log[1]


def test_small_machine_binds_exactly_the_cpus_it_may_use():
    m = Machine("x86_64", "Test CPU", AVX2, (2, 3, 7), 3)
    assert choose(m, {}, []).env["VLLM_CPU_OMP_THREADS_BIND"] == "2-3,7"


@pytest.mark.parametrize("env", [{"VLLM_CPU_OMP_THREADS_BIND": "0"}, {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}])
def test_users_layout_variables_win(env):
    choice = choose(machine(cpus=2), env, [])
    assert choice.env == {}
    assert "your VLLM_CPU_" in choice.log[1]
    assert choice.worker_threads == 1


def test_large_machine_keeps_vllms_layout():
    choice = choose(machine(cpus=32, cores=16), {}, [])
    assert choice.env == {}
    assert choice.worker_threads == 15  # one thread per physical core, one core reserved


def test_several_workers_on_a_small_machine_share_its_cpus():
    """vLLM's own layout wants a NUMA node per worker and refuses to start a small one-node machine's tensor-parallel engine."""
    choice = choose(machine(cpus=4), {}, [], world_size=2)
    assert choice.env == {"VLLM_CPU_OMP_THREADS_BIND": "0-1|2-3", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert choice.worker_threads == 2
    assert choose(machine(cpus=2), {}, [], world_size=2).env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"


def test_several_workers_on_a_large_machine_keep_vllms_layout():
    choice = choose(machine(cpus=32, cores=16), {}, [], world_size=2)
    assert choice.env == {}
    assert choice.worker_threads == 7  # (16 physical cores - one reserved per worker) / 2


def test_every_choice_is_logged_with_how_to_override():
    for line in choose(machine(), {}, []).log:
        assert "override" in line


@pytest.mark.parametrize("cpus, text", [((0,), "0"), ((0, 1, 2, 5), "0-2,5"), ((1, 3), "1,3")])
def test_cpu_list_round_trips(cpus, text):
    assert cpu_list(cpus) == text
    assert tuple(parse_cpu_list(text)) == cpus


CPUINFO = """processor\t: {n}
model name\t: Fake EPYC
physical id\t: 0
core id\t: {core}
flags\t\t: fpu avx2 avx512f avx512_bf16
"""


def test_read_machine_applies_the_cgroup_quota_and_counts_physical_cores(tmp_path, monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    (tmp_path / "cpuinfo").write_text("\n".join(CPUINFO.format(n=n, core=n // 2) for n in range(4)))
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    m = read_machine(tmp_path / "cpuinfo", tmp_path)
    assert m.cpus == (0, 1) and m.physical_cores == 1
    assert m.model_name == "Fake EPYC" and "avx512_bf16" in m.flags
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert read_machine(tmp_path / "cpuinfo", tmp_path).cpus == (0, 1, 2, 3)
