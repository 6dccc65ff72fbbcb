"""A real server logs the dtype and thread layout it chose for this machine, and vLLM's worker runs with them."""

from __future__ import annotations

import os
import re

import pytest

from server.engine.cpu_defaults import choose, parse_cpu_list, read_machine
from tests.conftest import FP32


def test_server_logs_its_cpu_choices_and_vllm_applies_them(server):
    expected = choose(read_machine(), dict(os.environ), FP32[1:])
    text = server.log_path.read_text()
    for line in expected.log:
        assert line in text
    bind = expected.env.get("VLLM_CPU_OMP_THREADS_BIND")
    if bind is None:
        pytest.skip("this machine keeps vLLM's own thread layout")
    cores = re.search(r"local_rank=0, core ids=\[([\d, ]*)\]", text)
    assert cores, "vLLM's thread binding line is missing from the server log"
    assert [int(c) for c in cores.group(1).split(",")] == parse_cpu_list(bind)
    assert "reserved_cpus=[]" in text
