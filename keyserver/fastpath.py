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

from typing import TYPE_CHECKING, Any

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

_MASTER = compile_path(layout.MASTER_ROUTE)[0]
_VARIANT = compile_path(layout.VARIANT_ROUTE)[0]
_KEY = compile_path(layout.KEY_ROUTE)[0]
_KEYS_PREFIX = layout.KEY_ROUTE.split("{", 1)[0]
_ASSETS_PREFIX = layout.MASTER_ROUTE.split("{", 1)[0]


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
        server = self.server
        route: Any
        if path.startswith(_KEYS_PREFIX) and (match := _KEY.match(path)):
            route, args = server.key, match.groups()
        elif path.startswith(_ASSETS_PREFIX) and (match := _MASTER.match(path)):
            route, args = server.master, (match.group(1),)
        elif path.startswith(_ASSETS_PREFIX) and (match := _VARIANT.match(path)):
            route, args = server.variant, match.groups()
        else:
            await self.app(scope, receive, send)
            return
        creds = Credentials(scope)
        if self.trusted is not None:
            creds.trust_proxies(self.trusted)
        call = route(creds, *args)
        try:
            answer = await call
        except Exception as exc:
            await send_answer(send, failure_answer(exc, path))
            if not isinstance(exc, HlsvaultError):
                raise  # as Starlette's ServerErrorMiddleware does: the server logs the traceback
            return
        await send_answer(send, answer)
