"""Three replicas on one machine sharing one memory root converge on a memory loaded through one."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest

from server.launcher import ServerProcess, server_env
from tests.conftest import FP32

TOKEN = "fleet-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def fleet(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("shared-root")
    shutil.copytree(tiny["alpha"], root / "alpha")
    procs = []
    # replicas 0 and 1 reconcile every second; replica 2 only at start and on admin calls
    for i, interval in enumerate(("1", "1", "0")):
        workdir = tmp_path_factory.mktemp(f"replica{i}")
        args = ["--model", str(tiny["base"]), "--served-model-name", "tiny-base", "--max-model-len", "512"]
        args += ["--memory-root", str(root), "--admin-token", TOKEN, "--reconcile-interval", interval, *FP32]
        # in-process engines start in seconds; the multiprocess path is covered by the other API tests
        procs.append(ServerProcess(args, workdir, env=server_env(workdir, VLLM_ENABLE_V1_MULTIPROCESSING="0")))
    try:
        for p in procs:
            p.wait_ready()
        yield procs
    finally:
        for p in procs:
            p.stop()


def hashes(proc) -> dict[str, str]:
    r = httpx.get(proc.url + "/admin/memories", headers=AUTH, timeout=60)
    return {m["name"]: m["content_sha256"] for m in r.json()["data"]}


def ask(proc, domain):
    return httpx.post(proc.url + "/v1/completions", json={"model": "tiny-base", "prompt": "the gene", "max_tokens": 4, "temperature": 0, "domain": domain}, timeout=60)


def test_replicas_converge(fleet):
    first, second, lazy = fleet
    r = httpx.post(first.url + "/admin/memories", json={"name": "shared", "path": "alpha"}, headers=AUTH, timeout=120)
    assert r.status_code == 201, r.text
    sha = r.json()["content_sha256"]

    # the lazy replica has not reconciled: a clear retryable error, never silently the base
    early = ask(lazy, "shared")
    assert early.status_code == 503 and int(early.headers["Retry-After"]) >= 1
    assert early.json()["error"]["param"] == "domain"

    deadline = time.time() + 30
    while hashes(second).get("shared") != sha:
        assert time.time() < deadline, "replica 1 did not converge in 30 s"
        time.sleep(0.5)
    assert hashes(lazy).get("shared") == sha  # an admin call reconciles
    texts = {ask(p, "shared").json()["choices"][0]["text"] for p in fleet}
    assert len(texts) == 1

    assert httpx.delete(second.url + "/admin/memories/shared", headers=AUTH, timeout=120).status_code == 200
    deadline = time.time() + 30
    while "shared" in hashes(first):
        assert time.time() < deadline, "replica 0 did not drop the memory in 30 s"
        time.sleep(0.5)
    assert ask(first, "shared").status_code == 404
