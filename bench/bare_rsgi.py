"""The RSGI twin of ``bare_asgi.py``: 16 bytes for every request, no checks, one
``response_bytes`` call. ``bench_keyserver.py --bare`` loads it beside the key server, nginx
and the bare ASGI app: the ceiling of an app on granian's RSGI interface on one core."""

from __future__ import annotations

from typing import Any

from bare_asgi import BODY, HEADERS

TEXT_HEADERS = [(name.decode(), value.decode()) for name, value in HEADERS]


async def app(scope: Any, proto: Any) -> None:
    proto.response_bytes(200, TEXT_HEADERS, BODY)
