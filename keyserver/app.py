"""The key server's ASGI app, built by :func:`create_app` from explicit settings.

    GET /v1/assets/{asset}/master.m3u8?token=…[&auth=cookie]   master playlist
    GET /v1/assets/{asset}/{rendition}.m3u8?token=…            variant playlist (tokenized mode);
                                                               ``iframes`` is trick play's
                                                               I-frame playlist
    GET /v1/assets/{asset}/thumbnails.vtt?token=…[&auth=cookie] trick play's thumbnail track
                                                               (WebVTT), as a variant playlist
    GET /v1/assets/{asset}/{rendition}.m3u8?auth=cookie        variant playlist of cookie mode,
                                                               when the CDN's static one names
                                                               another public URL; the token
                                                               comes as the cookie
    GET /v1/keys/{asset}/{version}/{index}                     the 16 key bytes; the token comes
                                                               as ?token=, a Bearer header, or
                                                               the cookie set in cookie mode
    GET /v1/downloads/{asset}?token=…                          302 to a short-lived signed URL
                                                               of the current version's MP4
                                                               (keyserver/downloads.py)
    GET /v1/offline/{asset}?token=…                            an offline token's bundle: the
                                                               version's variant playlists and
                                                               keys as JSON (pipeline/offline.py)
    GET /cdn/downloads/{asset}/{version}/{asset}.mp4?expires=…&signature=…
    GET /cdn/thumbnails/{asset}/{version}/sheet_000.jpg?expires=…&signature=…
                                                               embedded mode only: a download
                                                               or a thumbnail sheet, checked
                                                               against its signature
    GET /cdn/…                                                 embedded mode only: the origin
                                                               (never downloads/, thumbnails/)
    GET /healthz                                               {"status": "ok", "state_bus": …,
                                                                "state_changes_heard": N,
                                                                "cdn_signing": "on"|"off"}

With HLSVAULT_CLOUDFRONT_KEY_PAIR_ID and HLSVAULT_CLOUDFRONT_PRIVATE_KEY, tokenized variant
playlists sign every segment URI with one CloudFront custom policy (the rendition's segments,
until the token's exp capped by HLSVAULT_CDN_SIGNATURE_TTL, from the token's address when it is
bound to one), and cookie mode's master also sets the three CloudFront cookies for the asset.

401: token missing, malformed, forged, expired or not yet valid. 403: a genuine token for
another asset or client address, or bound to a session the request does not present; an
ordinary token asking for an offline bundle; an embedded download link unsigned or expired.
404: unknown asset, rendition, key, path or /cdn/ file; a version without a download or
without thumbnails. 405: a
method other than GET or HEAD. 410: revoked asset, or a retired version's key after its grace
period. 400: malformed path values. 429: too many key, download or offline requests for one
token or one client address. 503: the vault could not be read; no way to sign a download URL.
Every error is ``{"error": "…"}`` with ``Cache-Control: no-store``.
"""

from __future__ import annotations

import asyncio
import mimetypes
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from pipeline import layout
from pipeline.catalog import Catalog
from pipeline.cdnsign import signer_for
from pipeline.errors import HlsvaultError
from pipeline.http import AccessLog
from pipeline.keys import KeyVault
from pipeline.settings import Settings
from pipeline.storage import LocalStore, Store, is_s3_url, open_store
from pipeline.tokens import SID_HEADER, verifier_for

from .auditlog import LineWriter
from .credentials import Credentials
from .downloads import DownloadLinks, EmbeddedDownloads, EmbeddedThumbnails, static_files
from .exports import Exports
from .fastpath import ViewerRoutes, failure_answer
from .ratelimit import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from .responses import PLAYLIST_TYPE, error, to_response
from .server import ACCESS_LOGGER, KeyServer, QueuedLogger
from .state import STATE_TTL_S, VaultView
from .statesync import StateListener
from .stats import KeyRequestStats

log = structlog.get_logger("hlsvault.keyserver")

#: Shutting down, the state listener gets this long to close its Redis connection.
STOP_TIMEOUT_S = 5.0
_HTTP_ERRORS = {404: "not found", 405: "method not allowed: use GET"}


class CdnHeaders:
    """Give the embedded /cdn/ the headers a CDN origin would: immutable segments, playlists
    briefly cacheable."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        playlist = scope.get("path", "").endswith(".m3u8")

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start" and message["status"] in (200, 206):
                headers = list(message.get("headers", []))
                value = (
                    b"public, max-age=300" if playlist else b"public, max-age=31536000, immutable"
                )
                headers.append((b"cache-control", value))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _error_answer(request: Request, exc: Exception) -> Response:
    """Every error that reaches the edge as our JSON error: Starlette's own refusals (no route,
    no /cdn/ file, a wrong method), an error of the tree (a vault that times out or refuses
    us), and anything else as a 500 whose body says nothing of the cause."""
    if isinstance(exc, HTTPException):
        message = _HTTP_ERRORS.get(exc.status_code, str(exc.detail))
        return error(exc.status_code, message, dict(exc.headers or {}))
    # Starlette's ServerErrorMiddleware logs the traceback of a 500 after this answer.
    return to_response(failure_answer(exc, request.url.path))


class ViewerEndpoints:
    """The viewer routes as Starlette endpoints: the same KeyServer calls as the fast path's."""

    def __init__(self, server: KeyServer) -> None:
        self.server = server

    async def master(self, request: Request) -> Response:
        params = request.path_params
        return to_response(await self.server.master(Credentials(request.scope), params["asset"]))

    async def variant(self, request: Request) -> Response:
        params = request.path_params
        return to_response(await self.server.variant(
            Credentials(request.scope), params["asset"], params["rendition"]))

    async def thumbnails(self, request: Request) -> Response:
        return to_response(await self.server.thumbnails(
            Credentials(request.scope), request.path_params["asset"]))

    async def key(self, request: Request) -> Response:
        params = request.path_params
        return to_response(await self.server.key(
            Credentials(request.scope), params["asset"], params["version"], params["index"]))


class KeyServerApp:
    """The key server as uvicorn or granian runs it: the fast path
    (:class:`~keyserver.fastpath.ViewerRoutes`) answers the viewer routes, and the access log
    and CORS around the Starlette app answer the rest. ``router`` is the Starlette app's,
    whose lifespan is the server's. ``viewer`` is the fast path (None when the app is built
    without it); its ``access_log``, ``cors`` and ``trusted`` are the layers it applies, for
    an edge that answers the viewer routes without ASGI (:class:`keyserver.rsgi.RsgiKeyServer`)
    to apply as they are."""

    def __init__(
        self, asgi: ASGIApp, starlette: Starlette, server: KeyServer, *,
        viewer: ViewerRoutes | None = None,
    ) -> None:
        self.asgi = asgi
        self.starlette = starlette
        self.router = starlette.router
        self.server = server
        self.viewer = viewer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        viewer = self.viewer
        if viewer is not None and (route := viewer.route(scope)) is not None:
            await viewer.answer(scope, route, send)
            return
        await self.asgi(scope, receive, send)


def _lifespan(listener: StateListener | None, lines: LineWriter, stats: KeyRequestStats) -> Any:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        lines.start()
        tasks = {asyncio.create_task(stats.report_dropped(lines))}
        if listener is not None:
            tasks.add(asyncio.create_task(listener.run()))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
            # What is still queued is written before the process goes, and its drops counted.
            await asyncio.to_thread(lines.close)
            await stats.publish_dropped(lines.dropped)

    return lifespan


def create_app(
    settings: Settings,
    *,
    vault: Store | None = None,
    origin: Store | None = None,
    limiter: RateLimiter | None = None,
    state_ttl_s: float = STATE_TTL_S,
    lines: LineWriter | None = None,
    fast_path: bool = True,
    forwarded_allow_ips: str | None = None,
) -> KeyServerApp:
    """Build the key server for ``settings``; stores, the rate limiter and the log line writer
    may be passed in. With ``settings.redis_url``, the app listens to the state bus while it
    runs (lifespan), and ``state_ttl_s`` bounds staleness only when an announcement is lost.
    ``fast_path=False`` leaves the viewer routes to Starlette too (the tests compare both).
    With ``forwarded_allow_ips`` (uvicorn's FORWARDED_ALLOW_IPS syntax), the client address
    of a request from one of those peers is the one its X-Forwarded-For names (README "Behind
    a proxy"): the fast path reads it with the other headers, the rest of the app through
    uvicorn's ProxyHeadersMiddleware, both by uvicorn's rule."""
    vault = vault if vault is not None else open_store(settings.vault)
    if limiter is None:
        limiter = (
            RedisRateLimiter(settings.redis_url) if settings.redis_url else MemoryRateLimiter()
        )
    lines = lines if lines is not None else LineWriter(autostart=False)
    view = VaultView(Catalog(vault), KeyVault(vault, settings.master_key), ttl_s=state_ttl_s)
    listener = StateListener(settings.redis_url, view) if settings.redis_url else None
    signer = signer_for(settings)
    # The origin is opened where downloads are signed from it: embedded /cdn/, or S3 presigned
    # GETs when CloudFront does not sign them.
    if origin is None and (
        settings.embedded or (signer is None and is_s3_url(settings.origin))
    ):
        origin = open_store(settings.origin)
    links = DownloadLinks(settings, signer=signer, origin=origin)
    stats = KeyRequestStats(settings.redis_url)
    server = KeyServer(
        settings,
        view=view,
        verifier=verifier_for(settings),
        limiter=limiter,
        stats=stats,
        lines=lines,
        listener=listener,
        signer=signer,
        links=links,
    )
    exports = Exports(server)
    viewer = ViewerEndpoints(server)
    routes: list[Route | Mount] = [
        Route("/healthz", server.healthz),
        Route(layout.MASTER_ROUTE, viewer.master),
        Route(layout.THUMBNAILS_ROUTE, viewer.thumbnails),
        Route(layout.VARIANT_ROUTE, viewer.variant),
        Route(layout.KEY_ROUTE, viewer.key),
        Route(layout.DOWNLOAD_ROUTE, exports.download),
        Route(layout.OFFLINE_ROUTE, exports.offline),
    ]
    if settings.embedded and isinstance(origin, LocalStore):
        for suffix in (".ts", ".m4s", ".mp4", ".jpg"):
            mimetypes.add_type(layout.segment_content_type(f"x{suffix}"), suffix)
        mimetypes.add_type(PLAYLIST_TYPE, ".m3u8")
        Path(origin.root).mkdir(parents=True, exist_ok=True)
        routes.append(
            Route(layout.EMBEDDED_DOWNLOAD_ROUTE, EmbeddedDownloads(origin, links.embedded).serve)
        )
        routes.append(Route(layout.EMBEDDED_THUMBNAIL_ROUTE,
                            EmbeddedThumbnails(origin, links.embedded).serve))
        routes.append(Mount("/cdn", app=CdnHeaders(static_files(origin.root))))
    # The access log and CORS wrap the whole server, fast path included, in this order.
    middleware = [
        # Key, download and offline requests each write an audit line of their own.
        Middleware(AccessLog, logger=QueuedLogger(lines, ACCESS_LOGGER),
                   skip_prefixes=layout.AUDITED_PATH_PREFIXES),
    ]
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_credentials=True,
                allow_methods=["GET", "HEAD"],
                allow_headers=["Authorization", "Range", SID_HEADER],
                expose_headers=["Content-Length", "Content-Range", "Retry-After"],
                max_age=600,
            )
        )
    starlette = Starlette(
        routes=routes,
        middleware=[] if fast_path else middleware,
        exception_handlers=dict.fromkeys((HTTPException, HlsvaultError, Exception), _error_answer),
        lifespan=_lifespan(listener, lines, stats),
    )
    proxied: ASGIApp = starlette
    trusted = None
    if forwarded_allow_ips is not None:
        proxy_layer = ProxyHeadersMiddleware(starlette, trusted_hosts=forwarded_allow_ips)  # type: ignore[arg-type]  # uvicorn types ASGI scopes more narrowly than Starlette
        proxied, trusted = proxy_layer, proxy_layer.trusted_hosts  # type: ignore[assignment]
    if not fast_path:
        return KeyServerApp(proxied, starlette, server)
    # The rest of the app runs under the access log and CORS, in this order; the fast path
    # applies the same instances itself.
    asgi: ASGIApp = proxied
    access_log = cors = None
    for layer in reversed(middleware):
        asgi = layer.cls(asgi, *layer.args, **layer.kwargs)
        if isinstance(asgi, AccessLog):
            access_log = asgi
        elif isinstance(asgi, CORSMiddleware):
            cors = asgi
    assert access_log is not None  # noqa: S101 - the first layer of the list above
    fast = ViewerRoutes(server, access_log=access_log, cors=cors, trusted=trusted)
    return KeyServerApp(asgi, starlette, server, viewer=fast)
