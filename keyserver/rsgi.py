"""The key server on granian's RSGI interface (`hlsvault serve --server granian-rsgi`).

RSGI hands the app a scope object and a protocol object whose ``response_bytes`` sends a
whole response in one call, where ASGI builds a scope dict of byte pairs and two message
dicts per response and awaits the server twice. :class:`RsgiKeyServer` answers the three
viewer routes that way, from the same :class:`~keyserver.server.KeyServer` calls and routing
rule as the ASGI fast path (:class:`keyserver.fastpath.ViewerRouter`), under the same layers
applied as they are: the access log's line (:meth:`pipeline.http.AccessLog.line`), the CORS
headers of Starlette's own middleware, trusted proxies' X-Forwarded-For
(:meth:`~keyserver.credentials.Credentials.trust_proxies`). Every other request (other
methods and paths, preflights, downloads, /cdn/ files with Range) goes through
:class:`AsgiBridge` to the ASGI app unchanged. The app's lifespan (log writer thread, state
bus listener) runs from ``__rsgi_init__`` to ``__rsgi_del__``, as granian calls them.

One difference granian makes, not this module: a request header value that is not visible
ASCII reaches an RSGI app as no value at all (ASGI passes its bytes). On the viewer routes
such a request can only get another 4xx message (``tests/test_keyserver_rsgi.py``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .app import KeyServerApp
from .credentials import Credentials
from .fastpath import answer_for, cors_headers
from .responses import KEY_HEADERS

#: Text headers of every 16-byte key answer, converted once.
_KEY_TEXT_HEADERS = [(name.decode("latin-1"), value.decode("latin-1"))
                     for name, value in KEY_HEADERS]


def text_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """ASGI's byte pairs as the text pairs RSGI takes (latin-1 both ways, so nothing is lost)."""
    if headers is KEY_HEADERS:
        return _KEY_TEXT_HEADERS
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]


class AsgiBridge:
    """An ASGI app served over RSGI: the scope granian's ASGI interface would build (path
    decoded, headers as latin-1 bytes, ``http.response.pathsend``), the request body in one
    receive, and the response sent whole, streamed or as a file."""

    def __init__(self, app: Any) -> None:
        self.app = app

    @staticmethod
    def scope(scope: Any) -> dict[str, Any]:
        client_host, _, client_port = scope.client.rpartition(":")
        server_host, _, server_port = scope.server.rpartition(":")
        return {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": scope.http_version, "scheme": scope.scheme,
            "method": scope.method, "path": scope.path, "root_path": "",
            "query_string": scope.query_string.encode("latin-1"),
            "headers": [(name.encode("latin-1"), value.encode("latin-1"))
                        for name, value in scope.headers.items()],
            "client": (client_host.strip("[]"), int(client_port or 0)),
            "server": (server_host.strip("[]"), int(server_port or 0)),
            "extensions": {"http.response.pathsend": {}},
            "state": {},
        }

    async def __call__(self, scope: Any, proto: Any) -> None:
        status, headers = 500, []
        stream: Any = None
        received = False

        async def receive() -> dict[str, Any]:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": await proto(), "more_body": False}
            await proto.client_disconnect()
            return {"type": "http.disconnect"}

        async def send(message: Any) -> None:
            nonlocal status, headers, stream
            kind = message["type"]
            if kind == "http.response.start":
                status, headers = message["status"], text_headers(message.get("headers", []))
            elif kind == "http.response.body":
                body, more = message.get("body", b""), message.get("more_body", False)
                if stream is None:
                    if not more:
                        proto.response_bytes(status, headers, body)
                        return
                    stream = proto.response_stream(status, headers)
                if body:
                    try:
                        await stream.send_bytes(body)
                    except RuntimeError as closed:  # the client went: ASGI 2.4 says OSError
                        raise OSError("client disconnected") from closed
            elif kind == "http.response.pathsend":
                proto.response_file(status, headers, message["path"])

        await self.app(self.scope(scope), receive, send)


class RsgiKeyServer:
    """``app``'s viewer routes answered over RSGI, everything else bridged to ``app``."""

    def __init__(self, app: KeyServerApp) -> None:
        self.app = app
        self.server = app.server
        self.viewer = app.viewer
        self.bridge = AsgiBridge(app)
        self._lifespan: Any = None

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._lifespan = self.app.router.lifespan_context(self.app.starlette)
        loop.run_until_complete(self._lifespan.__aenter__())

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._lifespan is not None:
            loop.run_until_complete(self._lifespan.__aexit__(None, None, None))
            self._lifespan = None

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        if scope.proto != "http":  # granian runs with websockets off: not expected
            return
        path: str = scope.path
        viewer = self.viewer  # None when the app was built without the fast path: ASGI
        route = viewer.router.route(path) if viewer is not None and scope.method == "GET" else None
        if viewer is None or route is None:
            await self.bridge(scope, proto)
            return
        access_log = viewer.access_log
        logged = not path.startswith(access_log.skip_prefixes)  # else audited: no clock read
        started = time.perf_counter() if logged else 0.0
        creds = Credentials.from_rsgi(scope)
        if viewer.trusted is not None:
            creds.trust_proxies(viewer.trusted)
        answer, failure = await answer_for(route, creds, path)
        headers = answer.headers
        if viewer.cors is not None:
            headers = await cors_headers(viewer.cors, answer, scope.headers.get("origin"))
        proto.response_bytes(answer.status, text_headers(headers), answer.body)
        if logged:
            access_log.line("GET", path, answer.status, started)
        if failure is not None:
            raise failure
