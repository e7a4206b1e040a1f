"""The fast path: a plain ASGI callable that answers the three viewer routes (master playlist,
variant playlist, key) itself and hands everything else to the Starlette app.

A viewer request costs what the checks cost: no Request object, router, middleware stack or
Response object on the way, and no log line formatted (the access log and the audit line are
queued). It calls the same :class:`~keyserver.server.KeyServer` methods the Starlette routes
call, and sends the :class:`~keyserver.responses.Answer` they return unchanged; its routes are
compiled from the same templates, and whatever it does not answer itself (another method, a
path that matches no viewer route, a ``root_path``, a lifespan or websocket scope) goes to the
Starlette app, so both give the same answer to every request (``tests/test_keyserver_fastpath``
runs one request matrix through both and compares).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog
from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from pipeline import layout
from pipeline.errors import HlsvaultError
from pipeline.http import status_for

from .credentials import Credentials
from .responses import Answer, error_answer
from .server import KeyServer

if TYPE_CHECKING:
    from uvicorn.middleware.proxy_headers import _TrustedHosts

log = structlog.get_logger("hlsvault.keyserver")

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


async def send_answer(send: Send, answer: Answer) -> None:
    # A fresh header list: CORS adds to the list it is given, and Answers may share theirs.
    await send({"type": "http.response.start", "status": answer.status,
                "headers": list(answer.headers)})
    await send({"type": "http.response.body", "body": answer.body})


#: A viewer route's handler and the path values it takes.
Route = tuple[Callable[..., Awaitable[Answer]], tuple[str, ...]]


def viewer_route(server: KeyServer, path: str) -> Route | None:
    """The viewer route ``path`` names (the :class:`KeyServer` method and its path values),
    or None for every other path: the fast path's one routing rule, under ASGI and RSGI."""
    for prefix, pattern, method in _VIEWER_ROUTES:
        if path.startswith(prefix) and (match := pattern.match(path)):
            return getattr(server, method), match.groups()
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


class ViewerRoutes:
    """The viewer routes of ``server``, in front of ``app`` (the rest of the key server).
    With ``trusted`` (FORWARDED_ALLOW_IPS), a viewer route's client address is the one a
    trusted proxy forwarded (:meth:`Credentials.trust_proxies`); ``app`` applies the same rule
    itself (uvicorn's ProxyHeadersMiddleware, see :func:`keyserver.app.create_app`)."""

    def __init__(
        self, server: KeyServer, app: ASGIApp, trusted: _TrustedHosts | None = None
    ) -> None:
        self.server = server
        self.app = app
        self.trusted = trusted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        route = viewer_route(self.server, path)
        if route is None:
            await self.app(scope, receive, send)
            return
        creds = Credentials(scope)
        if self.trusted is not None:
            creds.trust_proxies(self.trusted)
        answer, failure = await answer_for(route, creds, path)
        await send_answer(send, answer)
        if failure is not None:
            raise failure
