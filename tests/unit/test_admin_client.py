"""``memserve memory load|unload|list`` explains refusals a user can fix: admin API off, token missing or wrong."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from server.cli import main

NOT_FOUND = (404, {"detail": "Not Found"})  # what a server without admin routes answers
TOKEN = "s3cret"


def _server(routes: dict[tuple[str, str], tuple[int, dict]], token: str | None = None):
    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            if token is not None and self.headers.get("authorization") != f"Bearer {token}":
                status, body = 401, {"error": {"message": "admin token missing or wrong", "type": "AuthenticationError", "param": None, "code": 401}}
            else:
                status, body = routes.get((self.command, self.path), NOT_FOUND)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _answer

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


@pytest.fixture
def serve(monkeypatch):
    monkeypatch.delenv("MEMSERVE_ADMIN_TOKEN", raising=False)
    started = []

    def start(routes=None, token=None):
        httpd, url = _server(routes or {}, token)
        started.append(httpd)
        return url

    yield start
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("command", [["list"], ["unload", "law"], ["load", "law", "law-v2"]])
def test_admin_api_off_is_named_with_the_flags_that_turn_it_on(serve, capsys, command):
    url = serve()
    assert main(["memory", *command, "--url", url]) == 1
    err = capsys.readouterr().err
    assert "error 404: the admin API is off on " + url in err
    assert "--admin-token" in err and "MEMSERVE_ADMIN_TOKEN" in err and "--admin-insecure-local" in err


def test_unknown_memory_on_a_server_with_admin_keeps_the_servers_message(serve, capsys):
    gone = (404, {"error": {"message": "memory 'law' is not loaded", "type": "NotFoundError", "param": "name", "code": 404}})
    url = serve({("GET", "/admin/memories"): (200, {"data": [], "problems": {}}), ("DELETE", "/admin/memories/law"): gone})
    assert main(["memory", "unload", "law", "--url", url]) == 1
    err = capsys.readouterr().err
    assert "error 404: memory 'law' is not loaded" in err
    assert "admin API is off" not in err


def test_missing_token_says_how_to_pass_one(serve, capsys):
    url = serve(token=TOKEN)
    assert main(["memory", "list", "--url", url]) == 1
    err = capsys.readouterr().err
    assert "error 401:" in err and "requires an admin token" in err and "--token" in err and "MEMSERVE_ADMIN_TOKEN" in err


def test_wrong_token_says_it_is_not_the_servers(serve, capsys):
    url = serve(token=TOKEN)
    assert main(["memory", "list", "--url", url, "--token", "wrong"]) == 1
    err = capsys.readouterr().err
    assert "error 401:" in err and "refused the admin token" in err


def test_right_token_lists(serve, capsys):
    listing = {"data": [], "problems": {}}
    url = serve({("GET", "/admin/memories"): (200, listing)}, token=TOKEN)
    assert main(["memory", "list", "--url", url, "--token", TOKEN]) == 0
    assert json.loads(capsys.readouterr().out) == listing
