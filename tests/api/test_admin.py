"""Admin API through a real server: hot load, replace, unload under load; persistence; the CLI client.

Auth, every refusal of a load and the admin limits are tests/app/test_app_admin.py's, in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server.launcher import ROOT, ServerProcess
from tests.conftest import FP32

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def root(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("memory-root")
    for name in ("alpha", "beta"):
        shutil.copytree(tiny[name], root / name)
    return root


def start_admin_server(tiny, root, workdir, *extra):
    args = ["--model", str(tiny["base"]), "--served-model-name", "tiny-base", "--max-model-len", "1024"]
    # LoRA off: this module serves decoder memories on vLLM without its LoRA path (tests/api/test_lora.py has it on)
    args += ["--memory-root", str(root), "--admin-token", TOKEN, "--reconcile-interval", "1", "--max-memories", "3", "--max-loras", "0", *extra, *FP32]
    proc = ServerProcess(args, workdir)
    proc.wait_ready()
    return proc


@pytest.fixture(scope="module")
def admin_server(tiny, root, tmp_path_factory):
    proc = start_admin_server(tiny, root, tmp_path_factory.mktemp("admin-server"))
    yield proc
    proc.stop()


def admin(server, method, path="/admin/memories", body=None, headers=AUTH):
    return httpx.request(method, server.url + path, json=body, headers=headers, timeout=300)


def generate(server, domain=None, max_tokens=24, prompt="the cell protein gene"):
    body = {"model": "tiny-base", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    if domain:
        body["domain"] = domain
    return httpx.post(server.url + "/v1/completions", json=body, timeout=300)


class Stream(threading.Thread):
    """A streamed completion in the background; ``started`` is set at its first token."""

    def __init__(self, server, domain=None, max_tokens=48, prompt="court law contract party", **extra):
        super().__init__(daemon=True)
        self.server, self.domain, self.max_tokens, self.prompt, self.extra = server, domain, max_tokens, prompt, extra
        self.started = threading.Event()
        self.tokens: list[int] = []
        self.error: str | None = None

    def run(self):
        body = {"model": "tiny-base", "prompt": self.prompt, "max_tokens": self.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True, **self.extra}
        if self.domain:
            body["domain"] = self.domain
        try:
            with httpx.stream("POST", self.server.url + "/v1/completions", json=body, timeout=300) as r:
                if r.status_code != 200:
                    self.error = f"{r.status_code}: {r.read()!r}"
                    return
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    data = json.loads(line[6:])
                    if "error" in data:
                        self.error = data["error"]["message"]
                        return
                    for c in data.get("choices", []):
                        self.tokens += c.get("token_ids") or []
                    self.started.set()
        except Exception as e:  # surfaced by the test's assertions
            self.error = repr(e)
        finally:
            self.started.set()


def run_streams(streams):
    for s in streams:
        s.start()
    return streams


def test_load_during_base_streams_then_use_then_unload_during_stream(admin_server):
    alone = [generate(admin_server, max_tokens=48, prompt=p).json()["choices"][0]["token_ids"] for p in ("court law contract party",)]
    streams = run_streams([Stream(admin_server) for _ in range(8)])
    for s in streams:
        assert s.started.wait(120)
    r = admin(admin_server, "POST", body={"name": "gamma", "path": "alpha", "memory_weight": 0.6})
    assert r.status_code == 201, r.text
    card = r.json()
    assert card["name"] == "gamma" and card["memory_weight"] == 0.6 and card["num_parameters"] > 0 and card["device_bytes"] > 0
    for s in streams:
        s.join(120)
        assert s.error is None and s.tokens == alone[0]

    models = httpx.get(admin_server.url + "/v1/models").json()["data"]
    assert any(m["id"] == "gamma" and m["parent"] == "tiny-base" for m in models)
    fused = generate(admin_server, "gamma")
    assert fused.status_code == 200
    assert fused.json()["choices"][0]["token_ids"] != generate(admin_server).json()["choices"][0]["token_ids"]

    expected = generate(admin_server, "gamma", max_tokens=80).json()["choices"][0]["token_ids"]
    stream = run_streams([Stream(admin_server, "gamma", max_tokens=80, prompt="the cell protein gene")])[0]
    assert stream.started.wait(120)
    r = admin(admin_server, "DELETE", "/admin/memories/gamma")
    assert r.status_code == 200 and r.json()["drained"] is True and r.json()["freed_bytes"] > 0
    stream.join(120)
    assert stream.error is None and stream.tokens == expected  # finished on the memory
    assert generate(admin_server, "gamma").status_code == 404
    assert admin(admin_server, "DELETE", "/admin/memories/gamma").status_code == 404


def test_replace_under_load(admin_server):
    assert admin(admin_server, "POST", body={"name": "delta", "path": "alpha"}).status_code == 201
    old = generate(admin_server, "delta", max_tokens=60).json()["choices"][0]["token_ids"]
    streams = run_streams([Stream(admin_server, "delta", max_tokens=60, prompt="the cell protein gene") for _ in range(4)])
    for s in streams:
        assert s.started.wait(120)
    r = admin(admin_server, "POST", body={"name": "delta", "path": "beta", "replace": True})
    assert r.status_code == 201, r.text
    new = generate(admin_server, "delta", max_tokens=60).json()["choices"][0]["token_ids"]
    for s in streams:
        s.join(120)
        assert s.error is None and s.tokens == old  # running requests finished on the old version
    assert new != old
    assert admin(admin_server, "POST", body={"name": "delta", "path": "alpha"}).status_code == 409
    assert admin(admin_server, "DELETE", "/admin/memories/delta").status_code == 200


def test_unload_timeout_ends_running_requests_with_an_error(admin_server):
    assert admin(admin_server, "POST", body={"name": "brief", "path": "alpha"}).status_code == 201
    with httpx.Client(base_url=admin_server.url, headers=AUTH, timeout=120) as client:
        client.get("/admin/memories")  # connection ready before the race starts
        # 8 choices × 1,000 tokens: far longer than the DELETE takes to arrive, however loaded the machine
        stream = run_streams([Stream(admin_server, "brief", max_tokens=1000, n=8, temperature=1.0, seed=0)])[0]
        assert stream.started.wait(120)
        r = client.delete("/admin/memories/brief", params={"timeout": 0})
    stream.join(120)
    assert r.status_code == 200 and r.json()["drained"] is False, (r.json(), stream.error, len(stream.tokens))
    assert stream.error and "unloaded while this request ran" in stream.error
    assert len(stream.tokens) < 8 * 1000
    assert generate(admin_server, max_tokens=2).status_code == 200


def test_concurrent_loads_of_one_name(admin_server):
    with ThreadPoolExecutor(2) as pool:
        codes = sorted(pool.map(lambda _: admin(admin_server, "POST", body={"name": "twin", "path": "beta"}).status_code, range(2)))
    assert codes == [201, 409]
    assert admin(admin_server, "DELETE", "/admin/memories/twin").status_code == 200


def test_cli_client(admin_server):
    def cli(*args):
        env = {**os.environ, "MEMSERVE_ADMIN_TOKEN": TOKEN}
        return subprocess.run([sys.executable, "-m", "server.cli", "memory", *args, "--url", admin_server.url], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    r = cli("load", "cli-mem", "beta", "--memory-weight", "0.4")
    assert r.returncode == 0, r.stderr
    listed = json.loads(cli("list").stdout)
    assert any(m["name"] == "cli-mem" and m["memory_weight"] == 0.4 for m in listed["data"])
    assert cli("unload", "cli-mem").returncode == 0
    r = cli("unload", "cli-mem")
    assert r.returncode == 1 and "404" in r.stderr


def test_restart_restores_the_set_and_reports_broken_entries(admin_server, tiny, root, tmp_path_factory):
    shutil.copytree(tiny["beta"], root / "fragile")
    assert admin(admin_server, "POST", body={"name": "keep", "path": "alpha", "memory_weight": 0.7}).status_code == 201
    assert admin(admin_server, "POST", body={"name": "fragile", "path": "fragile"}).status_code == 201
    state = json.loads((root / "memserve-state.json").read_text())
    assert {m["name"] for m in state["memories"]} >= {"keep", "fragile"}
    admin_server.stop()
    (root / "fragile" / "model.safetensors").write_bytes(b"broken")
    again = start_admin_server(tiny, root, tmp_path_factory.mktemp("restart"))
    try:
        listing = admin(again, "GET").json()
        keep = next(m for m in listing["data"] if m["name"] == "keep")
        assert keep["memory_weight"] == 0.7
        assert "fragile" in listing["problems"]
        assert generate(again, "keep").status_code == 200
    finally:
        again.stop()
