"""Calling the key server's ASGI app directly, with no HTTP client in between: for tests and
benchmarks that send very many requests, or send them from many client addresses (an HTTP
client's ASGI transport has one address for its whole life)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp

HOST = "keys.test"


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def get_scope(
    path: str, *, query: str = "", client_ip: str = "127.0.0.1",
    headers: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """The ASGI scope of one GET of ``path`` over https from ``client_ip``."""
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "https", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": query.encode(),
        "headers": [(b"host", HOST.encode())]
        + [(name.lower().encode(), value.encode()) for name, value in headers],
        "client": (client_ip, 50000), "server": (HOST, 443),
    }


async def no_body() -> dict[str, Any]:
    """An ASGI ``receive`` for a request without a body."""
    return {"type": "http.request", "body": b"", "more_body": False}


async def get(
    app: ASGIApp,
    path: str,
    *,
    query: str = "",
    client_ip: str = "127.0.0.1",
    headers: Sequence[tuple[str, str]] = (),
) -> Answer:
    """One GET of ``path`` over https from ``client_ip``; the whole answer."""
    scope = get_scope(path, query=query, client_ip=client_ip, headers=headers)
    status, body = 0, bytearray()
    answer_headers: dict[str, str] = {}

    async def send(message: Any) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            answer_headers.update((k.decode(), v.decode()) for k, v in message["headers"])
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))

    await app(scope, no_body, send)
    return Answer(status, answer_headers, bytes(body))
