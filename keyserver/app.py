"""The key server's ASGI app, built by :func:`create_app` from explicit settings.

    GET /v1/assets/{asset}/master.m3u8?token=…[&auth=cookie]   master playlist
    GET /v1/assets/{asset}/{rendition}.m3u8?token=…            variant playlist (tokenized mode)
    GET /v1/keys/{asset}/{version}/{index}                     the 16 key bytes; the token comes
                                                               as ?token=, a Bearer header, or
                                                               the cookie set in cookie mode
    GET /cdn/…                                                 embedded mode only: the origin
    GET /healthz

401: token missing, malformed, forged, expired or not yet valid. 403: a genuine token for
another asset, session or client address. 404: unknown asset, rendition or key. 410: revoked
asset, or a retired version's key after its grace period. 400: malformed path values.
429: too many key requests for one token or one client address.
"""

from __future__ import annotations

import hashlib
import mimetypes
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import structlog
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from pipeline.catalog import AssetState, Catalog
from pipeline.keys import KeyUnwrapError, KeyVault
from pipeline.layout import ASSET_ID_PATTERN, MAX_KEY_INDEX, VERSION_PATTERN
from pipeline.playlists import (
    AssetVersion,
    PublishedSegment,
    RenditionEntry,
    render_master,
    render_variant,
)
from pipeline.settings import Settings
from pipeline.storage import LocalStore, ObjectNotFound, Store, open_store
from pipeline.tokens import TokenClaims, TokenForbidden, TokenRejected, TokenVerifier, verifier_for

from .ratelimit import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from .state import STALE, VaultView
from .stats import KeyRequestStats

log = structlog.get_logger("hlsvault.keyserver")
audit = structlog.get_logger("hlsvault.audit")

PLAYLIST_TYPE = "application/vnd.apple.mpegurl"
NO_STORE = {"Cache-Control": "no-store"}
#: Cookie mode: the token travels in this cookie, scoped to one asset's key path.
COOKIE_NAME = "hlsvault_token"
SID_HEADER = "x-hlsvault-sid"
_RENDITION = re.compile(r"[A-Za-z0-9_-]{1,64}")
_INDEX = re.compile(r"(0|[1-9][0-9]{0,6})")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(
        {"error": message}, status_code=status, headers={**NO_STORE, **(headers or {})}
    )


def _request_token(request: Request, *, cookie: bool = False) -> str:
    token = request.query_params.get("token", "")
    if not token:
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            token = auth[7:].strip()
    if not token and cookie:
        token = request.cookies.get(COOKIE_NAME, "")
    return token


def _request_sid(request: Request) -> str | None:
    return request.query_params.get("sid") or request.headers.get(SID_HEADER) or None


def _client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


class KeyServer:
    """Route handlers over a cached view of the vault."""

    def __init__(
        self,
        settings: Settings,
        *,
        view: VaultView,
        verifier: TokenVerifier,
        limiter: RateLimiter,
        stats: KeyRequestStats,
    ) -> None:
        self.settings = settings
        self.view = view
        self.verifier = verifier
        self.limiter = limiter
        self.stats = stats

    def _authorise(
        self, request: Request, asset: str, *, cookie: bool = False
    ) -> TokenClaims | Response:
        try:
            return self.verifier.verify(
                _request_token(request, cookie=cookie),
                asset=asset,
                client_ip=_client_ip(request),
                sid=_request_sid(request),
            )
        except TokenForbidden as error:
            return _error(403, str(error))
        except TokenRejected as error:
            return _error(401, str(error))

    async def _state(self, asset: str) -> AssetState | None:
        state = self.view.fresh_state(asset)
        if state is STALE:
            # A vault read (file or S3) blocks: off the event loop, on the thread pool.
            return await run_in_threadpool(self.view.state, asset)
        return state if isinstance(state, AssetState) else None

    async def _published(self, asset: str) -> tuple[AssetState, AssetVersion] | Response:
        state = await self._state(asset)
        if state is None or state.version is None:
            return _error(404, "unknown asset")
        if state.revoked:
            return _error(410, "asset revoked")
        described = await run_in_threadpool(self.view.version, asset, state.version)
        if described is None:
            return _error(404, "unknown asset")
        return state, described

    def _suffix(self, request: Request, token: str) -> str:
        """The query string a playlist passes on to the URIs it names."""
        suffix = f"?token={quote(token, safe='')}" if token else ""
        sid = _request_sid(request)
        if sid:
            suffix += f"{'&' if suffix else '?'}sid={quote(sid, safe='')}"
        return suffix

    async def _playlist_access(
        self, request: Request, asset: str
    ) -> tuple[TokenClaims, AssetVersion] | Response:
        """The viewer's claims and the asset's current version, or the refusal to send."""
        claims = self._authorise(request, asset)
        if isinstance(claims, Response):
            return claims
        published = await self._published(asset)
        if isinstance(published, Response):
            return published
        return claims, published[1]

    async def master(self, request: Request) -> Response:
        asset = request.path_params["asset"]
        if not ASSET_ID_PATTERN.fullmatch(asset):
            return _error(400, "malformed asset id")
        access = await self._playlist_access(request, asset)
        if isinstance(access, Response):
            return access
        claims, described = access
        cookie_mode = request.query_params.get("auth") == "cookie"
        token = _request_token(request)
        base = self.settings.public_url
        if cookie_mode:
            cdn = self.settings.cdn_url

            def variant_uri(rendition: RenditionEntry) -> str:
                return f"{cdn}/assets/{asset}/{described.version}/{rendition.name}.m3u8"
        else:
            suffix = self._suffix(request, token)

            def variant_uri(rendition: RenditionEntry) -> str:
                return f"{base}/v1/assets/{asset}/{rendition.name}.m3u8{suffix}"

        body = render_master(described, variant_uri=variant_uri)
        response = PlainTextResponse(body, media_type=PLAYLIST_TYPE, headers=NO_STORE)
        if cookie_mode:
            response.set_cookie(
                COOKIE_NAME,
                token,
                max_age=max(1, claims.expires_at - int(time.time())),
                # The key path as the browser sees it, under any prefix of the public URL.
                path=f"{urlsplit(self.settings.public_url).path.rstrip('/')}/v1/keys/{asset}/",
                secure=True,
                httponly=True,
                samesite="none",
            )
        return response

    async def variant(self, request: Request) -> Response:
        asset = request.path_params["asset"]
        name = request.path_params["rendition"]
        if not ASSET_ID_PATTERN.fullmatch(asset) or not _RENDITION.fullmatch(name):
            return _error(400, "malformed asset id or rendition")
        access = await self._playlist_access(request, asset)
        if isinstance(access, Response):
            return access
        _, described = access
        rendition = described.rendition(name)
        if rendition is None:
            return _error(404, "unknown rendition")
        suffix = self._suffix(request, _request_token(request))
        cdn = self.settings.cdn_url
        version = described.version
        keys_base = f"{self.settings.public_url}/v1/keys/{asset}/{version}"

        def segment_uri(segment: PublishedSegment) -> str:
            return f"{cdn}/assets/{asset}/{version}/{name}/{segment.name}"

        def key_uri(index: int) -> str:
            return f"{keys_base}/{index}{suffix}"

        body = render_variant(described, rendition, segment_uri=segment_uri, key_uri=key_uri)
        return PlainTextResponse(body, media_type=PLAYLIST_TYPE, headers=NO_STORE)

    async def _limited(self, request: Request, token: str) -> Response | None:
        ip = _client_ip(request) or "unknown"
        wait = await self.limiter.hit(f"ip:{ip}", self.settings.rate_limit_ip_per_min)
        if wait is None and token:
            # PyJWT accepts a '='-padded signature as the same token: count the canonical form,
            # or padding would buy a fresh allowance.
            head, dot, signature = token.rpartition(".")
            canonical = f"{head}{dot}{signature.rstrip('=')}" if dot else token
            digest = hashlib.sha256(canonical.encode()).hexdigest()[:24]
            wait = await self.limiter.hit(f"token:{digest}", self.settings.rate_limit_token_per_min)
        if wait is None:
            return None
        return _error(429, "too many key requests", {"Retry-After": str(int(wait + 0.999))})

    async def key(self, request: Request) -> Response:
        asset = request.path_params["asset"]
        version = request.path_params["version"]
        raw_index = request.path_params["index"]
        ip = _client_ip(request)
        if (
            not ASSET_ID_PATTERN.fullmatch(asset)
            or not VERSION_PATTERN.fullmatch(version)
            or not _INDEX.fullmatch(raw_index)
            or int(raw_index) > MAX_KEY_INDEX
        ):
            await self._audit(asset[:128], None, None, ip, "malformed path")
            return _error(400, "malformed key path")
        index = int(raw_index)
        key_id = f"{version}/{index}"
        token = _request_token(request, cookie=True)
        limited = await self._limited(request, token)
        if limited is not None:
            await self._audit(asset, key_id, None, ip, "rate limited")
            return limited
        claims = self._authorise(request, asset, cookie=True)
        if isinstance(claims, Response):
            await self._audit(asset, key_id, None, ip, f"denied {claims.status_code}")
            return claims
        state = await self._state(asset)
        outcome, response = await self._key_response(state, asset, version, index)
        await self._audit(asset, key_id, claims.sid, ip, outcome)
        return response

    async def _audit(
        self, asset: str, key_id: str | None, sid: str | None, ip: str | None, outcome: str
    ) -> None:
        """One audit line per key request, and its outcome counted for the ops metrics."""
        audit.info(
            "key request", asset=asset, key_id=key_id, sid=sid, client_ip=ip, outcome=outcome
        )
        await self.stats.count(outcome)

    async def _key_response(
        self, state: AssetState | None, asset: str, version: str, index: int
    ) -> tuple[str, Response]:
        if state is None:
            return "unknown asset", _error(404, "unknown key")
        if not state.key_servable(version):
            self.view.forget_keys(asset, version)
            if state.revoked or version in state.retired:
                return "gone", _error(410, "key withdrawn: the asset was revoked or re-keyed")
            known = await run_in_threadpool(self.view.version, asset, version)
            if known is None:
                return "unknown key", _error(404, "unknown key")
            return "gone", _error(410, "key withdrawn: the version was replaced")
        key = self.view.cached_key(asset, version, index)
        if key is None:
            try:
                key = await run_in_threadpool(self.view.key, asset, version, index)
            except ObjectNotFound:
                return "unknown key", _error(404, "unknown key")
            except KeyUnwrapError:
                log.error(
                    "wrapped key does not authenticate", asset=asset, key_id=f"{version}/{index}"
                )
                return "unwrap failed", _error(500, "key unavailable")
        return "served", Response(key, media_type="application/octet-stream", headers=NO_STORE)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})


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


#: Paths whose every request already writes an audit line: no second, access-log line.
AUDITED_PREFIXES = ("/v1/keys/",)


class AccessLog:
    """One structured line per request; the query string (which holds tokens) is never logged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(AUDITED_PREFIXES):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            log.info(
                "request",
                method=scope["method"],
                path=scope["path"],
                status=status,
                ms=round((time.perf_counter() - started) * 1000, 2),
            )


def create_app(
    settings: Settings,
    *,
    vault: Store | None = None,
    origin: Store | None = None,
    limiter: RateLimiter | None = None,
) -> Starlette:
    """Build the key server for ``settings``; stores and the rate limiter may be passed in."""
    vault = vault if vault is not None else open_store(settings.vault)
    if limiter is None:
        limiter = (
            RedisRateLimiter(settings.redis_url) if settings.redis_url else MemoryRateLimiter()
        )
    server = KeyServer(
        settings,
        view=VaultView(Catalog(vault), KeyVault(vault, settings.master_key)),
        verifier=verifier_for(settings),
        limiter=limiter,
        stats=KeyRequestStats(settings.redis_url),
    )
    routes: list[Route | Mount] = [
        Route("/healthz", server.healthz),
        Route("/v1/assets/{asset}/master.m3u8", server.master),
        Route("/v1/assets/{asset}/{rendition}.m3u8", server.variant),
        Route("/v1/keys/{asset}/{version}/{index}", server.key),
    ]
    if settings.embedded:
        origin = origin if origin is not None else open_store(settings.origin)
        if isinstance(origin, LocalStore):
            mimetypes.add_type("video/mp2t", ".ts")
            mimetypes.add_type(PLAYLIST_TYPE, ".m3u8")
            Path(origin.root).mkdir(parents=True, exist_ok=True)
            routes.append(Mount("/cdn", app=CdnHeaders(StaticFiles(directory=origin.root))))
    middleware = [Middleware(AccessLog)]
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_credentials=True,
                allow_methods=["GET", "HEAD"],
                allow_headers=["Authorization", "Range", "X-Hlsvault-Sid"],
                expose_headers=["Content-Length", "Content-Range", "Retry-After"],
                max_age=600,
            )
        )
    return Starlette(routes=routes, middleware=middleware)
