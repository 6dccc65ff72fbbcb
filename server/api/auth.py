"""Bearer-token checks shared by the inference routes (--api-key) and the admin routes."""

from __future__ import annotations

import hmac

from fastapi import Request

from server.errors import Unauthorized


def require_bearer(raw_request: Request, token: str | None, refusal: str) -> None:
    """Constant-time check of ``Authorization: Bearer <token>``; no token configured means open."""
    if token is None:
        return
    given = raw_request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise Unauthorized(refusal)
