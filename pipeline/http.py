"""What the two HTTP edges (the key server and the ops app) share: the status code of every
error of the tree, and one access-log line per request.

Pure ASGI, no web framework: both apps wrap these in whatever they are built with.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import structlog

from .errors import (
    BadSpec,
    ConfigurationError,
    Conflict,
    Forbidden,
    HlsvaultError,
    InvalidSource,
    NotFound,
    PermanentError,
    StorageRefused,
    TooLarge,
    TransientError,
    Unauthenticated,
)

log = structlog.get_logger("hlsvault.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The HTTP status of each error class, most specific first.
STATUS_CODES: tuple[tuple[type[HlsvaultError], int], ...] = (
    (TooLarge, 413),
    (BadSpec, 400),
    (Unauthenticated, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (InvalidSource, 422),
    # Our store refused us: the caller did nothing wrong, and retrying will not help until an
    # operator fixes the policy.
    (StorageRefused, 503),
    (PermanentError, 422),
    (TransientError, 503),
    (ConfigurationError, 503),
)


def status_for(error: HlsvaultError) -> int:
    """The HTTP status code that tells a caller whose fault ``error`` is."""
    return next((code for kind, code in STATUS_CODES if isinstance(error, kind)), 500)


class AccessLog:
    """One structured line per request; the query string (which holds tokens) is never logged.
    Paths under ``skip_prefixes`` are left out (the key server audits each key request itself)."""

    def __init__(
        self, app: ASGIApp, *, logger: Any = None, skip_prefixes: tuple[str, ...] = ()
    ) -> None:
        self.app = app
        self.log = logger if logger is not None else log
        self.skip_prefixes = skip_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.skip_prefixes):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            self.line(scope["method"], scope["path"], status, started)

    def line(self, method: str, path: str, status: int, started: float) -> None:
        """The access line of one request that began at ``started`` (``time.perf_counter()``):
        what :meth:`__call__` writes, for an edge that answers without ASGI (RSGI)."""
        self.log.info(
            "request", method=method, path=path, status=status,
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
