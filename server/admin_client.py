"""``memserve memory load|unload|list``: the admin API from a terminal."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import httpx


def add_admin_client_commands(memory_commands) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=os.environ.get("MEMSERVE_URL", "http://127.0.0.1:8000"), help="server URL (default: $MEMSERVE_URL or %(default)s)")
        p.add_argument("--token", default=os.environ.get("MEMSERVE_ADMIN_TOKEN"), help="admin token (default: $MEMSERVE_ADMIN_TOKEN)")

    load = memory_commands.add_parser(
        "load", help="load (or replace) a memory on a running server",
        description="Load an artifact directory, or (--prompts) have the server's generator make a lora memory from unlabeled texts and load it.",
    )  # fmt: skip
    load.add_argument("name", help="name clients will select the memory by")
    load.add_argument("path", nargs="?", help="artifact directory, relative to or inside the server's --memory-root (or give --prompts)")
    load.add_argument(
        "--prompts", metavar="FILE|DIR", default=None,
        help="instead of a path: unlabeled texts of the domain (a file with one per line, JSONL with 'text', or a folder of .txt files); "
        "the server (started with --generator) generates a lora memory from them (default: none, PATH is loaded)",
    )  # fmt: skip
    load.add_argument("--description", default="", help="with --prompts: the generated memory's description (default: one naming the generator and prompt count)")
    load.add_argument("--memory-weight", type=float, default=None, help="λ for a decoder memory (default: the memory's own)")
    load.add_argument("--replace", action="store_true", help="swap a loaded memory of the same name (default: refuse with 409)")
    common(load)
    load.set_defaults(func=_load)

    unload = memory_commands.add_parser("unload", help="unload a memory from a running server")
    unload.add_argument("name", help="name of the loaded memory")
    unload.add_argument("--timeout", type=float, default=None, help="seconds to wait for running requests (default: the server's)")
    common(unload)
    unload.set_defaults(func=lambda o: _call(o, "DELETE", f"/admin/memories/{o.name}" + (f"?timeout={o.timeout}" if o.timeout is not None else ""), None))

    listing = memory_commands.add_parser("list", help="list the memories loaded on a running server")
    common(listing)
    listing.set_defaults(func=lambda o: _call(o, "GET", "/admin/memories", None))


def _load(opts: argparse.Namespace) -> int:
    if (opts.path is None) == (opts.prompts is None):
        print("give exactly one of PATH and --prompts", file=sys.stderr)
        return 2
    body = {"name": opts.name, "memory_weight": opts.memory_weight, "replace": opts.replace}
    if opts.prompts is None:
        return _call(opts, "POST", "/admin/memories", {**body, "path": opts.path})
    from memories.lora.generate import PromptError, read_prompts

    try:
        prompts = read_prompts(opts.prompts)
    except PromptError as e:
        print(e, file=sys.stderr)
        return 2
    return _call(opts, "POST", "/admin/memories", {**body, "prompts": prompts, "description": opts.description})


def _call(opts: argparse.Namespace, method: str, path: str, body: dict | None) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request repeats what we print
    headers = {"Authorization": f"Bearer {opts.token}"} if opts.token else {}
    url = opts.url.rstrip("/")
    try:
        r = httpx.request(method, url + path, json=body, headers=headers, timeout=600)
        if r.status_code == 404 and not (method == "GET" and path == "/admin/memories"):
            # an unload's 404 may only mean "no such memory"; the listing tells which
            admin_off = httpx.get(url + "/admin/memories", headers=headers, timeout=60).status_code == 404
        else:
            admin_off = r.status_code == 404
    except httpx.HTTPError as e:
        print(f"error: cannot reach {opts.url}: {e}", file=sys.stderr)
        return 1
    try:
        data = r.json()
    except ValueError:
        data = {"error": {"message": r.text}}
    if r.is_error:
        message = data.get("error", {}).get("message", data) if isinstance(data, dict) else data
        print(f"error {r.status_code}: {_hint(r.status_code, admin_off, opts) or message}", file=sys.stderr)
        return 1
    if method == "GET" and sys.stdout.isatty():
        for m in data["data"]:
            mix = f"λ={m['memory_weight']:.2f} T={m['temperature']:.2f}" if m.get("memory_weight") is not None else f"rank={m.get('rank')}"
            print(f"{m['name']:<20} {m.get('kind', 'decoder'):<8} {mix} params={m['num_parameters']:,} bytes={m['device_bytes']:,} requests={m['requests']} sha256={m['content_sha256'][:12]}")
        for name, why in data.get("problems", {}).items():
            print(f"{name:<20} NOT LOADED: {why}")
    else:
        print(json.dumps(data, indent=2))
    return 0


def _hint(status: int, admin_off: bool, opts: argparse.Namespace) -> str | None:
    """What to do about a refusal that the server's own message does not explain."""
    if admin_off:
        return (
            f"the admin API is off on {opts.url}: start that server with --admin-token TOKEN "
            "(or MEMSERVE_ADMIN_TOKEN), or with --admin-insecure-local if it listens on loopback only"
        )
    if status == 401 and not opts.token:
        return f"{opts.url} requires an admin token: pass --token TOKEN or set MEMSERVE_ADMIN_TOKEN"
    if status == 401:
        return f"{opts.url} refused the admin token: it is not the one the server was started with (--admin-token / MEMSERVE_ADMIN_TOKEN)"
    return None
