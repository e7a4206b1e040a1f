"""A bare ASGI app that answers every request with 16 bytes: the ceiling of an ASGI server on
one core, which ``bench_keyserver.py --bare`` loads beside the key server and nginx."""

from __future__ import annotations

from typing import Any

BODY = bytes(range(16))
HEADERS = [(b"content-type", b"application/octet-stream"), (b"content-length", b"16")]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
