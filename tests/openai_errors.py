"""The OpenAI error shape every refusal must have, checked the same way against a real server and the in-process app."""

from __future__ import annotations

import httpx


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    """``{"error": {"message", "type", "param", "code"}}`` with ``code`` the status; returns the error object."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["code"] == status and err["message"]
    if param is not None:
        assert err["param"] == param
    return err
