"""The fast path: the three viewer routes (master playlist, variant playlist, key) answered
in front of the key server's middleware and Starlette app, which answer everything else.

A viewer request costs what the checks cost: no Request object, router, middleware stack or
Response object on the way, and no log line formatted (the access log and the audit line are
queued); the access log's line and the CORS headers are those layers' own. It calls the same
:class:`~keyserver.server.KeyServer` methods the Starlette routes call, and sends the
:class:`~keyserver.responses.Answer` they return unchanged; its routes are compiled from the
same templates, and whatever it does not answer itself (another method, a path that matches
no viewer route, a ``root_path``, a lifespan or websocket scope) goes to the rest of the app,
so both give the same answer to every request (``tests/test_keyserver_fastpath`` runs one
request matrix through both and compares).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog
from starlette.datastructures import Headers
from starlette.routing import compile_path
from starlette.types import Scope, Send

from pipeline import layout
from pipeline.errors import HlsvaultError
from pipeline.http import AccessLog, status_for

from .credentials import Credentials
from .responses import Answer, error_answer
from .server import KeyServer

if TYPE_CHECKING:
    from starlette.middleware.cors import CORSMiddleware
    from uvicorn.middleware.proxy_headers import _TrustedHosts

log = structlog.get_logger("hlsvault.keyserver")
_NO_HEADERS = Headers(raw=[])

#: The viewer routes the fast path answers, in the order they are tried: the route's fixed
#: prefix (a cheap first test), its compiled pattern, and the KeyServer method that answers it
#: with the path values in order. A new viewer route is one more line here (and its Starlette
#: Route in keyserver.app, which the equivalence matrix holds it to).
_VIEWER_ROUTES = tuple(
    (template.split("{", 1)[0], compile_path(template)[0], method)
    for template, method in (
        (layout.KEY_ROUTE, "key"),
        (layout.MASTER_ROUTE, "master"),
        (layout.VARIANT_ROUTE, "variant"),
    )
)


def failure_answer(exc: Exception, path: str) -> Answer:
    """An error that escaped a route: one of the tree with its status (a vault that times out
    or refuses us), anything else a 500 whose body says nothing of the cause."""
    if isinstance(exc, HlsvaultError):
        status = status_for(exc)
        log.warning("request failed", path=path, status=status, error=str(exc))
        return error_answer(status, str(exc))
    return error_answer(500, "internal error")


#: A viewer route's handler and the path values it takes.
Route = tuple[Callable[..., Awaitable[Answer]], tuple[str, ...]]


#: Viewer paths whose route is remembered at most, and the longest one remembered (a route's
#: values are bounded: asset 128, version 64, index 7 characters), so the memo stays near 1 MB.
MAX_KNOWN_PATHS = 4096
MAX_KNOWN_PATH_CHARS = 256


class ViewerRouter:
    """The fast path's one routing rule, under ASGI and RSGI: the viewer route a path names
    (the :class:`KeyServer` method and its path values), or None for every other path. A
    player asks for the same few paths over and over: their routes are remembered."""

    def __init__(self, server: KeyServer) -> None:
        self.server = server
        self._known: dict[str, Route] = {}

    def route(self, path: str) -> Route | None:
        route = self._known.get(path)
        if route is not None:
            return route
        for prefix, pattern, method in _VIEWER_ROUTES:
            if path.startswith(prefix) and (match := pattern.match(path)):
                route = getattr(self.server, method), match.groups()
                if len(path) <= MAX_KNOWN_PATH_CHARS:
                    if len(self._known) >= MAX_KNOWN_PATHS:
                        self._known.clear()
                    self._known[path] = route
                return route
        return None


async def answer_for(
    route: Route, creds: Credentials, path: str
) -> tuple[Answer, Exception | None]:
    """The route's answer and, when it failed with anything but an error of the tree, the
    exception to raise once the 500 is sent (as Starlette's ServerErrorMiddleware does: the
    server logs the traceback)."""
    handler, args = route
    try:
        return await handler(creds, *args), None
    except Exception as exc:
        return failure_answer(exc, path), None if isinstance(exc, HlsvaultError) else exc


async def cors_headers(
    cors: CORSMiddleware, answer: Answer, origin: str | None
) -> list[tuple[bytes, bytes]]:
    """The answer's headers as Starlette's CORSMiddleware ``cors`` (the instance the rest of
    the app runs under) rewrites them for a GET with ``origin``."""
    message: dict[str, Any] = {"type": "http.response.start", "status": answer.status,
                               "headers": list(answer.headers)}
    request = _NO_HEADERS if origin is None else Headers(
        raw=[(b"origin", origin.encode("latin-1"))])

    async def keep(_: Any) -> None:
        return None

    await cors.send(message, keep, request)
    headers: list[tuple[bytes, bytes]] = message["headers"]
    return headers


class ViewerRoutes:
    """The viewer routes of ``server`` answered over ASGI in front of the rest of the key
    server, under its layers applied as they are: the access log's line
    (:meth:`pipeline.http.AccessLog.line`, ``access_log``), the CORS headers of Starlette's own
    middleware (``cors``, when configured) and, with ``trusted`` (FORWARDED_ALLOW_IPS), the
    client address a trusted proxy forwarded (:meth:`Credentials.trust_proxies`; the rest of
    the app applies the same rule with uvicorn's ProxyHeadersMiddleware, see
    :func:`keyserver.app.create_app`). :meth:`route` says whether a request is one of them;
    the caller sends every other request to the rest of the app."""

    def __init__(
        self, server: KeyServer, *, access_log: AccessLog, cors: CORSMiddleware | None = None,
        trusted: _TrustedHosts | None = None,
    ) -> None:
        self.server = server
        self.access_log = access_log
        self.cors = cors
        self.trusted = trusted
        self.router = ViewerRouter(server)

    def route(self, scope: Scope) -> Route | None:
        """The viewer route ``scope`` asks for, or None for a request the rest of the app
        answers (another method, a path that is no viewer route, a ``root_path``, a lifespan
        or websocket scope)."""
        if scope["type"] != "http" or scope["method"] != "GET" or scope.get("root_path"):
            return None
        return self.router.route(scope["path"])

    async def answer(self, scope: Scope, route: Route, send: Send) -> None:
        """Answer ``route`` for the request ``scope``, as the layers and the Starlette route
        would have: the access line written whatever happens (but for audited paths), an
        error outside the tree raised once its 500 is sent."""
        path: str = scope["path"]
        access_log = self.access_log
        # Audited paths (keys) get their audit line instead: no clock read for them.
        logged = not path.startswith(access_log.skip_prefixes)
        started = time.perf_counter() if logged else 0.0
        status = 500
        try:
            creds = Credentials(scope)
            if self.trusted is not None:
                creds.trust_proxies(self.trusted)
            handler, args = route
            try:
                answer = await handler(creds, *args)
                failure = None
            except Exception as exc:
                answer = failure_answer(exc, path)
                failure = None if isinstance(exc, HlsvaultError) else exc
            status = answer.status
            if self.cors is None:
                # A fresh list: Answers may share theirs (every key answer's is one list).
                headers = list(answer.headers)
            else:
                headers = await cors_headers(self.cors, answer, Headers(scope=scope).get("origin"))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": answer.body})
        finally:
            if logged:
                access_log.line("GET", path, status, started)
        if failure is not None:
            raise failure
