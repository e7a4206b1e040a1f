"""Where a request's credentials come from: the token (``?token=``, an ``Authorization: Bearer``
header, or cookie mode's cookie), the session it presents (``?sid=`` or ``X-Hlsvault-Sid``) and
the client address. Nothing here checks them; :mod:`pipeline.tokens` does."""

from __future__ import annotations

import hashlib

from starlette.requests import Request

from pipeline.tokens import SID_HEADER

#: Cookie mode: the token travels in this cookie, scoped to one asset's key (and, when the key
#: server serves its variants, playlist) path.
COOKIE_NAME = "hlsvault_token"


def request_token(request: Request, *, cookie: bool = False) -> str:
    """The token of ``request``, in the order the docs promise: query, Bearer, cookie."""
    token = request.query_params.get("token", "")
    if not token:
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            token = auth[7:].strip()
    if not token and cookie:
        token = request.cookies.get(COOKIE_NAME, "")
    return token


def request_sid(request: Request) -> str | None:
    return request.query_params.get("sid") or request.headers.get(SID_HEADER) or None


def client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


def token_bucket(token: str) -> str:
    """The rate-limit bucket of a (verified) token. PyJWT accepts a '='-padded signature as the
    same token: the canonical form is counted, or padding would buy a fresh allowance. Hashed,
    so that no limiter (or Redis key) ever holds a token."""
    head, dot, signature = token.rpartition(".")
    canonical = f"{head}{dot}{signature.rstrip('=')}" if dot else token
    return "token:" + hashlib.sha256(canonical.encode()).hexdigest()[:24]


def ip_bucket(ip: str | None) -> str:
    return f"ip:{ip or 'unknown'}"
